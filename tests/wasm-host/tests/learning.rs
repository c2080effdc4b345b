//! What the compiled filter learns from traffic, across workers: a streamed reply's first-token
//! time and token pace on one worker, a switch on another, all in the shared estimates, and the
//! scheduler of every worker deciding with them.

use crate::common::*;
use exo_lb::logic::state::{model_key, node_key};
use wasm_host::{Host, Outcome};

fn stream_chat(lb: &Host, w: usize, model: &str) -> anyhow::Result<wasm_host::Stream> {
    let body = serde_json::json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    lb.worker(w)
        .request("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.to_string())
        .start()
}

/// A streamed reply: the first token after `first_ms`, then `tokens - 1` more, `per_token_ms`
/// apart.
fn reply(lb: &Host, s: &wasm_host::Stream, first_ms: u64, tokens: u64, per_token_ms: u64) -> R {
    s.upstream_address(&first(s));
    s.upstream_response(200, &[("content-type", "text/event-stream")])?;
    lb.advance(std::time::Duration::from_millis(first_ms))?;
    s.response_body("data: {}\n\n", false)?;
    for _ in 1..tokens {
        lb.advance(std::time::Duration::from_millis(per_token_ms))?;
        s.response_body("data: {}\n\n", false)?;
    }
    s.response_body("", true)?;
    s.finish()
}

/// Two workers over nodes a and b, both serving m1 and m2, with these models loaded at start.
fn two_nodes_loaded(a: &str, b: &str) -> Host {
    let serves = |loaded: &str| format!(r#""models": ["m1", "m2"], "loaded": "{loaded}""#);
    load(&format!(r#"{{"nodes": [{}, {}]}}"#, node("a", 0, &serves(a)), node("b", 1, &serves(b))), 2)
}

#[test]
fn workers_learn_together_and_decide_with_it() -> R {
    let lb = two_nodes_loaded("m1", "m1");
    // Worker 0: warm m1 replies, first token at 400 ms, then 20 ms per token.
    for _ in 0..3 {
        let s = stream_chat(&lb, 0, "m1")?;
        reply(&lb, &s, 400, 26, 20)?;
    }
    // Worker 1: an m2 request switches a node; its first token comes 5 s later than warm.
    let s = stream_chat(&lb, 1, "m2")?;
    let switched_node = first(&s);
    reply(&lb, &s, 5_400, 26, 20)?;
    // Each worker folds its samples in on its next tick and reads everyone's on the one after.
    advance_ms(&lb, 2_100)?;
    let e = estimates(&lb);
    let (m1, m2) = (model_key("m1"), model_key("m2"));
    let node = if switched_node == addr(0) { node_key("a") } else { node_key("b") };
    assert_eq!(e.warm_first_token_ms(node, m1), Some(400), "{e:?}");
    assert_eq!(e.per_token_us(node, m1), Some(20_000));
    assert_eq!(e.switch_ms(node, m2), Some(5_000), "the m2 request paid a 5 s switch");
    // Worker 0 now decides with worker 1's measurement. The other node keeps m1 busy; the
    // switched node (m2) is free. An m1 request is 0.9 s of work (0.4 s + 25 x 20 ms): a few
    // queued ones drain on the m1 node sooner than a switch (5 s, plus the chance that m2 is
    // asked for again), twelve of them do not: then the free node is switched to m1.
    let busy = stream_chat(&lb, 1, "m1")?;
    assert_ne!(first(&busy), switched_node, "m1 goes to the node that has it");
    let mut waiting = Vec::new();
    for k in 0..12 {
        waiting.push(stream_chat(&lb, 0, "m1")?);
        advance_ms(&lb, 10)?;
        let granted = waiting.iter().filter(|w| matches!(w.outcome(), Outcome::Forwarded { .. })).count();
        if k < 3 {
            assert_eq!(granted, 0, "{} waiting: they wait for the warm node; {:?}", k + 1, state(&lb));
        }
    }
    let granted: Vec<_> = waiting.iter().filter(|w| matches!(w.outcome(), Outcome::Forwarded { .. })).collect();
    assert_eq!(granted.len(), 1, "twelve waiting: the free node is switched for the oldest");
    assert_eq!(first(granted[0]), switched_node);
    reply(&lb, granted[0], 400, 26, 20)?;
    reply(&lb, &busy, 400, 26, 20)?;
    for _ in 0..400 {
        advance_ms(&lb, 10)?;
        for w in &waiting {
            if matches!(w.outcome(), Outcome::Forwarded { .. }) && !w.is_finished() {
                reply(&lb, w, 400, 26, 20)?;
            }
        }
        if waiting.iter().all(|w| w.is_finished()) {
            break;
        }
    }
    assert_idle(&lb);
    Ok(())
}

/// A worker with nothing queued folds its measurements into the shared estimates when a
/// request ends, and reads them before it admits one (at most every 100 ms), not only on its
/// lease renewal every second: a request it queues counts for the work its own `max_tokens`
/// says, by another worker's measurements.
#[test]
fn a_worker_admits_with_what_another_worker_measured() -> R {
    let lb = load(&format!(r#"{{"nodes": [{}]}}"#, node("a", 0, r#""models": ["m1"], "loaded": "m1""#)), 2);
    advance_ms(&lb, 5)?;
    // Worker 0 measures m1: the first token after 100 ms, then 10 ms a token.
    let s = stream_chat(&lb, 0, "m1")?;
    reply(&lb, &s, 100, 11, 10)?;
    let m1 = model_key("m1");
    assert_eq!(estimates(&lb).per_token_us(node_key("a"), m1), Some(10_000), "folded as the request ended");
    // a is busy; worker 1, which last read the estimates at start, queues a request for at
    // most 3 tokens: 100 ms + 3 x 10 ms of work.
    let busy = stream_chat(&lb, 0, "m1")?;
    let body = serde_json::json!({"model": "m1", "stream": true, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]});
    let queued = lb
        .worker(1)
        .request("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.to_string())
        .start()?;
    assert_eq!(queued.outcome(), Outcome::Paused);
    assert_eq!(state(&lb).waiter(0).map(|w| w.work_ms), Some(130), "{:?}", state(&lb));
    reply(&lb, &busy, 100, 3, 10)?;
    advance_ms(&lb, 10)?;
    reply(&lb, &queued, 100, 3, 10)?;
    assert_idle(&lb);
    Ok(())
}

/// Every worker's admitted requests reach the shared estimates on its tick, in time order, as
/// the arrivals the scheduler reads each model's demand from; a rejected request is none.
#[test]
fn every_workers_arrivals_reach_the_shared_estimates() -> R {
    let lb = two_nodes_loaded("m1", "m2");
    // Past the workers' first ticks, which come at once (they ask the nodes what they have).
    advance_ms(&lb, 5)?;
    let on_a = stream_chat(&lb, 1, "m1")?;
    advance_ms(&lb, 10)?;
    let on_b = stream_chat(&lb, 0, "m2")?;
    advance_ms(&lb, 10)?;
    let queued = stream_chat(&lb, 1, "m1")?;
    let unknown = stream_chat(&lb, 0, "m3")?;
    assert_eq!(unknown.outcome().local_status(), Some(404));
    assert_eq!(queued.outcome(), Outcome::Paused, "a is busy: it waits");
    assert!(estimates(&lb).arrivals.is_empty(), "folded on the tick, not on the request path");
    advance_ms(&lb, 1_100)?;
    let e = estimates(&lb);
    let (m1, m2) = (model_key("m1"), model_key("m2"));
    let models: Vec<u64> = e.arrivals.iter().map(|a| a.model).collect();
    assert_eq!(models, [m1, m2, m1], "{e:?}");
    assert!(e.arrivals.windows(2).all(|w| w[0].at_ms < w[1].at_ms), "{e:?}");
    reply(&lb, &on_a, 400, 5, 20)?;
    reply(&lb, &on_b, 400, 5, 20)?;
    advance_ms(&lb, 100)?;
    reply(&lb, &queued, 400, 5, 20)?;
    assert_idle(&lb);
    Ok(())
}

/// `tokens` events `per_token_ms` apart, then newer exo's `[DONE]`, and the end of the request.
fn newer_exo_tokens(lb: &Host, s: &wasm_host::Stream, tokens: u64, per_token_ms: u64) -> R {
    for _ in 0..tokens {
        s.response_body("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", false)?;
        lb.advance(std::time::Duration::from_millis(per_token_ms))?;
    }
    s.response_body("data: [DONE]\n\n", true)?;
    s.finish()
}

/// Newer exo opens a stream with `: keep-alive` and repeats it every 10 s while the request
/// waits or the model loads: the first token is the first chunk that is an event.
#[test]
fn keep_alive_comments_before_the_first_token_are_not_its_time() -> R {
    let cfg = format!(r#"{{"nodes": [{}]}}"#, node("a", 0, r#""models": ["m1", "m2"], "loaded": "m1""#));
    let lb = load(&cfg, 2);
    // A warm m1 reply whose first token comes at 400 ms, after a keep-alive at once.
    let warm = stream_chat(&lb, 0, "m1")?;
    warm.upstream_address(&addr(0));
    warm.upstream_response(200, &[("content-type", "text/event-stream")])?;
    warm.response_body(": keep-alive\n\n", false)?;
    lb.advance(std::time::Duration::from_millis(400))?;
    newer_exo_tokens(&lb, &warm, 26, 20)?;
    // An m2 request switches a: keep-alives while the model loads (12 s), then its first token.
    let switched = stream_chat(&lb, 1, "m2")?;
    switched.upstream_address(&addr(0));
    switched.upstream_response(200, &[("content-type", "text/event-stream")])?;
    switched.response_body(": keep-alive\n\n", false)?;
    lb.advance(std::time::Duration::from_millis(10_000))?;
    switched.response_body(": keep-alive\n\n", false)?;
    assert!(state(&lb).switching(0).is_some_and(|(_, _, phase)| phase.is_ok()), "still loading: {:?}", state(&lb));
    lb.advance(std::time::Duration::from_millis(2_400))?;
    newer_exo_tokens(&lb, &switched, 26, 20)?;
    advance_ms(&lb, 2_100)?;
    let e = estimates(&lb);
    let (a, m1, m2) = (node_key("a"), model_key("m1"), model_key("m2"));
    assert_eq!(e.warm_first_token_ms(a, m1), Some(400), "{e:?}");
    assert_eq!(e.switch_ms(a, m2), Some(12_000), "the switch: 12.4 s to the first token, less 0.4 s warm; {e:?}");
    assert_eq!(e.per_token_us(a, m1), Some(20_000), "{e:?}");
    Ok(())
}
