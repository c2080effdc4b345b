//! Routing through the real Envoy: by model, by each policy, and never by the client.

use e2e::{both_hosts, chat_body, root, Cluster, Host, NodeSpec};
use serde_json::json;
use std::collections::BTreeMap;

fn tally(names: impl IntoIterator<Item = Option<String>>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n.unwrap_or_else(|| "(none)".into())).or_insert(0) += 1;
    }
    t
}

both_hosts!(routes_by_model);
async fn routes_by_model(host: Host) {
    let c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("b", &["m1", "m2"]), NodeSpec::new("c", &["m3"])],
        json!({}),
    )
    .await;
    let m1: Vec<_> =
        futures_util::future::join_all((0..8).map(|_| c.chat("m1", false))).await.iter().map(|r| r.node()).collect();
    let t = tally(m1);
    assert_eq!(t.keys().collect::<Vec<_>>(), ["a", "b"], "m1 spreads over its two nodes: {t:?}");
    for _ in 0..8 {
        let r = c.chat("m2", false).await;
        assert_eq!((r.status, r.node().as_deref()), (200, Some("b")), "{}", r.body);
        assert_eq!(r.json()["system_fingerprint"], "b", "the node itself says who served");
        let r = c.chat("m3", false).await;
        assert_eq!((r.status, r.node().as_deref()), (200, Some("c")));
    }
    assert_eq!(c.node("c").stats().requests_by_path.get("/v1/chat/completions"), Some(&8));
}

both_hosts!(a_client_never_chooses_the_node);
async fn a_client_never_chooses_the_node(host: Host) {
    let c = Cluster::start_on(host, vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("c", &["m3"])], json!({})).await;
    let a = c.node("a").addr().to_string();
    for _ in 0..4 {
        let r = c
            .post(
                "/v1/chat/completions",
                chat_body("m3", false, 2),
                &[("x-gateway-destination-endpoint", &a), ("x-envoy-max-retries", "5")],
            )
            .await;
        assert_eq!((r.status, r.node().as_deref()), (200, Some("c")));
    }
    // Passthrough requests too.
    let r = c.client.get(c.envoy.url("/")).header("x-gateway-destination-endpoint", "10.9.9.9:1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.nodes.iter().map(|n| n.stats().requests_total).sum::<u64>(), 5);
    match host {
        Host::Envoy => assert_eq!(c.envoy.stat("wasmcustom.exo_lb_upstream_mismatch_total").await, 0),
        // No metrics exporter in nginx: the filter's warning is the evidence.
        Host::Nginx => assert!(!c.envoy.log().contains("not among the chosen nodes"), "{}", c.envoy.log()),
    }
}

both_hosts!(round_robin_follows_weights);
async fn round_robin_follows_weights(host: Host) {
    let c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m"]).extra(json!({"weight": 3})), NodeSpec::new("b", &["m"])],
        json!({"policy": "round_robin"}),
    )
    .await;
    let mut served = Vec::new();
    for _ in 0..40 {
        served.push(c.chat("m", false).await.node());
    }
    let t = tally(served.clone());
    assert_eq!((t["a"], t["b"]), (30, 10), "{served:?}");
    // Smooth: b never waits more than three turns.
    let seq: String = served.iter().map(|n| n.as_deref().unwrap_or("?")).collect::<Vec<_>>().join("");
    assert!(!seq.contains("aaaa"), "{seq}");
}

both_hosts!(least_conn_spreads_concurrent_requests);
async fn least_conn_spreads_concurrent_requests(host: Host) {
    let slow = |name: &str| NodeSpec::new(name, &["m"]).with(|s| s.time_scale = 1.0);
    let c = Cluster::start_on(host, vec![slow("a"), slow("b"), slow("c")], json!({"policy": "least_conn"})).await;
    let requests = (0..6).map(|_| c.post("/v1/chat/completions", chat_body("m", true, 10), &[]));
    let replies = futures_util::future::join_all(requests).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let t = tally(replies.iter().map(|r| r.node()));
    assert_eq!(t.values().copied().collect::<Vec<_>>(), [2, 2, 2], "{t:?}");
    for n in &c.nodes {
        // The default cap of one generation per node holds: the rest waited in the balancer.
        assert_eq!(n.stats().max_concurrent_requests, 1, "{}", n.name());
    }
}

both_hosts!(hash_keeps_a_session_on_its_node);
async fn hash_keeps_a_session_on_its_node(host: Host) {
    let c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m"]), NodeSpec::new("b", &["m"]), NodeSpec::new("c", &["m"])],
        json!({"policy": "hash", "hash_on": "header:x-session"}),
    )
    .await;
    let mut owners = BTreeMap::new();
    for round in 0..3 {
        for session in 0..12 {
            let key = format!("session-{session}");
            let r = c.post("/v1/chat/completions", chat_body("m", false, 1), &[("x-session", &key)]).await;
            let node = r.node().expect("served");
            let first = owners.entry(key.clone()).or_insert_with(|| node.clone());
            assert_eq!(*first, node, "{key} moved in round {round}");
        }
    }
    let used: std::collections::BTreeSet<_> = owners.values().collect();
    assert!(used.len() >= 2, "12 sessions on one node: {owners:?}");
}

both_hosts!(web_ui_health_and_model_list);
async fn web_ui_health_and_model_list(host: Host) {
    let c =
        Cluster::start_on(host, vec![NodeSpec::new("a", &["m1", "m2"]), NodeSpec::new("b", &["m3"])], json!({})).await;
    let ui = c.get("/").await;
    assert_eq!(ui.status, 200);
    assert!(ui.body.contains("exo"), "{}", ui.body);
    assert!(ui.node().is_some());
    let h = c.get("/healthcheck").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["nodes"], json!({"up": 2, "total": 2}));
    assert_eq!(h.json()["models"]["m3"], json!({"up": 1, "total": 1}));
    assert!(h.node().is_none(), "answered by the balancer itself");
    let m = c.get("/v1/models").await;
    let ids: Vec<String> =
        m.json()["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["m1", "m2", "m3"]);
    assert_eq!(
        c.nodes.iter().map(|n| n.stats().requests_by_path.get("/healthcheck").copied().unwrap_or(0)).sum::<u64>(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_node_model_list_is_proxied() {
    let c = Cluster::start(vec![NodeSpec::new("any", &["m1", "m9"]).extra(json!({"models": ["*"]}))], json!({})).await;
    let m = c.get("/v1/models").await;
    assert_eq!((m.status, m.node().as_deref()), (200, Some("any")));
    let r = c.chat("m9", false).await;
    assert_eq!((r.status, r.node().as_deref()), (200, Some("any")));
}

#[test]
fn production_config_validates_in_envoy() {
    let wasm = e2e::wasm_path();
    assert!(wasm.ends_with("target/wasm32-wasip1/release/exo_lb.wasm"));
    let out = std::process::Command::new(e2e::envoy_binary())
        .current_dir(root())
        .args(["--mode", "validate", "-c", "envoy/envoy.yaml", "--disable-hot-restart"])
        .output()
        .expect("run envoy");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("OK"), "{text}");
    assert!(text.contains("configured 3 node(s)"), "the filter loaded its configuration: {text}");
}
