//! Access control with Envoy's own filters: API keys (RBAC), CORS, and hiding the balancer's
//! insides (x-exo-lb-node, health details) from clients.

use e2e::{chat_body, Cluster, NodeSpec};
use exo_lb_ctl::RenderOptions;
use serde_json::json;
use std::time::{Duration, Instant};

const KEY: &str = "test-key-0123456789abcdef";
const ORIGIN: &str = "https://chat.example.org";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_everything_but_the_health_check() {
    let c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"])],
        json!({}),
        None,
        RenderOptions { api_keys: vec![KEY.into(), "second-key-0123456789".into()], ..RenderOptions::default() },
    )
    .await;
    let body = chat_body("m1", false, 4);
    for auth in [None, Some("Bearer wrong-key-0123456789abc"), Some(KEY), Some("Basic dGVzdA==")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let r = c.post("/v1/chat/completions", body.clone(), &headers).await;
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer realm=\"exo-lb\""));
        let e = r.json();
        assert_eq!(
            (e["error"]["type"].as_str(), e["error"]["code"].as_str()),
            (Some("invalid_request_error"), Some("invalid_api_key"))
        );
        assert!(e["error"]["request_id"].as_str().is_some_and(|id| !id.is_empty()));
        assert_eq!(r.node(), None);
    }
    // The model list is for key holders too.
    assert_eq!(c.get("/v1/models").await.status, 401);
    // Nothing refused reached the exo-lb filter or a node.
    assert_eq!(c.node("a").stats().requests_total, 0);
    assert_eq!(c.envoy.stat("wasmcustom.exo_lb_local_replies_total").await, 0);

    let bearer = format!("Bearer {KEY}");
    let r = c.post("/v1/chat/completions", body.clone(), &[("authorization", &bearer)]).await;
    assert_eq!((r.status, r.node().as_deref()), (200, Some("a")), "{}", r.body);
    let r = c.post("/v1/chat/completions", body, &[("authorization", "Bearer second-key-0123456789")]).await;
    assert_eq!(r.status, 200);
    let r = c.client.get(c.envoy.url("/v1/models")).header("authorization", &bearer).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The health check stays public, with its details (hide_node_details is off).
    let h = c.get("/healthcheck").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["nodes"]["up"], 1);

    // The keys appear in no log.
    let log = c.envoy.access_log_lines(9).await;
    assert_eq!(log.iter().filter(|l| l["status"] == 401).count(), 5, "{log:?}");
    let all = serde_json::to_string(&log).unwrap() + &c.envoy.log();
    assert!(!all.contains(KEY) && !all.contains("second-key"), "a key was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflights_for_allowed_origins_only() {
    let c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"])],
        json!({}),
        None,
        RenderOptions { api_keys: vec![KEY.into()], cors_origins: vec![ORIGIN.into()], ..RenderOptions::default() },
    )
    .await;
    let preflight = |origin: &'static str| {
        c.client
            .request(reqwest::Method::OPTIONS, c.envoy.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    // A browser's preflight carries no key: it is answered by Envoy before the key check.
    let r = preflight(ORIGIN).await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    assert!(h["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    assert_eq!(h["access-control-max-age"], "86400");
    // Another origin gets no CORS headers (and, without a key, the refusal).
    let r = preflight("https://evil.example.com").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none(), "{:?}", r.headers());
    assert_eq!(r.status(), 401);
    // The real request from the allowed origin, and the refusal without a key, both readable by
    // the page.
    let bearer = format!("Bearer {KEY}");
    let r = c
        .post("/v1/chat/completions", chat_body("m1", false, 4), &[("origin", ORIGIN), ("authorization", &bearer)])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some(ORIGIN));
    assert_eq!(r.header("access-control-expose-headers").as_deref(), Some("x-request-id, retry-after"));
    let r = c.post("/v1/chat/completions", chat_body("m1", false, 4), &[("origin", ORIGIN)]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some(ORIGIN));
    let r = c
        .post(
            "/v1/chat/completions",
            chat_body("m1", false, 4),
            &[("origin", "https://evil.example.com"), ("authorization", &bearer)],
        )
        .await;
    assert_eq!(r.status, 200, "CORS is the browser's business; the key is what lets a request in");
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(c.node("a").stats().requests_by_path.get("/v1/chat/completions"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_node_details_stay_in_the_log() {
    let mut c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"])],
        json!({"probe": {"interval": "200ms", "timeout": "200ms"}}),
        None,
        RenderOptions { hide_node_details: true, ..RenderOptions::default() },
    )
    .await;
    let r = c.chat("m1", true).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.node(), None, "no x-exo-lb-node: {:?}", r.headers);
    assert!(r.body.contains("\"system_fingerprint\":\"a\""), "(the simulated node names itself in its replies)");
    let h = c.get("/healthcheck").await;
    assert_eq!((h.status, h.body.trim()), (200, r#"{"status":"ok"}"#));
    assert_eq!(h.header("content-type").as_deref(), Some("application/json"));
    // The filter's status page (loopback only) still has everything.
    assert_eq!(c.envoy.status_page().await["nodes"][0]["name"], "a");
    // The health check still reflects health.
    c.kill("a").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let h = loop {
        let h = c.get("/healthcheck").await;
        if h.status == 503 || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((h.status, h.body.trim()), (503, r#"{"status":"unavailable"}"#));
    let log = c.envoy.access_log_lines(3).await;
    let served = log.iter().find(|l| l["path"] == "/v1/chat/completions").expect("logged");
    assert_eq!(served["node"], "a", "{served}");
}
