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
pub const STATE_KEY: &str = "exo-lb/state/v2";
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
    /// Requests waiting for a free node, oldest first, for all workers.
    #[serde(default)]
    pub queue: Vec<Waiter>,
    /// The arrival number of the next waiter (FIFO order across workers).
    #[serde(default)]
    pub next_seq: u64,
    /// Node name -> the model it ran last (its warm model).
    #[serde(default)]
    pub warm: BTreeMap<String, String>,
    /// Node name -> models it said it is not running (newer exo's 404) -> until when to avoid
    /// them there (a check that lists the model ends it sooner).
    #[serde(default)]
    pub not_running: BTreeMap<String, BTreeMap<String, u64>>,
    /// Model -> moving average of how long a request takes once a node has it (ms).
    #[serde(default)]
    pub service_ms: BTreeMap<String, u64>,
    /// Nodes still busy with a generation whose client left.
    #[serde(default)]
    pub holds: Vec<Hold>,
    /// The VM that runs the active health checks.
    #[serde(default)]
    pub prober: Option<ProberLease>,
    /// Node name -> when its next active check is due.
    #[serde(default)]
    pub next_check_ms: BTreeMap<String, u64>,
    /// Node name -> counters for the status page.
    #[serde(default)]
    pub counters: BTreeMap<String, NodeCounters>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub seq: u64,
    /// The VM and stream context holding the paused request.
    pub vm: u64,
    pub ctx: u32,
    pub model: String,
    #[serde(default)]
    pub hash_key: Option<String>,
    #[serde(default)]
    pub random: u64,
    pub enqueued_ms: u64,
    /// Set by the scheduler; the owning VM picks it up on its next tick.
    #[serde(default)]
    pub grant: Option<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grant {
    /// A slot on the first node is booked in the waiter's VM lease.
    Nodes {
        nodes: Vec<String>,
        probing: bool,
        #[serde(default)]
        switched: bool,
    },
    /// Every node for the model went out while it waited.
    Unavailable { retry_after_s: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub node: String,
    pub until_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProberLease {
    pub vm: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounters {
    #[serde(default)]
    pub served: u64,
    #[serde(default)]
    pub failures: u64,
    #[serde(default)]
    pub switches: u64,
}

impl ClusterState {
    /// Reads the state; absent or unreadable bytes give the empty state (which is safe: every
    /// node healthy and idle).
    pub fn decode(bytes: Option<&[u8]>) -> ClusterState {
        bytes.and_then(|b| postcard::from_bytes(b).ok()).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn health(&self, node: &str) -> NodeHealth {
        self.health.get(node).cloned().unwrap_or_default()
    }

    pub fn health_mut(&mut self, node: &str) -> &mut NodeHealth {
        self.health.entry(node.to_string()).or_default()
    }

    /// Stores a node's health, dropping it when it is back to the default.
    pub fn tidy_health(&mut self, node: &str) {
        if self.health.get(node).is_some_and(|h| *h == NodeHealth::default()) {
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
        self.drop_lease_if_idle(vm);
    }

    /// Keeps a VM's lease alive while it has requests in flight or waiting.
    pub fn touch_lease(&mut self, vm: u64, now_ms: u64) {
        self.leases.entry(vm).or_default().expires_ms = now_ms.saturating_add(LEASE_TTL_MS);
    }

    pub fn drop_lease_if_idle(&mut self, vm: u64) {
        let idle = self.leases.get(&vm).is_some_and(|l| l.inflight.is_empty());
        if idle && !self.queue.iter().any(|w| w.vm == vm) {
            self.leases.remove(&vm);
        }
    }

    /// In flight plus held by a generation whose client left: what counts against the cap.
    pub fn busy(&self, node: &str, now_ms: u64) -> u32 {
        let held = self.holds.iter().filter(|h| h.node == node && h.until_ms > now_ms).count();
        self.inflight(node, now_ms).saturating_add(u32::try_from(held).unwrap_or(u32::MAX))
    }

    pub fn count(&mut self, node: &str) -> &mut NodeCounters {
        self.counters.entry(node.to_string()).or_default()
    }

    /// Records that `node` runs `model` now; counts a switch when it ran another one.
    pub fn set_warm(&mut self, node: &str, model: &str) {
        match self.warm.get(node) {
            Some(current) if current == model => {}
            previous => {
                if previous.is_some() {
                    let c = self.count(node);
                    c.switches = c.switches.saturating_add(1);
                }
                self.warm.insert(node.to_string(), model.to_string());
            }
        }
    }

    /// Extends this VM's lease (a tick), and drops the leases of VMs that stopped renewing.
    /// Returns the number of in-flight requests reclaimed from dead leases.
    pub fn renew_and_prune(&mut self, vm: u64, now_ms: u64) -> u32 {
        if let Some(lease) = self.leases.get_mut(&vm) {
            lease.expires_ms = now_ms.saturating_add(LEASE_TTL_MS);
        }
        let dead: Vec<u64> = self.leases.iter().filter(|(_, l)| l.expires_ms <= now_ms).map(|(id, _)| *id).collect();
        let mut reclaimed = 0u32;
        for id in dead {
            if let Some(lease) = self.leases.remove(&id) {
                reclaimed = lease.inflight.values().fold(reclaimed, |a, b| a.saturating_add(*b));
            }
            // Requests paused in a VM that is gone can never be resumed.
            self.queue.retain(|w| w.vm != id);
        }
        self.holds.retain(|h| h.until_ms > now_ms);
        if self.prober.as_ref().is_some_and(|p| p.expires_ms <= now_ms) {
            self.prober = None;
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
        self.warm.retain(|k, _| names.contains(&k.as_str()));
        self.not_running.retain(|k, _| names.contains(&k.as_str()));
        self.next_check_ms.retain(|k, _| names.contains(&k.as_str()));
        self.counters.retain(|k, _| names.contains(&k.as_str()));
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
    fn a_vm_with_waiters_keeps_its_lease() {
        let mut s = ClusterState::default();
        s.touch_lease(3, 0);
        s.queue.push(Waiter {
            seq: 0,
            vm: 3,
            ctx: 9,
            model: "m".into(),
            hash_key: None,
            random: 0,
            enqueued_ms: 0,
            grant: None,
        });
        s.acquire(3, "a", 0);
        s.release(3, "a");
        assert!(s.leases.contains_key(&3));
        s.queue.clear();
        s.drop_lease_if_idle(3);
        assert!(s.leases.is_empty());
        // A dead VM's waiters go with its lease.
        s.touch_lease(4, 0);
        s.queue.push(Waiter {
            seq: 1,
            vm: 4,
            ctx: 2,
            model: "m".into(),
            hash_key: None,
            random: 0,
            enqueued_ms: 0,
            grant: None,
        });
        s.renew_and_prune(5, LEASE_TTL_MS + 1);
        assert!(s.queue.is_empty());
    }

    #[test]
    fn busy_counts_holds_until_they_expire() {
        let mut s = ClusterState::default();
        s.acquire(1, "a", 0);
        s.holds.push(Hold { node: "a".into(), until_ms: 500 });
        assert_eq!(s.busy("a", 100), 2);
        assert_eq!(s.busy("a", 500), 1);
    }

    #[test]
    fn warm_model_switches_are_counted() {
        let mut s = ClusterState::default();
        s.set_warm("a", "m1");
        s.set_warm("a", "m1");
        s.set_warm("a", "m2");
        assert_eq!((s.warm["a"].as_str(), s.counters["a"].switches), ("m2", 1));
    }

    #[test]
    fn encodes_and_decodes() {
        let mut s = ClusterState::default();
        s.acquire(7, "rk1", 5);
        s.health_mut("rk2").record_failure(3, 1, 100);
        s.rr.insert("rk1".into(), -2);
        let back = ClusterState::decode(Some(&s.encode()));
        assert_eq!(back, s);
        assert_eq!(ClusterState::decode(Some(b"garbage")), ClusterState::default());
        assert_eq!(ClusterState::decode(None), ClusterState::default());
    }
}
