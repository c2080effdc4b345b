//! Failover and passive failure tracking through the real Envoy.

use e2e::{both_hosts, Cluster, Host, NodeSpec};
use exo_sim::Fault;
use serde_json::json;
use std::time::Duration;

/// The status when no node answered: Envoy's 503, nginx's 502 (both as OpenAI-style JSON).
fn no_node_answered(host: Host) -> u16 {
    match host {
        Host::Envoy => 503,
        Host::Nginx => 502,
    }
}

both_hosts!(
    the_only_node_for_a_model_is_never_taken_out,
    every_node_out_answers_503_with_retry_after,
    a_silent_node_times_out_with_504
);

both_hosts!(a_dead_node_is_skipped_and_then_taken_out);
async fn a_dead_node_is_skipped_and_then_taken_out(host: Host) {
    let mut c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m"]), NodeSpec::new("b", &["m"]), NodeSpec::new("c", &["m"])],
        // No warm-model affinity: sequential requests rotate over the nodes.
        json!({"max_fails": 3, "fail_timeout": "60s", "model_switch_cost": "0s"}),
    )
    .await;
    let dead = c.kill("b").await;
    for i in 0..12 {
        let r = c.chat("m", false).await;
        assert_eq!(r.status, 200, "request {i}: the client never sees the dead node: {}", r.body);
        assert_ne!(r.node().as_deref(), Some("b"));
    }
    // Three failed connection attempts took b out; after that Envoy is never asked to try it.
    assert_eq!(c.envoy.connect_failures_reaching(dead, 3).await, 3);
    for _ in 0..6 {
        assert_eq!(c.chat("m", true).await.status, 200);
    }
    assert_eq!(c.envoy.connect_failures_reaching(dead, 3).await, 3);
    let h = c.get("/healthcheck").await;
    assert_eq!(h.json()["nodes"], json!({"up": 2, "total": 3}));
    assert!(c.envoy.log().contains("node b"), "the failure is logged");
}

both_hosts!(a_node_comes_back_after_fail_timeout);
async fn a_node_comes_back_after_fail_timeout(host: Host) {
    let mut c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m"]), NodeSpec::new("b", &["m"])],
        json!({"max_fails": 2, "fail_timeout": "2s", "model_switch_cost": "0s"}),
    )
    .await;
    let sim = c.node("b").stats();
    assert_eq!(sim.requests_total, 0);
    let b_config = NodeSpec::new("b", &["m"]).sim;
    let dead = c.kill("b").await;
    for _ in 0..8 {
        assert_eq!(c.chat("m", false).await.status, 200);
    }
    assert_eq!(c.envoy.connect_failures_reaching(dead, 2).await, 2);
    assert_eq!(c.get("/healthcheck").await.json()["nodes"]["up"], 1);
    c.revive(dead, b_config).await;
    // Still out until fail_timeout has passed.
    for _ in 0..4 {
        assert_eq!(c.chat("m", false).await.node().as_deref(), Some("a"));
    }
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let mut served = Vec::new();
    for _ in 0..6 {
        served.push(c.chat("m", false).await.node().unwrap_or_default());
    }
    assert!(served.iter().filter(|n| *n == "b").count() >= 2, "b is back in rotation: {served:?}");
    assert_eq!(c.get("/healthcheck").await.json()["nodes"]["up"], 2);
}

both_hosts!(failing_statuses_take_a_node_out);
async fn failing_statuses_take_a_node_out(host: Host) {
    let c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m"]).with(|s| s.fault = Fault::Status(503)), NodeSpec::new("b", &["m"])],
        json!({"max_fails": 2, "fail_timeout": "60s", "model_switch_cost": "0s"}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = c.chat("m", false).await;
        statuses.push((r.status, r.node().unwrap_or_default()));
    }
    // A request a node has started on is never re-sent: a's two 503s reach their clients,
    // then a is out and b takes everything.
    let from_a: Vec<_> = statuses.iter().filter(|(_, n)| n == "a").collect();
    assert_eq!(from_a.len(), 2, "{statuses:?}");
    assert!(from_a.iter().all(|(s, _)| *s == 503));
    assert!(statuses.iter().filter(|(_, n)| n == "b").all(|(s, _)| *s == 200));
    assert_eq!(c.node("a").stats().requests_total, 2);
}

async fn the_only_node_for_a_model_is_never_taken_out(host: Host) {
    let mut c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("solo", &["m2"])],
        json!({"max_fails": 1, "fail_timeout": "60s"}),
    )
    .await;
    let dead = c.kill("solo").await;
    for i in 1..=4 {
        let r = c.chat("m2", false).await;
        assert_eq!(r.status, no_node_answered(host), "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "upstream_error", "the proxy's reply, not no_available_node");
        assert_eq!(c.envoy.connect_failures_reaching(dead, i).await, i, "every request still tries it");
    }
}

async fn every_node_out_answers_503_with_retry_after(host: Host) {
    let mut c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m"]), NodeSpec::new("b", &["m"])],
        json!({"max_fails": 1, "fail_timeout": "30s"}),
    )
    .await;
    c.kill("a").await;
    c.kill("b").await;
    // The first request tries both (the proxy's own error), which takes both out.
    let first = c.chat("m", false).await;
    assert_eq!(
        (first.status, first.json()["error"]["code"].as_str()),
        (no_node_answered(host), Some("upstream_error"))
    );
    let r = c.chat("m", false).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_available_node");
    assert_eq!(r.json()["error"]["type"], "server_error");
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    let h = c.get("/healthcheck").await;
    assert_eq!((h.status, h.json()["status"].as_str()), (503, Some("unavailable")));
}

both_hosts!(a_stream_cut_by_its_node_counts_as_a_failure);
async fn a_stream_cut_by_its_node_counts_as_a_failure(host: Host) {
    let c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m"]).with(|s| s.fault = Fault::DieMidStream(2)), NodeSpec::new("b", &["m"])],
        json!({"max_fails": 1, "fail_timeout": "60s", "model_switch_cost": "0s"}),
    )
    .await;
    let mut cut = 0;
    for _ in 0..6 {
        let resp =
            c.client.post(c.envoy.url("/v1/chat/completions")).body(e2e::chat_body("m", true, 8)).send().await.unwrap();
        let node = resp.headers().get("x-exo-lb-node").map(|v| v.to_str().unwrap().to_string());
        let body = resp.text().await;
        if node.as_deref() == Some("a") {
            assert!(body.is_err(), "a cut stream is not a clean end");
            cut += 1;
        } else {
            assert!(body.is_ok());
        }
    }
    assert_eq!(cut, 1, "one cut stream takes a out (max_fails 1)");
    // b's streams ended cleanly: none of them counted against it (on nginx the filter judges a
    // stream's end by its last bytes).
    let status = c.envoy.status_page().await;
    let b = status["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "b").unwrap().clone();
    assert_eq!((b["state"].as_str(), b["failures"].as_u64()), (Some("up"), Some(0)), "{b}");
}

async fn a_silent_node_times_out_with_504(host: Host) {
    let c =
        Cluster::start_with_on(host, vec![NodeSpec::new("a", &["m"]).with(|s| s.fault = Fault::Hang)], json!({}), 2)
            .await;
    let t = std::time::Instant::now();
    let r = c.chat("m", false).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert_eq!(r.json()["error"]["type"], "server_error");
    // At the 2 s idle limit, give or take: once, on a busy 2-core machine, Envoy's 504 came in
    // under 2 s by this test's clock (by how much was not recorded, nor why; the message now
    // says when it came).
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1_800), "504 after {took:?}, before the 2 s idle limit");
}
