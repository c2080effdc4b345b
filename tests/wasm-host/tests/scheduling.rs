//! Scheduling serial nodes through the real .wasm on the simulated clock: per-node caps, the
//! FIFO queue shared by all workers, 429 and queue timeouts, clients leaving while queued,
//! slots reclaimed from a reloaded VM, holds after an abort, and active health checks.

use std::collections::BTreeMap;

use crate::common::*;
use wasm_host::{Host, HttpCall, Outcome, Stream};

/// One node `a` serving every model, so every request competes for its slot.
fn one_node(extra: &str, workers: usize) -> Host {
    load(&format!(r#"{{{extra} "nodes": [{}]}}"#, node("a", 0, "")), workers)
}

#[test]
fn the_queue_admits_in_arrival_order_across_workers() -> R {
    let lb = one_node("", 3);
    let running = post(&lb, 0, "m")?;
    assert_eq!(endpoints(&running), [addr(0)]);
    let mut waiting: Vec<(usize, Stream)> = Vec::new();
    for k in 0..9 {
        let w = [1, 0, 2, 2, 1, 0, 1, 2, 0][k];
        let s = post(&lb, w, "m")?;
        assert_eq!(s.outcome(), Outcome::Paused, "request {k} waits");
        waiting.push((k, s));
        advance_ms(&lb, 3)?;
    }
    assert_eq!(queue_len(&lb), 9);
    let mut order = Vec::new();
    let mut current = running;
    while !waiting.is_empty() {
        ok(&current)?;
        // The slot is granted at once; the holder's worker resumes it on its next tick.
        advance_ms(&lb, 20)?;
        let forwarded: Vec<usize> =
            (0..waiting.len()).filter(|&i| matches!(waiting[i].1.outcome(), Outcome::Forwarded { .. })).collect();
        assert_eq!(forwarded.len(), 1, "exactly one request per freed slot");
        let (k, s) = waiting.remove(forwarded[0]);
        assert_eq!(endpoints(&s), [addr(0)]);
        assert_eq!(inflight(&lb, "a"), 1, "the cap holds");
        order.push(k);
        current = s;
    }
    ok(&current)?;
    assert_eq!(order, (0..9).collect::<Vec<_>>(), "first come, first served, whatever the worker");
    assert_idle(&lb);
    let waits = lb.histogram("exo_lb_queue_wait_milliseconds;model=other").unwrap_or_default();
    assert_eq!(waits.len(), 9, "one queue-wait sample per resumed request");
    Ok(())
}

#[test]
fn a_full_queue_answers_429_with_retry_after() -> R {
    // The node is known to have "m" loaded, so its first generation measures the service time.
    let cfg = format!(r#"{{"queue": {{"max_waiting": 2}}, "nodes": [{}]}}"#, node("a", 0, r#""loaded": "m""#));
    let lb = load(&cfg, 2);
    let running = post(&lb, 0, "m")?;
    let q1 = post(&lb, 1, "m")?;
    let q2 = post(&lb, 0, "m")?;
    assert_eq!((q1.outcome(), q2.outcome()), (Outcome::Paused, Outcome::Paused));
    let rejected = lb
        .worker(1)
        .request("POST", "/v1/chat/completions")
        .header("x-request-id", "rid-429")
        .body(chat("m"))
        .start()?;
    let e = error_reply(&rejected);
    assert_eq!((e.status, e.kind.as_str(), e.code.as_str()), (429, "rate_limit_error", "queue_full"));
    assert_eq!(e.retry_after, Some(10), "no service time measured yet: 10 s");
    assert_eq!(e.request_id, "rid-429");
    assert_eq!(queue_len(&lb), 2, "a rejected request leaves no trace in the queue");
    assert_eq!(counter(&lb, "exo_lb_local_replies_total;code=queue_full"), 1);
    // A generation of 42 s is measured (and folded into the estimates on the workers' next
    // second tick): Retry-After follows it.
    advance_ms(&lb, 42_000)?;
    ok(&running)?;
    advance_ms(&lb, 1_000)?;
    assert!(matches!(q1.outcome(), Outcome::Forwarded { .. }));
    let q3 = post(&lb, 1, "m")?;
    assert_eq!(q3.outcome(), Outcome::Paused, "q1 left the queue: room for one more");
    let e = error_reply(&post(&lb, 0, "m")?);
    assert_eq!((e.status, e.retry_after), (429, Some(42)));
    for s in [&q1, &q2, &q3] {
        advance_ms(&lb, 20)?;
        ok(s)?;
    }
    assert_idle(&lb);
    Ok(())
}

#[test]
fn a_request_that_waits_past_queue_timeout_gets_503() -> R {
    let lb = one_node(r#""queue": {"timeout": "5s"},"#, 2);
    let running = post(&lb, 0, "m")?;
    let start = lb.clock_ms();
    let q = lb
        .worker(1)
        .request("POST", "/v1/chat/completions")
        .header("x-request-id", "rid-late")
        .body(chat("m"))
        .start()?;
    advance_ms(&lb, 2_000)?;
    let q2 = post(&lb, 0, "m")?;
    lb.set_time_ms(start + 4_990)?;
    assert_eq!(q.outcome(), Outcome::Paused);
    lb.set_time_ms(start + 5_020)?;
    let e = error_reply(&q);
    assert_eq!((e.status, e.kind.as_str(), e.code.as_str()), (503, "server_error", "queue_timeout"));
    assert_eq!((e.retry_after, e.request_id.as_str()), (None, "rid-late"));
    assert!(e.message.contains("within 5 s"), "{}", e.message);
    assert_eq!(q2.outcome(), Outcome::Paused, "the later request still waits");
    lb.set_time_ms(start + 7_020)?;
    assert_eq!(error_reply(&q2).code, "queue_timeout");
    assert_eq!(queue_len(&lb), 0);
    assert_eq!(inflight(&lb, "a"), 1, "timeouts take no slot");
    ok(&running)?;
    assert_idle(&lb);
    Ok(())
}

#[test]
fn a_client_that_leaves_while_queued_leaves_at_once_and_takes_no_slot() -> R {
    let lb = one_node("", 2);
    let running = post(&lb, 0, "m")?;
    let gone = post(&lb, 1, "m")?;
    let next = post(&lb, 0, "m")?;
    assert_eq!(queue_len(&lb), 2);
    gone.abort()?;
    assert_eq!(queue_len(&lb), 1, "out of the queue at once, before any tick");
    ok(&running)?;
    advance_ms(&lb, 20)?;
    assert_eq!(endpoints(&next), [addr(0)], "the slot goes to the next request, not the one that left");
    assert_eq!(inflight(&lb, "a"), 1);

    // Granted but not yet resumed (its worker has not ticked): the slot passes on.
    let granted = post(&lb, 1, "m")?;
    let after = post(&lb, 0, "m")?;
    ok(&next)?;
    let st = state(&lb);
    assert!(st.waiter(0).is_some_and(|w| w.grant.is_some()), "granted, waiting for worker 1's tick: {st:?}");
    granted.abort()?;
    advance_ms(&lb, 20)?;
    assert_eq!(endpoints(&after), [addr(0)]);
    assert_eq!(inflight(&lb, "a"), 1);
    ok(&after)?;
    assert_idle(&lb);
    Ok(())
}

#[test]
fn a_slot_held_by_a_reloaded_vm_is_reclaimed_within_the_lease_ttl() -> R {
    let lb = one_node("", 2);
    let start = lb.clock_ms();
    let lost = post(&lb, 1, "m")?;
    assert_eq!(endpoints(&lost), [addr(0)]);
    lb.reload_worker(1)?;
    assert!(lost.is_orphaned());
    lost.finish()?; // the old VM is gone: nothing happens
    let waiting = post(&lb, 0, "m")?;
    assert_eq!(waiting.outcome(), Outcome::Paused, "the dead VM's slot still counts");
    lb.set_time_ms(start + 9_000)?;
    assert_eq!(waiting.outcome(), Outcome::Paused, "within the lease TTL");
    lb.set_time_ms(start + 11_100)?;
    assert_eq!(endpoints(&waiting), [addr(0)], "reclaimed within TTL + one renewal");
    assert_eq!(counter(&lb, "exo_lb_reclaimed_inflight_total"), 1);
    assert!(lb.logged("reclaimed 1 in-flight request(s) held by a VM that stopped"));
    assert_eq!(inflight(&lb, "a"), 1);
    ok(&waiting)?;
    // The reloaded worker serves normally.
    let s = post(&lb, 1, "m")?;
    ok(&s)?;
    assert_idle(&lb);
    Ok(())
}

#[test]
fn a_client_leaving_mid_generation_keeps_its_node_busy_until_the_generation_would_end() -> R {
    for hold in [true, false] {
        let cfg = format!(r#"{{"hold_after_abort": {hold}, "nodes": [{}]}}"#, node("a", 0, r#""loaded": "m""#));
        let lb = load(&cfg, 2);
        // One 10 s generation on the node known to have the model measures the service time.
        let s = post(&lb, 0, "m")?;
        advance_ms(&lb, 10_000)?;
        ok(&s)?;
        // The next one's client leaves 2 s in, mid-stream.
        let left = post(&lb, 1, "m")?;
        let t1 = lb.clock_ms();
        advance_ms(&lb, 2_000)?;
        left.upstream_response(200, &[("content-type", "text/event-stream")])?;
        left.response_body("data: {}\n\n", false)?;
        left.response_flags(flags::DC);
        left.abort()?;
        assert_eq!(inflight(&lb, "a"), 0, "the request itself is over");
        let next = post(&lb, 0, "m")?;
        if !hold {
            assert_eq!(endpoints(&next), [addr(0)], "without the hold the node is free at once");
            ok(&next)?;
            continue;
        }
        assert_eq!(next.outcome(), Outcome::Paused, "the node still generates for the client that left");
        lb.set_time_ms(t1 + 9_980)?;
        assert_eq!(next.outcome(), Outcome::Paused);
        lb.set_time_ms(t1 + 10_040)?;
        assert_eq!(endpoints(&next), [addr(0)], "free when the generation would have ended");
        ok(&next)?;
        assert_idle(&lb);
    }
    Ok(())
}

/// A client that leaves once the node's whole reply came holds nothing: the node is done (and
/// the filter does not ask Envoy for the response flags of a whole 2xx reply).
#[test]
fn a_client_leaving_after_the_whole_reply_holds_no_node() -> R {
    let cfg = format!(r#"{{"nodes": [{}]}}"#, node("a", 0, r#""loaded": "m""#));
    let lb = load(&cfg, 1);
    let s = post(&lb, 0, "m")?;
    advance_ms(&lb, 10_000)?;
    ok(&s)?;
    let done = post(&lb, 0, "m")?;
    advance_ms(&lb, 2_000)?;
    done.upstream_response(200, &[("content-type", "text/event-stream")])?;
    done.response_body("data: [DONE]\n\n", true)?;
    done.response_flags(flags::DC);
    done.abort()?;
    let next = post(&lb, 0, "m")?;
    assert_eq!(endpoints(&next), [addr(0)], "the generation is over: the node is free");
    ok(&next)?;
    assert_idle(&lb);
    Ok(())
}

/// Randomised traffic on three nodes with different caps, two workers, two models: the count
/// of requests forwarded and not yet ended never exceeds a node's cap, failover lists only
/// free nodes, the filter's own in-flight count always equals the test's (requests running
/// plus slots granted to queued requests not yet resumed), and everything returns to zero.
#[test]
fn caps_are_never_exceeded_under_random_traffic() -> R {
    let cfg = format!(
        r#"{{"hold_after_abort": false, "queue": {{"max_waiting": 4, "timeout": "2s"}}, "nodes": [{}, {}, {}]}}"#,
        node("a", 0, r#""models": ["m1", "m2"]"#),
        node("b", 1, r#""models": ["m1", "m2"], "max_inflight": 2"#),
        node("c", 2, r#""models": ["m2"]"#)
    );
    let lb = load(&cfg, 2);
    let names = ["a", "b", "c"];
    let caps = [1usize, 2, 1];
    let index = |address: &str| (0..3).find(|&i| addr(i) == address).expect("a configured node");
    let mut rng = Rng::new(0x5eed_cafe);
    let mut running: Vec<(Stream, usize)> = Vec::new();
    let mut queued: Vec<(Stream, u64)> = Vec::new();
    let mut stats = BTreeMap::<&str, u32>::new();
    let mut peak = [0usize; 3];

    // Takes a forwarded request into `running`, checking its list against the current load.
    // A request admitted at once lists only free nodes. One resumed from the queue has its
    // slot on the first node booked since its grant; its failover nodes were free at the grant
    // (a request arriving before the tick may have taken one since: docs/scheduling.md's "briefly
    // over its cap" on failover).
    let admit = |s: Stream, at_once: bool, running: &mut Vec<(Stream, usize)>, peak: &mut [usize; 3]| {
        let list = endpoints(&s);
        let mut load = [0usize; 3];
        for (_, n) in running.iter() {
            load[*n] += 1;
        }
        let checked = if at_once { &list[..] } else { &list[..1] };
        for a in checked {
            let n = index(a);
            assert!(load[n] < caps[n], "{a} listed while at its cap ({list:?}, load {load:?})");
        }
        let n = index(&list[0]);
        load[n] += 1;
        peak[n] = peak[n].max(load[n]);
        running.push((s, n));
    };

    for step in 0..3_000 {
        match rng.below(10) {
            0..=3 => {
                let model = if rng.chance(50) { "m1" } else { "m2" };
                let s = post(&lb, rng.below(2), model)?;
                match s.outcome() {
                    Outcome::Forwarded { .. } => {
                        *stats.entry("forwarded at once").or_default() += 1;
                        admit(s, true, &mut running, &mut peak);
                    }
                    Outcome::Paused => queued.push((s, lb.clock_ms())),
                    _ => {
                        let e = error_reply(&s);
                        assert_eq!((e.status, e.code.as_str()), (429, "queue_full"), "step {step}");
                        assert!(queued.len() >= 4, "429 with only {} waiting", queued.len());
                        *stats.entry("429").or_default() += 1;
                    }
                }
            }
            4..=5 if !running.is_empty() => {
                let (s, n) = running.remove(rng.below(running.len()));
                complete(&s, &addr(n), 200)?;
            }
            6 if !running.is_empty() => {
                let (s, _) = running.remove(rng.below(running.len()));
                s.abort()?;
            }
            7 if !queued.is_empty() => {
                let (s, _) = queued.remove(rng.below(queued.len()));
                s.abort()?;
                *stats.entry("left the queue").or_default() += 1;
            }
            // Now and then every node stalls for a while: the queue fills and times out.
            8 if rng.chance(5) => advance_ms(&lb, 1_500 + rng.below(1_500) as u64)?,
            _ => advance_ms(&lb, rng.below(200) as u64)?,
        }
        // Requests resumed or answered by ticks.
        let mut still = Vec::new();
        for (s, since) in queued {
            match s.outcome() {
                Outcome::Paused => still.push((s, since)),
                Outcome::Forwarded { .. } => {
                    *stats.entry("resumed").or_default() += 1;
                    admit(s, false, &mut running, &mut peak);
                }
                _ => {
                    let e = error_reply(&s);
                    assert_eq!((e.status, e.code.as_str()), (503, "queue_timeout"), "step {step}");
                    // Answered by the first tick after 2 s (the message rounds down).
                    assert!(e.message.contains("within 2 s"), "{}", e.message);
                    assert!(lb.clock_ms() - since >= 2_000);
                    *stats.entry("timed out").or_default() += 1;
                }
            }
        }
        queued = still;
        for n in 0..3 {
            let mine = running.iter().filter(|(_, m)| *m == n).count() as u64;
            let booked = inflight(&lb, names[n]);
            assert_eq!(booked, mine + granted(&lb, names[n]), "step {step}: node {}: {:?}", names[n], state(&lb));
            assert!(booked <= caps[n] as u64, "step {step}: node {} over its cap", names[n]);
        }
    }
    eprintln!("random traffic: {stats:?}, peak per node {peak:?}");
    assert_eq!(peak, [1, 2, 1], "every cap was reached, none exceeded");
    for key in ["forwarded at once", "resumed", "429", "timed out", "left the queue"] {
        assert!(stats.get(key).copied().unwrap_or(0) > 5, "too few '{key}': {stats:?}");
    }
    for (s, n) in running.drain(..) {
        complete(&s, &addr(n), 200)?;
    }
    for (s, _) in queued.drain(..) {
        s.abort()?;
    }
    assert_idle(&lb);
    Ok(())
}

#[test]
fn waiting_requests_fail_with_503_when_every_node_of_their_model_goes_out() -> R {
    let cfg = format!(
        r#"{{"max_fails": 1, "model_switch_cost": "0s", "nodes": [{}, {}]}}"#,
        node("a", 0, ""),
        node("b", 1, "")
    );
    let lb = load(&cfg, 2);
    let r1 = post(&lb, 0, "m")?;
    let r2 = post(&lb, 1, "m")?;
    let q = post(&lb, 1, "m")?;
    assert_eq!(q.outcome(), Outcome::Paused);
    complete(&r1, &first(&r1), 502)?;
    advance_ms(&lb, 20)?;
    assert_eq!(q.outcome(), Outcome::Paused, "the other node may still free up");
    advance_ms(&lb, 5_000)?;
    complete(&r2, &first(&r2), 503)?;
    advance_ms(&lb, 20)?;
    let e = error_reply(&q);
    assert_eq!((e.status, e.code.as_str()), (503, "no_available_node"));
    assert_eq!(e.retry_after, Some(25), "the first node is back 30 s after its failure");
    assert_idle(&lb);
    Ok(())
}

/// A node that said "No instance found for model X" is skipped for X until a check lists X.
/// Without checks (`probe` absent) nothing ever lists it: the 503 promises a retry in 30 s,
/// but the model stays unavailable on those nodes for good (until Envoy restarts).
#[test]

fn without_checks_a_not_running_mark_does_not_last_forever() -> R {
    let cfg = format!(r#"{{"model_switch_cost": "0s", "nodes": [{}, {}]}}"#, node("a", 0, ""), node("b", 1, ""));
    let lb = load(&cfg, 1);
    for n in 0..2 {
        let s = post(&lb, 0, "m1")?;
        assert!(endpoints(&s).contains(&addr(n)));
        s.upstream_address(&addr(n));
        s.upstream_response(404, &[])?;
        s.response_body(r#"{"detail":"No instance found for model m1"}"#, true)?;
        s.finish()?;
    }
    let e = error_reply(&post(&lb, 0, "m1")?);
    assert_eq!((e.status, e.code.as_str(), e.retry_after), (503, "no_available_node", Some(30)));
    advance_ms(&lb, 600_000)?;
    let s = post(&lb, 0, "m1")?;
    assert!(
        matches!(s.outcome(), Outcome::Forwarded { .. }),
        "10 minutes after a 503 that said 'retry in 30 s': {:?}",
        s.local_response().map(|l| String::from_utf8_lossy(&l.body).into_owned())
    );
    Ok(())
}

#[test]
fn affinity_switches_models_less_than_plain_least_conn() -> R {
    // Two nodes, two models, a mixed workload of 10 s generations arriving in bursts.
    let run = |switch_cost: &str| -> anyhow::Result<i64> {
        let cfg = format!(
            r#"{{"model_switch_cost": "{switch_cost}", "nodes": [{}, {}]}}"#,
            node("a", 0, ""),
            node("b", 1, "")
        );
        let lb = load(&cfg, 2);
        let mut rng = Rng::new(7);
        let mut running: Vec<(Stream, u64)> = Vec::new();
        let mut waiting: Vec<Stream> = Vec::new();
        let mut served = 0;
        for _round in 0..40 {
            for _ in 0..2 {
                let model = if rng.chance(50) { "llama" } else { "qwen" };
                waiting.push(post(&lb, rng.below(2), model)?);
            }
            for _ in 0..500 {
                advance_ms(&lb, 20)?;
                let now = lb.clock_ms();
                let (done, rest): (Vec<_>, Vec<_>) = running.into_iter().partition(|(_, t)| now >= *t);
                running = rest;
                for (s, _) in done {
                    ok(&s)?;
                    served += 1;
                }
                let (go, stay): (Vec<_>, Vec<_>) =
                    waiting.into_iter().partition(|s| matches!(s.outcome(), Outcome::Forwarded { .. }));
                waiting = stay;
                running.extend(go.into_iter().map(|s| (s, now + 10_000)));
                assert!(waiting.iter().all(|s| s.outcome() == Outcome::Paused), "no errors expected");
            }
        }
        while !(running.is_empty() && waiting.is_empty()) {
            advance_ms(&lb, 1_000)?;
            for (s, _) in running.drain(..) {
                ok(&s)?;
                served += 1;
            }
            let (go, stay): (Vec<_>, Vec<_>) =
                waiting.into_iter().partition(|s| matches!(s.outcome(), Outcome::Forwarded { .. }));
            waiting = stay;
            running.extend(go.into_iter().map(|s| (s, 0)));
        }
        assert_eq!(served, 80, "every request was served ({switch_cost})");
        assert_idle(&lb);
        Ok(["a", "b"].iter().map(|n| counter(&lb, &format!("exo_lb_model_switches_total;node={n}"))).sum())
    };
    let with_affinity = run("20s")?;
    let without = run("0s")?;
    eprintln!("model switches: {with_affinity} with affinity, {without} with plain least_conn");
    assert!(without >= 10, "the workload must make least_conn switch ({without})");
    assert!(with_affinity * 2 <= without, "affinity: {with_affinity} switches, least_conn: {without}");
    Ok(())
}

/// Each plan the look-ahead makes while requests wait is timed in a histogram (what it costs a
/// worker, in the host's clock); with `look_ahead` off no plan is made and nothing is recorded.
#[test]
fn the_look_ahead_times_its_plans() -> R {
    let run = |look_ahead: bool| -> anyhow::Result<Option<Vec<u64>>> {
        let cfg = format!(
            r#"{{"look_ahead": {look_ahead}, "nodes": [{}, {}]}}"#,
            node("a", 0, r#""loaded": "m1""#),
            node("b", 1, r#""loaded": "m2""#)
        );
        let lb = load(&cfg, 2);
        // One reply of each model measured (it plans only on measured replies), folded into the
        // estimates on the next second's tick.
        let first = [post(&lb, 0, "m1")?, post(&lb, 1, "m2")?];
        advance_ms(&lb, 600)?;
        for s in &first {
            ok(s)?;
        }
        advance_ms(&lb, 1_000)?;
        // a runs m1; more m1 requests wait (or take b); a frees with requests waiting.
        let running = post(&lb, 0, "m1")?;
        let mut pending: Vec<Stream> = vec![post(&lb, 1, "m1")?, post(&lb, 0, "m1")?, post(&lb, 1, "m1")?];
        assert!(queue_len(&lb) >= 1, "requests wait");
        advance_ms(&lb, 600)?;
        ok(&running)?;
        for _ in 0..100 {
            if pending.is_empty() {
                break;
            }
            advance_ms(&lb, 100)?;
            let (go, stay): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|s| matches!(s.outcome(), Outcome::Forwarded { .. }));
            for s in &go {
                ok(s)?;
            }
            pending = stay;
        }
        assert!(pending.is_empty(), "every request was served (look_ahead {look_ahead})");
        assert_idle(&lb);
        Ok(lb.histogram("exo_lb_look_ahead_microseconds"))
    };
    let timed = run(true)?.unwrap_or_default();
    assert!(!timed.is_empty(), "plans were made and timed");
    assert_eq!(run(false)?, None, "no look-ahead, no plans timed");
    Ok(())
}

// ----- active health checks -----

/// Checks every second; no `/state` asks beside them (these tests count the checks).
const PROBED: &str = r#""probe": {"interval": "1s", "timeout": "500ms"}, "discover_loaded": false,"#;

fn probed(workers: usize) -> Host {
    let cfg = format!(
        r#"{{{PROBED} "model_switch_cost": "0s", "max_inflight": 4, "nodes": [{}, {}, {}]}}"#,
        node("a", 0, r#""models": ["m1"]"#),
        node("b", 1, r#""models": ["m1"], "probe_path": "/healthcheck""#),
        node("c", 2, r#""models": ["m1"], "down": true"#)
    );
    load(&cfg, workers)
}

/// Answers every pending check: `up(address)` decides between 200 (a model list) and failure.
fn answer_checks(lb: &Host, up: impl Fn(&str) -> bool) -> anyhow::Result<Vec<HttpCall>> {
    let calls = lb.pending_http_calls();
    for c in &calls {
        let target = c.header("x-gateway-destination-endpoint").unwrap_or_default().to_string();
        if up(&target) {
            lb.answer_http_call(
                c.token,
                200,
                &[("content-type", "application/json")],
                br#"{"object":"list","data":[{"id":"m1"}]}"#,
            )?;
        } else {
            lb.fail_http_call(c.token)?;
        }
    }
    Ok(calls)
}

#[test]
fn a_failed_check_takes_a_node_out_before_any_request_and_a_passing_one_brings_it_back() -> R {
    let lb = probed(3);
    advance_ms(&lb, 1_000)?;
    let calls = lb.pending_http_calls();
    let mut targets: Vec<(String, String)> = calls
        .iter()
        .map(|c| {
            (c.header("x-gateway-destination-endpoint").unwrap().to_string(), c.header(":path").unwrap().to_string())
        })
        .collect();
    targets.sort();
    assert_eq!(targets, [(addr(0), "/v1/models".into()), (addr(1), "/healthcheck".into())], "drained c is not checked");
    for c in &calls {
        assert_eq!((c.upstream.as_str(), c.timeout_ms, c.header("x-envoy-max-retries")), ("exo_nodes", 500, Some("0")));
        assert_eq!(c.header(":method"), Some("GET"));
    }
    answer_checks(&lb, |a| a != addr(0))?;
    assert!(lb.logged("exo-lb: health check of a failed: out of service (status 0)"));
    // No live request has reached a, and none will.
    for w in 0..3 {
        let s = post(&lb, w, "m1")?;
        assert_eq!(endpoints(&s), [addr(1)], "worker {w}");
        ok(&s)?;
    }
    let h = lb.request("GET", "/healthcheck").start()?;
    assert_eq!(json_reply(&h).1["nodes"]["up"], 1);
    // The next check passes: a is back within one interval.
    advance_ms(&lb, 1_000)?;
    answer_checks(&lb, |_| true)?;
    assert!(lb.logged("exo-lb: health check of a passed: back in service (status 200)"));
    let s = post(&lb, 1, "m1")?;
    assert_eq!(endpoints(&s).len(), 2);
    ok(&s)?;
    // A check that gets no answer within probe.timeout fails too.
    advance_ms(&lb, 1_000)?;
    let pending = lb.pending_http_calls();
    assert_eq!(pending.len(), 2);
    advance_ms(&lb, 500)?;
    assert!(lb.pending_http_calls().is_empty(), "timed out by the host");
    let s = post(&lb, 2, "m1")?;
    let e = error_reply(&s);
    assert_eq!((e.status, e.code.as_str()), (503, "no_available_node"), "both checks timed out");
    Ok(())
}

#[test]
fn exactly_one_worker_sends_checks_and_another_takes_over_when_it_dies() -> R {
    let lb = probed(3);
    let mut per_node = BTreeMap::<String, u32>::new();
    let mut senders = BTreeMap::<usize, u32>::new();
    for _ in 0..20 {
        advance_ms(&lb, 1_000)?;
        for c in answer_checks(&lb, |_| true)? {
            *per_node.entry(c.header("x-gateway-destination-endpoint").unwrap().to_string()).or_default() += 1;
            *senders.entry(c.worker).or_default() += 1;
        }
    }
    assert_eq!(senders.len(), 1, "one worker checks: {senders:?}");
    assert_eq!(per_node, BTreeMap::from([(addr(0), 20), (addr(1), 20)]), "one check per node per interval");
    let prober = *senders.keys().next().unwrap();

    // The prober's VM dies: another worker takes over within 3 intervals.
    lb.reload_worker(prober)?;
    let mut takeover = None;
    for second in 1..=6 {
        advance_ms(&lb, 1_000)?;
        let calls = answer_checks(&lb, |_| true)?;
        if let Some(c) = calls.first() {
            assert!(calls.iter().all(|x| x.worker == c.worker), "one worker at a time");
            takeover = Some((second, c.worker));
            break;
        }
    }
    let (after, by) = takeover.expect("someone takes over");
    assert!(after <= 4, "taken over {after} s after the prober died");
    // Whichever worker holds the lease now (a fresh VM may win it), it is one worker.
    let _ = by;
    for _ in 0..5 {
        advance_ms(&lb, 1_000)?;
        let calls = answer_checks(&lb, |_| true)?;
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|c| c.worker == calls[0].worker));
    }
    Ok(())
}

#[test]
fn with_checks_on_a_node_out_after_live_failures_returns_only_through_a_passing_check() -> R {
    let cfg = format!(
        r#"{{{PROBED} "max_fails": 1, "fail_timeout": "5s", "model_switch_cost": "0s", "nodes": [{}, {}]}}"#,
        node("a", 0, ""),
        node("b", 1, "")
    );
    let lb = load(&cfg, 2);
    let s = post(&lb, 0, "m")?;
    complete(&s, &addr(0), 502)?;
    let out_at = lb.clock_ms();
    // Checks of a fail from now on (it is really dead); b's pass.
    let mut back_at = None;
    for _ in 0..12 {
        advance_ms(&lb, 1_000)?;
        answer_checks(&lb, |x| x != addr(0) || lb.clock_ms() >= out_at + 8_000)?;
        let s = post(&lb, 1, "m")?;
        let listed = endpoints(&s).contains(&addr(0));
        ok(&s)?;
        if listed && back_at.is_none() {
            back_at = Some(lb.clock_ms() - out_at);
        }
        if lb.clock_ms() - out_at < 8_000 {
            assert!(!listed, "a is back without a passing check at +{} ms", lb.clock_ms() - out_at);
        }
    }
    assert_eq!(back_at, Some(8_000), "back with the first passing check after fail_timeout");
    Ok(())
}

#[test]
fn a_node_not_running_a_model_is_skipped_for_it_until_a_check_lists_it() -> R {
    let cfg = format!(
        r#"{{{PROBED} "model_switch_cost": "0s", "nodes": [{}, {}]}}"#,
        node("a", 0, r#""models": ["m1", "m2"]"#),
        node("b", 1, r#""models": ["m1", "m2"]"#)
    );
    let lb = load(&cfg, 2);
    let s = post(&lb, 0, "m1")?;
    assert_eq!(first(&s), addr(0));
    s.upstream_response(404, &[("content-type", "application/json")])?;
    s.response_body(r#"{"detail":"No instance found for model m1"}"#, true)?;
    s.finish()?;
    assert!(lb.logged("exo-lb: node a is not running model m1"));
    let s = post(&lb, 1, "m1")?;
    assert_eq!(endpoints(&s), [addr(1)], "m1 no longer goes to a");
    ok(&s)?;
    let s = post(&lb, 1, "m2")?;
    assert!(endpoints(&s).contains(&addr(0)), "other models still do");
    ok(&s)?;
    let not_running = state(&lb).not_running(index(&lb, "a"), lb.clock_ms());
    assert_eq!(not_running, [exo_lb::logic::state::model_key("m1")]);
    // A check whose model list lacks m1 changes nothing; one that lists it brings m1 back.
    advance_ms(&lb, 1_000)?;
    for c in lb.pending_http_calls() {
        lb.answer_http_call(c.token, 200, &[], br#"{"data":[{"id":"m2"}]}"#)?;
    }
    let s = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&s), [addr(1)]);
    ok(&s)?;
    advance_ms(&lb, 1_000)?;
    answer_checks(&lb, |_| true)?;
    let s = post(&lb, 0, "m1")?;
    assert!(endpoints(&s).contains(&addr(0)), "listed by the check: back");
    ok(&s)?;
    Ok(())
}

#[test]
fn without_probe_no_check_is_sent_and_a_node_that_cannot_tell_its_model_is_asked_once() -> R {
    let lb = one_node("", 2);
    advance_ms(&lb, 1_000)?;
    let calls = lb.pending_http_calls();
    let paths: Vec<_> = calls.iter().map(|c| c.header(":path")).collect();
    assert_eq!(paths, [Some("/state"), Some("/metrics")], "one worker asks a what it has loaded, both ways: {calls:?}");
    // An exo that has neither.
    for c in &calls {
        lb.answer_http_call(c.token, 404, &[], b"Not Found")?;
    }
    for _ in 0..30 {
        advance_ms(&lb, 1_000)?;
    }
    assert_eq!(lb.http_calls().len(), 2, "no check, and no second ask");
    assert_eq!(lb.tick_period_ms(0), 1_000, "ticks renew the lease every second");
    Ok(())
}

/// Newer exo's `/state` for a board running `model` (trimmed).
fn exo_state(model: &str) -> String {
    format!(
        r#"{{"instances":{{"i1":{{"MlxRingInstance":{{"instanceId":"i1","shardAssignments":{{"modelId":"{model}","nodeToRunner":{{"n1":"r1"}}}}}}}}}},"runners":{{"r1":{{"RunnerReady":{{}}}}}}}}"#
    )
}

/// Older exo's (exo-rkllama's) `/metrics` for a board that loaded `model` last, its loads having
/// taken `load_s` seconds on average (trimmed).
fn exo_metrics(model: &str, load_s: f64) -> String {
    format!(
        "# TYPE exo_model_info gauge\nexo_model_info{{layers=\"28\",model_id=\"{model}\",rkllm_name=\"X\"}} 1.0\n\
         # TYPE rkllm_model_load_duration_seconds histogram\n\
         rkllm_model_load_duration_seconds_count 2.0\nrkllm_model_load_duration_seconds_sum {}\n",
        2.0 * load_s
    )
}

/// Each worker's first tick comes at once and asks the nodes; a request that comes while their
/// answers are out waits for them (a guess could cost a switch) and then goes where its model
/// is; one that comes when no answer is awaited goes at once; none waits longer than an ask
/// may take.
#[test]
fn requests_wait_for_the_nodes_answers_which_the_first_tick_asks_for_at_once() -> R {
    let cfg = format!(
        r#"{{"nodes": [{}, {}]}}"#,
        node("a", 0, r#""models": ["m1", "m2"]"#),
        node("b", 1, r#""models": ["m1", "m2"]"#)
    );
    let lb = load(&cfg, 2);
    assert_eq!((lb.tick_period_ms(0), lb.tick_period_ms(1)), (1, 1), "the first tick comes fast");
    advance_ms(&lb, 1)?;
    assert_eq!((lb.tick_period_ms(0), lb.tick_period_ms(1)), (1, 1), "and the next, while answers are awaited");
    let calls = lb.pending_http_calls();
    assert_eq!(calls.len(), 4, "both nodes, both places");
    let waiting = post(&lb, 1, "m2")?;
    assert!(matches!(waiting.outcome(), Outcome::Paused), "{:?}", waiting.outcome());
    // a says m1 (older exo): b may still have m2, so the request keeps waiting.
    let to = |c: &HttpCall| {
        let header = |name| c.header(name).unwrap_or_default().to_string();
        (header("x-gateway-destination-endpoint"), header(":path"))
    };
    for c in &calls {
        match to(c) {
            (n, p) if n == addr(0) && p == "/metrics" => {
                lb.answer_http_call(c.token, 200, &[], exo_metrics("m1", 10.0).as_bytes())?
            }
            (n, _) if n == addr(0) => lb.answer_http_call(c.token, 404, &[], b"Not Found")?,
            _ => {}
        }
    }
    advance_ms(&lb, 10)?;
    assert!(matches!(waiting.outcome(), Outcome::Paused), "{:?}", waiting.outcome());
    for c in lb.pending_http_calls() {
        match to(&c).1.as_str() {
            "/metrics" => lb.answer_http_call(c.token, 200, &[], exo_metrics("m2", 10.0).as_bytes())?,
            _ => lb.answer_http_call(c.token, 404, &[], b"Not Found")?,
        }
    }
    advance_ms(&lb, 5)?;
    assert_eq!(first(&waiting), addr(1), "m2 waited for b's word and went there");
    ok(&waiting)?;
    let s = post(&lb, 0, "m1")?;
    assert_eq!(first(&s), addr(0), "nothing awaited: at once");
    ok(&s)?;
    assert_eq!(state(&lb).counters(index(&lb, "a")).switches + state(&lb).counters(index(&lb, "b")).switches, 0);
    advance_ms(&lb, 10)?;
    assert_eq!((lb.tick_period_ms(0), lb.tick_period_ms(1)), (1_000, 1_000), "every answer in: the slow tick");

    // Nodes that do not answer hold a request no longer than an ask may take (2 s).
    let lb = load(&cfg, 1);
    advance_ms(&lb, 5)?;
    let waiting = post(&lb, 0, "m2")?;
    advance_ms(&lb, 1_990)?;
    assert!(matches!(waiting.outcome(), Outcome::Paused), "{:?}", waiting.outcome());
    advance_ms(&lb, 15)?;
    assert!(matches!(waiting.outcome(), Outcome::Forwarded { .. }), "{:?}", waiting.outcome());
    ok(&waiting)?;
    Ok(())
}

#[test]
fn at_start_each_node_is_asked_once_what_it_has_loaded_and_requests_go_where_their_model_is() -> R {
    let cfg = format!(
        r#"{{"nodes": [{}, {}, {}]}}"#,
        node("a", 0, r#""models": ["m1", "m2", "m3"]"#),
        node("b", 1, r#""models": ["m1", "m2", "m3"]"#),
        node("c", 2, r#""models": ["m1", "m2", "m3"], "loaded": "m1""#)
    );
    let lb = load(&cfg, 3);
    advance_ms(&lb, 1_000)?;
    let calls = lb.pending_http_calls();
    let mut asked: Vec<(String, &str)> = calls
        .iter()
        .map(|c| {
            (
                c.header("x-gateway-destination-endpoint").unwrap_or_default().to_string(),
                c.header(":path").unwrap_or_default(),
            )
        })
        .collect();
    asked.sort();
    let both = |i: usize| [(addr(i), "/metrics"), (addr(i), "/state")];
    assert_eq!(asked, [both(0), both(1)].concat(), "c's model is known from `loaded`; each node asked by one worker");
    for c in &calls {
        assert_eq!((c.upstream.as_str(), c.timeout_ms), ("exo_nodes", 2_000));
    }
    // a is newer exo and runs m3; b does not answer (asked again 30 s later).
    for c in &calls {
        match (c.header("x-gateway-destination-endpoint") == Some(addr(0).as_str()), c.header(":path")) {
            (true, Some("/state")) => {
                lb.answer_http_call(c.token, 200, &[("content-type", "application/json")], exo_state("m3").as_bytes())?
            }
            (true, _) => lb.answer_http_call(c.token, 404, &[], b"Not Found")?,
            (false, _) => lb.fail_http_call(c.token)?,
        }
    }
    assert!(lb.logged("exo-lb: node a has m3 loaded (it says so)"));
    for w in 0..3 {
        let s = post(&lb, w, "m3")?;
        assert_eq!(first(&s), addr(0), "m3 goes to a, which has it (worker {w})");
        ok(&s)?;
    }
    assert_eq!(state(&lb).counters(index(&lb, "a")).switches, 0);
    advance_ms(&lb, 28_000)?;
    assert!(lb.pending_http_calls().is_empty(), "not yet");
    advance_ms(&lb, 2_000)?;
    let again = lb.pending_http_calls();
    assert_eq!(again.len(), 2);
    // b is older exo (exo-rkllama): no /state, but its metrics name m2 and loads of 12.5 s.
    for c in &again {
        assert_eq!(c.header("x-gateway-destination-endpoint"), Some(addr(1).as_str()));
        match c.header(":path") {
            Some("/metrics") => lb.answer_http_call(c.token, 200, &[], exo_metrics("m2", 12.5).as_bytes())?,
            _ => lb.answer_http_call(c.token, 404, &[], b"Not Found")?,
        }
    }
    assert!(lb.logged("exo-lb: node b has m2 loaded (it says so)"));
    assert!(lb.logged("exo-lb: node b says its model loads take 12500 ms"));
    let e = estimates(&lb);
    let b = exo_lb::logic::state::node_key("b");
    assert_eq!(
        e.switch_ms(b, exo_lb::logic::state::model_key("m1")),
        Some(12_500),
        "b's word, before any switch: {e:?}"
    );
    let s = post(&lb, 1, "m2")?;
    assert_eq!(first(&s), addr(1), "m2 goes to b");
    ok(&s)?;
    for _ in 0..40 {
        advance_ms(&lb, 1_000)?;
    }
    assert_eq!(lb.http_calls().len(), 6, "every node's model known: no more asks");
    Ok(())
}
