//! The cluster state every Envoy worker shares: node health, in-flight requests and the
//! balancing counters. It lives in proxy-wasm shared data and is updated with compare-and-swap
//! by the glue; here it is a plain value.
//!
//! In-flight counts are kept per VM in a lease that the VM's ticks renew. A VM that crashed
//! (and was reloaded by Envoy's FAIL_RELOAD) never decrements what it held, so its lease simply
//! expires and the counts it held stop counting within `LEASE_TTL_MS`.

use crate::logic::health::NodeHealth;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The shared-data key of the state.
pub const STATE_KEY: &str = "exo-lb/state/v1";
/// How long a lease lives without renewal. Ticks renew every `LEASE_RENEW_MS`.
pub const LEASE_TTL_MS: u64 = 10_000;
pub const LEASE_RENEW_MS: u64 = 1_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub expires_ms: u64,
    /// Node name -> requests this VM has in flight there.
    pub inflight: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Node name -> failure state. Absent means healthy.
    #[serde(default)]
    pub health: BTreeMap<String, NodeHealth>,
    /// VM id -> its lease.
    #[serde(default)]
    pub leases: BTreeMap<u64, Lease>,
    /// Smooth weighted round robin: node name -> current weight.
    #[serde(default)]
    pub rr: BTreeMap<String, i64>,
    /// Node name -> times it was chosen first (spreads ties evenly).
    #[serde(default)]
    pub picks: BTreeMap<String, u64>,
}

impl ClusterState {
    /// Reads the state; absent or unreadable bytes give the empty state (which is safe: every
    /// node healthy and idle).
    pub fn decode(bytes: Option<&[u8]>) -> ClusterState {
        bytes
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn health(&self, node: &str) -> NodeHealth {
        self.health.get(node).cloned().unwrap_or_default()
    }

    pub fn health_mut(&mut self, node: &str) -> &mut NodeHealth {
        self.health.entry(node.to_string()).or_default()
    }

    /// Stores a node's health, dropping it when it is back to the default.
    pub fn tidy_health(&mut self, node: &str) {
        if self
            .health
            .get(node)
            .is_some_and(|h| *h == NodeHealth::default())
        {
            self.health.remove(node);
        }
    }

    pub fn lease_alive(&self, vm: u64, now_ms: u64) -> bool {
        self.leases.get(&vm).is_some_and(|l| l.expires_ms > now_ms)
    }

    /// Requests in flight on `node`, summed over the live leases of all VMs.
    pub fn inflight(&self, node: &str, now_ms: u64) -> u32 {
        self.leases
            .values()
            .filter(|l| l.expires_ms > now_ms)
            .filter_map(|l| l.inflight.get(node))
            .fold(0u32, |a, b| a.saturating_add(*b))
    }

    pub fn acquire(&mut self, vm: u64, node: &str, now_ms: u64) {
        let lease = self.leases.entry(vm).or_default();
        lease.expires_ms = now_ms.saturating_add(LEASE_TTL_MS);
        let n = lease.inflight.entry(node.to_string()).or_insert(0);
        *n = n.saturating_add(1);
    }

    /// Gives back one request on `node`. Never goes below zero: a lease that expired and was
    /// pruned has already given everything back.
    pub fn release(&mut self, vm: u64, node: &str) {
        let Some(lease) = self.leases.get_mut(&vm) else {
            return;
        };
        if let Some(n) = lease.inflight.get_mut(node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                lease.inflight.remove(node);
            }
        }
        if lease.inflight.is_empty() {
            self.leases.remove(&vm);
        }
    }

    /// Extends this VM's lease (a tick), and drops the leases of VMs that stopped renewing.
    /// Returns the number of in-flight requests reclaimed from dead leases.
    pub fn renew_and_prune(&mut self, vm: u64, now_ms: u64) -> u32 {
        if let Some(lease) = self.leases.get_mut(&vm) {
            lease.expires_ms = now_ms.saturating_add(LEASE_TTL_MS);
        }
        let dead: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        let mut reclaimed = 0u32;
        for id in dead {
            if let Some(lease) = self.leases.remove(&id) {
                reclaimed = lease
                    .inflight
                    .values()
                    .fold(reclaimed, |a, b| a.saturating_add(*b));
            }
        }
        // A probe held by a VM that is gone will never report back.
        let leases = &self.leases;
        for h in self.health.values_mut() {
            if let Some(p) = h.probe_vm {
                if leases.get(&p).is_none_or(|l| l.expires_ms <= now_ms) {
                    h.probe_vm = None;
                }
            }
        }
        reclaimed
    }

    /// Forgets nodes that are no longer configured (after a configuration change).
    pub fn retain_nodes(&mut self, names: &[&str]) {
        self.health.retain(|k, _| names.contains(&k.as_str()));
        self.rr.retain(|k, _| names.contains(&k.as_str()));
        self.picks.retain(|k, _| names.contains(&k.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_sums_live_leases_and_returns_to_zero() {
        let mut s = ClusterState::default();
        s.acquire(1, "a", 0);
        s.acquire(1, "a", 0);
        s.acquire(2, "a", 0);
        s.acquire(2, "b", 0);
        assert_eq!((s.inflight("a", 1), s.inflight("b", 1)), (3, 1));
        s.release(1, "a");
        s.release(1, "a");
        s.release(1, "a"); // one too many: ignored
        s.release(2, "a");
        s.release(2, "b");
        assert_eq!((s.inflight("a", 1), s.inflight("b", 1)), (0, 0));
        assert!(s.leases.is_empty());
    }

    #[test]
    fn dead_vm_lease_is_reclaimed() {
        let mut s = ClusterState::default();
        s.acquire(1, "a", 0);
        s.acquire(2, "a", 0);
        s.health_mut("a").probe_vm = Some(1);
        // VM 2 keeps ticking, VM 1 died.
        for t in (1_000..=LEASE_TTL_MS).step_by(1_000) {
            s.renew_and_prune(2, t);
        }
        assert_eq!(s.inflight("a", LEASE_TTL_MS), 1);
        assert_eq!(s.health("a").probe_vm, None);
        assert!(!s.lease_alive(1, LEASE_TTL_MS));
    }

    #[test]
    fn encodes_and_decodes() {
        let mut s = ClusterState::default();
        s.acquire(7, "rk1", 5);
        s.health_mut("rk2").record_failure(3, 1, 100);
        s.rr.insert("rk1".into(), -2);
        let back = ClusterState::decode(Some(&s.encode()));
        assert_eq!(back, s);
        assert_eq!(
            ClusterState::decode(Some(b"garbage")),
            ClusterState::default()
        );
        assert_eq!(ClusterState::decode(None), ClusterState::default());
    }
}
