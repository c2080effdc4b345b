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
use crate::logic::estimates::Estimates;
use crate::logic::select::{self, book, eligible, order, Eligible, Ineligible, Route, RouteInput};
use crate::logic::state::{ClusterState, Grant, Waiter};

/// Without a measured service time, the Retry-After of a full queue.
const DEFAULT_RETRY_AFTER_S: u64 = 10;

/// A request that wants a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival<'a> {
    pub vm: u64,
    pub ctx: u32,
    /// The model id (for error messages) and its [`crate::logic::state::model_key`].
    pub model: &'a str,
    pub model_key: u64,
    pub hash_key: Option<u64>,
    pub random: u64,
    pub now_ms: u64,
    /// Who sent it (a hash of the API key or client address).
    pub client: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A slot on the first node is booked: send it now.
    Granted(Route),
    /// Every candidate is busy: hold the request; a tick resumes it.
    Queued,
    Rejected(LbError),
}

/// Why a queued request ends without a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFailure {
    /// Every node for the model went out while it waited.
    Unavailable { retry_after_s: u64 },
    /// It waited `queue.timeout`.
    Timeout { waited_s: u64 },
}

impl QueueFailure {
    pub fn error(self, model: &str) -> LbError {
        match self {
            QueueFailure::Unavailable { retry_after_s } => {
                LbError::NoAvailableNode { model: Some(model.to_string()), retry_after_s }
            }
            QueueFailure::Timeout { waited_s } => LbError::QueueTimeout { model: model.to_string(), waited_s },
        }
    }
}

/// What a VM's tick must do with one of its paused requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Resume it towards these nodes (a slot on the first is booked).
    Go { ctx: u32, route: Route },
    /// Answer it with this error.
    Fail { ctx: u32, failure: QueueFailure },
}

/// Admits an inference request: at once when a node is free for it (and no older request is
/// waiting for that node), else into the queue, or rejected (404, 503, 429 when the queue is
/// full).
pub fn admit(cfg: &Config, state: &mut ClusterState, est: &Estimates, a: &Arrival) -> Admission {
    let nodes = match eligible(cfg, state, Some(a.model_key), a.now_ms) {
        Ok(nodes) => nodes,
        Err(why) => return Admission::Rejected(why.error(cfg, Some(a.model))),
    };
    let waiter = Waiter {
        seq: 0,
        vm: a.vm,
        ctx: a.ctx,
        model: a.model_key,
        hash_key: a.hash_key,
        random: a.random,
        enqueued_ms: a.now_ms,
        client: a.client,
        grant: None,
    };
    if state.queue_len() == 0 {
        // Nobody waits: this request is the oldest, no queue to walk.
        if let Some(route) = place(cfg, state, est, &waiter, &nodes, 0, a.now_ms) {
            return Admission::Granted(route);
        }
        if cfg.queue.max_waiting == 0 {
            return Admission::Rejected(queue_full(est, a));
        }
        state.touch_lease(a.vm, a.now_ms);
        let seq = state.take_seq();
        state.push_waiter(&Waiter { seq, ..waiter });
        return Admission::Queued;
    }
    state.touch_lease(a.vm, a.now_ms);
    let seq = state.take_seq();
    state.push_waiter(&Waiter { seq, ..waiter });
    schedule(cfg, state, est, a.now_ms);
    let Some(pos) = state.find_waiter(a.vm, a.ctx) else {
        return Admission::Rejected(LbError::NoAvailableNode { model: Some(a.model.to_string()), retry_after_s: 1 });
    };
    match state.waiter(pos).and_then(|w| w.grant) {
        Some(grant) => {
            state.remove_waiter(pos);
            match to_ready(cfg, state, a.ctx, a.model_key, grant, a.now_ms) {
                Ready::Go { route, .. } => Admission::Granted(route),
                Ready::Fail { failure, .. } => Admission::Rejected(failure.error(a.model)),
            }
        }
        None => {
            let waiting = state.waiters().filter(|w| w.grant.is_none()).count();
            if waiting > usize::try_from(cfg.queue.max_waiting).unwrap_or(usize::MAX) {
                state.remove_waiter(pos);
                Admission::Rejected(queue_full(est, a))
            } else {
                Admission::Queued
            }
        }
    }
}

fn queue_full(est: &Estimates, a: &Arrival) -> LbError {
    let retry_after_s = est.service_ms(a.model_key).map_or(DEFAULT_RETRY_AFTER_S, |ms| ms.div_ceil(1_000).max(1));
    LbError::QueueFull { model: a.model.to_string(), retry_after_s }
}

/// Grants free slots to waiting requests, oldest first.
pub fn schedule(cfg: &Config, state: &mut ClusterState, est: &Estimates, now: u64) {
    // Waiters per model that could not be placed, ahead of later ones (for the wait estimate).
    let mut ahead: Vec<(u64, u64)> = Vec::new();
    for k in 0..state.queue_len() {
        let Some(waiter) = state.waiter(k).filter(|w| w.grant.is_none()) else {
            continue;
        };
        let grant = match eligible(cfg, state, Some(waiter.model), now) {
            Ok(nodes) => {
                let before = ahead.iter().find(|(m, _)| *m == waiter.model).map_or(0, |(_, n)| *n);
                place(cfg, state, est, &waiter, &nodes, before, now).and_then(|route| {
                    route.nodes.first().map(|&node| Grant::Node {
                        node,
                        probing: route.probing,
                        switched: route.switched,
                    })
                })
            }
            Err(Ineligible::Unavailable { retry_after_s }) => Some(Grant::Unavailable { retry_after_s }),
            // The model is no longer configured (the configuration changed while it waited).
            Err(Ineligible::NotServed) => Some(Grant::Unavailable { retry_after_s: 1 }),
        };
        match grant {
            Some(g) => state.set_waiter(k, &Waiter { grant: Some(g), ..waiter }),
            None => match ahead.iter_mut().find(|(m, _)| *m == waiter.model) {
                Some((_, n)) => *n += 1,
                None => ahead.push((waiter.model, 1)),
            },
        }
    }
}

/// Whether node `i` can take one more request.
fn is_free(cfg: &Config, state: &ClusterState, i: usize, now: u64) -> bool {
    cfg.nodes.get(i).is_some_and(|n| state.busy(i, now) < n.max_inflight)
}

/// Chooses a node with a free slot for `waiter` and books it, or leaves it waiting.
fn place(
    cfg: &Config,
    state: &mut ClusterState,
    est: &Estimates,
    waiter: &Waiter,
    nodes: &Eligible,
    ahead: u64,
    now: u64,
) -> Option<Route> {
    let model = waiter.model;
    let free: Vec<usize> =
        nodes.up.iter().chain(&nodes.probe).copied().filter(|&i| is_free(cfg, state, i, now)).collect();
    if free.is_empty() {
        return None;
    }
    // Affinity is for the load-based policies: `hash` keeps its keys where they are, and
    // `round_robin` rotates. A switch cost of 0 turns it off.
    let affinity = cfg.model_switch_cost_ms > 0 && matches!(cfg.policy, Policy::LeastConn | Policy::RandomTwo);
    let warm_free: Vec<usize> = free.iter().copied().filter(|&i| state.warm(i) == Some(model)).collect();
    let first_choices = if !affinity {
        free.clone()
    } else if !warm_free.is_empty() {
        warm_free
    } else if switch_now(cfg, state, est, waiter, nodes, ahead, now) {
        // Prefer a node with nothing loaded over evicting another model.
        let blank: Vec<usize> = free.iter().copied().filter(|&i| state.warm(i).is_none()).collect();
        if blank.is_empty() {
            free.clone()
        } else {
            blank
        }
    } else {
        return None;
    };
    let input =
        RouteInput { model: Some(model), hash_key: waiter.hash_key, now_ms: now, vm: waiter.vm, random: waiter.random };
    let (ranked, probing) = order(cfg, state, &input, nodes, |i| first_choices.contains(&i))?;
    let first = *ranked.first()?;
    state.acquire(waiter.vm, first, now);
    let switched = state.set_warm(first, model);
    let list = with_failover(cfg, state, model, first, now);
    Some(Route { switched, ..book(state, &input, list, probing) })
}

/// `first`, then the other healthy nodes for the model that have a free slot (failover goes only
/// to free nodes, so that caps hold; never to a node due for a probe).
fn with_failover(cfg: &Config, state: &ClusterState, model: u64, first: usize, now: u64) -> Vec<usize> {
    let others: Vec<usize> = match eligible(cfg, state, Some(model), now) {
        Ok(nodes) => nodes.up.into_iter().filter(|&i| i != first && is_free(cfg, state, i, now)).collect(),
        Err(_) => Vec::new(),
    };
    let mut list = vec![first];
    list.extend(select::failover_order(cfg, state, now, &others));
    list
}

/// Whether to load the model on a free node rather than wait for a node that has it loaded:
/// when no node has it, when the switch costs less than the expected wait, or when the request
/// has waited half of `queue.timeout` already.
fn switch_now(
    cfg: &Config,
    state: &ClusterState,
    est: &Estimates,
    waiter: &Waiter,
    nodes: &Eligible,
    ahead: u64,
    now: u64,
) -> bool {
    let warm_busy = nodes.up.iter().filter(|&&i| state.warm(i) == Some(waiter.model)).count() as u64;
    if warm_busy == 0 {
        return true;
    }
    if now.saturating_sub(waiter.enqueued_ms).saturating_mul(2) >= cfg.queue.timeout_ms {
        return true;
    }
    match est.service_ms(waiter.model) {
        // No measurement yet: keep the nodes busy.
        None => true,
        Some(service) => {
            let expected_wait = service.saturating_mul(ahead.saturating_add(1)) / warm_busy;
            cfg.model_switch_cost_ms < expected_wait
        }
    }
}

fn to_ready(cfg: &Config, state: &ClusterState, ctx: u32, model: u64, grant: Grant, now: u64) -> Ready {
    match grant {
        Grant::Node { node, probing, switched } => {
            Ready::Go { ctx, route: Route { nodes: with_failover(cfg, state, model, node, now), probing, switched } }
        }
        Grant::Unavailable { retry_after_s } => {
            Ready::Fail { ctx, failure: QueueFailure::Unavailable { retry_after_s } }
        }
    }
}

/// This VM's paused requests that can go on: granted ones, and ones that waited too long.
/// They leave the queue; a granted slot stays booked until the request ends.
pub fn take_ready(cfg: &Config, state: &mut ClusterState, vm: u64, now: u64) -> Vec<Ready> {
    let mut ready = Vec::new();
    let mut k = 0;
    while let Some(w) = state.waiter(k) {
        let outcome = match w.grant {
            _ if w.vm != vm => None,
            Some(grant) => Some(to_ready(cfg, state, w.ctx, w.model, grant, now)),
            None if now.saturating_sub(w.enqueued_ms) >= cfg.queue.timeout_ms => Some(Ready::Fail {
                ctx: w.ctx,
                failure: QueueFailure::Timeout { waited_s: now.saturating_sub(w.enqueued_ms) / 1_000 },
            }),
            None => None,
        };
        match outcome {
            Some(r) => {
                ready.push(r);
                state.remove_waiter(k);
            }
            None => k += 1,
        }
    }
    ready
}

/// A paused request whose client went away: it leaves the queue, and gives back a slot that was
/// granted but not yet used. Returns whether it was queued.
pub fn withdraw(cfg: &Config, state: &mut ClusterState, est: &Estimates, vm: u64, ctx: u32, now: u64) -> bool {
    let Some(w) = state.find_waiter(vm, ctx).and_then(|pos| state.remove_waiter(pos)) else {
        return false;
    };
    if let Some(Grant::Node { node, probing, .. }) = w.grant {
        state.release(vm, node);
        if probing {
            state.update_health(node, |h| h.release_probe(vm));
        }
        // The slot is free again for the next waiter.
        schedule(cfg, state, est, now);
    }
    true
}

/// Requests waiting (not yet granted), and how long the oldest has waited.
pub fn queue_depth(state: &ClusterState, now: u64) -> (usize, u64) {
    state
        .waiters()
        .filter(|w| w.grant.is_none())
        .fold((0, 0), |(n, oldest), w| (n + 1, oldest.max(now.saturating_sub(w.enqueued_ms))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::estimates::Sample;
    use crate::logic::outcome::{finish, Ending};
    use crate::logic::state::model_key;

    const NO_EST: Estimates = Estimates { models: Vec::new() };

    fn measured(model: &str, service_ms: u64) -> Estimates {
        let mut e = Estimates::default();
        e.record(&[Sample { model: model.into(), service_ms, at_ms: 0 }], |_| true);
        e
    }

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
        Arrival {
            vm: 1 + u64::from(ctx % 2),
            ctx,
            model,
            model_key: model_key(model),
            hash_key: None,
            random: 0,
            now_ms: now,
            client: 0,
        }
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
        finish(c, s, &NO_EST, &e);
    }

    #[test]
    fn caps_hold_and_the_queue_is_fifo_across_workers() {
        let c = two();
        let mut s = c.new_state();
        let a1 = admit(&c, &mut s, &NO_EST, &arrive(1, "m1", 0));
        let a2 = admit(&c, &mut s, &NO_EST, &arrive(2, "m1", 0));
        assert_ne!(first(&c, &a1), first(&c, &a2), "one per node");
        assert_eq!(admit(&c, &mut s, &NO_EST, &arrive(3, "m1", 1)), Admission::Queued);
        assert_eq!(admit(&c, &mut s, &NO_EST, &arrive(4, "m1", 2)), Admission::Queued);
        match admit(&c, &mut s, &NO_EST, &arrive(5, "m1", 3)) {
            Admission::Rejected(LbError::QueueFull { retry_after_s, .. }) => assert!(retry_after_s >= 1),
            other => panic!("{other:?}"),
        }
        // A slot frees: the oldest waiter (ctx 3, on VM 2) gets it, not ctx 4.
        let Admission::Granted(r1) = a1 else { panic!() };
        end(&c, &mut s, &r1.nodes, 2, 0, 10);
        assert_eq!(take_ready(&c, &mut s, 1, 10), vec![], "VM 1 has nothing ready");
        let ready = take_ready(&c, &mut s, 2, 10);
        assert!(matches!(ready.as_slice(), [Ready::Go { ctx: 3, route }] if route.nodes == [r1.nodes[0]]), "{ready:?}");
        for n in 0..2 {
            assert_eq!(s.busy(n, 10), 1, "caps hold on {n}");
        }
    }

    /// Both nodes busy (ctx 1 and 2), ctx 3 and 5 (VM 2) waiting.
    fn both_busy_two_waiting() -> (Config, ClusterState) {
        let c = two();
        let mut s = c.new_state();
        admit(&c, &mut s, &NO_EST, &arrive(1, "m1", 0));
        admit(&c, &mut s, &NO_EST, &arrive(2, "m1", 0));
        assert_eq!(admit(&c, &mut s, &NO_EST, &arrive(3, "m1", 0)), Admission::Queued);
        assert_eq!(admit(&c, &mut s, &NO_EST, &arrive(5, "m1", 0)), Admission::Queued);
        (c, s)
    }

    #[test]
    fn queued_requests_time_out_and_aborts_leave_the_queue() {
        let (c, mut s) = both_busy_two_waiting();
        assert!(withdraw(&c, &mut s, &NO_EST, 2, 5, 100));
        assert!(!withdraw(&c, &mut s, &NO_EST, 2, 5, 100), "only once");
        assert_eq!(queue_depth(&s, 100), (1, 100));
        assert_eq!(take_ready(&c, &mut s, 2, 59_999), vec![]);
        let ready = take_ready(&c, &mut s, 2, 60_000);
        assert!(
            matches!(ready.as_slice(), [Ready::Fail { ctx: 3, failure: QueueFailure::Timeout { .. } }]),
            "{ready:?}"
        );
        assert_eq!(s.queue_len(), 0);
    }

    #[test]
    fn a_granted_slot_given_back_by_an_abort_goes_to_the_next_waiter() {
        let c = two();
        let mut s = c.new_state();
        let Admission::Granted(r1) = admit(&c, &mut s, &NO_EST, &arrive(1, "m1", 0)) else { panic!() };
        admit(&c, &mut s, &NO_EST, &arrive(2, "m1", 0));
        admit(&c, &mut s, &NO_EST, &arrive(3, "m1", 0));
        admit(&c, &mut s, &NO_EST, &arrive(5, "m1", 0));
        end(&c, &mut s, &r1.nodes, 2, 0, 10);
        // ctx 3 was granted the slot but its client left before VM 2 resumed it.
        assert!(withdraw(&c, &mut s, &NO_EST, 2, 3, 11));
        let ready = take_ready(&c, &mut s, 2, 12);
        assert!(matches!(ready.as_slice(), [Ready::Go { ctx: 5, .. }]), "{ready:?}");
        assert_eq!(s.busy(0, 12) + s.busy(1, 12), 2);
    }

    #[test]
    fn warm_nodes_are_preferred_and_switches_happen_when_waiting_costs_more() {
        let c = cfg(
            r#""model_switch_cost":"20s","queue":{"timeout":"300s"},"#,
            r#"{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]},{"name":"b","address":"10.0.0.2:1","models":["m1","m2"]}"#,
        );
        let mut s = c.new_state();
        s.set_warm(0, model_key("m1"));
        s.set_warm(1, model_key("m2"));
        // Free warm node first.
        let g = admit(&c, &mut s, &NO_EST, &arrive(1, "m1", 0));
        assert_eq!(first(&c, &g), "a");
        // a is busy; b is free but holds m2. m1 takes 5 s per request: waiting (5 s) beats
        // switching (20 s).
        let short = measured("m1", 5_000);
        assert_eq!(admit(&c, &mut s, &short, &arrive(2, "m1", 0)), Admission::Queued);
        assert_eq!(s.warm(1), Some(model_key("m2")), "b was not switched");
        // With 60 s requests, waiting costs more: the next m1 request switches b.
        let mut s2 = s.clone();
        s2.retain_waiters(|_| false);
        let long = measured("m1", 60_000);
        assert_eq!(first(&c, &admit(&c, &mut s2, &long, &arrive(3, "m1", 0))), "b");
        assert_eq!((s2.warm(1), s2.counters(1).switches), (Some(model_key("m1")), 1));
        // Affinity never holds a request past half the queue timeout (a is still busy: its VM
        // keeps renewing its lease).
        s.touch_lease(2, 149_000);
        schedule(&c, &mut s, &short, 150_000);
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
            let mut s = c.new_state();
            let mut firsts = Vec::new();
            for ctx in 0..4 {
                let a = admit(&c, &mut s, &NO_EST, &arrive(ctx, "m", 0));
                firsts.push(first(&c, &a));
                let Admission::Granted(r) = a else { panic!() };
                end(&c, &mut s, &r.nodes, 1 + u64::from(ctx % 2), 0, 1);
            }
            assert_eq!(firsts, ["a", "b", "a", "b"], "{extra}");
        }
        // With affinity, sequential requests stay on the warm node.
        let c = cfg("", r#"{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"}"#);
        let mut s = c.new_state();
        for ctx in 0..4 {
            let a = admit(&c, &mut s, &NO_EST, &arrive(ctx, "m", 0));
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
        let mut s = c.new_state();
        let g1 = admit(&c, &mut s, &NO_EST, &arrive(1, "m", 0));
        let Admission::Granted(r1) = &g1 else { panic!() };
        assert_eq!(r1.nodes.len(), 3);
        let Admission::Granted(r2) = admit(&c, &mut s, &NO_EST, &arrive(2, "m", 0)) else { panic!() };
        assert_eq!(r2.nodes.len(), 2, "the busy node is not a failover choice");
        assert!(!r2.nodes.contains(&r1.nodes[0]));
    }

    #[test]
    fn all_nodes_out_while_waiting_fails_the_waiters() {
        let (c, mut s) = both_busy_two_waiting();
        for n in 0..2 {
            for t in 0..3 {
                s.update_health(n, |h| h.record_failure(t, 3, 30_000));
            }
        }
        schedule(&c, &mut s, &NO_EST, 10);
        let ready = take_ready(&c, &mut s, 2, 10);
        assert!(
            ready.iter().all(|r| matches!(r, Ready::Fail { failure: QueueFailure::Unavailable { .. }, .. }))
                && ready.len() == 2,
            "{ready:?}"
        );
    }

    #[test]
    fn nodes_being_probed_make_requests_wait_not_fail() {
        // Both nodes were out and are due for a probe; two requests claim one probe each.
        let c = two();
        let mut s = c.new_state();
        for n in 0..2 {
            for t in 0..3 {
                s.update_health(n, |h| h.record_failure(t, 3, 30_000));
            }
        }
        let now = 40_000;
        let g1 = admit(&c, &mut s, &NO_EST, &arrive(1, "m1", now));
        let g2 = admit(&c, &mut s, &NO_EST, &arrive(2, "m1", now));
        for g in [&g1, &g2] {
            assert!(matches!(g, Admission::Granted(r) if r.probing && r.nodes.len() == 1), "{g:?}");
        }
        // Every node is being probed: the next request waits for a probe to end.
        assert_eq!(admit(&c, &mut s, &NO_EST, &arrive(3, "m1", now)), Admission::Queued);
        // The probe on the first node succeeds: the waiter goes there.
        let Admission::Granted(r1) = g1 else { panic!() };
        end(&c, &mut s, &r1.nodes, 2, now, now + 10);
        let ready = take_ready(&c, &mut s, 2, now + 10);
        assert!(
            matches!(ready.as_slice(), [Ready::Go { ctx: 3, route }] if route.nodes[0] == r1.nodes[0]),
            "{ready:?}"
        );
    }

    #[test]
    fn a_full_queue_of_an_empty_cluster_is_never_touched_by_admission() {
        let c = two();
        let mut s = c.new_state();
        let before = s.encode().len();
        let Admission::Granted(r) = admit(&c, &mut s, &NO_EST, &arrive(1, "m1", 0)) else { panic!() };
        assert_eq!(s.queue_len(), 0, "a free node: the request never entered the queue");
        end(&c, &mut s, &r.nodes, 2, 0, 5);
        assert_eq!(s.encode().len(), before + 16 + 2 * 2, "one VM lease and its in-flight column");
    }
}
