//! Passive failure tracking through the real .wasm on the simulated clock: nginx's
//! `max_fails` / `fail_timeout`, one live probe, resets, the single-node rule, and failures
//! inferred from the attempts Envoy moved past.

use crate::common::*;
use wasm_host::{Host, Stream};

const T: u64 = 30_000;

/// a and b serve m1 (max_inflight 2, so a busy node stays a failover choice); c alone serves m9.
fn cluster(extra: &str) -> Host {
    let cfg = format!(
        r#"{{"max_fails": 3, "fail_timeout": "30s", "model_switch_cost": "0s", "max_inflight": 2, {extra}
            "nodes": [{}, {}, {}]}}"#,
        node("a", 0, r#""models": ["m1"]"#),
        node("b", 1, r#""models": ["m1"]"#),
        node("c", 2, r#""models": ["m9"]"#)
    );
    load(&cfg, 2)
}

/// A request for m1 that node a (which must be listed) answers with `status`.
fn a_answers(lb: &Host, w: usize, status: u32) -> R {
    let s = post(lb, w, "m1")?;
    assert!(endpoints(&s).contains(&addr(0)), "a must be a candidate: {:?}", endpoints(&s));
    complete(&s, &addr(0), status)
}

/// Where m1 requests go now (b answers them, so a's record is untouched).
fn m1_route(lb: &Host, w: usize) -> anyhow::Result<Vec<String>> {
    let s = post(lb, w, "m1")?;
    let list = endpoints(&s);
    complete(&s, &addr(1), 200)?;
    Ok(list)
}

fn a_is_listed(lb: &Host) -> anyhow::Result<bool> {
    Ok(m1_route(lb, 0)?.contains(&addr(0)) && m1_route(lb, 1)?.contains(&addr(0)))
}

#[test]
fn exactly_max_fails_within_fail_timeout_take_a_node_out() -> R {
    let lb = cluster("");
    a_answers(&lb, 0, 502)?;
    advance_ms(&lb, 10_000)?;
    a_answers(&lb, 1, 503)?;
    assert_eq!(fails(&lb, "a"), 2);
    assert!(a_is_listed(&lb)?, "two failures are not enough");
    advance_ms(&lb, 19_000)?;
    a_answers(&lb, 0, 504)?;
    assert!(!a_is_listed(&lb)?, "the third failure within 30 s takes a out");
    assert_eq!(m1_route(&lb, 1)?, [addr(1)]);
    assert_eq!(counter(&lb, "exo_lb_node_failures_total;node=a;reason=status"), 3);
    assert!(lb.logged("exo-lb: node a (10.0.0.1:52415) failed: status"));
    let h = lb.request("GET", "/healthcheck").start()?;
    assert_eq!(json_reply(&h).1["models"]["m1"], serde_json::json!({"up": 1, "total": 2}));
    // A status that is not in fail_on_status is not a failure.
    let lb = cluster("");
    for _ in 0..5 {
        a_answers(&lb, 0, 500)?;
        a_answers(&lb, 1, 404)?;
    }
    assert_eq!(fails(&lb, "a"), 0);
    assert!(a_is_listed(&lb)?);
    Ok(())
}

#[test]
fn failures_spaced_beyond_fail_timeout_never_take_a_node_out() -> R {
    let lb = cluster("");
    for k in 0..10 {
        a_answers(&lb, k % 2, 502)?;
        assert_eq!(fails(&lb, "a"), 1, "failure {k}: the window passed, the count started over");
        assert!(a_is_listed(&lb)?, "failure {k}");
        advance_ms(&lb, T + 1)?;
    }
    // The same three failures just inside the window do.
    let lb = cluster("");
    for _ in 0..3 {
        a_answers(&lb, 0, 502)?;
        advance_ms(&lb, T - 1)?;
    }
    assert_eq!(m1_route(&lb, 0)?, [addr(1)]);
    Ok(())
}

/// Takes a out with three failures now; returns when it comes back (ms).
fn take_a_out(lb: &Host) -> anyhow::Result<u64> {
    for _ in 0..3 {
        a_answers(lb, 0, 502)?;
    }
    assert_eq!(m1_route(lb, 0)?, [addr(1)]);
    Ok(lb.clock_ms() + T)
}

/// b holds one request, so that least_conn puts a (idle) first once it may be probed.
fn busy_b(lb: &Host) -> anyhow::Result<Stream> {
    let s = post(lb, 1, "m1")?;
    assert_eq!(first(&s), addr(1));
    Ok(s)
}

#[test]
fn after_fail_timeout_one_live_request_probes_and_its_success_resets() -> R {
    let lb = cluster("");
    let back = take_a_out(&lb)?;
    let hold = busy_b(&lb)?;
    lb.set_time_ms(back - 1)?;
    let s = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&s), [addr(1)], "still out 1 ms before fail_timeout ends");
    s.finish()?;
    lb.set_time_ms(back)?;
    let probe = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&probe), [addr(0), addr(1)], "the probe: a first, b as failover");
    // While the probe runs, no other request goes to a, on either worker.
    for w in [0, 1, 1] {
        let s = post(&lb, w, "m1")?;
        assert_eq!(endpoints(&s), [addr(1)], "one probe at a time (worker {w})");
        s.finish()?;
    }
    advance_ms(&lb, 5_000)?;
    complete(&probe, &addr(0), 200)?;
    assert_eq!(state(&lb).health(index(&lb, "a")), Default::default(), "a is back with a clean record");
    assert!(a_is_listed(&lb)?);
    // A clean count: two new failures leave it in.
    a_answers(&lb, 0, 502)?;
    a_answers(&lb, 1, 502)?;
    assert!(a_is_listed(&lb)?);
    ok(&hold)?;
    Ok(())
}

#[test]
fn a_failed_probe_takes_the_node_out_again_for_a_full_fail_timeout() -> R {
    let lb = cluster("");
    let back = take_a_out(&lb)?;
    let hold = busy_b(&lb)?;
    lb.set_time_ms(back + 60_000)?;
    let probe = post(&lb, 0, "m1")?;
    assert_eq!(first(&probe), addr(0));
    complete(&probe, &addr(0), 503)?;
    let again = lb.clock_ms() + T;
    assert_eq!(m1_route(&lb, 1)?, [addr(1)], "one failed probe is enough: out again");
    lb.set_time_ms(again - 1)?;
    assert_eq!(m1_route(&lb, 0)?, [addr(1)]);
    lb.set_time_ms(again)?;
    let probe = post(&lb, 1, "m1")?;
    assert_eq!(endpoints(&probe), [addr(0), addr(1)], "probed again after a full fail_timeout");
    // A probe that tells nothing (the client left before an answer) frees the claim.
    probe.abort()?;
    let probe = post(&lb, 0, "m1")?;
    assert_eq!(first(&probe), addr(0), "the next request probes");
    ok(&probe)?;
    ok(&hold)?;
    assert!(a_is_listed(&lb)?);
    assert_idle(&lb);
    Ok(())
}

#[test]
fn a_success_resets_the_count_but_not_one_that_started_before_the_failures() -> R {
    let lb = cluster("");
    let early = post(&lb, 0, "m1")?;
    assert_eq!(first(&early), addr(0));
    advance_ms(&lb, 1_000)?;
    a_answers(&lb, 1, 502)?;
    a_answers(&lb, 1, 502)?;
    // A long generation that began before the failures ends well: it says nothing about now.
    complete(&early, &addr(0), 200)?;
    assert_eq!(fails(&lb, "a"), 2);
    // A request that began after them does reset the count.
    advance_ms(&lb, 1_000)?;
    a_answers(&lb, 0, 200)?;
    assert_eq!(fails(&lb, "a"), 0);
    a_answers(&lb, 0, 502)?;
    a_answers(&lb, 1, 502)?;
    assert!(a_is_listed(&lb)?, "2 failures after the reset");
    a_answers(&lb, 0, 502)?;
    assert!(!a_is_listed(&lb)?);
    Ok(())
}

#[test]
fn a_models_single_node_keeps_getting_its_requests() -> R {
    let lb = cluster("");
    for k in 0..10 {
        let s = post(&lb, k % 2, "m9")?;
        assert_eq!(endpoints(&s), [addr(2)], "request {k}: the only node for m9, out or not");
        assert_eq!(s.request_header("x-envoy-max-retries").as_deref(), Some("0"));
        complete(&s, &addr(2), 502)?;
    }
    assert_eq!(counter(&lb, "exo_lb_node_failures_total;node=c;reason=status"), 10);
    // It is out for the health check, but not for its model's requests.
    let h = lb.request("GET", "/healthcheck").start()?;
    assert_eq!(json_reply(&h).1["models"]["m9"], serde_json::json!({"up": 0, "total": 1}));
    // A single node that is down (drained) is not used, though.
    let lb = load(
        &format!(
            r#"{{"nodes": [{}, {}]}}"#,
            node("a", 0, r#""models": ["m1"], "down": true"#),
            node("b", 1, r#""models": ["m2"]"#)
        ),
        1,
    );
    let e = error_reply(&post(&lb, 0, "m1")?);
    assert_eq!((e.status, e.code.as_str(), e.retry_after), (503, "no_available_node", Some(30)));
    Ok(())
}

#[test]
fn when_every_node_of_a_model_is_out_the_reply_says_when_to_retry() -> R {
    let lb = cluster("");
    take_a_out(&lb)?;
    advance_ms(&lb, 10_000)?;
    for _ in 0..3 {
        let s = post(&lb, 0, "m1")?;
        complete(&s, &addr(1), 503)?;
    }
    let e = error_reply(&post(&lb, 1, "m1")?);
    assert_eq!((e.status, e.kind.as_str(), e.code.as_str()), (503, "server_error", "no_available_node"));
    assert_eq!(e.retry_after, Some(20), "a is back in 20 s, b in 30 s");
    advance_ms(&lb, 15_500)?;
    assert_eq!(error_reply(&post(&lb, 0, "m1")?).retry_after, Some(5), "rounded up");
    // Other models are not affected; m9's node is fine.
    let s = post(&lb, 0, "m9")?;
    assert_eq!(endpoints(&s), [addr(2)]);
    ok(&s)?;
    advance_ms(&lb, 4_500)?;
    let s = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&s), [addr(0)], "a is back first (as a probe)");
    ok(&s)?;
    Ok(())
}

#[test]
fn nodes_envoy_retried_past_count_as_failed() -> R {
    let three = || {
        let cfg = format!(
            r#"{{"max_fails": 1, "model_switch_cost": "0s", "nodes": [{}, {}, {}]}}"#,
            node("a", 0, ""),
            node("b", 1, ""),
            node("c", 2, "")
        );
        load(&cfg, 2)
    };
    // Third attempt answered: the first two nodes refused the connection.
    let lb = three();
    let s = post(&lb, 0, "m")?;
    let list = endpoints(&s);
    assert_eq!(list.len(), 3);
    s.attempt_count(3).upstream_address(&list[2]);
    let headers = s.upstream_response(200, &[])?;
    assert!(headers.iter().any(|(k, _)| k == "x-exo-lb-node"));
    s.response_body("data: [DONE]\n\n", true)?;
    s.finish()?;
    for n in ["a", "b", "c"] {
        let failed = list[..2].contains(&addr(["a", "b", "c"].iter().position(|x| *x == n).unwrap()));
        assert_eq!(
            counter(&lb, &format!("exo_lb_node_failures_total;node={n};reason=connect")),
            i64::from(failed),
            "{n}"
        );
    }
    let next = post(&lb, 1, "m")?;
    assert_eq!(endpoints(&next), [list[2].clone()], "the two nodes Envoy moved past are out (max_fails 1)");
    ok(&next)?;
    assert_idle(&lb);

    // Second attempt answered: only the first node failed.
    let lb = three();
    let s = post(&lb, 0, "m")?;
    let list = endpoints(&s);
    s.attempt_count(2).upstream_address(&list[1]);
    s.respond(200, &[], b"{}")?;
    s.finish()?;
    let next = post(&lb, 0, "m")?;
    let mut want = list[1..].to_vec();
    want.sort();
    let mut got = endpoints(&next);
    got.sort();
    assert_eq!(got, want, "only {} is out", list[0]);
    ok(&next)?;

    // Every attempt failed (Envoy's own 503 after URX): all three are out.
    let lb = three();
    let s = post(&lb, 0, "m")?;
    let list = endpoints(&s);
    s.attempt_count(3).upstream_address(&list[2]).response_flags(flags::UF | flags::URX);
    s.respond(503, &[], b"upstream connect error")?;
    s.finish()?;
    assert_eq!(counter(&lb, "exo_lb_node_failures_total;node=a;reason=connect"), 1);
    let e = error_reply(&post(&lb, 1, "m")?);
    assert_eq!((e.status, e.code.as_str()), (503, "no_available_node"));
    assert_idle(&lb);
    Ok(())
}

#[test]
fn each_kind_of_failure_counts_and_a_client_leaving_does_not() -> R {
    // (response.flags, response status or 0 for none, failure reason or "" for none)
    let cases: [(u64, u32, &str); 11] = [
        (flags::UF, 503, "connect"),
        (flags::UF, 0, "connect"),
        (flags::UT, 504, "timeout"),
        (flags::SI, 0, "timeout"),
        (flags::UR, 0, "reset"),
        (flags::UC, 503, "reset"),
        (0, 502, "status"),
        (0, 504, "status"),
        (flags::DC, 0, ""),
        (flags::DC, 200, ""),
        (0, 0, ""),
    ];
    for (f, status, reason) in cases {
        let lb = cluster(r#""fail_on_status": [502, 503, 504],"#);
        let s = post(&lb, 0, "m9")?;
        s.upstream_address(&addr(2)).response_flags(f);
        if status > 0 {
            s.upstream_response(status, &[])?;
        }
        if f & flags::DC != 0 {
            s.abort()?;
        } else {
            s.finish()?;
        }
        let what = format!("flags {f:#x}, status {status}");
        if reason.is_empty() {
            assert_eq!(fails(&lb, "c"), 0, "{what}: no failure");
            assert!(!lb.logged("failed:"), "{what}");
        } else {
            assert_eq!(fails(&lb, "c"), 1, "{what}");
            assert_eq!(counter(&lb, &format!("exo_lb_node_failures_total;node=c;reason={reason}")), 1, "{what}");
        }
        assert_idle(&lb);
    }
    Ok(())
}

#[test]
fn max_fails_zero_turns_tracking_off_and_per_node_overrides_apply() -> R {
    let cfg = format!(
        r#"{{"max_fails": 0, "model_switch_cost": "0s", "max_inflight": 2, "nodes": [{}, {}]}}"#,
        node("a", 0, ""),
        node("b", 1, r#""max_fails": 1, "fail_timeout": "5s""#)
    );
    let lb = load(&cfg, 1);
    for _ in 0..20 {
        let s = post(&lb, 0, "m")?;
        complete(&s, &addr(0), 502)?;
    }
    assert_eq!(state(&lb).health(index(&lb, "a")), Default::default(), "nothing recorded for a");
    let s = post(&lb, 0, "m")?;
    assert_eq!(endpoints(&s).len(), 2);
    complete(&s, &addr(1), 502)?;
    let s = post(&lb, 0, "m")?;
    assert_eq!(endpoints(&s), [addr(0)], "b's own max_fails is 1");
    s.finish()?;
    advance_ms(&lb, 4_999)?;
    let s = post(&lb, 0, "m")?;
    assert_eq!(endpoints(&s), [addr(0)]);
    s.finish()?;
    advance_ms(&lb, 1)?;
    let s = post(&lb, 0, "m")?;
    assert!(endpoints(&s).contains(&addr(1)), "b's own fail_timeout is 5 s");
    ok(&s)?;
    Ok(())
}
