//! Routing through the real .wasm: which nodes a request may go to, in which order, and what
//! the filter writes for Envoy (`x-gateway-destination-endpoint`, `x-envoy-max-retries`,
//! `x-exo-lb-model`) — never what the client sent.

use crate::common::*;
use serde_json::json;
use wasm_host::{Host, Outcome, Stream};

/// What a request of a routing case must get.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Forwarded with exactly this ranked list (node names).
    Route(&'static [&'static str]),
    /// Held in the queue.
    Queued,
    /// Answered by the balancer with this status and error code.
    Error(u32, &'static str),
    /// No request: a second passes (the workers tick and fold what they measured into the
    /// shared estimates).
    Tick,
}

/// One request of a case; `keep` leaves it in flight (otherwise its first node answers 200).
struct Step {
    model: &'static str,
    want: Want,
    keep: bool,
}

fn go(model: &'static str, want: &'static [&'static str]) -> Step {
    Step { model, want: Want::Route(want), keep: false }
}

fn hold(model: &'static str, want: &'static [&'static str]) -> Step {
    Step { model, want: Want::Route(want), keep: true }
}

fn queued(model: &'static str) -> Step {
    Step { model, want: Want::Queued, keep: true }
}

fn tick() -> Step {
    Step { model: "", want: Want::Tick, keep: false }
}

fn fails(model: &'static str, status: u32, code: &'static str) -> Step {
    Step { model, want: Want::Error(status, code), keep: false }
}

struct Case {
    name: &'static str,
    /// (name, address, extra node fields).
    nodes: &'static [(&'static str, &'static str, &'static str)],
    /// Extra top-level fields (with a trailing comma).
    options: &'static str,
    steps: Vec<Step>,
}

fn cases() -> Vec<Case> {
    const A: &str = "10.0.0.1:52415";
    const B: &str = "10.0.0.2:52415";
    const C: &str = "10.0.0.3:52415";
    const D: &str = "10.0.0.4:52415";
    vec![
        Case {
            name: "each model goes only to its nodes; affinity waits for the warm node",
            nodes: &[
                ("a", A, r#""models": ["m1", "m2"]"#),
                ("b", B, r#""models": ["m1"]"#),
                ("c", C, r#""models": ["m3"]"#),
            ],
            // A configured switch cost (instead of "auto", which switches freely until it has
            // measured a switch).
            options: r#""model_switch_cost": "20s","#,
            steps: vec![
                go("m2", &["a"]),
                go("m3", &["c"]),
                // a holds m2 now: the node with nothing loaded is preferred; a is the failover.
                go("m1", &["b", "a"]),
                go("m1", &["b", "a"]),
                hold("m1", &["b", "a"]),
                tick(),
                // b (warm with m1) is busy. Switching a to m1 costs 20 s; the measured m1 service
                // time (0 ms on this clock) makes waiting for b cheaper: queued.
                queued("m1"),
                fails("m9", 404, "model_not_found"),
                fails("M1", 404, "model_not_found"),
                fails("m1 ", 404, "model_not_found"),
            ],
        },
        Case {
            name: "least_conn spreads concurrent requests; busy nodes are never failover targets",
            nodes: &[("a", A, ""), ("b", B, ""), ("c", C, "")],
            options: r#""max_inflight": 2, "model_switch_cost": "0s","#,
            steps: vec![
                hold("m", &["a", "b", "c"]),
                hold("m", &["b", "c", "a"]),
                hold("m", &["c", "a", "b"]),
                hold("m", &["a", "b", "c"]),
                hold("m", &["b", "c"]),
                hold("m", &["c"]),
                queued("m"),
            ],
        },
        Case {
            name: "least_conn follows weights for sequential requests",
            nodes: &[("a", A, r#""weight": 2"#), ("b", B, "")],
            options: r#""model_switch_cost": "0s","#,
            steps: vec![
                go("m", &["a", "b"]),
                go("m", &["b", "a"]),
                go("m", &["a", "b"]),
                go("m", &["a", "b"]),
                go("m", &["b", "a"]),
                go("m", &["a", "b"]),
            ],
        },
        Case {
            name: "round_robin is nginx's smooth weighted sequence (5,1,1: aabacaa); failover by weighted load",
            nodes: &[("a", A, r#""weight": 5"#), ("b", B, ""), ("c", C, "")],
            options: r#""policy": "round_robin","#,
            steps: vec![
                go("m", &["a", "b", "c"]),
                go("m", &["a", "b", "c"]),
                go("m", &["b", "c", "a"]),
                go("m", &["a", "c", "b"]),
                // Failover order is by load (picks per weight): a 3/5 before b 1/1.
                go("m", &["c", "a", "b"]),
                go("m", &["a", "b", "c"]),
                go("m", &["a", "b", "c"]),
            ],
        },
        Case {
            name: "a backup is last, and alone when the primary is busy",
            nodes: &[("a", A, ""), ("b", B, r#""backup": true"#)],
            options: r#""model_switch_cost": "0s","#,
            steps: vec![hold("m", &["a", "b"]), hold("m", &["b"]), queued("m")],
        },
        Case {
            name: "drained nodes get nothing; a model only on drained nodes is unavailable",
            nodes: &[
                ("a", A, r#""models": ["m1", "m3"], "down": true"#),
                ("b", B, r#""models": ["m1"]"#),
                ("c", C, r#""models": ["m1"]"#),
            ],
            options: r#""model_switch_cost": "0s","#,
            steps: vec![
                hold("m1", &["b", "c"]),
                hold("m1", &["c"]),
                queued("m1"),
                fails("m3", 503, "no_available_node"),
            ],
        },
        Case {
            name: "a node serving any model takes unknown models",
            nodes: &[("a", A, r#""models": ["m1"]"#), ("d", D, r#""models": ["*"]"#)],
            options: r#""model_switch_cost": "0s","#,
            steps: vec![go("m1", &["a", "d"]), go("anything/else:7b", &["d"]), go("m1", &["a", "d"])],
        },
        Case {
            name: "IPv6 addresses are written as Envoy prints them",
            nodes: &[("v6", "[0:0:0:0:0:0:0:1]:52415", ""), ("v4", "10.0.0.2:52415", "")],
            options: r#""model_switch_cost": "0s","#,
            steps: vec![hold("m", &["v6", "v4"]), hold("m", &["v4"])],
        },
    ]
}

fn normalised(address: &str) -> &str {
    if address == "[0:0:0:0:0:0:0:1]:52415" {
        "[::1]:52415"
    } else {
        address
    }
}

#[test]
fn routing_table() -> R {
    for case in cases() {
        let nodes: Vec<String> = case
            .nodes
            .iter()
            .map(|(name, address, extra)| {
                let sep = if extra.is_empty() { "" } else { ", " };
                format!(r#"{{"name": "{name}", "address": "{address}"{sep}{extra}}}"#)
            })
            .collect();
        let config = format!(r#"{{{} "nodes": [{}]}}"#, case.options, nodes.join(", "));
        let lb = load(&config, 2);
        let address_of = |name: &str| {
            let (_, a, _) = case.nodes.iter().find(|(n, _, _)| *n == name).expect("node of the case");
            normalised(a).to_string()
        };
        let mut open = Vec::new();
        for (k, step) in case.steps.iter().enumerate() {
            if matches!(step.want, Want::Tick) {
                advance_ms(&lb, 1_000)?;
                continue;
            }
            let s = post(&lb, k % 2, step.model)?;
            let what = format!("case '{}', step {k} ({})", case.name, step.model);
            match step.want {
                Want::Route(names) => {
                    let want: Vec<String> = names.iter().map(|n| address_of(n)).collect();
                    assert_eq!(endpoints(&s), want, "{what}");
                    let retries = s.request_header("x-envoy-max-retries");
                    assert_eq!(retries, Some((want.len() - 1).to_string()), "{what}");
                    assert_eq!(s.request_header("x-exo-lb-model").as_deref(), Some(step.model), "{what}");
                }
                Want::Queued => assert_eq!(s.outcome(), Outcome::Paused, "{what}"),
                Want::Tick => {}
                Want::Error(status, code) => {
                    let e = error_reply(&s);
                    assert_eq!((e.status, e.code.as_str()), (status, code), "{what}: {e:?}");
                }
            }
            if step.keep {
                open.push(s);
            } else if matches!(step.want, Want::Route(_)) {
                ok(&s)?;
            }
        }
        // Unwind: everything finishes (queued ones are resumed by ticks), nothing stays booked.
        for _ in 0..100 {
            let mut still = Vec::new();
            for s in open {
                match s.outcome() {
                    Outcome::Forwarded { .. } => ok(&s)?,
                    Outcome::Paused => still.push(s),
                    other => panic!("case '{}': {other:?}", case.name),
                }
            }
            open = still;
            if open.is_empty() {
                break;
            }
            advance_ms(&lb, 20)?;
        }
        assert!(open.is_empty(), "case '{}': requests stuck in the queue", case.name);
        assert_idle(&lb);
    }
    Ok(())
}

#[test]
fn the_model_not_found_error_lists_the_served_models() -> R {
    let cfg = format!(
        r#"{{"nodes": [{}, {}]}}"#,
        node("a", 0, r#""models": ["qwen-3b", "qwen-1.5b"]"#),
        node("b", 1, r#""models": ["r1"]"#)
    );
    let lb = load(&cfg, 1);
    let s = lb.request("POST", "/v1/chat/completions").header("x-request-id", "req-42").body(chat("llama")).start()?;
    let e = error_reply(&s);
    assert_eq!((e.status, e.kind.as_str(), e.code.as_str()), (404, "invalid_request_error", "model_not_found"));
    assert!(e.message.contains("'llama'") && e.message.contains("qwen-1.5b, qwen-3b, r1"), "{}", e.message);
    assert_eq!(e.request_id, "req-42");
    assert_eq!(e.retry_after, None);
    Ok(())
}

/// The headers a client must never set, with hostile values.
const FORGED: [(&str, &str); 4] = [
    ("x-gateway-destination-endpoint", "6.6.6.6:22"),
    ("X-Gateway-Destination-Endpoint", "6.6.6.7:22,6.6.6.8:22"),
    ("x-envoy-max-retries", "99"),
    ("x-exo-lb-model", "forged"),
];

fn forged(lb: &Host, w: usize, method: &str, path: &str, body: Option<String>) -> anyhow::Result<Stream> {
    let mut b = lb.worker(w).request(method, path).headers(&FORGED);
    if let Some(body) = body {
        b = b.body(body);
    }
    b.start()
}

/// The forged values are gone from the headers as forwarded (or as left, for local replies).
fn assert_no_forged(s: &Stream, what: &str) {
    let headers = s.forwarded_request_headers().unwrap_or_else(|| s.request_headers());
    for (k, v) in &headers {
        assert!(!v.contains("6.6.6."), "{what}: forged endpoint survived in {k}: {headers:?}");
        assert!(!(k == "x-envoy-max-retries" && v == "99"), "{what}: forged retries survived");
        assert!(!(k == "x-exo-lb-model" && v == "forged"), "{what}: forged model survived");
    }
    for name in ["x-gateway-destination-endpoint", "x-envoy-max-retries", "x-exo-lb-model"] {
        let n = headers.iter().filter(|(k, _)| k == name).count();
        assert!(n <= 1, "{what}: {n} values of {name}: {headers:?}");
    }
}

#[test]
fn a_client_sent_destination_header_never_survives() -> R {
    let cfg = format!(
        r#"{{"nodes": [{}, {}], "queue": {{"timeout": "1s"}}}}"#,
        node("a", 0, r#""models": ["m1"]"#),
        node("b", 1, r#""models": ["m1", "m2"]"#)
    );
    let lb = load(&cfg, 2);

    // Routed inference request: replaced by the filter's own values.
    let s = forged(&lb, 0, "POST", "/v1/chat/completions", Some(chat("m1")))?;
    assert_no_forged(&s, "routed");
    assert_eq!(endpoints(&s), [addr(0), addr(1)]);
    assert_eq!(s.request_header("x-envoy-max-retries").as_deref(), Some("1"));
    assert_eq!(s.request_header("x-exo-lb-model").as_deref(), Some("m1"));

    // Queued, then resumed by a tick: the resumed request carries the filter's list only.
    let b_busy = post(&lb, 1, "m2")?;
    assert_eq!(endpoints(&b_busy), [addr(1)]);
    let q = forged(&lb, 1, "POST", "/v1/chat/completions", Some(chat("m1")))?;
    assert_eq!(q.outcome(), Outcome::Paused);
    assert_no_forged(&q, "queued");
    assert_eq!(q.request_header("x-gateway-destination-endpoint"), None, "nothing to steer by while queued");
    ok(&s)?;
    advance_ms(&lb, 20)?;
    assert_no_forged(&q, "resumed");
    assert_eq!(endpoints(&q), [addr(0)]);
    ok(&q)?;
    ok(&b_busy)?;

    // Local replies (bad body, unknown model, health, model list): removed.
    for (method, path, body) in [
        ("POST", "/v1/chat/completions", Some("{not json".to_string())),
        ("POST", "/v1/chat/completions", Some(chat("nope"))),
        ("GET", "/healthcheck", None),
        ("GET", "/v1/models", None),
    ] {
        let s = forged(&lb, 0, method, path, body)?;
        assert!(s.local_response().is_some(), "{method} {path}: {:?}", s.outcome());
        assert_no_forged(&s, path);
        assert_eq!(s.request_header("x-gateway-destination-endpoint"), None, "{path}");
    }

    // Passthrough (web UI, other paths, GET on an inference path): the filter's node only.
    for (method, path) in [("GET", "/"), ("GET", "/v1/chat/completions"), ("PUT", "/v1/completions"), ("GET", "/ws")] {
        let s = forged(&lb, 1, method, path, None)?;
        assert_no_forged(&s, path);
        let list = endpoints(&s);
        assert!(!list.is_empty() && list.iter().all(|a| *a == addr(0) || *a == addr(1)), "{path}: {list:?}");
        assert_eq!(s.request_header("x-envoy-max-retries"), Some((list.len() - 1).to_string()));
        assert_eq!(s.request_header("x-exo-lb-model"), None, "{path}: no model for passthrough");
        ok(&s)?;
    }
    assert_idle(&lb);
    Ok(())
}

#[test]
fn every_inference_path_routes_by_model_and_other_methods_pass_through() -> R {
    let cfg =
        format!(r#"{{"nodes": [{}, {}]}}"#, node("a", 0, r#""models": ["m1"]"#), node("b", 1, r#""models": ["e5"]"#));
    let lb = load(&cfg, 1);
    for path in
        ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/completions?x=1"]
    {
        let model = if path.contains("embeddings") { "e5" } else { "m1" };
        let s = lb.request("POST", path).body(json!({"model": model, "prompt": "x"}).to_string()).start()?;
        let want = if model == "e5" { addr(1) } else { addr(0) };
        assert_eq!(endpoints(&s), [want], "{path}");
        // The body went upstream untouched.
        assert_eq!(s.forwarded_request_body(), json!({"model": model, "prompt": "x"}).to_string().as_bytes());
        ok(&s)?;
        // Without a model it is an inference request all the same: 400.
        let bad = lb.request("POST", path).body("{}").start()?;
        assert_eq!(error_reply(&bad).code, "missing_model", "{path}");
    }
    // Not inference: routed at the headers stage, body not buffered, no model needed.
    for (method, path) in [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"), ("GET", "/v1/other")] {
        let s = lb.request(method, path).streaming().start()?;
        assert!(s.forwarded_request_headers().is_some(), "{method} {path} is routed at headers");
        s.request_body("{garbage", true)?;
        assert!(matches!(s.outcome(), Outcome::Forwarded { .. }), "{method} {path}");
        assert_eq!(s.forwarded_request_body(), b"{garbage");
        ok(&s)?;
    }
    // Anything else that changes something is node administration: refused by the balancer.
    for (method, path) in [("POST", "/v1/chat"), ("POST", "/v1/models"), ("POST", "/healthcheck")] {
        let s = lb.request(method, path).body("{}").start()?;
        assert_eq!(error_reply(&s).code, "path_not_allowed", "{method} {path}");
    }
    assert_idle(&lb);
    Ok(())
}

#[test]
fn passthrough_requests_hold_no_slot_and_are_never_queued() -> R {
    let lb = load(&format!(r#"{{"nodes": [{}]}}"#, node("a", 0, "")), 2);
    let gen = post(&lb, 0, "m")?;
    assert_eq!(endpoints(&gen), [addr(0)]);
    let mut ui = Vec::new();
    for i in 0..5 {
        let s = lb.worker(i % 2).request("GET", &format!("/assets/{i}.js")).start()?;
        assert_eq!(endpoints(&s), [addr(0)], "the web UI is not held to the node's cap");
        ui.push(s);
    }
    assert_eq!(inflight(&lb, "a"), 1, "only the generation counts");
    for s in &ui {
        ok(s)?;
    }
    ok(&gen)?;
    assert_idle(&lb);
    Ok(())
}

#[test]
fn the_model_header_is_sanitised() -> R {
    let lb = load(&format!(r#"{{"nodes": [{}]}}"#, node("any", 0, "")), 1);
    // The longest model id a request may name (longer ones are refused: 400 invalid_model).
    let long = "x".repeat(256);
    for (model, want) in [
        ("qwen2.5-1.5b-instruct-rkllm", "qwen2.5-1.5b-instruct-rkllm".to_string()),
        ("mé\u{1}del\r\nX-Evil: 1", "mdelX-Evil: 1".to_string()),
        (long.as_str(), "x".repeat(128)),
    ] {
        let s = post(&lb, 0, model)?;
        assert_eq!(s.request_header("x-exo-lb-model"), Some(want), "{model:?}");
        ok(&s)?;
    }
    Ok(())
}

#[test]
fn hash_policy_is_sticky_across_workers_and_falls_back_without_a_key() -> R {
    let nodes: Vec<String> = (0..4).map(|i| node(&format!("n{i}"), i, "")).collect();
    let lb =
        load(&format!(r#"{{"policy": "hash", "hash_on": "header:x-session", "nodes": [{}]}}"#, nodes.join(",")), 2);
    let mut owners = std::collections::BTreeMap::new();
    for k in 0..40 {
        let session = format!("session-{k}");
        let mut seen = Vec::new();
        for w in [0, 1, 0] {
            let s = lb
                .worker(w)
                .request("POST", "/v1/chat/completions")
                .header("x-session", &session)
                .body(chat("m"))
                .start()?;
            let list = endpoints(&s);
            assert_eq!(list.len(), 4, "every node is listed for failover");
            seen.push(list[0].clone());
            ok(&s)?;
        }
        assert!(seen.iter().all(|a| *a == seen[0]), "{session} moved: {seen:?}");
        *owners.entry(seen[0].clone()).or_insert(0) += 1;
    }
    assert_eq!(owners.len(), 4, "40 sessions use every node: {owners:?}");

    // Without the header: least_conn, which spreads concurrent requests over all nodes.
    let open: Vec<Stream> = (0..4).map(|_| post(&lb, 0, "m")).collect::<anyhow::Result<_>>()?;
    let mut firsts: Vec<String> = open.iter().map(first).collect();
    firsts.sort();
    assert_eq!(firsts, (0..4).map(addr).collect::<Vec<_>>());
    for s in &open {
        ok(s)?;
    }

    // hash_on client_ip: the port does not matter, the address does.
    let lb = load(&format!(r#"{{"policy": "hash", "nodes": [{}]}}"#, nodes.join(",")), 1);
    let from = |src: &str| -> anyhow::Result<String> {
        let s =
            lb.request("POST", "/v1/chat/completions").property_str("source.address", src).body(chat("m")).start()?;
        let f = first(&s);
        ok(&s)?;
        Ok(f)
    };
    let mut spread = std::collections::BTreeSet::new();
    for ip in 0..30 {
        let a = from(&format!("192.168.7.{ip}:40000"))?;
        assert_eq!(a, from(&format!("192.168.7.{ip}:61234"))?, "client 192.168.7.{ip}");
        spread.insert(a);
    }
    assert!(spread.len() >= 3, "clients spread over the nodes: {spread:?}");
    Ok(())
}

#[test]
fn healthcheck_and_model_list_are_answered_by_the_balancer() -> R {
    let cfg = format!(
        r#"{{"max_fails": 1, "nodes": [{}, {}, {}]}}"#,
        node("a", 0, r#""models": ["m1", "m2"]"#),
        node("b", 1, r#""models": ["m1"]"#),
        node("c", 2, r#""models": ["m3"], "down": true"#)
    );
    let lb = load(&cfg, 1);
    let get = |path: &str| -> anyhow::Result<(u32, serde_json::Value)> {
        let s = lb.request("GET", path).start()?;
        assert_eq!(
            s.local_response().map(|l| l.headers.iter().any(|(k, v)| k == "cache-control" && v == "no-store")),
            Some(true)
        );
        Ok(json_reply(&s))
    };
    let (status, h) = get("/healthcheck")?;
    assert_eq!(status, 200);
    assert_eq!(
        h,
        json!({"status": "ok", "nodes": {"up": 2, "total": 3}, "models": {
            "m1": {"up": 2, "total": 2}, "m2": {"up": 1, "total": 1}, "m3": {"up": 0, "total": 1}}})
    );
    let (status, m) = get("/v1/models?limit=5")?;
    assert_eq!(status, 200);
    let ids: Vec<&str> = m["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!((m["object"].as_str(), ids), (Some("list"), vec!["m1", "m2"]), "union of the nodes that are up");
    assert_eq!(lb.request("HEAD", "/healthcheck").start()?.outcome().local_status(), Some(200));

    // Node b fails (max_fails 1): out of the health count and of the model list's support.
    let s = post(&lb, 0, "m1")?;
    complete(&s, &addr(1), 503)?;
    assert_eq!(get("/healthcheck")?.1["models"]["m1"], json!({"up": 1, "total": 2}));
    let s = post(&lb, 0, "m2")?;
    complete(&s, &addr(0), 502)?;
    let (status, h) = get("/healthcheck")?;
    assert_eq!((status, h["status"].as_str()), (503, Some("unavailable")));
    assert_eq!(get("/v1/models")?.1["data"], json!([]));

    // With a node that serves any model, only a node can list its models: forwarded.
    let lb = load(&format!(r#"{{"nodes": [{}, {}]}}"#, node("a", 0, r#""models": ["m1"]"#), node("any", 1, "")), 1);
    let s = lb.request("GET", "/v1/models").start()?;
    assert!(matches!(s.outcome(), Outcome::Forwarded { .. }), "{:?}", s.outcome());
    Ok(())
}

#[test]
fn the_response_names_the_node_that_served_it() -> R {
    let cfg = format!(r#"{{"nodes": [{}, {}]}}"#, node("rk1", 0, ""), node("rk2", 1, ""));
    let lb = load(&cfg, 1);
    let s = post(&lb, 0, "m")?;
    let list = endpoints(&s);
    // Envoy failed over to the second node.
    s.upstream_address(&list[1]).attempt_count(2);
    let headers = s.upstream_response(200, &[("content-type", "text/event-stream"), ("x-exo-lb-node", "forged")])?;
    let name = if list[1] == addr(0) { "rk1" } else { "rk2" };
    let node_headers: Vec<&String> = headers.iter().filter(|(k, _)| k == "x-exo-lb-node").map(|(_, v)| v).collect();
    assert_eq!(node_headers, [name]);
    s.finish()?;
    assert_eq!(counter(&lb, "exo_lb_upstream_mismatch_total"), 0);

    // An address that is not a configured node: no header, a warning and a counter.
    let s = post(&lb, 0, "m")?;
    s.upstream_address("10.9.9.9:52415");
    let headers = s.upstream_response(200, &[("x-exo-lb-node", "forged")])?;
    assert!(!headers.iter().any(|(k, _)| k == "x-exo-lb-node"), "{headers:?}");
    s.finish()?;
    assert_eq!(counter(&lb, "exo_lb_upstream_mismatch_total"), 1);
    assert!(lb.logged("served by 10.9.9.9:52415 which is not among the chosen nodes"));

    // Envoy's own reply (connect failure on every node, URX|UF): no node is named.
    let s = post(&lb, 0, "m")?;
    s.response_flags(flags::UF | flags::URX).attempt_count(2);
    let headers = s.upstream_response(503, &[("x-exo-lb-node", "forged")])?;
    assert!(!headers.iter().any(|(k, _)| k == "x-exo-lb-node"), "{headers:?}");
    s.finish()?;
    assert_idle(&lb);
    Ok(())
}
