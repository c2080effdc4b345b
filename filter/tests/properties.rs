//! Property tests of the pure logic: no input makes it panic, and bookkeeping always balances.

// The crate's no-panic lints are for the filter; a test fails by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use exo_lb::logic::config::Config;
use exo_lb::logic::discover;
use exo_lb::logic::estimates::{Estimates, Sample};
use exo_lb::logic::header_map;
use exo_lb::logic::lookahead::{self, Choice, Job, ModelView, NodeView, View};
use exo_lb::logic::outcome::{finish, flags, Ending};
use exo_lb::logic::request::parse_body;
use exo_lb::logic::schedule::{admit, schedule, take_ready, withdraw, Admission, Arrival, Ready};
use exo_lb::logic::state::{model_key, ClusterState, VM_BYTES};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z]{1,8}|model|stream", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_shared_bytes_decode_to_a_usable_state(bytes in prop::collection::vec(any::<u8>(), 0..2048), vm in 0u64..4) {
        let cfg = Config::parse(br#"{"nodes":[{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"}]}"#).unwrap();
        let mut state = ClusterState::decode(Some(&bytes), &cfg.index.layout);
        state.acquire(vm, 1, 5);
        prop_assert_eq!(state.node_count(), 2);
        prop_assert!(state.inflight(1, 5) >= 1);
        let again = ClusterState::decode(Some(state.encode()), &cfg.index.layout);
        prop_assert_eq!(again, state);
    }

    #[test]
    fn any_measurements_give_every_node_and_model_a_switch_cost(
        samples in prop::collection::vec(
            (0u64..4, 0usize..3, prop::option::of(any::<bool>()), prop::option::of(any::<u64>()), any::<u64>(), prop::option::of(any::<u64>())),
            0..40,
        ),
        reports in prop::collection::vec((0u64..5, any::<u64>(), prop::option::of(0usize..3)), 0..6),
    ) {
        let models = ["p", "m", "r"];
        let mut e = Estimates::default();
        for (node, ms, model) in reports {
            e.report_load(node, ms, model.and_then(|m| models.get(m)).map(|m| model_key(m)), 0);
        }
        let samples: Vec<Sample> = samples
            .into_iter()
            .map(|(node, m, switched, first_token_ms, total_ms, tokens)| Sample {
                model: models.get(m).copied().unwrap_or("p").into(),
                node,
                switched,
                first_token_ms,
                total_ms,
                tokens,
                at_ms: 0,
            })
            .collect();
        e.record(&samples, |_| true);
        let measured = e.switch_known();
        for node in 0..6u64 {
            for m in models {
                // Anything measured or said gives every pair a figure; the same one when asked again.
                let ms = e.switch_ms(node, model_key(m));
                prop_assert_eq!(ms.is_some(), measured);
                prop_assert_eq!(ms, e.switch_ms(node, model_key(m)));
            }
        }
        prop_assert_eq!(Estimates::decode(Some(&e.encode())), e);
    }

    #[test]
    fn any_header_map_bytes_give_positions_inside_them(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        small_count in 0u32..6,
    ) {
        // Half the cases claim a small pair count, so that some lengths tables fit.
        let mut bytes = bytes;
        if small_count % 2 == 0 && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&small_count.to_le_bytes());
        }
        let mut end = 0;
        for (name, value) in header_map::pairs(&bytes) {
            prop_assert!(name.start >= end && name.end < value.start && value.end <= bytes.len());
            end = value.end;
        }
    }

    #[test]
    fn parse_body_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(req) = parse_body(&body) {
            prop_assert!(!req.model.trim().is_empty());
        }
    }

    #[test]
    fn parse_body_reads_model_only_when_it_is_a_string(v in json_value()) {
        let body = serde_json::to_vec(&v).unwrap();
        let result = parse_body(&body);
        match v.get("model") {
            Some(serde_json::Value::String(m)) if !m.trim().is_empty() && v.is_object() => {
                prop_assert_eq!(result.map(|r| r.model), Ok(m.clone()));
            }
            _ => prop_assert!(result.is_err()),
        }
    }

    /// Whatever a node answers to "what have you loaded", the answer is taken (once) and at most
    /// one of the node's models comes of it.
    #[test]
    fn any_answer_about_what_a_node_has_loaded_is_safe(
        v in json_value(),
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        status in prop_oneof![Just(0u32), Just(200), Just(404), Just(503), 0u32..1000],
    ) {
        let cfg = Config::parse(br#"{"nodes":[{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]}]}"#).unwrap();
        let wrapped = serde_json::json!({"instances": {"i": {"MlxRingInstance": {"shardAssignments": {"modelId": v.clone()}}}}});
        // Older exo's metrics, with arbitrary text where the model id and the load time go.
        let text = String::from_utf8_lossy(&bytes);
        let metrics = format!(
            "exo_model_info{{model_id=\"{text}\"}} 1\nrkllm_model_load_duration_seconds_sum {text}\nrkllm_model_load_duration_seconds_count 1\n{text}"
        );
        let bodies = [serde_json::to_vec(&v).unwrap(), bytes.clone(), serde_json::to_vec(&wrapped).unwrap(), metrics.into_bytes()];
        for (body, source) in bodies.iter().flat_map(|b| discover::Source::ALL.map(|s| (b, s))) {
            let mut state = cfg.new_state();
            prop_assert_eq!(discover::due(&cfg, &mut state, 0), vec![0]);
            let learned = discover::record(&cfg, &mut state, 0, source, status, body).model;
            match &learned {
                Some(m) => {
                    prop_assert!(m == "m1" || m == "m2");
                    prop_assert_eq!(state.warm(0), Some(model_key(m)));
                }
                None => prop_assert_eq!(state.warm(0), None),
            }
            // The node's other place does not answer: it is asked again only if neither did.
            for other in discover::Source::ALL.into_iter().filter(|&s| s != source) {
                discover::record(&cfg, &mut state, 0, other, 0, &[]);
            }
            let asked_again = !discover::due(&cfg, &mut state, discover::RETRY_MS).is_empty();
            prop_assert_eq!(asked_again, status == 0 || status >= 500, "status {}", status);
        }
    }

    #[test]
    fn config_parse_never_panics(v in json_value(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Config::parse(&serde_json::to_vec(&v).unwrap());
        let _ = Config::parse(&bytes);
    }
}

#[derive(Debug, Clone)]
enum Step {
    Arrive { model: u8, vm: u8, random: u64 },
    Finish { which: usize, attempts: u8, status: u16, flags: u64 },
    Abandon { which: usize },
    Tick { vm: u8 },
    Advance { ms: u32 },
}

fn step() -> impl Strategy<Value = Step> {
    let flag = prop_oneof![
        Just(0u64),
        Just(flags::UPSTREAM_CONNECTION_FAILURE),
        Just(flags::DOWNSTREAM_CONNECTION_TERMINATION),
        Just(flags::UPSTREAM_REMOTE_RESET),
        Just(flags::UPSTREAM_REQUEST_TIMEOUT),
        any::<u64>(),
    ];
    prop_oneof![
        3 => (0u8..4, 0u8..3, any::<u64>()).prop_map(|(model, vm, random)| Step::Arrive { model, vm, random }),
        3 => (any::<usize>(), 0u8..5, prop_oneof![Just(200u16), Just(503), Just(502), Just(0), any::<u16>()], flag)
            .prop_map(|(which, attempts, status, flags)| Step::Finish { which, attempts, status, flags }),
        1 => any::<usize>().prop_map(|which| Step::Abandon { which }),
        2 => (0u8..3).prop_map(|vm| Step::Tick { vm }),
        1 => (0u32..40_000).prop_map(|ms| Step::Advance { ms }),
    ]
}

const POLICIES: [&str; 4] = ["least_conn", "round_robin", "random_two", "hash"];

/// A request that holds a slot: its route, probe claim, start time, VM and model.
type Open = (Vec<usize>, bool, u64, u64, &'static str);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Any interleaving of arrivals, endings, aborts, ticks and time leaves nothing in flight or
    /// queued once every request has ended; caps are never exceeded; every route honours the
    /// model and the drained nodes. `serial`: every node runs one generation at a time and the
    /// models' replies are measured, so that the scheduler's look-ahead plans too.
    #[test]
    fn bookkeeping_balances(policy in 0usize..4, serial in any::<bool>(), steps in prop::collection::vec(step(), 1..80)) {
        let cfg = Config::parse(format!(r#"{{"policy":"{}","max_fails":2,"fail_timeout":"10s","hold_after_abort":false,
            "queue":{{"max_waiting":4,"timeout":"30s"}},"nodes":[
            {{"name":"a","address":"10.0.0.1:1","models":["m0","m1"]}},
            {{"name":"b","address":"10.0.0.2:1","models":["m0"],"weight":3,"max_inflight":{}}},
            {{"name":"c","address":"10.0.0.3:1","models":["m0","m2"],"backup":true}},
            {{"name":"d","address":"10.0.0.4:1","down":true}}]}}"#, POLICIES[policy], if serial { 1 } else { 2 }).as_bytes()).unwrap();
        let models = ["m0", "m1", "m2", "zz"];
        let mut state = cfg.new_state();
        let mut est = Estimates::default();
        if serial {
            let replies: Vec<Sample> = ["m0", "m1", "m2"].iter().zip([800, 1_500, 3_000]).map(|(m, total_ms)| Sample {
                model: m.to_string(), node: 0, switched: Some(false), first_token_ms: Some(50), total_ms, tokens: Some(20), at_ms: 0,
            }).collect();
            est.record(&replies, |_| true);
        }
        let mut now = 1_000_000u64;
        let mut next_ctx = 0u32;
        let mut open: Vec<Open> = Vec::new();
        let mut queued: Vec<(u64, u32, &'static str)> = Vec::new();
        let check_route = |route: &[usize], m: &str| -> Result<(), TestCaseError> {
            prop_assert!(!route.is_empty());
            let mut seen = route.to_vec();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), route.len(), "no node twice");
            for &i in route {
                prop_assert!(cfg.nodes[i].serves(m) && !cfg.nodes[i].down);
            }
            Ok(())
        };
        for s in steps {
            match s {
                Step::Arrive { model, vm, random } => {
                    let m = models[usize::from(model)];
                    next_ctx += 1;
                    let a = Arrival {
                        vm: u64::from(vm), ctx: next_ctx, model: m, model_key: model_key(m), hash_key: Some(7),
                        random, now_ms: now, client: u64::from(vm), max_tokens: None, stream: true,
                    };
                    match admit(&cfg, &mut state, &est, &a) {
                        Admission::Granted(r) => {
                            check_route(&r.nodes, m)?;
                            open.push((r.nodes, r.probing, now, u64::from(vm), m));
                        }
                        Admission::Queued => queued.push((u64::from(vm), next_ctx, m)),
                        Admission::Rejected(_) => {}
                    }
                }
                Step::Tick { vm } => {
                    let vm = u64::from(vm);
                    state.renew_and_prune(vm, now);
                    schedule(&cfg, &mut state, &est, now);
                    for r in take_ready(&cfg, &mut state, vm, now) {
                        let ctx = match &r { Ready::Go { ctx, .. } | Ready::Fail { ctx, .. } => *ctx };
                        let Some(pos) = queued.iter().position(|q| q.0 == vm && q.1 == ctx) else {
                            return Err(TestCaseError::fail(format!("unknown ready {r:?}")));
                        };
                        let (_, _, m) = queued.remove(pos);
                        if let Ready::Go { route, .. } = r {
                            check_route(&route.nodes, m)?;
                            open.push((route.nodes, route.probing, now, vm, m));
                        }
                    }
                }
                Step::Abandon { which } => {
                    if !queued.is_empty() {
                        let (vm, ctx, _) = queued.remove(which % queued.len());
                        withdraw(&cfg, &mut state, &est, vm, ctx, now);
                    }
                }
                Step::Finish { which, attempts, status, flags } => {
                    if !open.is_empty() {
                        let (nodes, probing, started, vm, m) = open.remove(which % open.len());
                        let end = Ending {
                            route: &nodes, probing, charged: nodes.first().copied(), attempts: u64::from(attempts),
                            served: None, status: u32::from(status), flags, started_ms: started, now_ms: now, vm, model: Some(m), ..Ending::default()
                        };
                        finish(&cfg, &mut state, &est, &end);
                    }
                }
                Step::Advance { ms } => {
                    // Ticks come every second: leases never lapse for a live VM.
                    let target = now + u64::from(ms);
                    while now < target {
                        now = (now + 1_000).min(target);
                        for vm in 0..3 {
                            state.renew_and_prune(vm, now);
                        }
                    }
                }
            }
            for (i, n) in cfg.nodes.iter().enumerate() {
                prop_assert!(state.busy(i, now) <= n.max_inflight, "cap of {} exceeded", n.name);
            }
            prop_assert_eq!(ClusterState::decode(Some(state.encode()), &cfg.index.layout), state.clone());
        }
        for (vm, ctx, _) in queued.drain(..) {
            prop_assert!(withdraw(&cfg, &mut state, &est, vm, ctx, now), "a queued request is in the shared queue");
        }
        for (nodes, probing, started, vm, m) in open.drain(..) {
            let end = Ending { route: &nodes, probing, charged: nodes.first().copied(), attempts: 0, served: None,
                status: 0, flags: flags::DOWNSTREAM_CONNECTION_TERMINATION, started_ms: started, now_ms: now, vm, model: Some(m), ..Ending::default() };
            finish(&cfg, &mut state, &est, &end);
        }
        // Whatever schedule() granted after the last tick is given back too.
        for vm in 0..3 {
            for r in take_ready(&cfg, &mut state, vm, now) {
                if let Ready::Go { route, .. } = r {
                    let end = Ending { route: &route.nodes, probing: route.probing, charged: route.nodes.first().copied(),
                        attempts: 0, served: None, status: 0, flags: flags::DOWNSTREAM_CONNECTION_TERMINATION,
                        started_ms: now, now_ms: now, vm, model: None, ..Ending::default() };
                    finish(&cfg, &mut state, &est, &end);
                }
            }
        }
        for i in 0..cfg.nodes.len() {
            prop_assert_eq!(state.inflight(i, now), 0);
            prop_assert_eq!(state.health(i).probe_vm, None);
        }
        prop_assert_eq!(state.queue_len(), 0);
        // Nothing but the leases of the VMs that took part is left: no trace of the requests.
        prop_assert!(state.encode().len() <= cfg.new_state().encode().len() + 3 * (VM_BYTES + 2 * cfg.nodes.len()), "{:?}", state);
    }
}

/// Any float the look-ahead might be fed, odd ones included.
fn seconds() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => 0.0f64..5.0,
        2 => -1e3f64..1e3,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(0.0),
    ]
}

fn view() -> impl Strategy<Value = View> {
    let node = (prop::option::of(0usize..24), seconds(), any::<u64>()).prop_map(|(loaded, free_at, serves)| NodeView {
        loaded,
        free_at,
        serves,
    });
    let model = (seconds(), prop::collection::vec(seconds(), 0..10), seconds())
        .prop_map(|(rate_per_s, services, first)| ModelView { rate_per_s, services, first });
    let job = (seconds(), 0usize..24, seconds(), seconds()).prop_map(|(at, model, service, first)| Job {
        at,
        model,
        service,
        first,
    });
    (
        prop::collection::vec(node, 0..20),
        prop::collection::vec(model, 0..20),
        prop::collection::vec(seconds(), 0..400),
        prop::collection::vec(job, 0..80),
        seconds(),
    )
        .prop_map(|(nodes, models, switch_s, waiting, timeout_s)| View {
            nodes,
            models,
            switch_s,
            waiting,
            timeout_s,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// The look-ahead never panics, loops or overrides a node it was not asked about, whatever
    /// the view (NaN and infinite times, indices out of range, more than it looks at).
    #[test]
    fn the_look_ahead_takes_any_view(
        v in view(),
        free in prop::collection::vec(0usize..24, 0..6),
        rule in prop::collection::vec(prop::option::of(0usize..24), 0..6),
        seed in any::<u64>(),
    ) {
        let overrides = lookahead::plan(&v, &free, &rule, seed);
        let mut nodes: Vec<usize> = overrides.iter().map(|(i, _)| *i).collect();
        for &(i, choice) in &overrides {
            prop_assert!(free.contains(&i), "node {} was not free", i);
            if let Choice::Serve(m) = choice {
                prop_assert!(m < v.models.len());
            }
        }
        nodes.sort_unstable();
        nodes.dedup();
        prop_assert!(nodes.len() <= free.len());
    }
}
