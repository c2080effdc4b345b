//! An online dispatcher that looks ahead: a lead for the filter's scheduler (issue 11), not what
//! it ships. At each decision (a node is free and requests wait) it plays every choice forward
//! over sampled futures and takes the one whose futures cost least: serve the oldest waiting
//! request of one of the models waiting, or hold the node a tick. The rest of each future is
//! decided by the base rule ([`rule_pick`], the shipped rule's shape), so this is rollout in the
//! sense of Bertsekas' approximate dynamic programming: a one-step improvement on the base rule.
//!
//! It knows only what the filter knows: requests that have come (their models and lengths), the
//! switch time, and arrival rates and generation lengths learned from the requests so far; the
//! futures it samples are Poisson arrivals at the learned rates with lengths drawn from those
//! seen. A choice's cost is the sum of the times to first byte of the requests in its future,
//! each one's excess over a target (a few mean generations) counted again several times: the
//! plain sum favours the many, and bought its p95 with the rare model's waits (docs/benchmarks.md,
//! twenty-second session).

use crate::rng::Rng;
use crate::trace::{Hardware, Req};
use exo_lb::logic::config::DEFAULT_QUEUE_TIMEOUT_MS;

/// How hard it looks, chosen in the simulator over seeds 1-64 of the issue's workload
/// (docs/benchmarks.md, twenty-second session).
pub struct Params {
    /// Futures sampled per decision (each choice is played on the same ones).
    pub samples: usize,
    /// How far ahead arrivals are sampled, in mean generations.
    pub horizon_generations: f64,
    /// How long a held node waits before it is decided again (s).
    pub tick_s: f64,
    /// A choice overrides the base rule's only when it beats it by this many standard errors of
    /// their paired differences over the futures (noise otherwise makes needless switches).
    pub z: f64,
    /// A wait longer than this many mean generations costs `excess_weight` times more per second.
    pub target_generations: f64,
    pub excess_weight: f64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            samples: 48,
            horizon_generations: 6.5,
            tick_s: 0.1,
            z: 2.0,
            target_generations: 4.0,
            excess_weight: 5.0,
        }
    }
}

#[derive(Clone, Copy)]
struct Node {
    loaded: usize,
    free_at: f64,
}

#[derive(Clone, Copy)]
struct Job {
    at: f64,
    model: usize,
    service: f64,
    /// Time to first byte on a warm node that starts it at once.
    first: f64,
}

/// Starts `job` on `node` at `t`; returns its time to first byte and whether it switched.
fn start(node: &mut Node, job: &Job, t: f64, switch_s: f64) -> (f64, bool) {
    let switched = node.loaded != job.model;
    let begins = t + if switched { switch_s } else { 0.0 };
    node.free_at = begins + job.service;
    node.loaded = job.model;
    (begins + job.first - job.at, switched)
}

/// What has been learned from the requests so far.
struct Learned<'a> {
    /// Arrivals per second, per model.
    rates: Vec<f64>,
    /// Each request's generation and warm time to first byte.
    seen: &'a [(f64, f64)],
    mean_service: f64,
}

/// The base rule, shaped as the shipped one (`place` in the filter's schedule.rs, without its
/// growth term): a free node serves the oldest request for its own model; else, in arrival
/// order, the first model whose queue takes longer to drain where it is loaded (forever where
/// nowhere) than a switch plus what evicting the node's model costs (nothing if another node
/// has it; else the switch back if its model is asked for again, plus the work its arrivals
/// bring while the node is away). `None`: the node holds.
fn rule_pick(nodes: &[Node], i: usize, waiting: &[Job], switch_s: f64, learned: &Learned) -> Option<usize> {
    let node = nodes.get(i)?;
    if let Some(k) = waiting.iter().position(|j| j.model == node.loaded) {
        return Some(k);
    }
    let shared = nodes.iter().enumerate().any(|(o, n)| o != i && n.loaded == node.loaded);
    let eviction = if shared {
        0.0
    } else {
        // Asked for again within the filter's default queue timeout.
        let rate = learned.rates.get(node.loaded).copied().unwrap_or(0.0);
        let timeout_s = DEFAULT_QUEUE_TIMEOUT_MS as f64 / 1_000.0;
        let likely = 1.0 - (-rate * timeout_s.max(switch_s)).exp();
        likely * switch_s + rate * learned.mean_service * 2.0 * switch_s
    };
    let mut weighed: Vec<usize> = Vec::new();
    // `waiting` is in arrival order.
    for (k, j) in waiting.iter().enumerate() {
        if weighed.contains(&j.model) {
            continue;
        }
        weighed.push(j.model);
        let warm = nodes.iter().filter(|n| n.loaded == j.model).count();
        let drain = if warm == 0 {
            f64::INFINITY
        } else {
            let queued: f64 = waiting.iter().filter(|x| x.model == j.model).map(|x| x.service).sum();
            queued / warm as f64 + learned.mean_service / 2.0
        };
        if switch_s + eviction <= drain {
            return Some(k);
        }
    }
    None
}

struct Future<'a> {
    switch_s: f64,
    tick_s: f64,
    horizon_s: f64,
    target_s: f64,
    excess_weight: f64,
    learned: &'a Learned<'a>,
}

impl Future<'_> {
    /// What a request's time to first byte costs.
    fn cost(&self, ttft: f64) -> f64 {
        ttft + self.excess_weight * (ttft - self.target_s).max(0.0)
    }

    /// Arrivals over the horizon from `t0`.
    fn sample(&self, rng: &mut Rng, t0: f64) -> Vec<Job> {
        let total: f64 = self.learned.rates.iter().sum();
        let mut out = Vec::new();
        if total <= 0.0 || self.learned.seen.is_empty() {
            return out;
        }
        let mut t = t0;
        loop {
            t += rng.exp(total);
            if t > t0 + self.horizon_s {
                return out;
            }
            let model = rng.weighted(&self.learned.rates);
            let drawn = (rng.next_u64() % self.learned.seen.len() as u64) as usize;
            if let Some(&(service, first)) = self.learned.seen.get(drawn) {
                out.push(Job { at: t, model, service, first });
            }
        }
    }

    /// The summed times to first byte of `waiting` and `arrivals` served from `t0` by the base
    /// rule; requests still waiting long after the horizon count as served then.
    fn play(&self, mut nodes: Vec<Node>, mut waiting: Vec<Job>, arrivals: &[Job], t0: f64) -> f64 {
        let (mut t, mut next, mut total) = (t0, 0usize, 0.0);
        let end = t0 + 4.0 * self.horizon_s;
        loop {
            while let Some(j) = arrivals.get(next).filter(|j| j.at <= t) {
                waiting.push(*j);
                next += 1;
            }
            for i in 0..nodes.len() {
                if !nodes.get(i).is_some_and(|n| n.free_at <= t) {
                    continue;
                }
                if let Some(k) = rule_pick(&nodes, i, &waiting, self.switch_s, self.learned) {
                    let job = waiting.remove(k);
                    if let Some(n) = nodes.get_mut(i) {
                        total += self.cost(start(n, &job, t, self.switch_s).0);
                    }
                }
            }
            if waiting.is_empty() && next >= arrivals.len() {
                return total;
            }
            let t_next = next_event(&nodes, arrivals.get(next).map(|j| j.at), !waiting.is_empty(), t, self.tick_s);
            if t_next > end {
                return total + waiting.iter().map(|j| self.cost(end - j.at + j.first)).sum::<f64>();
            }
            t = t_next;
        }
    }
}

/// The next arrival, the next node to free, or a tick on where a free node holds.
fn next_event(nodes: &[Node], arrival: Option<f64>, waiting: bool, t: f64, tick_s: f64) -> f64 {
    let mut next = arrival.unwrap_or(f64::INFINITY);
    for n in nodes.iter().filter(|n| n.free_at > t) {
        next = next.min(n.free_at);
    }
    if waiting && nodes.iter().any(|n| n.free_at <= t) {
        next = next.min(t + tick_s);
    }
    next
}

/// Runs `trace` through the look-ahead dispatcher (node `i` starts with model `i % models`, as
/// the simulated nodes do). Returns each request's time to first byte and the switches made.
pub fn run(hw: &Hardware, trace: &[Req], models: usize, p: &Params, seed: u64) -> (Vec<f64>, u64) {
    let switch_s = hw.switch_time_s;
    let mut nodes: Vec<Node> = (0..hw.nodes).map(|i| Node { loaded: i % models.max(1), free_at: 0.0 }).collect();
    let job = |r: &Req| Job { at: r.at, model: r.model, service: hw.service(r), first: hw.min_ttft(r) };
    let mut ttft = vec![f64::NAN; trace.len()];
    // Indices into `trace`, in arrival order.
    let mut waiting: Vec<usize> = Vec::new();
    let (mut t, mut next, mut switches, mut decision) = (0.0f64, 0usize, 0u64, 0u64);
    let mut counts = vec![0usize; models];
    let mut seen: Vec<(f64, f64)> = Vec::new();
    loop {
        while let Some(r) = trace.get(next).filter(|r| r.at <= t) {
            waiting.push(next);
            if let Some(c) = counts.get_mut(r.model) {
                *c += 1;
            }
            seen.push((hw.service(r), hw.min_ttft(r)));
            next += 1;
        }
        // Within one event (one time, the same arrivals) what is learned is the same for every
        // free node: built once.
        let mean_service = seen.iter().map(|s| s.0).sum::<f64>() / seen.len().max(1) as f64;
        let learned =
            Learned { rates: counts.iter().map(|&c| c as f64 / t.max(1.0)).collect(), seen: &seen, mean_service };
        let future = Future {
            switch_s,
            tick_s: p.tick_s,
            horizon_s: p.horizon_generations * mean_service,
            target_s: p.target_generations * mean_service,
            excess_weight: p.excess_weight,
            learned: &learned,
        };
        for i in 0..nodes.len() {
            if waiting.is_empty() || nodes.get(i).is_none_or(|n| n.free_at > t) {
                continue;
            }
            let jobs: Vec<Job> = waiting.iter().filter_map(|&k| trace.get(k).map(job)).collect();
            let base = rule_pick(&nodes, i, &jobs, switch_s, &learned);
            // A horizon that does not hold a switch and the switch back cannot see what a
            // switch costs: the base rule decides alone.
            let choice = if 2.0 * switch_s > future.horizon_s {
                base
            } else {
                decision += 1;
                let rng_seed = seed ^ decision.wrapping_mul(0x9E37_79B9);
                look_ahead(&future, &nodes, i, &jobs, base, t, p, rng_seed)
            };
            let Some(pos) = choice else { continue };
            let k = waiting.remove(pos);
            if let (Some(r), Some(n)) = (trace.get(k), nodes.get_mut(i)) {
                let (first, switched) = start(n, &job(r), t, switch_s);
                if let Some(x) = ttft.get_mut(k) {
                    *x = first;
                }
                switches += u64::from(switched);
            }
        }
        if next >= trace.len() && waiting.is_empty() {
            break;
        }
        let t_next = next_event(&nodes, trace.get(next).map(|r| r.at), !waiting.is_empty(), t, p.tick_s);
        if !t_next.is_finite() {
            break;
        }
        t = t_next;
    }
    (ttft, switches)
}

/// The choice for free node `i` (a position in `jobs`, or `None`: hold): the base rule's, unless
/// another's futures cost less by more than `p.z` standard errors.
#[allow(clippy::too_many_arguments)]
fn look_ahead(
    future: &Future,
    nodes: &[Node],
    i: usize,
    jobs: &[Job],
    base: Option<usize>,
    t: f64,
    p: &Params,
    rng_seed: u64,
) -> Option<usize> {
    // The oldest waiting request of each model waiting, and holding.
    let mut choices: Vec<Option<usize>> = Vec::new();
    for (k, j) in jobs.iter().enumerate() {
        if !choices.iter().flatten().any(|&c| jobs.get(c).is_some_and(|o| o.model == j.model)) {
            choices.push(Some(k));
        }
    }
    choices.push(None);
    let Some(b) = choices.iter().position(|c| *c == base) else { return base };
    let mut costs: Vec<Vec<f64>> = vec![Vec::with_capacity(p.samples); choices.len()];
    for s in 0..p.samples {
        let mut rng = Rng::new(rng_seed ^ (s as u64).wrapping_mul(0x51_7CC1_B727));
        let arrivals = future.sample(&mut rng, t);
        for (choice, cost) in choices.iter().zip(costs.iter_mut()) {
            let (mut ns, mut js) = (nodes.to_vec(), jobs.to_vec());
            let mut total = 0.0;
            match *choice {
                Some(k) if k < js.len() => {
                    let j = js.remove(k);
                    if let Some(n) = ns.get_mut(i) {
                        total += future.cost(start(n, &j, t, future.switch_s).0);
                    }
                }
                _ => {
                    if let Some(n) = ns.get_mut(i) {
                        n.free_at = t + p.tick_s;
                    }
                }
            }
            cost.push(total + future.play(ns, js, &arrivals, t));
        }
    }
    let Some(base_costs) = costs.get(b) else { return base };
    let mut best = (0.0, base);
    for (choice, cost) in choices.iter().zip(&costs) {
        let d: Vec<f64> = cost.iter().zip(base_costs).map(|(x, y)| x - y).collect();
        let n = d.len().max(2) as f64;
        let mean = d.iter().sum::<f64>() / n;
        let se = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt();
        if mean < -p.z * se && mean < best.0 {
            best = (mean, *choice);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::percentile;
    use crate::trace::Preset;

    /// On the issue's workload at 80 % load with a switch of one mean generation, looking ahead
    /// improves on its own base rule (the rollout property) and serves every request, none
    /// faster than a warm node could.
    #[test]
    fn looking_ahead_beats_its_base_rule_and_serves_every_request() {
        let (mut hw, wl) = Preset::Issue.cluster(3);
        hw.switch_time_s = wl.expected_service(&hw);
        let (mut ahead, mut base) = (Vec::new(), Vec::new());
        for seed in 1..=8 {
            let trace = wl.trace(&hw, seed, 0.8, 120);
            let (ttft, _) = run(&hw, &trace, wl.models.len(), &Params::default(), seed);
            for (t, r) in ttft.iter().zip(&trace) {
                assert!(t.is_finite() && *t >= hw.min_ttft(r) - 1e-9, "request {} got {t}", r.id);
            }
            ahead.extend(ttft);
            // z infinite: the base rule's choice always stands.
            let rule_only = Params { z: f64::INFINITY, ..Params::default() };
            base.extend(run(&hw, &trace, wl.models.len(), &rule_only, seed).0);
        }
        let (a, b) = (percentile(&ahead, 95.0), percentile(&base, 95.0));
        assert!(a < 0.95 * b, "look-ahead p95 {a:.2} s, base rule {b:.2} s");
    }

    /// Counting each wait's excess over the target again keeps the rare model's requests from
    /// paying for everyone's p95, as they did when the cost was the plain sum of waits.
    #[test]
    fn the_excess_weight_keeps_the_rare_model_from_paying_for_the_p95() {
        let (mut hw, wl) = Preset::Issue.cluster(3);
        hw.switch_time_s = wl.expected_service(&hw);
        let worst_model_p95 = |p: &Params| {
            let mut by_model: Vec<Vec<f64>> = vec![Vec::new(); wl.models.len()];
            for seed in 1..=8 {
                let trace = wl.trace(&hw, seed, 0.8, 120);
                for (t, r) in run(&hw, &trace, wl.models.len(), p, seed).0.into_iter().zip(&trace) {
                    if let Some(v) = by_model.get_mut(r.model) {
                        v.push(t);
                    }
                }
            }
            by_model.iter().map(|v| percentile(v, 95.0)).fold(0.0, f64::max)
        };
        let weighted = worst_model_p95(&Params::default());
        let plain = worst_model_p95(&Params { excess_weight: 0.0, ..Params::default() });
        assert!(weighted < 0.8 * plain, "worst model's p95: {weighted:.2} s weighted, {plain:.2} s plain");
    }
}
