//! The filter's scheduling logic run in virtual time: the same pure functions the wasm filter
//! calls (`schedule::admit`, `outcome::finish`, `schedule::take_ready`, the estimates), fed by
//! a trace and a model of serial nodes like exo-sim's, with no Envoy and no sockets. A sweep
//! point takes milliseconds instead of minutes, so decision rules can be compared over many
//! seeds; the real sweep (`sweep`) remains what the numbers we publish come from.

use crate::trace::{Hardware, Req};
use exo_lb::logic::config::Config;
use exo_lb::logic::estimates::{Arrived, Estimates, Sample};
use exo_lb::logic::outcome::{finish, Ending};
use exo_lb::logic::schedule::{self, Admission, Arrival, Ready};
use exo_lb::logic::select::Route;
use exo_lb::logic::state::{model_key, ClusterState};
use serde_json::{json, Value};

/// How often the filter's VM ticks while requests wait (`QUEUE_TICK_MS`), and folds its samples
/// into the estimates (ms of real time): the simulated VM does the same in simulated time, these
/// times the time scale (60 ms and 6 s at the real sweep's 60). A freed node goes to a waiting
/// request on the next tick, as in the filter.
const TICK_REAL_MS: f64 = 1.0;
const ESTIMATES_EVERY_REAL_MS: f64 = 100.0;
const VM: u64 = 1;
/// The proxy's stream idle timeout (simulated s): a request with no byte for this long fails,
/// as it does through Envoy (`stream_idle_timeout`) and nginx (`proxy_read_timeout`).
pub const IDLE_TIMEOUT_S: f64 = 300.0;

/// What a simulated run gives: each request's time to first byte (None: it failed), the
/// model switches the nodes made, and the requests each node was sent, in order.
pub struct SimRun {
    pub ttft: Vec<Option<f64>>,
    pub switches: u64,
    pub order: Vec<Vec<usize>>,
}

/// One serial node: what it has loaded and when it is free.
struct Node {
    loaded: usize,
    free_at: u64,
}

struct InFlight {
    req: usize,
    route: Route,
    started: u64,
    first_byte: u64,
    end: u64,
    /// A streamed switch whose first byte the filter has yet to see.
    switch_pending: bool,
}

/// Runs `trace` through the filter's logic with `options` (filter options without nodes,
/// durations in simulated time) on `hw`; node `i` starts with model `i` loaded, as exo-sim's do.
pub fn run(
    hw: &Hardware,
    trace: &[Req],
    models: &[String],
    options: &Value,
    time_scale: f64,
) -> Result<SimRun, String> {
    let tick_ms = ((TICK_REAL_MS * time_scale).round() as u64).max(1);
    let estimates_every_ms = ((ESTIMATES_EVERY_REAL_MS * time_scale).round() as u64).max(1);
    let mut config = options.clone();
    let obj = config.as_object_mut().ok_or("options must be an object")?;
    // What the nodes tell when asked (`discover_loaded`, on unless the options turn it off):
    // exo-sim's nodes speak older exo by default, whose metrics say what each has loaded and
    // how long its loads took (one so far: the model it started with), so the filter knows
    // both before the first request, as it does in the real sweep once its first tick has
    // asked. EXO_LB_SIM_NODES_SILENT=1: nodes that tell nothing (what the filter did before it
    // read older exo's metrics), learned from traffic alone.
    let silent = std::env::var("EXO_LB_SIM_NODES_SILENT").is_ok_and(|v| v == "1")
        || obj.get("discover_loaded").is_some_and(|v| v == &json!(false));
    let nodes: Vec<Value> = (0..hw.nodes)
        .map(|i| json!({"name": format!("rk{}", i + 1), "address": format!("127.0.0.1:{}", 10_000 + i), "models": models}))
        .collect();
    obj.insert("nodes".into(), Value::Array(nodes));
    let bytes = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
    let cfg = Config::parse(&bytes).map_err(|e| e.to_string())?;
    let mut state = ClusterState::new(&cfg.index.layout);
    let mut est = Estimates::default();
    let first_model = |i: usize| i % models.len().max(1);
    if !silent {
        for (i, &key) in cfg.index.layout.nodes.iter().enumerate() {
            if let Some(m) = models.get(first_model(i)) {
                state.set_warm(i, model_key(m));
            }
            let booted = models.get(first_model(i)).map(|m| model_key(m));
            est.report_load(key, (hw.switch_s(i, first_model(i)) * 1_000.0).round() as u64, booted, 0);
        }
    }
    let mut samples: Vec<Sample> = Vec::new();
    let mut arrivals: Vec<Arrived> = Vec::new();
    let mut nodes: Vec<Node> = (0..hw.nodes).map(|i| Node { loaded: first_model(i), free_at: 0 }).collect();
    let mut ttft: Vec<Option<f64>> = vec![None; trace.len()];
    let mut running: Vec<InFlight> = Vec::new();
    let mut switches = 0;
    let mut order: Vec<Vec<usize>> = vec![Vec::new(); hw.nodes];
    let ms = |s: f64| (s * 1_000.0).round() as u64;
    let model_of = |r: &Req| models.get(r.model).map_or("", String::as_str);
    // EXO_LB_SIM_LOG: every decision on stderr (to set beside the real sweep's log).
    let log = std::env::var_os("EXO_LB_SIM_LOG").is_some();

    // Why each switch was decided (the filter's log line), taken after every call that may
    // decide one.
    let say_switches = |state: &mut ClusterState, est: &Estimates, now: u64| {
        for d in state.take_switches() {
            if log {
                eprintln!("{:>8.1} {}", now as f64 / 1e3, d.describe(&cfg, est));
            }
        }
    };

    // Sends request `k` to the first node of `route` at `now`: the node serves it after what it
    // runs, loading its model first when another is loaded.
    let mut send = |k: usize, route: Route, now: u64, nodes: &mut Vec<Node>, running: &mut Vec<InFlight>| {
        let (Some(r), Some(&i)) = (trace.get(k), route.nodes.first()) else { return };
        let (Some(node), Some(sent)) = (nodes.get_mut(i), order.get_mut(i)) else { return };
        sent.push(k);
        let switch = if node.loaded == r.model { 0 } else { ms(hw.switch_s(i, r.model)) };
        switches += u64::from(switch > 0);
        let start = node.free_at.max(now) + switch;
        let had = node.loaded;
        node.loaded = r.model;
        node.free_at = start + ms(hw.service(r));
        let first_byte = start + ms(hw.min_ttft(r));
        if log {
            let ttft = (if r.stream { first_byte } else { node.free_at }).saturating_sub(ms(r.at));
            eprintln!(
                "{:>8.1} req {k:>3} (at {:>7.1}) model {} -> node {i} (had {had}) ttft {:>6.1}{}{}",
                now as f64 / 1e3,
                r.at,
                r.model,
                ttft as f64 / 1e3,
                if switch > 0 { " SWITCH" } else { "" },
                if route.cold { " cold" } else { "" }
            );
        }
        let switch_pending = (route.switched || route.cold) && r.stream;
        running.push(InFlight { req: k, route, started: now, first_byte, end: node.free_at, switch_pending });
    };

    let mut next_arrival = 0;
    let mut now = 0u64;
    let mut next_tick = 0u64;
    let mut next_fold = estimates_every_ms;
    let mut waiting = 0usize;
    loop {
        let arrival_at = trace.get(next_arrival).map(|r| ms(r.at));
        let end_at = running.iter().map(|f| f.end).min();
        let first_byte_at = running.iter().filter(|f| f.switch_pending).map(|f| f.first_byte).min();
        if arrival_at.is_none() && end_at.is_none() && waiting == 0 {
            break;
        }
        // The next event: an arrival, an end, a switched stream's first byte, or a tick (ticks
        // only matter while requests wait or samples or arrivals are pending).
        let mut t =
            arrival_at.unwrap_or(u64::MAX).min(end_at.unwrap_or(u64::MAX)).min(first_byte_at.unwrap_or(u64::MAX));
        if waiting > 0 || !samples.is_empty() || !arrivals.is_empty() {
            t = t.min(next_tick);
        }
        now = now.max(t);
        // The VM's ticks renew its lease every second; it never lapses here.
        state.touch_lease(VM, now);
        if first_byte_at == Some(now) {
            if let Some(f) = running.iter_mut().find(|f| f.switch_pending && f.first_byte == now) {
                f.switch_pending = false;
                if let Some(&node) = f.route.nodes.first() {
                    state.end_switch(node, now);
                }
            }
        } else if end_at == Some(now) {
            if let Some(pos) = running.iter().position(|f| f.end == now) {
                let f = running.swap_remove(pos);
                if log {
                    eprintln!("{:>8.1} req {:>3} ends on node {:?}", now as f64 / 1e3, f.req, f.route.nodes.first());
                }
                let r = trace.get(f.req).ok_or("request index")?;
                let model = model_of(r);
                let end = Ending {
                    route: &f.route.nodes,
                    probing: f.route.probing,
                    charged: f.route.nodes.first().copied(),
                    attempts: 1,
                    served: f.route.nodes.first().copied(),
                    status: 200,
                    flags: 0,
                    started_ms: f.started,
                    now_ms: now,
                    vm: VM,
                    model: Some(model),
                    switched: f.route.switched,
                    cold: f.route.cold,
                    first_byte_ms: Some(f.first_byte).filter(|_| r.stream),
                    chunks: Some(u64::from(r.max_tokens)).filter(|_| r.stream),
                    max_tokens: Some(u64::from(r.max_tokens)),
                };
                if let Some(s) = finish(&cfg, &mut state, &est, &end).sample {
                    samples.push(s);
                }
                say_switches(&mut state, &est, now);
                if let Some(slot) = ttft.get_mut(f.req) {
                    let at = ms(r.at);
                    let first = if r.stream { f.first_byte } else { f.end };
                    let waited = first.saturating_sub(at) as f64 / 1_000.0;
                    *slot = Some(waited).filter(|&w| w <= IDLE_TIMEOUT_S);
                }
            }
        } else if arrival_at == Some(now) {
            let k = next_arrival;
            next_arrival += 1;
            let r = trace.get(k).ok_or("request index")?;
            let model = model_of(r);
            let a = Arrival {
                vm: VM,
                ctx: k as u32,
                model,
                model_key: model_key(model),
                hash_key: None,
                random: (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                now_ms: now,
                client: 1,
                max_tokens: Some(u64::from(r.max_tokens)),
                stream: r.stream,
            };
            let admission = schedule::admit(&cfg, &mut state, &est, &a);
            say_switches(&mut state, &est, now);
            if matches!(admission, Admission::Granted(_) | Admission::Queued) {
                arrivals.push(Arrived { model: a.model_key, at_ms: now });
            }
            match admission {
                Admission::Granted(route) => send(k, route, now, &mut nodes, &mut running),
                Admission::Queued => {
                    if log {
                        eprintln!("{:>8.1} req {k:>3} model {} queued", now as f64 / 1e3, r.model);
                    }
                    waiting += 1
                }
                Admission::Rejected(_) => {}
            }
        }
        let ticked = now >= next_tick;
        if ticked {
            next_tick = now + tick_ms;
            if now >= next_fold {
                next_fold = now + estimates_every_ms;
                est.record(&samples, |_| true);
                est.record_arrivals(&arrivals);
                samples.clear();
                arrivals.clear();
            }
        }
        // What the VM's tick does: resume granted requests, fail timed-out ones.
        if waiting > 0 && ticked {
            schedule::schedule(&cfg, &mut state, &est, now);
            say_switches(&mut state, &est, now);
            for ready in schedule::take_ready(&cfg, &mut state, VM, now) {
                waiting = waiting.saturating_sub(1);
                if let Ready::Go { ctx, route } = ready {
                    send(ctx as usize, route, now, &mut nodes, &mut running);
                }
            }
        }
    }
    if log {
        for (index, m) in models.iter().enumerate() {
            let key = model_key(m);
            eprintln!(
                "learned {m}: service {:?} ms, warm first token {:?} ms",
                est.service_ms(key),
                est.warm_first_token_ms(0, key)
            );
            // Per node, beside the simulated truth: whether a switch never made on a node is
            // taken as what it costs there (boards and models that load unalike).
            for (i, &node) in cfg.index.layout.nodes.iter().enumerate() {
                eprintln!(
                    "  node {i}: switch {:?} ms (simulated {:.0} ms)",
                    est.switch_ms(node, key),
                    hw.switch_s(i, index) * 1e3
                );
            }
        }
    }
    Ok(SimRun { ttft, switches, order })
}

/// p95 of a run's times to first byte, a failed request (None) counting as never answered.
pub fn p95_failed_last(t: &[Option<f64>]) -> f64 {
    crate::report::percentile(&t.iter().map(|x| x.unwrap_or(f64::INFINITY)).collect::<Vec<_>>(), 95.0)
}

/// How the verdict "exo-lb / best static" reads on samples of a few seeds each (the real sweep
/// pools two), set beside the verdict over every seed: each sample's p95 ratio against the best
/// static setting of that sample (what the sweep reports), and against the one setting best over
/// every seed (no choosing on the sample itself). A ratio is NaN where both p95s are infinite.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleVerdicts {
    /// Which of the static settings is best over every seed.
    pub best_overall: usize,
    pub against_best_in_sample: Vec<f64>,
    pub against_best_overall: Vec<f64>,
}

/// `auto[seed]`: exo-lb's times to first byte on each seed's trace; `statics[setting][seed]`:
/// each static setting's on the same traces. Samples are consecutive runs of `per_sample` seeds
/// (a shorter rest is left out).
pub fn sample_verdicts(
    auto: &[Vec<Option<f64>>],
    statics: &[Vec<Vec<Option<f64>>>],
    per_sample: usize,
) -> SampleVerdicts {
    let pooled = |runs: &[Vec<Option<f64>>]| p95_failed_last(&runs.concat());
    let best_overall =
        (0..statics.len()).min_by(|&a, &b| pooled(&statics[a]).total_cmp(&pooled(&statics[b]))).unwrap_or(0);
    let ratio = |a: f64, b: f64| if a.is_infinite() && b.is_infinite() { f64::NAN } else { a / b };
    let (mut against_best_in_sample, mut against_best_overall) = (Vec::new(), Vec::new());
    for start in (0..auto.len()).step_by(per_sample.max(1)) {
        let end = start + per_sample.max(1);
        if end > auto.len() {
            break;
        }
        let mine = pooled(&auto[start..end]);
        let each: Vec<f64> = statics.iter().map(|runs| pooled(&runs[start..end])).collect();
        against_best_in_sample.push(ratio(mine, each.iter().copied().fold(f64::INFINITY, f64::min)));
        against_best_overall.push(ratio(mine, each.get(best_overall).copied().unwrap_or(f64::NAN)));
    }
    SampleVerdicts { best_overall, against_best_in_sample, against_best_overall }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Workload;

    #[test]
    fn every_request_is_answered_one_generation_per_node() {
        let (wl, hw) = (Workload::default(), Hardware::default());
        let trace = wl.trace(&hw, 1, 0.5, 200);
        let models: Vec<String> = wl.models.iter().map(|m| m.0.clone()).collect();
        let run = run(&hw, &trace, &models, &json!({}), 60.0).unwrap();
        assert_eq!(run.ttft.iter().filter(|t| t.is_some()).count(), 200);
        // No request's first byte can come sooner than the hardware allows.
        for (r, t) in trace.iter().zip(&run.ttft) {
            assert!(t.unwrap() + 1e-3 >= hw.min_ttft(r), "{r:?}: {t:?}");
        }
        assert!(run.switches > 0);
    }

    /// The decision rule's regression test: with no option set, exo-lb schedules about as well
    /// as with the real switch time set by hand, where switches are cheap (0.2 of a mean
    /// generation, 80 % load) and where they take minutes (8 mean generations, 50 % load: a rule
    /// that switches as if they were cheap fails a tenth of the requests there, by timeouts).
    #[test]
    fn with_no_options_it_schedules_about_as_well_as_the_real_switch_time_set_by_hand() {
        let wl = Workload::default();
        let models: Vec<String> = wl.models.iter().map(|m| m.0.clone()).collect();
        let mean = wl.expected_service(&Hardware::default());
        for (utilization, factor) in [(0.8, 0.2), (0.5, 8.0)] {
            let hw = Hardware { switch_time_s: factor * mean, ..Hardware::default() };
            let by_hand = json!({"model_switch_cost": format!("{:.3}s", hw.switch_time_s), "learn_switch_cost": false});
            let (mut auto, mut fixed) = (Vec::new(), Vec::new());
            for seed in 1..=6 {
                let trace = wl.trace(&hw, seed, utilization, 60);
                auto.extend(run(&hw, &trace, &models, &json!({}), 60.0).unwrap().ttft);
                fixed.extend(run(&hw, &trace, &models, &by_hand, 60.0).unwrap().ttft);
            }
            let failed = auto.iter().filter(|t| t.is_none()).count();
            assert_eq!(failed, 0, "{factor}x at {utilization}: {failed} failed");
            let (a, f) = (p95_failed_last(&auto), p95_failed_last(&fixed));
            assert!(a <= 1.1 * f, "{factor}x at {utilization}: p95 {a:.1} s with no options vs {f:.1} s set by hand");
        }
    }

    /// Four seeds of twenty requests in samples of two: the setting best over every seed is
    /// found, each sample is judged against its own best setting and against that one, and a
    /// sample where every run failed its p95 reads as NaN, not as a ratio of infinities.
    #[test]
    fn samples_are_judged_against_their_own_best_and_the_overall_best_setting() {
        let runs = |t: f64| vec![Some(t); 20];
        let auto = vec![runs(10.0), runs(10.0), runs(20.0), vec![None; 20]];
        // Setting 0 wins the first sample, setting 1 the second and all four seeds pooled.
        let statics = vec![
            vec![runs(8.0), runs(8.0), runs(40.0), vec![None; 20]],
            vec![runs(10.0), runs(10.0), runs(16.0), runs(16.0)],
        ];
        let v = sample_verdicts(&auto, &statics, 2);
        assert_eq!(v.best_overall, 1);
        assert_eq!(v.against_best_in_sample, vec![1.25, f64::INFINITY]);
        assert_eq!(v.against_best_overall, vec![1.0, f64::INFINITY]);
        let all_failed = vec![vec![None; 20]; 2];
        let v = sample_verdicts(&all_failed, std::slice::from_ref(&all_failed), 2);
        assert!(v.against_best_in_sample[0].is_nan() && v.against_best_overall[0].is_nan());
        // A rest shorter than a sample is left out.
        assert_eq!(sample_verdicts(&auto[..3], &statics, 2).against_best_overall.len(), 1);
    }
}
