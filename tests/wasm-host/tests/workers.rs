//! Several workers (one VM each) over one shared-data store, as Envoy runs them: node state and
//! in-flight counts are the cluster's, not a worker's, and return exactly to zero.

use crate::common::*;
use std::collections::BTreeMap;

use wasm_host::{Host, Outcome, Stream};

fn two_nodes(extra: &str) -> Host {
    let cfg = format!(
        r#"{{"model_switch_cost": "0s", {extra} "nodes": [{}, {}]}}"#,
        node("a", 0, r#""models": ["m1"]"#),
        node("b", 1, r#""models": ["m1"]"#)
    );
    load(&cfg, 2)
}

#[test]
fn failures_recorded_on_one_worker_exclude_the_node_on_another() -> R {
    let lb = two_nodes(r#""max_fails": 2, "max_inflight": 4,"#);
    for _ in 0..2 {
        let s = post(&lb, 0, "m1")?;
        complete(&s, &addr(0), 503)?;
    }
    for _ in 0..3 {
        let s = post(&lb, 1, "m1")?;
        assert_eq!(endpoints(&s), [addr(1)], "worker 1 sees what worker 0 recorded");
        ok(&s)?;
    }
    // The probe after fail_timeout is claimed once for the cluster, whichever worker asks.
    advance_ms(&lb, 30_000)?;
    // a was picked less often than b, so least_conn ranks it first: the probe.
    let probe = post(&lb, 1, "m1")?;
    assert_eq!(first(&probe), addr(0));
    let other = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&other), [addr(1)], "worker 0 does not probe while worker 1 does");
    other.finish()?;
    // The probe's success on worker 1 brings a back for worker 0.
    complete(&probe, &addr(0), 200)?;
    let s = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&s).len(), 2);
    ok(&s)?;
    assert_idle(&lb);
    Ok(())
}

/// The in-flight counts in each worker's lease: node -> count, one map per lease.
fn per_lease(lb: &Host) -> Vec<BTreeMap<String, u32>> {
    let names: Vec<String> = config(lb).nodes.iter().map(|n| n.name.clone()).collect();
    state(lb)
        .leases()
        .into_iter()
        .map(|(_, _, counts)| {
            names.iter().zip(counts).filter(|(_, n)| *n > 0).map(|(name, n)| (name.clone(), u32::from(n))).collect()
        })
        .collect()
}

#[test]
fn in_flight_counts_from_two_workers_add_up_and_return_to_zero() -> R {
    let cfg = format!(
        r#"{{"model_switch_cost": "0s", "max_inflight": 2, "hold_after_abort": false, "nodes": [{}, {}, {}]}}"#,
        node("a", 0, ""),
        node("b", 1, ""),
        node("c", 2, "")
    );
    let lb = load(&cfg, 2);
    // Alternating workers: each sees the other's requests, so load spreads evenly.
    let mut open: Vec<Stream> = Vec::new();
    let mut firsts = Vec::new();
    for k in 0..6 {
        let s = post(&lb, k % 2, "m")?;
        firsts.push(first(&s));
        open.push(s);
    }
    assert_eq!(firsts, [addr(0), addr(1), addr(2), addr(0), addr(1), addr(2)]);
    for n in ["a", "b", "c"] {
        assert_eq!(inflight(&lb, n), 2, "node {n}");
    }
    let leases = per_lease(&lb);
    assert_eq!(leases.len(), 2, "one lease per worker");
    for l in &leases {
        let one_each: BTreeMap<String, u32> = ["a", "b", "c"].iter().map(|n| (n.to_string(), 1)).collect();
        assert_eq!(l, &one_each, "each worker holds one per node");
    }
    // Every node is at its cap of 2, counted over both workers: the next request waits.
    let queued = post(&lb, 0, "m")?;
    assert_eq!(queued.outcome(), Outcome::Paused);
    advance_ms(&lb, 1_000)?;
    assert_eq!(lb.metric("exo_lb_node_inflight;node=b"), Some(2), "the gauge shows the cluster's count");
    assert_eq!(lb.metric("exo_lb_queue_depth"), Some(1));

    // Six different endings.
    let [r0, r1, r2, r3, r4, r5]: [Stream; 6] = open.try_into().map_err(|_| anyhow::anyhow!("six"))?;
    // 1. A completed generation (worker 0).
    r0.upstream_response(200, &[("content-type", "text/event-stream")])?;
    r0.response_body("data: {}\n\n", false)?;
    r0.response_body("data: [DONE]\n\n", true)?;
    r0.finish()?;
    // The queued request takes the freed slot on a.
    advance_ms(&lb, 20)?;
    assert_eq!(endpoints(&queued), [addr(0)]);
    // 2. The client leaves before any response (worker 1).
    r1.abort()?;
    // 3. The node resets the stream (worker 0).
    r2.upstream_address(&addr(2)).response_flags(flags::UR);
    r2.finish()?;
    // 4. The client leaves mid-stream (worker 1).
    r3.upstream_response(200, &[])?;
    r3.response_body("data: {}\n\n", false)?;
    r3.response_flags(flags::DC);
    r3.abort()?;
    // 5. Envoy's own reply after a connect failure (worker 0).
    r4.response_flags(flags::UF).upstream_address(&addr(1));
    r4.upstream_response(503, &[])?;
    r4.finish()?;
    // 6. A completion on worker 1, and the request that waited.
    ok(&r5)?;
    ok(&queued)?;
    for n in ["a", "b", "c"] {
        assert_eq!(inflight(&lb, n), 0, "node {n}");
    }
    assert_idle(&lb);
    advance_ms(&lb, 1_000)?;
    assert_eq!(lb.metric("exo_lb_node_inflight;node=a"), Some(0));
    assert_eq!(lb.metric("exo_lb_queue_depth"), Some(0));

    // The whole capacity is back: six fit again, the seventh waits.
    let again: Vec<Stream> = (0..6).map(|k| post(&lb, k % 2, "m")).collect::<anyhow::Result<_>>()?;
    assert!(again.iter().all(|s| matches!(s.outcome(), Outcome::Forwarded { .. })));
    let seventh = post(&lb, 1, "m")?;
    assert_eq!(seventh.outcome(), Outcome::Paused);
    seventh.abort()?;
    for s in &again {
        ok(s)?;
    }
    assert_idle(&lb);
    Ok(())
}

#[test]
fn round_robin_turns_are_shared_by_the_workers() -> R {
    let cfg = format!(
        r#"{{"policy": "round_robin", "nodes": [{}, {}, {}]}}"#,
        node("a", 0, r#""weight": 5"#),
        node("b", 1, ""),
        node("c", 2, "")
    );
    let lb = load(&cfg, 3);
    let mut seq = String::new();
    for k in 0..14 {
        let s = post(&lb, k % 3, "m")?;
        let f = first(&s);
        seq.push(["a", "b", "c"][(0..3).position(|i| addr(i) == f).unwrap()].chars().next().unwrap());
        ok(&s)?;
    }
    assert_eq!(seq, "aabacaaaabacaa", "one smooth weighted sequence for the cluster, not one per worker");
    Ok(())
}

#[test]
fn a_probe_claimed_by_a_worker_that_dies_is_freed_with_its_lease() -> R {
    let lb = two_nodes(r#""max_fails": 1, "max_inflight": 4,"#);
    let s = post(&lb, 0, "m1")?;
    complete(&s, &addr(0), 502)?;
    advance_ms(&lb, 30_000)?;
    let hold = post(&lb, 0, "m1")?;
    let probe = post(&lb, 1, "m1")?;
    assert_eq!(first(&probe), addr(0), "worker 1 probes a");
    lb.reload_worker(1)?;
    assert!(probe.is_orphaned());
    // Worker 1's lease still lives (up to 10 s): nobody else probes a meanwhile.
    advance_ms(&lb, 8_000)?;
    let s = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&s), [addr(1)]);
    s.finish()?;
    // Once the lease expired and a tick pruned it, worker 0 may probe.
    advance_ms(&lb, 3_100)?;
    let s = post(&lb, 0, "m1")?;
    assert_eq!(first(&s), addr(0), "the dead worker's probe claim was released");
    ok(&s)?;
    ok(&hold)?;
    assert_eq!(counter(&lb, "exo_lb_reclaimed_inflight_total"), 1, "the probe's slot was reclaimed");
    assert_idle(&lb);
    Ok(())
}
