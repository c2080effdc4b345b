//! Behaviour of the simulated exo node, driven over real HTTP on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use exo_sim::{Dialect, Fault, SimConfig, SimNode, Stats};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn config(name: &str, models: &[&str]) -> SimConfig {
    let mut c = SimConfig::new(name, models);
    c.prefill_tokens_per_second = 1e6; // negligible prefill unless a test wants it
    c
}

async fn start(cfg: SimConfig) -> SimNode {
    SimNode::start("127.0.0.1:0".parse().unwrap(), cfg).await.expect("start sim node")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

fn chat_body(model: &str, stream: bool, max_tokens: Option<u32>) -> Value {
    let mut b = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello there, RK3588!"}],
        "stream": stream,
    });
    if let Some(n) = max_tokens {
        b["max_tokens"] = json!(n);
    }
    b
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> reqwest::Response {
    client().post(url(addr, path)).json(body).send().await.expect("send")
}

/// SSE events (text between blank lines) with their arrival times, and how the stream ended.
struct Sse {
    events: Vec<(Instant, String)>,
    error: Option<reqwest::Error>,
}

impl Sse {
    async fn read(resp: reqwest::Response, stop_after_data: Option<usize>) -> Sse {
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        let mut events = Vec::new();
        let mut error = None;
        'outer: while let Some(item) = body.next().await {
            match item {
                Ok(bytes) => {
                    buf.push_str(std::str::from_utf8(&bytes).unwrap());
                    while let Some(pos) = buf.find("\n\n") {
                        let ev = buf[..pos].to_string();
                        buf.drain(..pos + 2);
                        events.push((Instant::now(), ev));
                        let n = events.iter().filter(|(_, e)| e.starts_with("data: {")).count();
                        if stop_after_data == Some(n) {
                            break 'outer;
                        }
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        Sse { events, error }
    }

    fn data_json(&self) -> Vec<(Instant, Value)> {
        self.events
            .iter()
            .filter_map(|(t, e)| e.strip_prefix("data: {").map(|_| (*t, serde_json::from_str(&e[6..]).unwrap())))
            .collect()
    }

    fn token_chunks(&self) -> Vec<(Instant, String)> {
        self.data_json()
            .into_iter()
            .filter_map(|(t, v)| v["choices"][0]["delta"]["content"].as_str().map(|s| (t, s.to_string())))
            .collect()
    }
}

async fn stats_http(addr: SocketAddr) -> Stats {
    client().get(url(addr, "/_sim/stats")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn old_dialect_stream_paces_tokens_and_has_no_done() {
    let mut cfg = config("rk-old", &["qwen2.5-1.5b-rkllm"]);
    cfg.tokens_per_second = 20.0; // 50 ms per token
    cfg.reply_tokens = 6;
    let node = start(cfg).await;
    let resp = post(node.addr(), "/v1/chat/completions", &chat_body("qwen2.5-1.5b-rkllm", true, None)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-exo-node"], "rk-old");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let sse = Sse::read(resp, None).await;
    assert!(sse.error.is_none(), "clean end expected: {:?}", sse.error);
    assert!(sse.events.iter().all(|(_, e)| e.starts_with("data: {")));
    assert!(!sse.events.iter().any(|(_, e)| e.contains("[DONE]")));
    for (_, v) in sse.data_json() {
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["system_fingerprint"], "rk-old");
    }
    let toks = sse.token_chunks();
    let text: String = toks.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 tok5 ");
    // One token at a time, spaced by about 50 ms, not all at once.
    for w in toks.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(gap >= Duration::from_millis(25), "gap {gap:?} too small");
    }
    let spread = toks.last().unwrap().0 - toks[0].0;
    assert!(spread >= Duration::from_millis(200), "spread {spread:?}");
    let last = sse.data_json().last().unwrap().1.clone();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    node.shutdown().await;
}

#[tokio::test]
async fn new_dialect_stream_has_keepalive_and_done() {
    let mut cfg = config("rk-new", &["m"]);
    cfg.dialect = Dialect::New;
    cfg.reply_tokens = 4;
    cfg.time_scale = 20.0;
    let node = start(cfg).await;
    let resp = post(node.addr(), "/v1/chat/completions", &chat_body("m", true, None)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-exo-node"], "rk-new");
    let sse = Sse::read(resp, None).await;
    assert!(sse.error.is_none());
    assert_eq!(sse.events.first().unwrap().1, ": keep-alive");
    assert_eq!(sse.events.last().unwrap().1, "data: [DONE]");
    let data = sse.data_json();
    assert_eq!(data.len(), 5, "4 tokens + final chunk");
    for (_, v) in &data {
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["system_fingerprint"], "rk-new");
    }
    assert_eq!(sse.token_chunks().len(), 4);
    node.shutdown().await;
}

#[tokio::test]
async fn new_dialect_sends_keepalives_during_a_model_switch() {
    let mut cfg = config("rk-new", &["a", "b"]);
    cfg.dialect = Dialect::New;
    cfg.switch_time = Duration::from_secs(25);
    cfg.time_scale = 50.0; // switch = 500 ms, keep-alive every 10 s = 200 ms
    cfg.reply_tokens = 2;
    let node = start(cfg).await;
    let r = post(node.addr(), "/v1/chat/completions", &chat_body("b", true, None)).await;
    let sse = Sse::read(r, None).await;
    assert!(sse.error.is_none());
    let keepalives: Vec<Instant> = sse.events.iter().filter(|(_, e)| e == ": keep-alive").map(|(t, _)| *t).collect();
    assert!(keepalives.len() >= 3, "got {} keep-alives", keepalives.len());
    assert!(keepalives[2] - keepalives[0] >= Duration::from_millis(300));
    assert_eq!(sse.token_chunks().len(), 2);
    assert_eq!(node.stats().model_switches, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn non_streaming_reply_has_usage_and_node_name() {
    let mut cfg = config("rk1", &["m"]);
    cfg.time_scale = 50.0;
    let node = start(cfg).await;
    for path in ["/v1/chat/completions", "/chat/completions"] {
        let resp = post(node.addr(), path, &chat_body("m", false, Some(3))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-exo-node"], "rk1");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["system_fingerprint"], "rk1");
        assert_eq!(v["model"], "m");
        assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        // "Hello there, RK3588!" is 20 chars = 5 tokens.
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 8);
    }
    // Without max_tokens the configured reply length (20) is used.
    let v: Value = post(node.addr(), "/v1/chat/completions", &chat_body("m", false, None)).await.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 20);
    let s = node.stats();
    assert_eq!(s.completed, 3);
    assert_eq!(s.tokens_generated, 26);
    assert_eq!(s.requests_by_path["/chat/completions"], 1);
    assert_eq!(s.requests_by_path["/v1/chat/completions"], 2);
    node.shutdown().await;
}

#[tokio::test]
async fn prefill_time_depends_on_prompt_length() {
    let mut cfg = config("rk1", &["m"]);
    cfg.prefill_tokens_per_second = 100.0;
    cfg.tokens_per_second = 1000.0;
    let node = start(cfg).await;
    let long = "x".repeat(120); // 30 tokens = 300 ms of prefill
    let body = json!({"model": "m", "messages": [{"role": "user", "content": long}], "max_tokens": 1});
    let t0 = Instant::now();
    let v: Value = post(node.addr(), "/v1/chat/completions", &body).await.json().await.unwrap();
    let took = t0.elapsed();
    assert_eq!(v["usage"]["prompt_tokens"], 30);
    assert!(took >= Duration::from_millis(280), "took {took:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn two_concurrent_requests_are_served_serially() {
    let mut cfg = config("rk1", &["m"]);
    cfg.tokens_per_second = 50.0;
    cfg.reply_tokens = 10; // 200 ms per generation
    let node = start(cfg).await;
    let addr = node.addr();
    let t0 = Instant::now();
    let one = || async move {
        let resp = post(addr, "/v1/chat/completions", &chat_body("m", false, None)).await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        t0.elapsed()
    };
    let (a, b) = tokio::join!(one(), one());
    let (first, second) = if a < b { (a, b) } else { (b, a) };
    assert!(first >= Duration::from_millis(180), "first {first:?}");
    assert!(
        second >= first + Duration::from_millis(180),
        "second {second:?} should finish one generation after first {first:?}"
    );
    let s = stats_http(addr).await;
    assert_eq!(s.max_concurrent_generations, 1);
    assert_eq!(s.max_concurrent_requests, 2);
    assert_eq!(s.current_requests, 0);
    assert_eq!(s.completed, 2);
    node.shutdown().await;
}

#[tokio::test]
async fn waiting_requests_are_served_in_fifo_order() {
    let mut cfg = config("rk1", &["m"]);
    cfg.tokens_per_second = 100.0;
    cfg.reply_tokens = 10; // 100 ms per generation
    let node = start(cfg).await;
    let addr = node.addr();
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        tasks.push(tokio::spawn(async move {
            let r = post(addr, "/v1/chat/completions", &chat_body("m", false, None)).await;
            r.bytes().await.unwrap();
            (Instant::now(), i)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    done.sort();
    let order: Vec<u32> = done.iter().map(|(_, i)| *i).collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
    let s = node.stats();
    assert_eq!(s.max_concurrent_generations, 1);
    assert_eq!(s.max_concurrent_requests, 4);
    node.shutdown().await;
}

/// How long a whole reply of `model` takes (not streamed).
async fn reply_time(addr: SocketAddr, model: &str) -> Duration {
    let t0 = Instant::now();
    let r = post(addr, "/v1/chat/completions", &chat_body(model, false, None)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    t0.elapsed()
}

#[tokio::test]
async fn model_switch_costs_switch_time_and_counts() {
    let mut cfg = config("rk1", &["a", "b"]);
    cfg.switch_time = Duration::from_secs(10);
    cfg.time_scale = 20.0; // switch = 500 ms wall
    cfg.tokens_per_second = 1000.0;
    cfg.reply_tokens = 2;
    let node = start(cfg).await;
    assert_eq!(node.stats().loaded_model, "a");
    let timed = |model: &'static str| reply_time(node.addr(), model);
    let loaded = timed("a").await;
    assert!(loaded < Duration::from_millis(300), "loaded model took {loaded:?}");
    let switch = timed("b").await;
    assert!(switch >= Duration::from_millis(480), "switch took {switch:?}");
    let again = timed("b").await;
    assert!(again < Duration::from_millis(300), "second b took {again:?}");
    let s = node.stats();
    assert_eq!(s.model_switches, 1);
    assert_eq!(s.loaded_model, "b");
    // exo-rkllama's metrics: the model loaded last, and two loads (the one at start, then b)
    // of about 500 ms each.
    let text = client().get(url(node.addr(), "/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"exo_model_info{layers="28",model_id="b",rkllm_name="b"} 1.0"#), "{text}");
    assert!(text.contains("rkllm_model_load_duration_seconds_count 2.0\n"), "{text}");
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rkllm_model_load_duration_seconds_sum "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((0.99..1.2).contains(&sum), "{sum}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_model_with_its_own_switch_time_loads_in_that_time() {
    let mut cfg = config("rk1", &["a", "b", "c"]);
    cfg.switch_time = Duration::from_secs(10);
    cfg.switch_time_by_model.insert("b".into(), Duration::from_secs(30));
    cfg.time_scale = 20.0; // 500 ms wall, b 1.5 s
    cfg.tokens_per_second = 1000.0;
    cfg.reply_tokens = 2;
    let node = start(cfg).await;
    let timed = |model: &'static str| reply_time(node.addr(), model);
    let to_b = timed("b").await;
    assert!(to_b >= Duration::from_millis(1480), "loading b took {to_b:?}");
    let to_c = timed("c").await;
    assert!((Duration::from_millis(480)..Duration::from_millis(1200)).contains(&to_c), "loading c took {to_c:?}");
    assert_eq!(node.stats().model_switches, 2);
    node.shutdown().await;

    let mut bad = config("rk1", &["a"]);
    bad.switch_time_by_model.insert("z".into(), Duration::from_secs(1));
    let err = SimNode::start("127.0.0.1:0".parse().unwrap(), bad).await.err().expect("a model it does not serve");
    assert!(err.to_string().contains("\"z\""), "{err}");
}

#[tokio::test]
async fn unknown_model_and_bad_requests_old_dialect() {
    let node = start(config("rk-old", &["m"])).await;
    let r = post(node.addr(), "/v1/chat/completions", &chat_body("nope", false, None)).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-exo-node"], "rk-old");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"detail": "Unsupported model: nope"}));

    let r = client()
        .post(url(node.addr(), "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("Invalid JSON"));

    let r = post(node.addr(), "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("model"));
    assert_eq!(node.stats().completed, 0);
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_model_and_bad_requests_new_dialect() {
    let mut cfg = config("rk-new", &["m"]);
    cfg.dialect = Dialect::New;
    let node = start(cfg).await;
    let r = post(node.addr(), "/v1/chat/completions", &chat_body("nope", true, None)).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "No instance found for model nope",
            "type": "invalid_request_error", "param": null, "code": "model_not_found"}})
    );
    let r = post(node.addr(), "/v1/chat/completions", &json!({"stream": true})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    node.shutdown().await;
}

#[tokio::test]
async fn other_endpoints_per_dialect() {
    let old = start(config("rk-old", &["a", "b"])).await;
    let mut cfg = config("rk-new", &["a"]);
    cfg.dialect = Dialect::New;
    let new = start(cfg).await;
    let c = client();
    for node in [&old, &new] {
        for path in ["/v1/models", "/models"] {
            let r = c.get(url(node.addr(), path)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-exo-node"], node.name());
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["object"], "list");
            assert_eq!(v["data"][0]["id"], "a");
            assert_eq!(v["data"][0]["object"], "model");
            assert_eq!(v["data"][0]["owned_by"], "exo");
        }
        let r = c.get(url(node.addr(), "/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let html = r.text().await.unwrap();
        assert!(html.contains("exo web UI") && html.contains(node.name()));

        let r = c.get(url(node.addr(), "/no/such/path")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["x-exo-node"], node.name());
        assert!(r.text().await.unwrap().contains(node.name()));

        let r = c.get(url(node.addr(), "/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        for m in [
            "exo_requests_total",
            "exo_tokens_generated_total",
            "exo_model_switches_total",
            "exo_tokens_per_second",
            "exo_inflight_requests",
        ] {
            assert!(text.contains(&format!("# TYPE {m} ")), "{m} missing");
        }
        // What exo-rkllama adds, only in the older dialect.
        let rkllama = text.contains("exo_model_info{") && text.contains("rkllm_model_load_duration_seconds_count 1.0");
        assert_eq!(rkllama, node.name() == "rk-old", "{text}");
    }
    let r = c.get(url(old.addr(), "/healthcheck")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    let r = c.get(url(new.addr(), "/healthcheck")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-exo-node"], "rk-new");
    old.shutdown().await;
    new.shutdown().await;
}

#[tokio::test]
async fn completions_and_embeddings() {
    let mut cfg = config("rk1", &["m"]);
    cfg.time_scale = 50.0;
    let node = start(cfg).await;
    let r = post(node.addr(), "/v1/completions", &json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 2}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 ");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["system_fingerprint"], "rk1");

    let r =
        post(node.addr(), "/v1/completions", &json!({"model": "m", "prompt": "hi", "max_tokens": 3, "stream": true}))
            .await;
    let sse = Sse::read(r, None).await;
    let texts: Vec<String> =
        sse.data_json().iter().map(|(_, v)| v["choices"][0]["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts.concat(), "tok0 tok1 tok2 ");

    let r = post(node.addr(), "/v1/embeddings", &json!({"model": "m", "input": ["a", "b"]})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert_ne!(v["data"][0]["embedding"], v["data"][1]["embedding"]);
    let r = post(node.addr(), "/v1/embeddings", &json!({"model": "x", "input": "a"})).await;
    assert_eq!(r.status(), 400);
    node.shutdown().await;
}

#[tokio::test]
async fn fault_status_503_in_both_dialects() {
    let old = start(config("rk-old", &["m"])).await;
    old.set_fault(Fault::Status(503));
    let r = post(old.addr(), "/v1/chat/completions", &chat_body("m", true, None)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-exo-node"], "rk-old");
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].is_string());
    // Health stays fine; only inference fails.
    let r = client().get(url(old.addr(), "/healthcheck")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let mut cfg = config("rk-new", &["m"]);
    cfg.dialect = Dialect::New;
    cfg.time_scale = 50.0;
    let new = start(cfg).await;
    // Set over HTTP this time.
    let r = post(new.addr(), "/_sim/fault", &json!({"fault": "status:502"})).await;
    assert_eq!(r.status(), 200);
    let r = post(new.addr(), "/v1/chat/completions", &chat_body("m", false, None)).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(new.stats().fault, "status:502");
    let r = post(new.addr(), "/_sim/fault", &json!("none")).await;
    assert_eq!(r.status(), 200);
    let r = post(new.addr(), "/v1/chat/completions", &chat_body("m", false, Some(1))).await;
    assert_eq!(r.status(), 200);
    let r = post(new.addr(), "/_sim/fault", &json!({"fault": "bogus"})).await;
    assert_eq!(r.status(), 400);
    old.shutdown().await;
    new.shutdown().await;
}

#[tokio::test]
async fn fault_hang_makes_client_time_out() {
    let mut cfg = config("rk1", &["m"]);
    cfg.fault = Fault::Hang;
    let node = start(cfg).await;
    let c = reqwest::Client::builder().no_proxy().timeout(Duration::from_millis(300)).build().unwrap();
    let t0 = Instant::now();
    let err = c
        .post(url(node.addr(), "/v1/chat/completions"))
        .json(&chat_body("m", true, None))
        .send()
        .await
        .expect_err("a hung node must not answer");
    assert!(err.is_timeout(), "{err:?}");
    assert!(t0.elapsed() >= Duration::from_millis(290));
    assert_eq!(node.stats().max_concurrent_requests, 1);
    // The held request is released once the client is gone.
    let deadline = Instant::now() + Duration::from_secs(2);
    while node.stats().current_requests != 0 {
        assert!(Instant::now() < deadline, "hung request never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.set_fault(Fault::None);
    let r = post(node.addr(), "/v1/chat/completions", &chat_body("m", false, Some(1))).await;
    assert_eq!(r.status(), 200);
    node.shutdown().await;
}

#[tokio::test]
async fn fault_die_mid_stream_is_not_a_clean_end() {
    let mut cfg = config("rk-new", &["m"]);
    cfg.dialect = Dialect::New;
    cfg.time_scale = 20.0;
    cfg.fault = Fault::DieMidStream(3);
    let node = start(cfg).await;
    let r = post(node.addr(), "/v1/chat/completions", &chat_body("m", true, None)).await;
    assert_eq!(r.status(), 200);
    let sse = Sse::read(r, None).await;
    assert!(sse.error.is_some(), "client must see an error");
    assert_eq!(sse.token_chunks().len(), 3);
    assert!(!sse.events.iter().any(|(_, e)| e.contains("[DONE]")));

    // Non-streaming: headers, then a cut body.
    let r = client().post(url(node.addr(), "/v1/chat/completions")).json(&chat_body("m", false, None)).send().await;
    match r {
        Ok(r) => assert!(r.bytes().await.is_err(), "body must fail"),
        Err(e) => assert!(!e.is_timeout(), "{e:?}"),
    }
    let s = node.stats();
    assert_eq!(s.aborted, 2);
    assert_eq!(s.completed, 0);

    // The node keeps serving after the fault is cleared.
    node.set_fault(Fault::None);
    let r = post(node.addr(), "/v1/chat/completions", &chat_body("m", true, Some(2))).await;
    let sse = Sse::read(r, None).await;
    assert!(sse.error.is_none());
    assert_eq!(sse.events.last().unwrap().1, "data: [DONE]");
    node.shutdown().await;
}

#[tokio::test]
async fn fault_slow_slows_token_pacing() {
    let mut cfg = config("rk1", &["m"]);
    cfg.tokens_per_second = 100.0;
    cfg.reply_tokens = 5; // 50 ms normally
    let node = start(cfg).await;
    let timed = || async {
        let t0 = Instant::now();
        let r = post(node.addr(), "/v1/chat/completions", &chat_body("m", false, None)).await;
        r.bytes().await.unwrap();
        t0.elapsed()
    };
    let normal = timed().await;
    node.set_fault(Fault::Slow(6.0));
    let slow = timed().await;
    assert!(normal < Duration::from_millis(200), "normal {normal:?}");
    assert!(slow >= Duration::from_millis(290), "slow {slow:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_frees_port_and_a_new_node_can_start_there() {
    let mut cfg = config("rk-a", &["m"]);
    cfg.tokens_per_second = 10.0; // a long reply: 2 s
    let node = SimNode::start("127.0.0.23:0".parse().unwrap(), cfg).await.unwrap();
    let addr = node.addr();
    let r = post(addr, "/v1/chat/completions", &chat_body("m", true, None)).await;
    let reader = tokio::spawn(Sse::read(r, None));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t0 = Instant::now();
    node.shutdown().await;
    assert!(t0.elapsed() < Duration::from_millis(500), "shutdown slow");
    // The in-flight stream is cut, not ended cleanly.
    let sse = tokio::time::timeout(Duration::from_secs(1), reader).await.expect("stream must end promptly").unwrap();
    assert!(sse.error.is_some());
    // Nothing listens any more.
    let err = client().get(url(addr, "/v1/models")).send().await.expect_err("connect must fail");
    assert!(err.is_connect(), "{err:?}");
    // The node comes back on the same address.
    let mut cfg = config("rk-a2", &["m"]);
    cfg.time_scale = 50.0;
    let node = SimNode::start(addr, cfg).await.expect("restart on same addr");
    let r = post(addr, "/v1/chat/completions", &chat_body("m", false, Some(1))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-exo-node"], "rk-a2");
    node.shutdown().await;
}

#[tokio::test]
async fn refuse_fault_refuses_connections_until_cleared() {
    let mut cfg = config("rk1", &["m"]);
    cfg.time_scale = 50.0;
    let node = start(cfg).await;
    let addr = node.addr();
    node.set_fault(Fault::Refuse);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = client().get(url(addr, "/v1/models")).send().await.expect_err("refused");
    assert!(err.is_connect(), "{err:?}");
    node.set_fault(Fault::None);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match client().get(url(addr, "/v1/models")).send().await {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "node did not come back: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    node.shutdown().await;
}

/// Starts a long stream, reads two tokens, hangs up; returns how long a tiny request sent right
/// after takes.
async fn next_request_delay_after_disconnect(node: &SimNode) -> Duration {
    let addr = node.addr();
    let r = post(addr, "/v1/chat/completions", &chat_body("m", true, None)).await;
    let sse = Sse::read(r, Some(2)).await;
    assert_eq!(sse.token_chunks().len(), 2);
    drop(sse);
    let t0 = Instant::now();
    let r = post(addr, "/v1/chat/completions", &chat_body("m", false, Some(1))).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    t0.elapsed()
}

#[tokio::test]
async fn client_disconnect_releases_the_npu() {
    let mut cfg = config("rk1", &["m"]);
    cfg.tokens_per_second = 50.0;
    cfg.reply_tokens = 40; // 800 ms
    let node = start(cfg).await;
    let took = next_request_delay_after_disconnect(&node).await;
    assert!(took < Duration::from_millis(300), "next request took {took:?}");
    let s = node.stats();
    assert_eq!(s.aborted, 1);
    assert_eq!(s.completed, 1);
    assert_eq!(s.max_concurrent_generations, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn keep_generating_after_disconnect_holds_the_npu() {
    let mut cfg = config("rk1", &["m"]);
    cfg.tokens_per_second = 50.0;
    cfg.reply_tokens = 40; // 800 ms
    cfg.keep_generating_after_disconnect = true;
    let node = start(cfg).await;
    let took = next_request_delay_after_disconnect(&node).await;
    // About 760 ms of the abandoned reply remain.
    assert!(took >= Duration::from_millis(600), "next request took {took:?}");
    let s = node.stats();
    assert_eq!(s.aborted, 0);
    assert_eq!(s.completed, 2);
    assert_eq!(s.tokens_generated, 41);
    node.shutdown().await;
}

#[tokio::test]
async fn stats_over_http_and_reset() {
    let mut cfg = config("rk1", &["m"]);
    cfg.time_scale = 50.0;
    let node = start(cfg).await;
    post(node.addr(), "/v1/chat/completions", &chat_body("m", false, Some(1))).await.bytes().await.unwrap();
    let s = stats_http(node.addr()).await;
    assert_eq!(s, node.stats());
    assert_eq!(s.name, "rk1");
    assert_eq!(s.requests_total, 1);
    assert_eq!(s.max_concurrent_requests, 1);
    let r = post(node.addr(), "/_sim/reset-stats", &json!({})).await;
    assert_eq!(r.status(), 200);
    let s = node.stats();
    assert_eq!(s.requests_total, 0);
    assert_eq!(s.completed, 0);
    assert_eq!(s.max_concurrent_generations, 0);
    assert_eq!(s.loaded_model, "m");
    node.shutdown().await;
}

#[tokio::test]
async fn binary_serves_and_exits_cleanly_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_exo-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--name",
            "bin1",
            "--models",
            "a,b",
            "--dialect",
            "new",
            "--switch-time",
            "500ms",
            "--switch-time-for",
            "b=1s",
            "--time-scale",
            "50",
            "--fault",
            "none",
        ])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap();
    let addr: SocketAddr = first
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .parse()
        .unwrap();
    assert!(first.contains(r#"{"b": 1s}"#), "per-model switch times in {first:?}");
    let r = post(addr, "/v1/chat/completions", &chat_body("b", false, Some(2))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-exo-node"], "bin1");
    let s = stats_http(addr).await;
    assert_eq!(s.model_switches, 1);
    // One log line for the request.
    let log = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(
        log.contains("POST /v1/chat/completions") && log.contains("model=b") && log.contains("status=200"),
        "{log}"
    );
    let pid = child.id().unwrap().to_string();
    let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(ok.success());
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await.expect("exits promptly").unwrap();
    assert!(status.success(), "{status:?}");
}
