//! Issue 9, "Hardening": what an attacker or a bad day did to exo-lb, each through a real Envoy
//! with the production template, so that none of it comes back. (Items 1, 4 and 6, the shared
//! state, probing and holds after aborts, are tested with the scheduler.)
//!
//! Requests whose exact bytes matter (odd paths, trickled bodies, held connections) are written
//! by hand on a TCP socket: an HTTP client library would normalise them first.

use e2e::{chat_body, Cluster, NodeSpec};
use exo_lb_ctl::{Limits, RenderOptions};
use exo_sim::Dialect;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "security-test-key-0123456789";

/// A reply read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The node that served it (`x-exo-lb-node`).
    fn node(&self) -> Option<String> {
        self.header("x-exo-lb-node")
    }
}

fn parse(bytes: &[u8]) -> Raw {
    let text = String::from_utf8_lossy(bytes).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let raw = Raw { status, head: head.to_string(), body: body.to_string() };
    if raw.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        // Chunk sizes and payloads; good enough for the small bodies these tests read.
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        return Raw { body: out, ..raw };
    }
    raw
}

/// Sends `method path` with `headers` and `body` exactly as given, and reads the whole reply.
async fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Raw {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: exo-lb\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut s = TcpStream::connect(addr).await.expect("connect to envoy");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await.expect("reply within 60 s").ok();
    parse(&buf)
}

fn assert_refused(r: &Raw, what: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"), "{what}");
    let e = r.json();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{what}");
    assert_eq!(e["error"]["code"], "path_not_allowed", "{what}");
    assert!(e["error"]["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{what}");
    assert_eq!(r.node(), None, "{what}");
}

fn total_requests(c: &Cluster) -> u64 {
    c.nodes.iter().map(|n| n.stats().requests_total).sum()
}

/// Item 2: `POST /v1/chat/complet%69ons` is a generation on both exo servers (they decode the
/// path), so it must get the scheduler: caps, queue and model routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_scheduled_however_the_path_is_spelled() {
    let slow = |name: &str, models: &[&str]| NodeSpec::new(name, models).with(|s| s.time_scale = 1.0);
    let c = Cluster::start(vec![slow("a", &["m1"]), slow("b", &["m1"]), slow("c", &["m2"])], json!({})).await;
    let spellings = [
        "/v1/chat/complet%69ons",
        "/v1/chat/completion%73",
        "/%76%31/chat/completions",
        "//v1//chat/completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "/v1/%2e/chat/completions",
        "/chat/complet%69ons",
    ];
    let body = chat_body("m1", false, 10);
    let replies =
        futures_util::future::join_all(spellings.iter().map(|p| raw(c.envoy.listen, "POST", p, &[], &body))).await;
    let mut served = Vec::new();
    for (path, r) in spellings.iter().zip(&replies) {
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let node = r.node().unwrap_or_default();
        assert!(node == "a" || node == "b", "{path} went to {node:?}, which does not serve m1");
        served.push(node);
    }
    assert_eq!(c.node("c").stats().requests_total, 0, "m1 was sent to c");
    for n in ["a", "b"] {
        let s = c.node(n).stats();
        assert_eq!(s.max_concurrent_requests, 1, "{n} ran two generations at once: {s:?}");
        assert!(
            s.requests_by_path.keys().all(|p| p == "/v1/chat/completions" || p == "/chat/completions"),
            "{n}: {s:?}"
        );
    }
    println!("8 spellings of a generation, 2 cap-1 nodes: served by {served:?}, max concurrency 1 on each");

    // An encoded '/' or '\' is refused by Envoy: the nodes would each read it differently.
    for path in ["/v1%2Fchat%2Fcompletions", "/v1/chat%5Ccompletions"] {
        let r = raw(c.envoy.listen, "POST", path, &[], &body).await;
        assert_eq!(r.status, 400, "{path}: {r:?}");
    }
    assert_eq!(total_requests(&c), spellings.len() as u64);
}

/// Item 3: three unauthenticated `POST /quit` reached all three nodes. Node administration is
/// refused by the filter, however it is spelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_administration_never_reaches_a_node() {
    let c = Cluster::start(vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("b", &["m1"])], json!({})).await;
    for (method, path) in [
        ("POST", "/quit"),
        ("POST", "//quit"),
        ("POST", "/v1/../quit"),
        ("POST", "/%71uit"),
        ("POST", "/quit?now=1"),
        ("POST", "/download"),
        ("DELETE", "/models/m1"),
        ("POST", "/v1/image/generations"),
        ("PUT", "/v1/models"),
        ("POST", "/"),
        ("POST", "/V1/CHAT/COMPLETIONS"),
    ] {
        let r = raw(c.envoy.listen, method, path, &[], "{}").await;
        assert_refused(&r, &format!("{method} {path}"));
    }
    assert_eq!(total_requests(&c), 0, "administration reached a node");
    // What users of the nginx setup had keeps working: the API and the web UI (reads).
    assert_eq!(c.chat("m1", false).await.status, 200);
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(raw(c.envoy.listen, "GET", "/v1/download/progress", &[], "").await.status, 404, "a node's 404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_can_be_turned_off() {
    let c = Cluster::start(vec![NodeSpec::new("a", &["m1"])], json!({"web_ui": false})).await;
    for path in ["/", "/ws", "/index.html", "/topology"] {
        assert_refused(&raw(c.envoy.listen, "GET", path, &[], "").await, path);
    }
    assert_eq!(c.get("/v1/models").await.status, 200);
    assert_eq!(c.get("/healthcheck").await.status, 200);
    assert_eq!(c.chat("m1", false).await.status, 200);
    assert_eq!(c.node("a").stats().requests_total, 1, "only the generation reached the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_admin_paths_are_open_to_key_holders_only() {
    let c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"])],
        json!({"admin_paths": ["/quit", "/models/"]}),
        None,
        RenderOptions { api_keys: vec![KEY.into()], ..RenderOptions::default() },
    )
    .await;
    let bearer = format!("Bearer {KEY}");
    let key = [("authorization", bearer.as_str())];
    assert_eq!(raw(c.envoy.listen, "POST", "/quit", &[], "").await.status, 401);
    // The simulated node has no /quit (it answers 404), but the request got there.
    assert_eq!(raw(c.envoy.listen, "POST", "/quit", &key, "").await.status, 404);
    assert_eq!(raw(c.envoy.listen, "DELETE", "/models/m1", &key, "").await.node().as_deref(), Some("a"));
    assert_refused(&raw(c.envoy.listen, "POST", "/download", &key, "{}").await, "unlisted, with a key");
    let by_path = c.node("a").stats().requests_by_path;
    assert_eq!((by_path.get("/quit"), by_path.get("/models/m1")), (Some(&1), Some(&1)), "{by_path:?}");
    assert_eq!(c.node("a").stats().requests_total, 2);
}

/// Item 5: 400 connections trickling bodies pinned Envoy's memory, with no connection limit,
/// no overload manager and no limit on the time to send a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_and_connections_are_capped() {
    let limits = Limits { max_connections: 8, request_timeout_s: 3, request_headers_timeout_s: 1, ..Limits::default() };
    let c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"])],
        json!({}),
        None,
        RenderOptions { limits, ..RenderOptions::default() },
    )
    .await;
    let listen = c.envoy.listen;

    // At most 8 client connections: hold 20, and see how many are served.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(listen).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut served = 0;
    for s in &mut held {
        let ok = s.write_all(b"GET /healthcheck HTTP/1.1\r\nhost: x\r\n\r\n").await.is_ok();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        if ok && matches!(read, Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200")) {
            served += 1;
        }
    }
    println!("20 connections held with max_connections 8: {served} served");
    assert!((1..=8).contains(&served), "{served} of 20 connections were served");
    let overflow = format!("listener.{}_{}.downstream_global_cx_overflow", listen.ip(), listen.port());
    assert!(c.envoy.stat(&overflow).await >= 12, "Envoy counted the connections it closed");
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(raw(listen, "GET", "/healthcheck", &[], "").await.status, 200, "served again once they left");

    // Headers trickled: 408 after request_headers_timeout.
    let start = Instant::now();
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.expect("send");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    let r = parse(&buf);
    assert_eq!(r.status, 408, "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "cut after {:?}", start.elapsed());

    // A body trickled a byte at a time: cut after request_timeout, with an OpenAI-style error.
    let start = Instant::now();
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
    )
    .await
    .expect("send");
    let mut buf = Vec::new();
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if s.write_all(b" ").await.is_err() {
                break;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(10), s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
            if start.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
    };
    trickle.await;
    let r = parse(&buf);
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    assert!(start.elapsed() < Duration::from_secs(8), "cut after {:?}", start.elapsed());
    assert_eq!(c.node("a").stats().requests_total, 0, "nothing half-sent reached the node");

    // The heap monitor and its actions are on.
    let stats = reqwest::get(format!("http://{}/stats?filter=overload", c.envoy.admin))
        .await
        .expect("admin")
        .text()
        .await
        .unwrap_or_default();
    assert!(stats.contains("fixed_heap") && stats.contains("stop_accepting_requests"), "{stats}");
}

/// The request timeout bounds sending a request, not generating: queued requests, long streams
/// and websockets outlive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_and_websockets_outlive_the_request_timeout() {
    let limits = Limits { request_timeout_s: 1, request_headers_timeout_s: 1, ..Limits::default() };
    let c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"]).with(|s| s.time_scale = 1.0)],
        json!({}),
        None,
        RenderOptions { limits, ..RenderOptions::default() },
    )
    .await;
    let start = Instant::now();
    let replies =
        futures_util::future::join_all((0..4).map(|_| c.post("/v1/chat/completions", chat_body("m1", true, 10), &[])))
            .await;
    let took = start.elapsed();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("data: "), "{}", r.body);
    }
    assert!(took > Duration::from_millis(1500), "the last one waited past the 1 s request timeout ({took:?})");
    assert_eq!(c.node("a").stats().max_concurrent_requests, 1);

    let (mut ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", c.envoy.listen)).await.expect("websocket");
    assert_eq!(resp.status(), 101);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(Message::text("still there")).await.expect("send");
    let reply = ws.next().await.expect("a reply").expect("a message");
    assert_eq!(reply.into_text().expect("text").as_str(), "a: still there");
}

/// Item 7: with `hash_on: client_ip`, a client picked its node by sending X-Forwarded-For, and
/// the access log recorded the forged address; a client's x-request-id was used as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_forge_their_address_or_request_id() {
    let c = Cluster::start(
        vec![NodeSpec::new("a", &["m"]), NodeSpec::new("b", &["m"]), NodeSpec::new("c", &["m"])],
        json!({"policy": "hash", "hash_on": "client_ip"}),
    )
    .await;
    let mut nodes = BTreeSet::new();
    for i in 0..12 {
        let forged = format!("203.0.113.{i}");
        let r = c
            .post(
                "/v1/chat/completions",
                chat_body("m", false, 1),
                &[("x-forwarded-for", &forged), ("x-real-ip", &forged)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        nodes.insert(r.node().unwrap_or_default());
    }
    assert_eq!(nodes.len(), 1, "X-Forwarded-For moved the client between nodes: {nodes:?}");

    let forged_id = "my-request-17";
    let r = c.post("/v1/chat/completions", "{}", &[("x-request-id", forged_id)]).await;
    assert_eq!(r.status, 400);
    let id = r.json()["error"]["request_id"].as_str().unwrap_or_default().to_string();
    assert_ne!(id, forged_id);
    let uuid_like = id.len() == 36 && id.chars().all(|ch| ch.is_ascii_hexdigit() || ch == '-');
    assert!(uuid_like, "Envoy's own id: {id}");

    let log = c.envoy.access_log_lines(13).await;
    assert_eq!(log.len(), 13, "{log:?}");
    for line in &log {
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        assert_ne!(line["request_id"], forged_id, "{line}");
    }
    assert!(log.iter().any(|l| l["request_id"] == id.as_str()), "the logged id is the one in the error");
}

/// Item 8: `POST /healthcheck?x=1` without a key reached a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_reads_of_the_health_check_go_without_a_key() {
    let c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"])],
        json!({}),
        None,
        RenderOptions { api_keys: vec![KEY.into()], ..RenderOptions::default() },
    )
    .await;
    for (method, path) in [
        ("POST", "/healthcheck?x=1"),
        ("POST", "/healthcheck"),
        ("PUT", "/healthcheck"),
        ("DELETE", "/healthcheck"),
        ("POST", "//healthcheck"),
        ("POST", "/healthchec%6b"),
    ] {
        let r = raw(c.envoy.listen, method, path, &[], "{}").await;
        assert_eq!(r.status, 401, "{method} {path}: {r:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    for (method, path) in [("GET", "/healthcheck"), ("GET", "/healthcheck?x=1"), ("HEAD", "/healthcheck")] {
        let r = raw(c.envoy.listen, method, path, &[], "").await;
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
    }
    // With a key, a POST to the health check is refused by the filter, not sent to a node.
    let bearer = format!("Bearer {KEY}");
    assert_refused(
        &raw(c.envoy.listen, "POST", "/healthcheck", &[("authorization", &bearer)], "{}").await,
        "POST with a key",
    );
    assert_eq!(c.node("a").stats().requests_total, 0, "a request reached the node");
}

/// Item 9: a model name with a newline forged a `[critical]` line in Envoy's log (logged raw in
/// the "not running model" warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_values_cannot_forge_log_lines() {
    let c = Cluster::start(
        vec![NodeSpec::new("a", &["m1"]).with(|s| s.dialect = Dialect::New).extra(json!({"models": ["*"]}))],
        json!({}),
    )
    .await;
    let forged = "[2026-01-01 00:00:00.000][1][critical][main] forged by a client";
    let model = format!("ghost\n{forged}\r\n{forged}");
    let r = c.post("/v1/chat/completions", json!({"model": model, "messages": []}).to_string(), &[]).await;
    if r.status == 400 {
        // Refused before anything was logged about it.
        assert_eq!(r.json()["error"]["code"], "invalid_model", "{}", r.body);
    } else {
        assert_eq!(r.status, 404, "the node is not running it: {}", r.body);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.envoy.log().contains("is not running model ghost") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(c.envoy.log().contains("is not running model ghost"), "the warning is logged:\n{}", c.envoy.log());
    }
    let log = c.envoy.log();
    let forged_lines: Vec<&str> = log.lines().filter(|l| l.starts_with("[2026-01-01")).collect();
    assert!(forged_lines.is_empty(), "a client wrote lines into Envoy's log: {forged_lines:?}");
}
