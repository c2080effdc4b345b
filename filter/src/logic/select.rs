//! Choosing nodes: which nodes may take a request for a model, and in what order Envoy should
//! try them. The ranked list goes to Envoy in `x-gateway-destination-endpoint`; each retry takes
//! the next entry.

use crate::logic::config::{Config, Policy};
use crate::logic::errors::LbError;
use crate::logic::health::Phase;
use crate::logic::state::ClusterState;
pub use crate::logic::state::{fnv1a, mix, FNV_OFFSET};
use std::cmp::Ordering;

/// Retry-After given when every node for a model is drained (no failure timer to count down).
pub const DRAINED_RETRY_AFTER_S: u64 = 30;
/// The longest ranked list given to Envoy: the first choice and three to fail over to. A
/// request that four nodes could not take will not be helped by a fifth, and a list of every
/// node would make each request's cost grow with the cluster.
pub const MAX_ROUTE_NODES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInput {
    /// [`crate::logic::state::model_key`] of the requested model; `None` for requests that any
    /// node can take (web UI, other paths).
    pub model: Option<u64>,
    /// A hash of the key for the `hash` policy, if the request has one.
    pub hash_key: Option<u64>,
    pub now_ms: u64,
    /// The VM taking the request (its in-flight lease and probe claims).
    pub vm: u64,
    /// A fresh random number (for `random_two`).
    pub random: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Node indices, best first. Never empty.
    pub nodes: Vec<usize>,
    /// The first node is being probed after `fail_timeout` (this request claimed the probe).
    pub probing: bool,
    /// Choosing the first node switches it to another model.
    pub switched: bool,
    /// What the first node had loaded was not known (so whether it switches is not either).
    pub cold: bool,
}

/// The nodes that may take a request for a model, by configuration and health (not load).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Eligible {
    /// Healthy nodes.
    pub up: Vec<usize>,
    /// Nodes due for a probe by live traffic (only ever a request's first choice).
    pub probe: Vec<usize>,
    /// Nodes whose probe another request is running: they may be back as soon as it ends, so
    /// a request for them waits rather than fails.
    pub probing: Vec<usize>,
}

/// Why no node may take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    /// No configured node serves the model (404).
    NotServed,
    /// Every node that does is out or drained (503 with this Retry-After).
    Unavailable { retry_after_s: u64 },
}

impl Ineligible {
    /// The client's error, for a request for `model` (`None`: any node).
    pub fn error(self, cfg: &Config, model: Option<&str>) -> LbError {
        match self {
            Ineligible::NotServed => {
                LbError::ModelNotFound { model: model.unwrap_or_default().to_string(), served: cfg.model_ids() }
            }
            Ineligible::Unavailable { retry_after_s } => {
                LbError::NoAvailableNode { model: model.map(str::to_string), retry_after_s }
            }
        }
    }
}

/// Which nodes may serve `model` (`None`: any node) now.
pub fn eligible(cfg: &Config, state: &ClusterState, model: Option<u64>, now: u64) -> Result<Eligible, Ineligible> {
    let all: Vec<usize>;
    let serving: &[usize] = match model {
        Some(key) => cfg.serving(key),
        None => {
            all = (0..cfg.nodes.len()).collect();
            &all
        }
    };
    if serving.is_empty() {
        return Err(Ineligible::NotServed);
    }
    let mut active = serving.iter().copied().filter(|&i| cfg.nodes.get(i).is_some_and(|n| !n.down));
    let (first, second) = (active.next(), active.next());
    // nginx's single-server rule: the only node for a model is never taken out.
    match (first, second) {
        (None, _) => return Err(Ineligible::Unavailable { retry_after_s: DRAINED_RETRY_AFTER_S }),
        (Some(only), None) => return Ok(Eligible { up: vec![only], ..Eligible::default() }),
        _ => {}
    }
    let active_checks = cfg.probe.as_ref();
    let mut result = Eligible { up: Vec::with_capacity(serving.len()), ..Eligible::default() };
    let mut soonest_back_ms: Option<u64> = None;
    let mut back_at = |t: u64| soonest_back_ms = Some(soonest_back_ms.map_or(t, |s| s.min(t)));
    for &i in serving {
        if cfg.nodes.get(i).is_none_or(|n| n.down) {
            continue;
        }
        if state.unremarkable(i) {
            result.up.push(i);
            continue;
        }
        let avoid_until = model.and_then(|m| state.not_running_until(i, m));
        if let Some(until) = avoid_until.filter(|&until| until > now) {
            // The node said it is not running this model; a check (or time) will tell when it is.
            back_at(match active_checks {
                Some(p) => now.saturating_add(p.interval_ms),
                None => until,
            });
            continue;
        }
        match state.phase(i, now, active_checks.is_some()) {
            Phase::Up => result.up.push(i),
            Phase::Probing => match state.health(i).probe_vm {
                Some(vm) if state.lease_alive(vm, now) => result.probing.push(i),
                _ => result.probe.push(i),
            },
            Phase::Out { until_ms } => back_at(until_ms),
            Phase::Down => back_at(now.saturating_add(active_checks.map_or(1_000, |p| p.interval_ms))),
        }
    }
    if result.up.is_empty() && result.probe.is_empty() && result.probing.is_empty() {
        let wait_ms = soonest_back_ms.map_or(DRAINED_RETRY_AFTER_S * 1_000, |t| t.saturating_sub(now));
        return Err(Ineligible::Unavailable { retry_after_s: wait_ms.div_ceil(1_000).max(1) });
    }
    Ok(result)
}

/// Ranks the eligible nodes that pass `allowed`, best first: primaries, then backups. A node due
/// for a probe may only come first (so exactly one live request at a time tests it). Returns
/// the list and whether its first node is a probe; `None` when no node passes.
pub fn order(
    cfg: &Config,
    state: &mut ClusterState,
    input: &RouteInput,
    nodes: &Eligible,
    loads: &[u32],
    allowed: impl Fn(usize) -> bool,
) -> Option<(Vec<usize>, bool)> {
    let probe: Vec<usize> = nodes.probe.iter().copied().filter(|&i| allowed(i)).collect();
    let all: Vec<usize> = nodes.up.iter().copied().filter(|&i| allowed(i)).chain(probe.iter().copied()).collect();
    let (primary, backup): (Vec<usize>, Vec<usize>) =
        all.into_iter().partition(|&i| cfg.nodes.get(i).is_some_and(|n| !n.backup));
    let mut ranked = rank(cfg, state, input, loads, &primary);
    ranked.extend(rank(cfg, state, input, loads, &backup));
    let first = ranked.first().copied()?;
    ranked.retain(|i| *i == first || !probe.contains(i));
    ranked.truncate(MAX_ROUTE_NODES);
    Some((ranked, probe.contains(&first)))
}

/// Picks and ranks the nodes for a request that is not held to the nodes' concurrency caps
/// (the web UI, other paths), and books the policy's counters and any probe claim.
pub fn route(cfg: &Config, state: &mut ClusterState, input: &RouteInput) -> Result<Route, Ineligible> {
    let nodes = eligible(cfg, state, input.model, input.now_ms)?;
    let loads = state.loads(input.now_ms);
    let (ranked, probing) =
        order(cfg, state, input, &nodes, &loads, |_| true).ok_or(Ineligible::Unavailable { retry_after_s: 1 })?;
    Ok(book(state, input, ranked, probing))
}

/// Records that `nodes[0]` was chosen: the policy's counters and the probe claim.
pub fn book(state: &mut ClusterState, input: &RouteInput, nodes: Vec<usize>, probing: bool) -> Route {
    if let Some(&first) = nodes.first() {
        state.count_pick(first);
        if probing {
            state.update_health(first, |h| h.probe_vm = Some(input.vm));
            // The claim is valid while this VM's lease lives.
            state.touch_lease(input.vm, input.now_ms);
        }
    }
    Route { nodes, probing, switched: false, cold: false }
}

/// Orders `candidates` by the configured policy, best first; `loads`: [`ClusterState::loads`].
pub(crate) fn rank(
    cfg: &Config,
    state: &mut ClusterState,
    input: &RouteInput,
    loads: &[u32],
    candidates: &[usize],
) -> Vec<usize> {
    if candidates.len() < 2 {
        return candidates.to_vec();
    }
    match cfg.policy {
        Policy::LeastConn => least_conn(cfg, state, loads, candidates.iter().copied()),
        Policy::RoundRobin => smooth_round_robin(cfg, state, candidates),
        Policy::RandomTwo => random_two(cfg, state, input, loads, candidates),
        Policy::Hash => match input.hash_key {
            Some(key) => rendezvous(cfg, key, candidates),
            None => least_conn(cfg, state, loads, candidates.iter().copied()),
        },
    }
}

/// Load relative to weight: compares `a.count / a.weight` with `b.count / b.weight` exactly.
fn cmp_weighted(a: (u64, u32), b: (u64, u32)) -> Ordering {
    // Run for every candidate of every decision: equal weights (the usual case) need no
    // product, and counts below 2^32 need no 128-bit one (a library call in wasm32).
    if a.1 == b.1 {
        return a.0.cmp(&b.0);
    }
    match (u32::try_from(a.0), u32::try_from(b.0)) {
        (Ok(x), Ok(y)) => (u64::from(x) * u64::from(b.1)).cmp(&(u64::from(y) * u64::from(a.1))),
        _ => (u128::from(a.0) * u128::from(b.1)).cmp(&(u128::from(b.0) * u128::from(a.1))),
    }
}

/// Orders failover candidates without touching any policy counter: primaries before backups,
/// each by load.
pub fn failover_order(
    cfg: &Config,
    state: &ClusterState,
    loads: &[u32],
    candidates: &[usize],
    allowed: impl Fn(usize) -> bool,
) -> Vec<usize> {
    let backup = |i: usize| cfg.nodes.get(i).is_none_or(|n| n.backup);
    let mut list = least_conn(cfg, state, loads, candidates.iter().copied().filter(|&i| allowed(i) && !backup(i)));
    if list.len() < MAX_ROUTE_NODES {
        list.extend(least_conn(cfg, state, loads, candidates.iter().copied().filter(|&i| allowed(i) && backup(i))));
    }
    list.truncate(MAX_ROUTE_NODES);
    list
}

/// The best `MAX_ROUTE_NODES` of `candidates`, best first: fewest in flight per weight; ties go
/// to the node picked least per weight, so that sequential requests spread instead of piling
/// on the first node, then to the lower index. One pass that keeps the best few in order
/// (a sort or a selection over hundreds of nodes cost more than the rest of the decision).
fn least_conn(
    cfg: &Config,
    state: &ClusterState,
    loads: &[u32],
    candidates: impl IntoIterator<Item = usize>,
) -> Vec<usize> {
    type Key = (usize, u64, u64, u32);
    let better = |a: &Key, b: &Key| {
        cmp_weighted((a.1, a.3), (b.1, b.3)).then_with(|| cmp_weighted((a.2, a.3), (b.2, b.3))).then(a.0.cmp(&b.0))
            == Ordering::Less
    };
    let mut best: Vec<Key> = Vec::with_capacity(MAX_ROUTE_NODES + 1);
    for i in candidates {
        let Some(n) = cfg.nodes.get(i) else { continue };
        let key = (i, u64::from(loads.get(i).copied().unwrap_or(0)), state.picks(i), n.weight);
        if best.len() == MAX_ROUTE_NODES && best.last().is_some_and(|last| !better(&key, last)) {
            continue;
        }
        let at = best.iter().position(|b| better(&key, b)).unwrap_or(best.len());
        best.insert(at, key);
        best.truncate(MAX_ROUTE_NODES);
    }
    best.into_iter().map(|k| k.0).collect()
}

/// nginx's smooth weighted round robin over the candidates, with current weights shared by all
/// workers. The rest of the list follows by current weight, for failover.
fn smooth_round_robin(cfg: &Config, state: &mut ClusterState, candidates: &[usize]) -> Vec<usize> {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for &i in candidates {
        let Some(n) = cfg.nodes.get(i) else { continue };
        let weight = i64::from(n.weight);
        let current = state.rr(i).saturating_add(weight);
        state.set_rr(i, current);
        total = total.saturating_add(weight);
        if best.is_none_or(|(_, w)| current > w) {
            best = Some((i, current));
        }
    }
    let Some((best, _)) = best else {
        return Vec::new();
    };
    let current = state.rr(best).saturating_sub(total);
    state.set_rr(best, current);
    let mut rest: Vec<(usize, i64)> = candidates.iter().filter(|&&i| i != best).map(|&i| (i, state.rr(i))).collect();
    rest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    std::iter::once(best).chain(rest.into_iter().map(|r| r.0)).collect()
}

/// Two random candidates, the less loaded first; the rest by least_conn for failover.
fn random_two(
    cfg: &Config,
    state: &ClusterState,
    input: &RouteInput,
    loads: &[u32],
    candidates: &[usize],
) -> Vec<usize> {
    let len = candidates.len() as u64;
    let mut rng = SplitMix(input.random);
    let a = (rng.next() % len) as usize;
    let b = (a + 1 + (rng.next() % (len - 1)) as usize) % candidates.len();
    let pair: Vec<usize> = [a, b].iter().filter_map(|&k| candidates.get(k).copied()).collect();
    let mut ranked = least_conn(cfg, state, loads, pair.iter().copied());
    ranked.extend(least_conn(cfg, state, loads, candidates.iter().copied().filter(|i| !pair.contains(i))));
    ranked
}

/// Weighted rendezvous (highest random weight) hashing: a key keeps its node while that node is
/// up, and removing a node moves only the keys it had.
fn rendezvous(cfg: &Config, key: u64, candidates: &[usize]) -> Vec<usize> {
    let mut scored: Vec<(usize, f64)> = candidates
        .iter()
        .filter_map(|&i| {
            let n = cfg.nodes.get(i)?;
            let node = cfg.index.layout.nodes.get(i).copied().unwrap_or(0);
            let h = mix(key ^ node.rotate_left(17));
            // Uniform in (0, 1), never 0 or 1.
            let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            Some((i, f64::from(n.weight) / -unit.ln()))
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.into_iter().map(|s| s.0).collect()
}

/// A hash of a `hash` policy key.
pub fn hash_key(key: &str) -> u64 {
    mix(fnv1a(key.as_bytes(), FNV_OFFSET))
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::config::Config;
    use crate::logic::state::model_key;
    use std::collections::BTreeMap;

    fn config(policy: &str, nodes: &str) -> Config {
        Config::parse(format!(r#"{{"policy":"{policy}","nodes":[{nodes}]}}"#).as_bytes()).unwrap()
    }

    #[test]
    fn weighted_comparison_is_the_exact_cross_product() {
        let counts = [0, 1, 2, 7, 1_000, u64::from(u32::MAX) - 1, u64::from(u32::MAX), 1 << 32, u64::MAX / 3, u64::MAX];
        let weights = [1, 2, 3, 999, 1_000];
        for &a in &counts {
            for &b in &counts {
                for &wa in &weights {
                    for &wb in &weights {
                        let exact = (u128::from(a) * u128::from(wb)).cmp(&(u128::from(b) * u128::from(wa)));
                        assert_eq!(cmp_weighted((a, wa), (b, wb)), exact, "{a}/{wa} vs {b}/{wb}");
                    }
                }
            }
        }
    }

    fn three(policy: &str) -> Config {
        config(
            policy,
            r#"{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]},
               {"name":"b","address":"10.0.0.2:1","models":["m1"]},
               {"name":"c","address":"10.0.0.3:1","models":["m1","m3"]}"#,
        )
    }

    fn input(model: &str, now_ms: u64) -> RouteInput {
        RouteInput { model: Some(model_key(model)), hash_key: None, now_ms, vm: 1, random: 0 }
    }

    fn names(cfg: &Config, r: &Route) -> Vec<String> {
        r.nodes.iter().map(|&i| cfg.nodes[i].name.clone()).collect()
    }

    #[test]
    fn routes_by_model() {
        let cfg = three("least_conn");
        let mut s = cfg.new_state();
        assert_eq!(names(&cfg, &route(&cfg, &mut s, &input("m2", 0)).unwrap()), ["a"]);
        assert_eq!(names(&cfg, &route(&cfg, &mut s, &input("m3", 0)).unwrap()), ["c"]);
        let r = route(&cfg, &mut s, &input("m1", 0)).unwrap();
        assert_eq!(r.nodes.len(), 3);
        match route(&cfg, &mut s, &input("nope", 0)) {
            Err(why) => match why.error(&cfg, Some("nope")) {
                LbError::ModelNotFound { served, .. } => assert_eq!(served, ["m1", "m2", "m3"]),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn least_conn_spreads_concurrent_requests() {
        let cfg = three("least_conn");
        let mut s = cfg.new_state();
        let firsts: Vec<String> = (0..6)
            .map(|_| {
                let first = route(&cfg, &mut s, &input("m1", 0)).unwrap().nodes[0];
                s.acquire(1, first, 0);
                cfg.nodes[first].name.clone()
            })
            .collect();
        // Nothing completes: each node gets two of six.
        for n in 0..3 {
            assert_eq!(s.inflight(n, 0), 2, "{firsts:?}");
        }
    }

    #[test]
    fn least_conn_spreads_sequential_requests_by_weight() {
        let cfg = config(
            "least_conn",
            r#"{"name":"a","address":"10.0.0.1:1","weight":2},{"name":"b","address":"10.0.0.2:1"}"#,
        );
        let mut s = cfg.new_state();
        let mut count = BTreeMap::new();
        for _ in 0..30 {
            let r = route(&cfg, &mut s, &input("m", 0)).unwrap();
            s.release(1, r.nodes[0]);
            *count.entry(cfg.nodes[r.nodes[0]].name.clone()).or_insert(0) += 1;
        }
        assert_eq!((count["a"], count["b"]), (20, 10));
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let cfg = config(
            "round_robin",
            r#"{"name":"a","address":"10.0.0.1:1","weight":5},{"name":"b","address":"10.0.0.2:1"},{"name":"c","address":"10.0.0.3:1"}"#,
        );
        let mut s = cfg.new_state();
        let seq: String =
            (0..7).map(|_| names(&cfg, &route(&cfg, &mut s, &input("m", 0)).unwrap())[0].clone()).collect();
        // nginx's documented sequence for weights 5,1,1.
        assert_eq!(seq, "aabacaa");
    }

    #[test]
    fn random_two_uses_every_node_and_prefers_less_loaded() {
        let cfg = three("random_two");
        let mut s = cfg.new_state();
        let mut seen = BTreeMap::new();
        for r in 0..300u64 {
            let mut i = input("m1", 0);
            i.random = r.wrapping_mul(0x9e37_79b9);
            let route = route(&cfg, &mut s, &i).unwrap();
            assert_eq!(route.nodes.len(), 3);
            s.release(1, route.nodes[0]);
            *seen.entry(cfg.nodes[route.nodes[0]].name.clone()).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        // Load a and b: with two choices among three, c wins whenever it is drawn.
        s.acquire(9, 0, 0);
        s.acquire(9, 1, 0);
        let mut c_first = 0;
        for r in 0..300u64 {
            let mut i = input("m1", 0);
            i.random = r;
            let route = route(&cfg, &mut s, &i).unwrap();
            s.release(1, route.nodes[0]);
            c_first += usize::from(route.nodes[0] == 2);
        }
        assert!(c_first >= 150, "{c_first}");
    }

    #[test]
    fn hash_is_sticky_and_moves_only_removed_keys() {
        let cfg = config(
            "hash",
            r#"{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"},{"name":"c","address":"10.0.0.3:1"},{"name":"d","address":"10.0.0.4:1"}"#,
        );
        let keys: Vec<String> = (0..400).map(|k| format!("10.1.{}.{}", k / 256, k % 256)).collect();
        let owner = |cfg: &Config, s: &mut ClusterState, k: &str| {
            let mut i = input("m", 0);
            i.hash_key = Some(hash_key(k));
            let r = route(cfg, s, &i).unwrap();
            cfg.nodes[r.nodes[0]].name.clone()
        };
        let mut s = cfg.new_state();
        let before: Vec<String> = keys.iter().map(|k| owner(&cfg, &mut s, k)).collect();
        let again: Vec<String> = keys.iter().map(|k| owner(&cfg, &mut s, k)).collect();
        assert_eq!(before, again, "sticky");
        let mut per = BTreeMap::new();
        for o in &before {
            *per.entry(o.clone()).or_insert(0) += 1;
        }
        assert!(per.values().all(|&n| n > 60), "balanced: {per:?}");
        // Take c out: only c's keys move.
        let mut s = cfg.new_state();
        for t in 0..3 {
            s.update_health(2, |h| h.record_failure(t, 3, 30_000));
        }
        for (k, old) in keys.iter().zip(&before) {
            let new = owner(&cfg, &mut s, k);
            if old == "c" {
                assert_ne!(new, "c");
            } else {
                assert_eq!(&new, old, "key {k} moved");
            }
        }
    }

    #[test]
    fn failed_node_is_skipped_then_probed_once() {
        let cfg = three("least_conn");
        let mut s = cfg.new_state();
        for t in 0..3 {
            s.update_health(1, |h| h.record_failure(t, 3, 30_000));
        }
        let r = route(&cfg, &mut s, &input("m1", 10)).unwrap();
        assert!(!names(&cfg, &r).contains(&"b".to_string()));
        // After fail_timeout, b is idle and due for a probe: it comes first, claimed by VM 1.
        let mut later = input("m1", 30_010);
        later.vm = 1;
        let r = route(&cfg, &mut s, &later).unwrap();
        assert_eq!(names(&cfg, &r)[0], "b");
        assert!(r.probing);
        // While the probe runs, no other request may use b, not even as a failover.
        for _ in 0..5 {
            let r = route(&cfg, &mut s, &input("m1", 30_020)).unwrap();
            assert!(!names(&cfg, &r).contains(&"b".to_string()), "{:?}", names(&cfg, &r));
        }
    }

    #[test]
    fn all_out_gives_503_with_retry_after() {
        let cfg = config("least_conn", r#"{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"}"#);
        let mut s = cfg.new_state();
        s.update_health(0, |h| h.record_failure(0, 1, 10_000));
        s.update_health(1, |h| h.record_failure(2_000, 1, 10_000));
        let before = s.clone();
        assert_eq!(route(&cfg, &mut s, &input("m", 4_500)), Err(Ineligible::Unavailable { retry_after_s: 6 }));
        assert_eq!(s, before, "a rejected request books nothing");
    }

    #[test]
    fn single_node_for_a_model_is_never_taken_out() {
        let cfg = three("least_conn");
        let mut s = cfg.new_state();
        for t in 0..10 {
            s.update_health(0, |h| h.record_failure(t, 3, 30_000));
        }
        assert_eq!(names(&cfg, &route(&cfg, &mut s, &input("m2", 20)).unwrap()), ["a"]);
    }

    #[test]
    fn down_and_backup_nodes() {
        let cfg = config(
            "least_conn",
            r#"{"name":"a","address":"10.0.0.1:1","down":true},{"name":"b","address":"10.0.0.2:1"},
               {"name":"c","address":"10.0.0.3:1"},{"name":"z","address":"10.0.0.9:1","backup":true}"#,
        );
        let mut s = cfg.new_state();
        let r = route(&cfg, &mut s, &input("m", 0)).unwrap();
        let n = names(&cfg, &r);
        assert!(!n.contains(&"a".to_string()));
        assert_eq!(n.last().unwrap(), "z", "backup only after the primaries: {n:?}");
        for node in [1, 2] {
            for t in 0..3 {
                s.update_health(node, |h| h.record_failure(t, 3, 30_000));
            }
        }
        assert_eq!(names(&cfg, &route(&cfg, &mut s, &input("m", 5)).unwrap()), ["z"]);
        let drained = config("least_conn", r#"{"name":"a","address":"10.0.0.1:1","down":true}"#);
        let mut s = drained.new_state();
        assert!(matches!(route(&drained, &mut s, &input("m", 0)), Err(Ineligible::Unavailable { .. })));
    }
}
