//! Active health checks: exactly one VM at a time (the holder of a lease in shared data, taken
//! over when its holder stops renewing it) checks each node every `probe.interval`; a failed
//! check takes the node out, a successful one brings it back.

use crate::logic::config::Config;
use crate::logic::estimates::Estimates;
use crate::logic::schedule;
use crate::logic::state::{model_key, ClusterState, ProberLease};
use serde::Deserialize;

/// The checks this VM should send now (node indices). Takes or renews the prober lease.
pub fn due_checks(cfg: &Config, state: &mut ClusterState, vm: u64, now: u64) -> Vec<usize> {
    let Some(probe) = &cfg.probe else { return Vec::new() };
    // A prober of another node list (the other side of a reload) does not check this list's
    // new nodes: each list's VMs check their own (nodes both have are checked once per
    // interval all the same: the next check is in the shared node record).
    if state.prober().is_some_and(|p| p.vm != vm && p.expires_ms > now && state.same_layout(p.vm)) {
        return Vec::new();
    }
    let ttl = probe.interval_ms.saturating_mul(3).max(3_000);
    state.set_prober(Some(ProberLease { vm, expires_ms: now.saturating_add(ttl) }));
    let mut due = Vec::new();
    for (i, node) in cfg.nodes.iter().enumerate() {
        if node.down {
            continue;
        }
        if state.next_check(i) <= now {
            state.set_next_check(i, now.saturating_add(probe.interval_ms));
            due.push(i);
        }
    }
    due
}

/// Applies a check's result: `status` 0 means no response (connect failure or timeout). A
/// `/v1/models` answer also tells which models the node has again.
pub fn record_check(
    cfg: &Config,
    state: &mut ClusterState,
    est: &Estimates,
    node: usize,
    status: u32,
    body: &[u8],
    now: u64,
) {
    if node >= cfg.nodes.len() {
        return;
    }
    let ok = (200..300).contains(&status);
    state.update_health(node, |h| h.record_check(ok, now));
    if ok {
        if let Ok(list) = serde_json::from_slice::<ModelList>(body) {
            let listed: Vec<u64> = list.data.iter().map(|d| model_key(&d.id)).collect();
            state.retain_not_running(node, |m| !listed.contains(&m));
        }
        schedule::schedule(cfg, state, est, now);
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::health::Phase;

    fn cfg() -> Config {
        Config::parse(
            br#"{"probe":{"interval":"5s"},"nodes":[{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1","down":true}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn each_node_list_checks_its_own_nodes_during_a_reload() {
        let old = cfg();
        let new = Config::parse(
            br#"{"probe":{"interval":"5s"},"nodes":[{"name":"a","address":"10.0.0.1:1"},{"name":"c","address":"10.0.0.3:1"}]}"#,
        )
        .unwrap();
        let mut s = old.new_state();
        s.touch_lease(1, 0);
        assert_eq!(due_checks(&old, &mut s, 1, 0), vec![0]);
        // VM 2 runs the new list: the old list's prober does not check c for it.
        let mut s = ClusterState::decode(Some(s.encode()), &new.index.layout);
        s.touch_lease(2, 0);
        assert_eq!(due_checks(&new, &mut s, 2, 1), vec![1], "c, not a again");
        // Back with the old list: a was checked already, and VM 2's lease does not stop VM 1.
        let mut s = ClusterState::decode(Some(s.encode()), &old.index.layout);
        assert_eq!(due_checks(&old, &mut s, 1, 2), Vec::<usize>::new());
        assert_eq!(s.prober().map(|p| p.vm), Some(1));
    }

    #[test]
    fn one_prober_at_a_time_and_taken_over_when_it_dies() {
        let c = cfg();
        let mut s = c.new_state();
        assert_eq!(due_checks(&c, &mut s, 1, 0), vec![0], "drained nodes are not checked");
        assert_eq!(due_checks(&c, &mut s, 2, 100), Vec::<usize>::new(), "VM 1 holds the lease");
        assert_eq!(due_checks(&c, &mut s, 1, 4_999), Vec::<usize>::new(), "not due yet");
        assert_eq!(due_checks(&c, &mut s, 1, 5_000), vec![0]);
        // VM 1 stops; after the lease expires VM 2 takes over.
        assert_eq!(due_checks(&c, &mut s, 2, 5_000 + 15_000), vec![0]);
        assert_eq!(s.prober().map(|p| p.vm), Some(2));
    }

    #[test]
    fn checks_take_nodes_out_and_bring_them_back() {
        let c = cfg();
        let mut s = c.new_state();
        let est = Estimates::default();
        record_check(&c, &mut s, &est, 0, 0, b"", 10);
        assert_eq!(s.health(0).phase(10, true), Phase::Down);
        s.mark_not_running(0, model_key("m1"), u64::MAX);
        s.mark_not_running(0, model_key("m2"), u64::MAX);
        record_check(&c, &mut s, &est, 0, 200, br#"{"object":"list","data":[{"id":"m1"}]}"#, 20);
        assert_eq!(s.health(0).phase(20, true), Phase::Up);
        assert_eq!(s.not_running(0, 20), vec![model_key("m2")], "the check listed m1 again");
    }
}
