//! Scheduling for serial nodes: each node runs at most `max_inflight` requests; the rest wait in
//! one FIFO queue shared by all Envoy workers and are admitted, oldest first, to the first
//! candidate that frees, preferring a node that already has the model loaded (a model switch
//! on an RK3588 costs tens of seconds).
//!
//! The queue lives in the shared [`ClusterState`]. Whoever frees a slot (a finishing request,
//! a tick) runs [`schedule`], which grants slots to waiters and books them in the waiter's VM
//! lease; the VM that holds the paused request picks its grant up with [`take_ready`] on its
//! next tick and resumes it.

use crate::logic::config::{Config, Policy};
use crate::logic::errors::LbError;
use crate::logic::select::{self, book, eligible, order, Eligible, Route, RouteInput};
use crate::logic::state::{ClusterState, Grant, Waiter};
use std::collections::BTreeMap;

/// Without a measured service time, the Retry-After of a full queue.
const DEFAULT_RETRY_AFTER_S: u64 = 10;

/// A request that wants a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival<'a> {
    pub vm: u64,
    pub ctx: u32,
    pub model: &'a str,
    pub hash_key: Option<&'a str>,
    pub random: u64,
    pub now_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A slot on the first node is booked: send it now.
    Granted(Route),
    /// Every candidate is busy: hold the request; a tick resumes it.
    Queued,
    Rejected(LbError),
}

/// What a VM's tick must do with one of its paused requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Resume it towards these nodes (a slot on the first is booked).
    Go { ctx: u32, route: Route },
    /// Answer it with this error.
    Fail { ctx: u32, error: LbError },
}

/// Admits an inference request: at once when a node is free for it (and no older request is
/// waiting for that node), else into the queue, or rejected (404, 503, 429 when the queue is
/// full).
pub fn admit(cfg: &Config, state: &mut ClusterState, a: &Arrival) -> Admission {
    if let Err(error) = eligible(cfg, state, Some(a.model), a.now_ms) {
        return Admission::Rejected(error);
    }
    state.touch_lease(a.vm, a.now_ms);
    let seq = state.next_seq;
    state.next_seq = seq.wrapping_add(1);
    state.queue.push(Waiter {
        seq,
        vm: a.vm,
        ctx: a.ctx,
        model: a.model.to_string(),
        hash_key: a.hash_key.map(str::to_string),
        random: a.random,
        enqueued_ms: a.now_ms,
        grant: None,
    });
    schedule(cfg, state, a.now_ms);
    let Some(pos) = state.queue.iter().position(|w| w.vm == a.vm && w.ctx == a.ctx) else {
        return Admission::Rejected(LbError::NoAvailableNode { model: Some(a.model.to_string()), retry_after_s: 1 });
    };
    let granted = state.queue.get(pos).and_then(|w| w.grant.clone());
    let admission = match granted {
        Some(grant) => {
            state.queue.remove(pos);
            match to_ready(cfg, a.ctx, a.model, grant) {
                Ready::Go { route, .. } => Admission::Granted(route),
                Ready::Fail { error, .. } => Admission::Rejected(error),
            }
        }
        None => {
            let waiting = state.queue.iter().filter(|w| w.grant.is_none()).count();
            if waiting > usize::try_from(cfg.queue.max_waiting).unwrap_or(usize::MAX) {
                state.queue.remove(pos);
                let retry_after_s =
                    state.service_ms.get(a.model).map_or(DEFAULT_RETRY_AFTER_S, |ms| ms.div_ceil(1_000).max(1));
                Admission::Rejected(LbError::QueueFull { model: a.model.to_string(), retry_after_s })
            } else {
                Admission::Queued
            }
        }
    };
    state.drop_lease_if_idle(a.vm);
    admission
}

/// Grants free slots to waiting requests, oldest first.
pub fn schedule(cfg: &Config, state: &mut ClusterState, now: u64) {
    // Waiters for a model that could not be placed, ahead of later ones (for the wait estimate).
    let mut ahead: BTreeMap<String, u64> = BTreeMap::new();
    for k in 0..state.queue.len() {
        let Some(waiter) = state.queue.get(k).filter(|w| w.grant.is_none()).cloned() else {
            continue;
        };
        let grant = match eligible(cfg, state, Some(&waiter.model), now) {
            Ok(nodes) => {
                match place(cfg, state, &waiter, &nodes, ahead.get(&waiter.model).copied().unwrap_or(0), now) {
                    Some(route) => {
                        let names =
                            route.nodes.iter().filter_map(|&i| cfg.nodes.get(i)).map(|n| n.name.clone()).collect();
                        Some(Grant::Nodes { nodes: names, probing: route.probing, switched: route.switched })
                    }
                    None => None,
                }
            }
            Err(LbError::NoAvailableNode { retry_after_s, .. }) => Some(Grant::Unavailable { retry_after_s }),
            // The model is no longer configured (the configuration changed while it waited).
            Err(_) => Some(Grant::Unavailable { retry_after_s: 1 }),
        };
        match grant {
            Some(g) => {
                if let Some(w) = state.queue.get_mut(k) {
                    w.grant = Some(g);
                }
            }
            None => *ahead.entry(waiter.model.clone()).or_insert(0) += 1,
        }
    }
}

/// Chooses a node with a free slot for `waiter` and books it, or leaves it waiting.
fn place(
    cfg: &Config,
    state: &mut ClusterState,
    waiter: &Waiter,
    nodes: &Eligible,
    ahead: u64,
    now: u64,
) -> Option<Route> {
    let model = waiter.model.as_str();
    let is_free =
        |state: &ClusterState, i: usize| cfg.nodes.get(i).is_some_and(|n| state.busy(&n.name, now) < n.max_inflight);
    let is_warm = |state: &ClusterState, i: usize| {
        cfg.nodes.get(i).is_some_and(|n| state.warm.get(&n.name).is_some_and(|w| w == model))
    };
    let free: Vec<usize> = nodes.up.iter().chain(&nodes.probe).copied().filter(|&i| is_free(state, i)).collect();
    if free.is_empty() {
        return None;
    }
    // Affinity is for the load-based policies: `hash` keeps its keys where they are, and
    // `round_robin` rotates. A switch cost of 0 turns it off.
    let affinity = cfg.model_switch_cost_ms > 0 && matches!(cfg.policy, Policy::LeastConn | Policy::RandomTwo);
    let warm_free: Vec<usize> = free.iter().copied().filter(|&i| is_warm(state, i)).collect();
    let first_choices = if !affinity {
        free.clone()
    } else if !warm_free.is_empty() {
        warm_free
    } else if switch_now(cfg, state, waiter, nodes, ahead, now) {
        // Prefer a node with nothing loaded over evicting another model.
        let blank: Vec<usize> = free
            .iter()
            .copied()
            .filter(|&i| cfg.nodes.get(i).is_some_and(|n| !state.warm.contains_key(&n.name)))
            .collect();
        if blank.is_empty() {
            free.clone()
        } else {
            blank
        }
    } else {
        return None;
    };
    let input = RouteInput {
        model: Some(model),
        hash_key: waiter.hash_key.as_deref(),
        now_ms: now,
        vm: waiter.vm,
        random: waiter.random,
    };
    let (ranked, probing) = order(cfg, state, &input, nodes, |i| first_choices.contains(&i))?;
    let first = *ranked.first()?;
    // Failover goes only to other free nodes, so that caps hold.
    let others: Vec<usize> = free.iter().copied().filter(|&i| i != first && !nodes.probe.contains(&i)).collect();
    let mut list = vec![first];
    list.extend(select::failover_order(cfg, state, now, &others));
    let name = cfg.nodes.get(first)?.name.clone();
    state.acquire(waiter.vm, &name, now);
    let switched = state.warm.get(&name).is_some_and(|w| w != model);
    state.set_warm(&name, model);
    Some(Route { switched, ..book(cfg, state, &input, list, probing) })
}

/// Whether to load the model on a free node rather than wait for a node that has it loaded:
/// when no node has it, when the switch costs less than the expected wait, or when the request
/// has waited half of `queue.timeout` already.
fn switch_now(cfg: &Config, state: &ClusterState, waiter: &Waiter, nodes: &Eligible, ahead: u64, now: u64) -> bool {
    let warm_busy = nodes
        .up
        .iter()
        .filter_map(|&i| cfg.nodes.get(i))
        .filter(|n| state.warm.get(&n.name).is_some_and(|w| *w == waiter.model))
        .count() as u64;
    if warm_busy == 0 {
        return true;
    }
    if now.saturating_sub(waiter.enqueued_ms).saturating_mul(2) >= cfg.queue.timeout_ms {
        return true;
    }
    match state.service_ms.get(&waiter.model) {
        // No measurement yet: keep the nodes busy.
        None => true,
        Some(&service) => {
            let expected_wait = service.saturating_mul(ahead.saturating_add(1)) / warm_busy;
            cfg.model_switch_cost_ms < expected_wait
        }
    }
}

fn to_ready(cfg: &Config, ctx: u32, model: &str, grant: Grant) -> Ready {
    match grant {
        Grant::Nodes { nodes, probing, switched } => Ready::Go {
            ctx,
            route: Route {
                nodes: nodes.iter().filter_map(|name| cfg.nodes.iter().position(|n| n.name == *name)).collect(),
                probing,
                switched,
            },
        },
        Grant::Unavailable { retry_after_s } => {
            Ready::Fail { ctx, error: LbError::NoAvailableNode { model: Some(model.to_string()), retry_after_s } }
        }
    }
}

/// This VM's paused requests that can go on: granted ones, and ones that waited too long.
/// They leave the queue; a granted slot stays booked until the request ends.
pub fn take_ready(cfg: &Config, state: &mut ClusterState, vm: u64, now: u64) -> Vec<Ready> {
    let mut ready = Vec::new();
    let mut kept = Vec::with_capacity(state.queue.len());
    for w in std::mem::take(&mut state.queue) {
        if w.vm != vm {
            kept.push(w);
            continue;
        }
        match w.grant {
            Some(grant) => ready.push(to_ready(cfg, w.ctx, &w.model, grant)),
            None if now.saturating_sub(w.enqueued_ms) >= cfg.queue.timeout_ms => ready.push(Ready::Fail {
                ctx: w.ctx,
                error: LbError::QueueTimeout {
                    model: w.model.clone(),
                    waited_s: now.saturating_sub(w.enqueued_ms) / 1_000,
                },
            }),
            None => kept.push(w),
        }
    }
    state.queue = kept;
    if !ready.is_empty() {
        state.drop_lease_if_idle(vm);
    }
    ready
}

/// A paused request whose client went away: it leaves the queue, and gives back a slot that was
/// granted but not yet used. Returns whether it was queued.
pub fn withdraw(cfg: &Config, state: &mut ClusterState, vm: u64, ctx: u32, now: u64) -> bool {
    let Some(pos) = state.queue.iter().position(|w| w.vm == vm && w.ctx == ctx) else {
        return false;
    };
    let w = state.queue.remove(pos);
    if let Some(Grant::Nodes { nodes, probing, .. }) = &w.grant {
        if let Some(first) = nodes.first() {
            state.release(vm, first);
            if *probing {
                state.health_mut(first).release_probe(vm);
                state.tidy_health(first);
            }
        }
        // The slot is free again for the next waiter.
        schedule(cfg, state, now);
    }
    state.drop_lease_if_idle(vm);
    true
}

/// Requests waiting (not yet granted), and how long the oldest has waited.
pub fn queue_depth(state: &ClusterState, now: u64) -> (usize, u64) {
    let waiting: Vec<&Waiter> = state.queue.iter().filter(|w| w.grant.is_none()).collect();
    let oldest = waiting.iter().map(|w| now.saturating_sub(w.enqueued_ms)).max().unwrap_or(0);
    (waiting.len(), oldest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::outcome::{finish, Ending};

    fn cfg(extra: &str, nodes: &str) -> Config {
        Config::parse(format!(r#"{{{extra}"nodes":[{nodes}]}}"#).as_bytes()).unwrap()
    }

    fn two() -> Config {
        cfg(
            r#""queue":{"max_waiting":2,"timeout":"60s"},"#,
            r#"{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]},{"name":"b","address":"10.0.0.2:1","models":["m1","m2"]}"#,
        )
    }

    fn arrive<'a>(ctx: u32, model: &'a str, now: u64) -> Arrival<'a> {
        Arrival { vm: 1 + u64::from(ctx % 2), ctx, model, hash_key: None, random: 0, now_ms: now }
    }

    fn first(c: &Config, a: &Admission) -> String {
        match a {
            Admission::Granted(r) => c.nodes[r.nodes[0]].name.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn end(c: &Config, s: &mut ClusterState, route: &[usize], vm: u64, started: u64, now: u64) {
        let e = Ending {
            route,
            probing: false,
            charged: route.first().copied(),
            attempts: 1,
            served: route.first().copied(),
            status: 200,
            flags: 0,
            started_ms: started,
            now_ms: now,
            vm,
            model: None,
        };
        finish(c, s, &e);
    }

    #[test]
    fn caps_hold_and_the_queue_is_fifo_across_workers() {
        let c = two();
        let mut s = ClusterState::default();
        let a1 = admit(&c, &mut s, &arrive(1, "m1", 0));
        let a2 = admit(&c, &mut s, &arrive(2, "m1", 0));
        assert_ne!(first(&c, &a1), first(&c, &a2), "one per node");
        assert_eq!(admit(&c, &mut s, &arrive(3, "m1", 1)), Admission::Queued);
        assert_eq!(admit(&c, &mut s, &arrive(4, "m1", 2)), Admission::Queued);
        match admit(&c, &mut s, &arrive(5, "m1", 3)) {
            Admission::Rejected(LbError::QueueFull { retry_after_s, .. }) => assert!(retry_after_s >= 1),
            other => panic!("{other:?}"),
        }
        // A slot frees: the oldest waiter (ctx 3, on VM 2) gets it, not ctx 4.
        let Admission::Granted(r1) = a1 else { panic!() };
        end(&c, &mut s, &r1.nodes, 2, 0, 10);
        assert_eq!(take_ready(&c, &mut s, 1, 10), vec![], "VM 1 has nothing ready");
        let ready = take_ready(&c, &mut s, 2, 10);
        assert!(matches!(ready.as_slice(), [Ready::Go { ctx: 3, route }] if route.nodes == [r1.nodes[0]]), "{ready:?}");
        for n in ["a", "b"] {
            assert_eq!(s.busy(n, 10), 1, "caps hold on {n}");
        }
    }

    /// Both nodes busy (ctx 1 and 2), ctx 3 and 5 (VM 2) waiting.
    fn both_busy_two_waiting() -> (Config, ClusterState) {
        let c = two();
        let mut s = ClusterState::default();
        admit(&c, &mut s, &arrive(1, "m1", 0));
        admit(&c, &mut s, &arrive(2, "m1", 0));
        assert_eq!(admit(&c, &mut s, &arrive(3, "m1", 0)), Admission::Queued);
        assert_eq!(admit(&c, &mut s, &arrive(5, "m1", 0)), Admission::Queued);
        (c, s)
    }

    #[test]
    fn queued_requests_time_out_and_aborts_leave_the_queue() {
        let (c, mut s) = both_busy_two_waiting();
        assert!(withdraw(&c, &mut s, 2, 5, 100));
        assert!(!withdraw(&c, &mut s, 2, 5, 100), "only once");
        assert_eq!(queue_depth(&s, 100), (1, 100));
        assert_eq!(take_ready(&c, &mut s, 2, 59_999), vec![]);
        let ready = take_ready(&c, &mut s, 2, 60_000);
        assert!(matches!(ready.as_slice(), [Ready::Fail { ctx: 3, error: LbError::QueueTimeout { .. } }]), "{ready:?}");
        assert!(s.queue.is_empty());
    }

    #[test]
    fn a_granted_slot_given_back_by_an_abort_goes_to_the_next_waiter() {
        let c = two();
        let mut s = ClusterState::default();
        let Admission::Granted(r1) = admit(&c, &mut s, &arrive(1, "m1", 0)) else { panic!() };
        admit(&c, &mut s, &arrive(2, "m1", 0));
        admit(&c, &mut s, &arrive(3, "m1", 0));
        admit(&c, &mut s, &arrive(5, "m1", 0));
        end(&c, &mut s, &r1.nodes, 2, 0, 10);
        // ctx 3 was granted the slot but its client left before VM 2 resumed it.
        assert!(withdraw(&c, &mut s, 2, 3, 11));
        let ready = take_ready(&c, &mut s, 2, 12);
        assert!(matches!(ready.as_slice(), [Ready::Go { ctx: 5, .. }]), "{ready:?}");
        assert_eq!(s.busy("a", 12) + s.busy("b", 12), 2);
    }

    #[test]
    fn warm_nodes_are_preferred_and_switches_happen_when_waiting_costs_more() {
        let c = cfg(
            r#""model_switch_cost":"20s","queue":{"timeout":"300s"},"#,
            r#"{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]},{"name":"b","address":"10.0.0.2:1","models":["m1","m2"]}"#,
        );
        let mut s = ClusterState::default();
        s.set_warm("a", "m1");
        s.set_warm("b", "m2");
        // Free warm node first.
        let g = admit(&c, &mut s, &arrive(1, "m1", 0));
        assert_eq!(first(&c, &g), "a");
        // a is busy; b is free but holds m2. m1 takes 5 s per request: waiting (5 s) beats
        // switching (20 s).
        s.service_ms.insert("m1".into(), 5_000);
        assert_eq!(admit(&c, &mut s, &arrive(2, "m1", 0)), Admission::Queued);
        assert_eq!(s.warm["b"], "m2", "b was not switched");
        // With 60 s requests, waiting costs more: the next m1 request switches b.
        let mut s2 = s.clone();
        s2.queue.clear();
        s2.service_ms.insert("m1".into(), 60_000);
        assert_eq!(first(&c, &admit(&c, &mut s2, &arrive(3, "m1", 0))), "b");
        assert_eq!((s2.warm["b"].as_str(), s2.counters["b"].switches), ("m1", 1));
        // Affinity never holds a request past half the queue timeout (a is still busy: its VM
        // keeps renewing its lease).
        s.touch_lease(2, 149_000);
        schedule(&c, &mut s, 150_000);
        let ready = take_ready(&c, &mut s, 1, 150_000);
        assert!(
            matches!(ready.as_slice(), [Ready::Go { ctx: 2, route }] if c.nodes[route.nodes[0]].name == "b"),
            "{ready:?}"
        );
    }

    #[test]
    fn affinity_is_off_for_hash_round_robin_and_a_zero_switch_cost() {
        for extra in [r#""policy":"round_robin","#, r#""model_switch_cost":"0s","#] {
            let c = cfg(extra, r#"{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"}"#);
            let mut s = ClusterState::default();
            let mut firsts = Vec::new();
            for ctx in 0..4 {
                let a = admit(&c, &mut s, &arrive(ctx, "m", 0));
                firsts.push(first(&c, &a));
                let Admission::Granted(r) = a else { panic!() };
                end(&c, &mut s, &r.nodes, 1 + u64::from(ctx % 2), 0, 1);
            }
            assert_eq!(firsts, ["a", "b", "a", "b"], "{extra}");
        }
        // With affinity, sequential requests stay on the warm node.
        let c = cfg("", r#"{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"}"#);
        let mut s = ClusterState::default();
        for ctx in 0..4 {
            let a = admit(&c, &mut s, &arrive(ctx, "m", 0));
            assert_eq!(first(&c, &a), "a");
            let Admission::Granted(r) = a else { panic!() };
            end(&c, &mut s, &r.nodes, 1 + u64::from(ctx % 2), 0, 1);
        }
    }

    #[test]
    fn failover_lists_only_free_nodes() {
        let c = cfg(
            "",
            r#"{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"},{"name":"c","address":"10.0.0.3:1"}"#,
        );
        let mut s = ClusterState::default();
        let g1 = admit(&c, &mut s, &arrive(1, "m", 0));
        let Admission::Granted(r1) = &g1 else { panic!() };
        assert_eq!(r1.nodes.len(), 3);
        let Admission::Granted(r2) = admit(&c, &mut s, &arrive(2, "m", 0)) else { panic!() };
        assert_eq!(r2.nodes.len(), 2, "the busy node is not a failover choice");
        assert!(!r2.nodes.contains(&r1.nodes[0]));
    }

    #[test]
    fn all_nodes_out_while_waiting_fails_the_waiters() {
        let (c, mut s) = both_busy_two_waiting();
        for n in ["a", "b"] {
            for t in 0..3 {
                s.health_mut(n).record_failure(t, 3, 30_000);
            }
        }
        schedule(&c, &mut s, 10);
        let ready = take_ready(&c, &mut s, 2, 10);
        assert!(
            ready.iter().all(|r| matches!(r, Ready::Fail { error: LbError::NoAvailableNode { .. }, .. }))
                && ready.len() == 2,
            "{ready:?}"
        );
    }
}
