//! Issue 11: the balancer learns, from the traffic it already sees, what a model switch costs,
//! how long the first token takes on a warm node and how long each further token takes, with
//! every option at its default (`model_switch_cost` auto). Through a real Envoy, against
//! simulated nodes whose true figures are known.

use e2e::{chat_body, Cluster, NodeSpec};
use exo_sim::Dialect;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The value of the sample `name{labels}` in a Prometheus text page.
fn prometheus_sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

/// Streams one request to the end; returns the node that served it and the time to its first
/// body chunk.
async fn stream(c: &Cluster, model: &str, tokens: u32) -> (String, Duration) {
    let t = Instant::now();
    let resp = c
        .client
        .post(c.envoy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(model, true, tokens))
        .send()
        .await
        .expect("request through envoy");
    assert_eq!(resp.status(), 200, "{model}");
    let node = resp.headers().get("x-exo-lb-node").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let mut body = resp.bytes_stream();
    let mut first = None;
    while let Some(chunk) = body.next().await {
        chunk.expect("body chunk");
        first.get_or_insert_with(|| t.elapsed());
    }
    (node, first.unwrap_or_default())
}

fn within(learned: &Value, truth: f64, tolerance: f64) -> bool {
    learned.as_f64().is_some_and(|v| (v - truth).abs() <= truth * tolerance)
}

/// Waits until each of the `nodes` nodes has said, as older exo's metrics do, how long its
/// loads take (the status page's `reported_load_ms`).
async fn wait_until_the_nodes_said_their_loads(c: &Cluster, nodes: usize) {
    let said = |status: &Value| -> Vec<Option<u64>> {
        (0..nodes).map(|i| status["nodes"][i]["reported_load_ms"].as_u64()).collect()
    };
    let status = c.envoy.status_page_when(Duration::from_secs(10), |s| said(s).iter().all(Option::is_some)).await;
    assert!(said(&status).iter().all(Option::is_some), "the nodes did not say how long their loads take: {status}");
    println!("the nodes said their loads take {:?} ms", said(&status));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_switch_and_token_times_converge_within_30_requests() {
    learned_figures_converge(Dialect::Old).await;
}

/// Newer exo opens each stream with a `: keep-alive` comment, before any token (and repeats
/// it every 10 s while the request waits or the model loads): that is not a first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_newer_exo_keep_alive_comments_are_not_first_tokens() {
    learned_figures_converge(Dialect::New).await;
}

async fn learned_figures_converge(dialect: Dialect) {
    const SWITCH: Duration = Duration::from_millis(1_500);
    const TOKENS_PER_SECOND: f64 = 50.0; // 20 ms a token
    const TOKENS: u32 = 20;
    let node = |name: &str, models: &[&str]| {
        NodeSpec::new(name, models).with(|s| {
            s.time_scale = 1.0;
            s.switch_time = SWITCH;
            s.tokens_per_second = TOKENS_PER_SECOND;
            s.dialect = dialect;
        })
    };
    // a serves m1 and m2, so alternating between them makes it switch; b serves m3 (never
    // switches; c too).
    let c = Cluster::start(vec![node("a", &["m1", "m2"]), node("b", &["m3"]), node("c", &["m3"])], json!({})).await;
    let sim = &c.node("a").models().to_vec();
    assert_eq!(sim, &["m1", "m2"]);
    let true_switch_ms = SWITCH.as_secs_f64() * 1e3; // time_scale 1
    let true_token_us = 1e6 / TOKENS_PER_SECOND;
    // Prefill of "Hello" (2 tokens at 60/s) plus the first token.
    let true_first_token_ms = 2.0 / 60.0 * 1e3 + true_token_us / 1e3;

    // 30 streaming requests: 20 alternating pairs of m1 and m2 (9 switches on a), and 10 of m3
    // alongside on b and c.
    let t = Instant::now();
    let pairs = async {
        let mut seen = Vec::new();
        for k in 0..20 {
            let model = if (k / 2) % 2 == 0 { "m1" } else { "m2" };
            let (node, first) = stream(&c, model, TOKENS).await;
            seen.push(format!("{model}@{node}:{}ms", first.as_millis()));
        }
        seen
    };
    let others = async {
        let mut seen = Vec::new();
        for _ in 0..10 {
            let (node, first) = stream(&c, "m3", TOKENS).await;
            seen.push(format!("m3@{node}:{}ms", first.as_millis()));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        seen
    };
    let (pairs, others) = tokio::join!(pairs, others);
    let took = t.elapsed();
    // The estimates are folded in on each worker's 1 s tick.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let status = c.envoy.status_page().await;
    let read_at = t.elapsed();
    let learned = &status["learned"];
    println!("30 streaming requests in {:.1} s (model@node:first token)", took.as_secs_f64());
    println!("  a: {pairs:?}");
    println!("  b/c: {others:?}");
    println!(
        "  true: switch {true_switch_ms:.0} ms, token {true_token_us:.0} us, warm first token ~{true_first_token_ms:.0} ms"
    );
    for model in ["m1", "m2", "m3"] {
        let m = &learned[model];
        println!(
            "  learned {model}: switch_ms {}, per_token_us {}, first_token_ms {}, samples {}, per node {}",
            m["switch_ms"], m["per_token_us"], m["first_token_ms"], m["samples"], m["nodes"]
        );
    }
    let switches = c.node("a").stats().model_switches;
    assert!(switches >= 8, "a switched {switches} times");
    assert_eq!(status["model_switch_cost"], "auto");

    let mut wrong = Vec::new();
    // The switch cost, where switches happened: on a, per node and for the model.
    for model in ["m1", "m2"] {
        for (what, v) in [
            (format!("{model} on a"), &learned[model]["nodes"]["a"]["switch_ms"]),
            (model.to_string(), &learned[model]["switch_ms"]),
        ] {
            if !within(v, true_switch_ms, 0.2) {
                wrong.push(format!("switch_ms of {what}: {v}, true {true_switch_ms:.0}"));
            }
        }
    }
    // The time per token, wherever the model ran.
    for (model, node) in [("m1", "a"), ("m2", "a"), ("m3", "b"), ("m3", "c")] {
        let v = &learned[model]["nodes"][node]["per_token_us"];
        if !within(v, true_token_us, 0.2) {
            wrong.push(format!("per_token_us of {model} on {node}: {v}, true {true_token_us:.0}"));
        }
    }
    for model in ["m1", "m2", "m3"] {
        let v = &learned[model]["per_token_us"];
        if !within(v, true_token_us, 0.2) {
            wrong.push(format!("per_token_us of {model}: {v}, true {true_token_us:.0}"));
        }
        // Warm first token: measured, and far below a switch.
        let v = &learned[model]["first_token_ms"];
        if !v.as_f64().is_some_and(|ms| ms > 0.0 && ms < true_switch_ms / 3.0) {
            wrong.push(format!("first_token_ms of {model}: {v}, true ~{true_first_token_ms:.0}"));
        }
    }
    assert!(wrong.is_empty(), "estimates off by more than 20 %:\n{}\nstatus: {status}", wrong.join("\n"));
    // How often each model is asked for, from every worker's arrivals: 10 times each, over
    // the span from the first arrival to the status read (far longer than the 16 of these
    // 0.44 s generations a rate is taken over at least), so between 10 over the whole run
    // with the read and 10 over the requests alone.
    let (slowest, fastest) = (600.0 / read_at.as_secs_f64(), 600.0 / took.as_secs_f64());
    for model in ["m1", "m2", "m3"] {
        let per_min = learned[model]["arrivals_per_minute"].as_f64().unwrap_or(0.0);
        assert!(
            per_min >= slowest - 0.01 && per_min <= fastest + 0.01,
            "{model}: {per_min} a minute, not within {slowest:.2}-{fastest:.2}; status: {status}"
        );
        // Demand: that rate times the model's service time.
        let demand = learned[model]["demand_nodes"].as_f64().unwrap_or(0.0);
        let service_s = learned[model]["service_ms"].as_f64().unwrap_or(0.0) / 1e3;
        assert!(
            demand > 0.0 && (demand - per_min / 60.0 * service_s).abs() <= 0.01,
            "{model}: {demand} nodes' worth at {per_min} a minute of {service_s} s; status: {status}"
        );
    }

    // The same figures as Prometheus gauges.
    let page = reqwest::get(format!("http://{}/stats/prometheus", c.envoy.admin)).await.unwrap().text().await.unwrap();
    let gauge = |name: &str, node: &str, model: &str| {
        prometheus_sample(&page, &format!("{name}{{node=\"{node}\",model=\"{model}\"}}"))
    };
    let switch_gauge = gauge("exo_lb_model_switch_milliseconds", "a", "m1");
    let token_gauge = gauge("exo_lb_token_microseconds", "a", "m1");
    let first_gauge = gauge("exo_lb_warm_first_token_milliseconds", "a", "m1");
    println!("  gauges for m1 on a: switch {switch_gauge:?} ms, token {token_gauge:?} us, warm first token {first_gauge:?} ms");
    assert!(switch_gauge.is_some_and(|v| (v - true_switch_ms).abs() <= true_switch_ms * 0.2), "{switch_gauge:?}");
    assert!(token_gauge.is_some_and(|v| (v - true_token_us).abs() <= true_token_us * 0.2), "{token_gauge:?}");
    assert!(first_gauge.is_some(), "no warm first-token gauge");
    let demand_gauge = prometheus_sample(&page, "exo_lb_model_demand_millinodes{model=\"m1\"}");
    let demand_millinodes = learned["m1"]["demand_nodes"].as_f64().unwrap_or(0.0) * 1e3;
    assert!(
        demand_gauge.is_some_and(|v| (v - demand_millinodes).abs() <= 10.0),
        "{demand_gauge:?} vs {demand_millinodes}"
    );
}

/// Boards load unalike (an SD card against eMMC): c loads five times slower than a and b, and
/// says so in older exo's metrics. The balancer makes its first switch on a board that loads
/// fast, and what it measures there stands for the other fast board as it is and for c five
/// times over: a switch not measured on its own node is the model's part times the node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_board_is_taken_to_load_slowly_what_only_fast_ones_loaded() {
    const FAST: Duration = Duration::from_millis(400);
    const SLOW: Duration = Duration::from_millis(2_000);
    let node = |name: &str, switch: Duration| {
        NodeSpec::new(name, &["m1", "m2"]).with(|s| {
            s.time_scale = 1.0;
            s.switch_time = switch;
            s.tokens_per_second = 50.0;
            s.dialect = Dialect::Old;
        })
    };
    let c =
        Cluster::start(vec![node("a", FAST), node("b", FAST), node("c", SLOW)], json!({"discover_loaded": true})).await;
    // Each node starts with m1 loaded and says how long that load took.
    wait_until_the_nodes_said_their_loads(&c, 3).await;
    // Warm replies of m1 (the warm first-token time), then two of m2: the first makes a node
    // load it, the second finds it warm there.
    for _ in 0..4 {
        stream(&c, "m1", 10).await;
    }
    let (loaded_on, _) = stream(&c, "m2", 10).await;
    let (again_on, _) = stream(&c, "m2", 10).await;
    assert_ne!(loaded_on, "c", "the first switch went to the slow board");
    assert_eq!(again_on, loaded_on, "the second m2 found it warm");
    // The estimates are folded in on each worker's tick.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let status = c.envoy.status_page().await;
    let learned = &status["learned"]["m2"]["nodes"];
    let other_fast = if loaded_on == "a" { "b" } else { "a" };
    println!("m2 loaded on {loaded_on}; learned per node: {learned}");
    let fast_ms = FAST.as_secs_f64() * 1e3;
    let slow_ms = SLOW.as_secs_f64() * 1e3;
    for (node, truth) in [(loaded_on.as_str(), fast_ms), (other_fast, fast_ms), ("c", slow_ms)] {
        let v = &learned[node]["switch_ms"];
        assert!(within(v, truth, 0.2), "m2's switch on {node}: {v}, true {truth:.0}; status: {status}");
    }
}

/// Models load unalike (a 3B model against a 1.5B one) on boards that load alike: m2 takes 2 s
/// to load on any board, m1 0.4 s. c booted m2 and says its one load took 2 s, which alone
/// reads like a slow board. Once m2 is measured loading on a fast board, c is taken as the
/// typical board it is: what it would take to load m1 is what a and b take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_that_booted_a_heavy_model_is_typical_once_that_model_loads_elsewhere() {
    const LIGHT: Duration = Duration::from_millis(400);
    const HEAVY: Duration = Duration::from_millis(2_000);
    let node = |name: &str, models: &[&str]| {
        NodeSpec::new(name, models).with(|s| {
            s.time_scale = 1.0;
            s.switch_time = LIGHT;
            s.switch_time_by_model.insert("m2".into(), HEAVY);
            s.tokens_per_second = 50.0;
            s.dialect = Dialect::Old;
        })
    };
    // a and b start with m1 loaded, c with m2.
    let c = Cluster::start(
        vec![node("a", &["m1", "m2"]), node("b", &["m1", "m2"]), node("c", &["m2", "m1"])],
        json!({"discover_loaded": true}),
    )
    .await;
    wait_until_the_nodes_said_their_loads(&c, 3).await;
    let status = c.envoy.status_page().await;
    let of: Vec<&Value> = (0..3).map(|i| &status["nodes"][i]["reported_load_of"]).collect();
    assert_eq!(of, [&json!("m1"), &json!("m1"), &json!("m2")], "the model each node's one load was: {status}");
    // Warm replies of both models.
    for _ in 0..3 {
        stream(&c, "m1", 10).await;
        let (on, _) = stream(&c, "m2", 10).await;
        assert_eq!(on, "c", "m2 went where it was not loaded");
    }
    // m2 while c is busy with a long m2 reply (3 s): a fast board loads it.
    let long = stream(&c, "m2", 150);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream(&c, "m2", 10).await
    };
    let ((long_on, _), (loaded_on, _)) = tokio::join!(long, second);
    assert_eq!(long_on, "c");
    assert_ne!(loaded_on, "c", "the second m2 waited for c instead of loading on a fast board");
    // The estimates are folded in on each worker's tick.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let status = c.envoy.status_page().await;
    println!("m2 loaded on {loaded_on}; learned: {}", status["learned"]);
    let other_fast = if loaded_on == "a" { "b" } else { "a" };
    let (light_ms, heavy_ms) = (LIGHT.as_secs_f64() * 1e3, HEAVY.as_secs_f64() * 1e3);
    for (model, node, truth) in
        [("m2", loaded_on.as_str(), heavy_ms), ("m2", other_fast, heavy_ms), ("m1", "c", light_ms)]
    {
        let v = &status["learned"][model]["nodes"][node]["switch_ms"];
        assert!(within(v, truth, 0.2), "{model}'s switch on {node}: {v}, true {truth:.0}; status: {status}");
    }
}
