//! Issue 9, items 1, 4 and 6, through a real Envoy with the production template: the shared
//! state stays bounded whatever model names clients send, probing nodes never block healthy
//! ones after an outage, and a node still generating for a departed client gets no new work
//! even before anything is measured.

use e2e::{chat_body, Cluster, NodeSpec};
use exo_sim::{Dialect, Fault};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The status page's raw bytes.
async fn status_bytes(c: &Cluster) -> String {
    reqwest::get(format!("http://{}/status", c.envoy.status)).await.expect("status").text().await.expect("status body")
}

/// Envoy's heap (admin `/memory`), in MiB; 0 when unreadable.
async fn heap_mib(c: &Cluster) -> f64 {
    let v: Value = match reqwest::get(format!("http://{}/memory", c.envoy.admin)).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let allocated = v["allocated"].as_str().and_then(|s| s.parse::<f64>().ok()).or(v["allocated"].as_f64());
    allocated.unwrap_or(0.0) / (1024.0 * 1024.0)
}

/// Median wall time of `n` ordinary requests, one after another.
async fn ordinary_latency(c: &Cluster, n: usize) -> Duration {
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let r = c.post("/v1/chat/completions", chat_body("m1", false, 1), &[]).await;
        times.push(t.elapsed());
        assert_eq!(r.status, 200, "an ordinary request failed: {}", r.body);
    }
    times.sort();
    times[times.len() / 2]
}

/// The k-th made-up model name: every other one oversized (257 bytes to ~4 KiB, every 100th
/// 64 KiB), the others short and distinct.
fn made_up_model(k: usize) -> (String, bool) {
    if k.is_multiple_of(2) {
        let len = if k.is_multiple_of(100) { 64 * 1024 } else { 257 + (k * 37) % 4_000 };
        let head = format!("huge-{k}-");
        (format!("{head}{}", "x".repeat(len - head.len())), true)
    } else {
        (format!("made-up-model-{k}-{}", "y".repeat(k % 200)), false)
    }
}

/// Item 1: with nodes that serve any model, every distinct model name a client sent used to
/// leave entries in the shared state that were never pruned; 660 requests took Envoy to 3.1 GB
/// and ordinary requests to seconds. 10,000 distinct names (half of them over the 256-byte
/// limit) must leave the state, the status page and the latency of an ordinary request flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_distinct_model_names_leave_state_and_latency_flat() {
    const NAMES: usize = 10_000;
    const CONCURRENCY: usize = 32;
    let fast = |name: &str, dialect: Dialect| {
        NodeSpec::new(name, &["m1"]).with(|s| {
            s.time_scale = 200.0;
            s.dialect = dialect;
        })
    };
    // Both serve any model as far as the balancer knows (`models` left out, or "*"); each
    // simulated node really runs m1 only, and answers other models as its exo dialect does:
    // older exo 400 "Unsupported model", newer exo 404 "No instance found for model".
    let c = Cluster::start(
        vec![
            fast("a", Dialect::Old).extra(json!({"models": null})),
            fast("b", Dialect::New).extra(json!({"models": ["*"]})),
        ],
        // Several requests at once per node: the nodes answer unknown models at once.
        json!({"max_fails": 1000, "max_inflight": 8}),
    )
    .await;
    assert!(c.filter_config["nodes"][0]["models"].is_null(), "{}", c.filter_config);

    // Warm up (the status page then shows m1's learned figures), then the baseline.
    for _ in 0..10 {
        assert_eq!(c.chat("m1", false).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let latency_before = ordinary_latency(&c, 15).await;
    let status_before = status_bytes(&c).await.len();
    let heap_before = heap_mib(&c).await;

    let storm = |range: std::ops::Range<usize>| {
        let c = &c;
        futures_util::stream::iter(range)
            .map(move |k| async move {
                let (model, oversized) = made_up_model(k);
                let r = c.post("/v1/chat/completions", chat_body(&model, false, 1), &[]).await;
                (k, oversized, r)
            })
            .buffer_unordered(CONCURRENCY)
            .fold((0usize, 0usize, Vec::new()), |(mut invalid, mut forwarded, mut odd), (k, oversized, r)| async move {
                if oversized {
                    if r.status == 400 && r.json()["error"]["code"] == "invalid_model" && r.node().is_none() {
                        invalid += 1;
                    } else if odd.len() < 5 {
                        odd.push(format!(
                            "#{k} (oversized): {} {}",
                            r.status,
                            r.body.chars().take(200).collect::<String>()
                        ));
                    }
                } else if (r.status == 400 || r.status == 404) && r.node().is_some() {
                    // The node's own answer for a model it does not run.
                    forwarded += 1;
                } else if odd.len() < 5 {
                    odd.push(format!(
                        "#{k}: {} {:?} {}",
                        r.status,
                        r.node(),
                        r.body.chars().take(200).collect::<String>()
                    ));
                }
                (invalid, forwarded, odd)
            })
    };

    let t = Instant::now();
    let (invalid1, forwarded1, odd1) = storm(0..NAMES / 2).await;
    let first_half = t.elapsed();
    tokio::time::sleep(Duration::from_millis(1_500)).await; // a tick or so: estimates folded in
    let status_middle = status_bytes(&c).await.len();
    let latency_middle = ordinary_latency(&c, 15).await;
    let t = Instant::now();
    let (invalid2, forwarded2, odd2) = storm(NAMES / 2..NAMES).await;
    let second_half = t.elapsed();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status_after_text = status_bytes(&c).await;
    let status_after = status_after_text.len();
    let latency_after = ordinary_latency(&c, 15).await;
    let heap_after = heap_mib(&c).await;
    let status: Value = serde_json::from_str(&status_after_text).expect("status JSON");
    let learned_models = status["learned"].as_object().map_or(0, |m| m.len());
    let m1_learned = status["learned"].get("m1").is_some();
    let node_requests: u64 = c.nodes.iter().map(|n| n.stats().requests_total).sum();

    println!(
        "{NAMES} distinct model names, {CONCURRENCY} at a time: first half in {:.1} s, second in {:.1} s",
        first_half.as_secs_f64(),
        second_half.as_secs_f64()
    );
    println!(
        "  400 invalid_model (oversized): {}; answered by a node (400/404 unknown model): {}; requests at the nodes: {node_requests}",
        invalid1 + invalid2,
        forwarded1 + forwarded2
    );
    println!(
        "  /status size: before {status_before} B, after 5,000 names {status_middle} B, after 10,000 {status_after} B"
    );
    println!(
        "  ordinary request (median of 15): before {:.1} ms, middle {:.1} ms, after {:.1} ms",
        latency_before.as_secs_f64() * 1e3,
        latency_middle.as_secs_f64() * 1e3,
        latency_after.as_secs_f64() * 1e3
    );
    println!("  Envoy heap: before {heap_before:.1} MiB, after {heap_after:.1} MiB; models in `learned` after: {learned_models} (m1 still there: {m1_learned})");
    println!(
        "  after: queue depth {}, in flight {:?}, not_running {:?}",
        status["queue"]["depth"],
        status["nodes"].as_array().unwrap().iter().map(|n| n["inflight"].clone()).collect::<Vec<_>>(),
        status["nodes"].as_array().unwrap().iter().map(|n| n["not_running"].clone()).collect::<Vec<_>>(),
    );

    let odd: Vec<_> = odd1.into_iter().chain(odd2).collect();
    assert!(odd.is_empty(), "unexpected replies: {odd:#?}");
    assert_eq!(invalid1 + invalid2, NAMES / 2, "every oversized name is refused with 400 invalid_model");
    assert_eq!(forwarded1 + forwarded2, NAMES / 2);
    // Bounded by configuration, not by client input: the second 5,000 names add nothing, and
    // all 10,000 add at most a bounded table's worth (a leak would add >= 10 bytes a name).
    assert!(
        status_after <= status_middle + status_middle / 10 + 512,
        "/status grew from {status_middle} to {status_after} bytes with 5,000 more names"
    );
    assert!(
        status_after <= status_before + 48 * 1024,
        "/status grew from {status_before} to {status_after} bytes with {NAMES} names"
    );
    let bound = |before: Duration| before * 3 + Duration::from_millis(20);
    assert!(latency_middle <= bound(latency_before), "{latency_middle:?} vs {latency_before:?}");
    assert!(latency_after <= bound(latency_before), "{latency_after:?} vs {latency_before:?}");
    if heap_before > 0.0 {
        assert!(heap_after < heap_before + 256.0, "Envoy's heap grew from {heap_before:.0} to {heap_after:.0} MiB");
    }
    assert_eq!(status["queue"]["depth"], 0);
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["inflight"], 0, "{n}");
        assert!(n["not_running"].as_array().is_some_and(|l| l.len() <= 4), "{n}");
    }
}

/// Item 4: after an outage every node is due for a probe at once; nodes whose probe was claimed
/// were skipped, so 8 concurrent requests after recovery got 5x 503 `no_available_node` with
/// two healthy nodes. Probing nodes must never turn requests away: they wait in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_probing_nodes_never_turn_requests_away() {
    let node = |name: &str| NodeSpec::new(name, &["m"]).with(|s| s.time_scale = 5.0);
    let c = Cluster::start(
        vec![node("a"), node("b"), node("c")],
        json!({"max_fails": 1, "fail_timeout": "1s", "model_switch_cost": "0s"}),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(c.chat("m", false).await.status, 200);
    }
    // The outage: every node refuses connections; requests fail until all are out.
    for n in &c.nodes {
        n.set_fault(Fault::Refuse);
    }
    let mut outage_statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        outage_statuses.push(c.chat("m", false).await.status);
        let status = c.envoy.status_page().await;
        let states: Vec<Value> = status["nodes"].as_array().unwrap().iter().map(|n| n["state"].clone()).collect();
        if states.iter().all(|s| s == "out" || s == "down") {
            break;
        }
        assert!(Instant::now() < deadline, "nodes never all out: {status}");
    }
    // Past fail_timeout: every node is due for a probe. Then the nodes come back.
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    let status = c.envoy.status_page().await;
    let states: Vec<Value> = status["nodes"].as_array().unwrap().iter().map(|n| n["state"].clone()).collect();
    assert!(states.iter().all(|s| s == "probing"), "every node due for a probe: {status}");
    for n in &c.nodes {
        n.set_fault(Fault::None);
    }
    // The nodes listen again (set_fault rebinds in the background).
    for n in &c.nodes {
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(n.addr()).await.is_err() {
            assert!(Instant::now() < deadline, "{} did not come back", n.name());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let t = Instant::now();
    let replies =
        futures_util::future::join_all((0..8).map(|_| c.post("/v1/chat/completions", chat_body("m", false, 8), &[])))
            .await;
    let took = t.elapsed();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    let served: Vec<String> = replies.iter().map(|r| r.node().unwrap_or_else(|| "-".into())).collect();
    let status = c.envoy.status_page().await;
    println!("outage: {} requests during it got {outage_statuses:?}", outage_statuses.len());
    println!(
        "after recovery, 8 concurrent requests in {:.2} s: statuses {statuses:?}, served by {served:?}; node states {:?}",
        took.as_secs_f64(),
        status["nodes"].as_array().unwrap().iter().map(|n| n["state"].clone()).collect::<Vec<_>>()
    );
    for r in &replies {
        assert_eq!(r.status, 200, "a request after recovery failed: {} {}", r.status, r.body);
    }
    for n in &c.nodes {
        assert_eq!(n.stats().max_concurrent_requests, 1, "{}: caps held", n.name());
    }
    assert_eq!(status["queue"]["depth"], 0);
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "up", "{n}");
        assert_eq!(n["inflight"], 0, "{n}");
    }
}

/// Item 6: before any service time is measured (a fresh start, a model's first use), an abort
/// left no hold, so a new request landed on a cap-1 node still generating for a departed
/// client. The hold (`DEFAULT_HOLD_MS`, 30 s, when nothing is measured) must keep the next
/// request queued at least until the abandoned generation is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_holds_the_node_even_before_anything_is_measured() {
    let c = Cluster::start(
        vec![NodeSpec::new("a", &["m"]).with(|s| {
            s.time_scale = 1.0;
            s.tokens_per_second = 10.0;
            s.keep_generating_after_disconnect = true;
        })],
        json!({}),
    )
    .await;
    let node = c.node("a");
    // Fresh: nothing measured. A 30-token stream (~3 s) whose client leaves after the first
    // token; the node keeps generating.
    let resp = c.client.post(c.envoy.url("/v1/chat/completions")).body(chat_body("m", true, 30)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    body.next().await.expect("a first chunk").expect("first chunk");
    drop(body);
    let left = Instant::now();
    tokio::time::sleep(Duration::from_millis(150)).await;

    // The next request, right after.
    let second = {
        let client = c.client.clone();
        let url = c.envoy.url("/v1/chat/completions");
        tokio::spawn(async move {
            let t = Instant::now();
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body(chat_body("m", false, 2))
                .timeout(Duration::from_secs(45))
                .send()
                .await;
            let status = match r {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            (status, t.elapsed())
        })
    };

    // While the abandoned generation runs, the node must not get the second request.
    let mut checked = 0;
    let mut saw_hold = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    let generation_ended = loop {
        let s = node.stats();
        if s.completed + s.aborted >= 1 {
            break left.elapsed();
        }
        assert_eq!(
            s.requests_total,
            1,
            "a new request reached node a {:?} after the client left, while it was still generating for it ({} tokens so far): {s:?}",
            left.elapsed(),
            s.tokens_generated
        );
        if checked % 5 == 0 {
            let status = c.envoy.status_page().await;
            if status["nodes"][0]["held_after_abort"] == 1 && status["queue"]["depth"] == 1 {
                saw_hold = true;
            }
        }
        checked += 1;
        assert!(Instant::now() < deadline, "the abandoned generation never ended: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let s = node.stats();
    assert_eq!(s.completed, 1, "the abandoned generation ran to its end: {s:?}");
    assert!(saw_hold, "the status page showed a hold and one request waiting");

    // The second request is served once the hold ends (at the latest DEFAULT_HOLD_MS after the
    // abort; sooner if the balancer learns the node is idle), never alongside the generation.
    let (status, waited) = second.await.unwrap();
    let s = node.stats();
    println!(
        "abort before anything was measured: abandoned generation ended {:.2} s after the client left; \
         the next request waited {:.2} s and got {status}; node a: {} requests, max concurrent generations {}",
        generation_ended.as_secs_f64(),
        waited.as_secs_f64(),
        s.requests_total,
        s.max_concurrent_generations
    );
    assert_eq!(status, 200, "the held request was served in the end");
    assert!(waited + Duration::from_millis(150) >= generation_ended, "served only after the generation ended");
    assert_eq!(s.requests_total, 2);
    assert_eq!(s.max_concurrent_generations, 1);
}
