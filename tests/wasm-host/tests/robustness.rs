//! Robustness of the real .wasm: a seeded fuzz of request bodies, headers and chunkings (no
//! trap, and the right answer for each), and VMs reloaded in the middle of traffic (no state
//! left stuck).

use std::collections::BTreeMap;
use std::time::Instant;

use crate::common::*;
use serde::Deserialize;
use serde_json::Value;
use wasm_host::{Host, LogLevel, Outcome, Stream};

// ----- the oracle: what the README says each request must get -----

const MAX_BODY: usize = 16_384;
/// Model -> the nodes (indices) that serve it.
const SERVED: [(&str, &[usize]); 5] =
    [("m1", &[0, 1]), ("m2", &[0]), ("qwen2.5-1.5b-instruct-rkllm", &[1]), ("m3", &[2]), ("模型-7b", &[2])];
const INFERENCE: [&str; 4] = ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/embeddings"];

fn fuzz_config() -> String {
    format!(
        r#"{{"max_body_bytes": {MAX_BODY}, "max_inflight": 10000, "nodes": [{}, {}, {}]}}"#,
        node("a", 0, r#""models": ["m1", "m2"]"#),
        node("b", 1, r#""models": ["m1", "qwen2.5-1.5b-instruct-rkllm"]"#),
        node("c", 2, r#""models": ["m3", "模型-7b"]"#)
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Forwarded to some of these nodes, with this model header (None: passthrough).
    Forward { nodes: Vec<usize>, model: Option<String> },
    /// The balancer's own JSON answer (health or model list).
    Json(u32),
    /// An OpenAI-style error.
    Error(u32, &'static str),
}

/// The only fields routing reads; everything else must merely be valid JSON.
#[derive(Deserialize)]
struct Head {
    model: Option<Value>,
    #[allow(dead_code)]
    stream: Option<Value>,
}

fn expect_body(body: &[u8]) -> Expect {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        _ => return Expect::Error(400, "invalid_json"),
    }
    let Ok(head) = serde_json::from_slice::<Head>(body) else { return Expect::Error(400, "invalid_json") };
    let model = match head.model {
        Some(Value::String(m)) if !m.trim().is_empty() => m,
        _ => return Expect::Error(400, "missing_model"),
    };
    match SERVED.iter().find(|(m, _)| *m == model) {
        Some((_, nodes)) => Expect::Forward { nodes: nodes.to_vec(), model: Some(model) },
        None => Expect::Error(404, "model_not_found"),
    }
}

struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    chunks: Vec<Vec<u8>>,
}

impl Req {
    fn body(&self) -> Vec<u8> {
        self.chunks.concat()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn expect(req: &Req) -> Expect {
    // The paths `random_target` picks, as the nodes would route them (runs of '/' merged).
    let path = match req.path.split(['?', '#']).next().unwrap_or_default() {
        "" | "//" => "/",
        "*" => "/*",
        p => p,
    };
    // Methods are compared without case.
    let method = req.method.to_ascii_uppercase();
    let get = method == "GET" || method == "HEAD";
    if get && path == "/healthcheck" {
        return Expect::Json(200);
    }
    if get && (path == "/v1/models" || path == "/models") {
        return Expect::Json(200);
    }
    if !INFERENCE.contains(&path) {
        // The allow-list: reads of the API, and of anything with the web UI on (the default).
        return if get || method == "OPTIONS" {
            Expect::Forward { nodes: vec![0, 1, 2], model: None }
        } else {
            Expect::Error(403, "path_not_allowed")
        };
    }
    if method != "POST" {
        return Expect::Forward { nodes: vec![0, 1, 2], model: None };
    }
    if req.chunks.is_empty() {
        return Expect::Error(400, "invalid_json");
    }
    let declared = req.header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) || req.body().len() > MAX_BODY {
        return Expect::Error(413, "request_too_large");
    }
    expect_body(&req.body())
}

/// What the header `x-exo-lb-model` carries for a model id.
fn header_safe(model: &str) -> String {
    model.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(128).collect()
}

// ----- running one request and checking it -----

#[derive(Default)]
struct Tally {
    by_outcome: BTreeMap<String, u64>,
    requests: u64,
}

fn run(lb: &Host, w: usize, req: &Req, rng: &mut Rng, tally: &mut Tally) -> anyhow::Result<()> {
    let want = expect(req);
    let mut b = lb.worker(w).request(&req.method, &req.path);
    for (k, v) in &req.headers {
        b = b.header(k, v);
    }
    let s = b.chunks(req.chunks.iter()).start()?;
    let what =
        || format!("{} {} {:?} body {:?}", req.method, req.path, req.headers, String::from_utf8_lossy(&req.body()));
    tally.requests += 1;
    let label = match (&want, s.outcome()) {
        (Expect::Forward { nodes, model }, Outcome::Forwarded { .. }) => {
            check_forwarded(&s, req, nodes, model.as_deref(), &what);
            finish_somehow(&s, rng)?;
            if model.is_some() { "routed" } else { "passthrough" }.to_string()
        }
        (Expect::Json(status), Outcome::LocalResponse { status: got, body, .. }) => {
            assert_eq!(got, *status, "{}", what());
            let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", what()));
            assert!(v.is_object(), "{}", what());
            "answered".to_string()
        }
        (Expect::Error(status, code), Outcome::LocalResponse { .. }) => {
            let e = error_reply(&s);
            assert_eq!((e.status, e.code.as_str()), (*status, *code), "{}", what());
            let rid = req.header("x-request-id").unwrap_or("00000000-0000-4000-8000-");
            assert!(e.request_id.starts_with(rid), "request id {:?} for {}", e.request_id, what());
            format!("{status} {code}")
        }
        (want, got) => panic!("expected {want:?}, got {got:?}\nfor {}", what()),
    };
    for name in ["x-gateway-destination-endpoint", "x-envoy-max-retries", "x-exo-lb-model"] {
        let values = s.request_header_all(name);
        assert!(values.len() <= 1, "{name} {values:?}: {}", what());
        assert!(
            !values.iter().any(|v| v.contains("6.6.6.6") || v == "77" || v == "forged"),
            "client's {name} survived"
        );
    }
    *tally.by_outcome.entry(label).or_default() += 1;
    Ok(())
}

fn check_forwarded(s: &Stream, req: &Req, nodes: &[usize], model: Option<&str>, what: &dyn Fn() -> String) {
    let list = endpoints(s);
    let allowed: Vec<String> = nodes.iter().map(|&i| addr(i)).collect();
    assert!(
        !list.is_empty() && list.iter().all(|a| allowed.contains(a)),
        "{list:?} not within {allowed:?}: {}",
        what()
    );
    let mut distinct = list.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), list.len(), "duplicates in {list:?}");
    assert_eq!(s.request_header("x-envoy-max-retries"), Some((list.len() - 1).to_string()), "{}", what());
    assert_eq!(s.request_header("x-exo-lb-model"), model.map(header_safe), "{}", what());
    assert_eq!(s.forwarded_request_body(), req.body(), "the body goes upstream untouched: {}", what());
}

/// Ends a forwarded request the way a random client and node would.
fn finish_somehow(s: &Stream, rng: &mut Rng) -> R {
    match rng.below(4) {
        0 => s.abort(),
        1 => s.finish(),
        _ => {
            let node = first(s);
            let headers = s.upstream_response(200, &[("content-type", "text/event-stream")])?;
            let name = ["a", "b", "c"][(0..3).position(|i| addr(i) == node).expect("a node")];
            assert!(headers.contains(&("x-exo-lb-node".to_string(), name.to_string())));
            for k in 0..rng.below(3) {
                assert_eq!(s.response_body(format!("data: {k}\n\n"), false)?, wasm_host::Action::Continue);
            }
            assert_eq!(s.response_body("data: [DONE]\n\n", true)?, wasm_host::Action::Continue);
            s.finish()
        }
    }
}

// ----- generating inputs -----

/// Seed bodies: valid and invalid, every JSON type as `model`, deep nesting, odd bytes.
fn seeds() -> Vec<Vec<u8>> {
    let mut s: Vec<Vec<u8>> = [
        r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"m2","stream":true,"messages":[]}"#,
        r#"{"model":"m3","input":"embed me"}"#,
        r#"{"model":"qwen2.5-1.5b-instruct-rkllm","messages":[{"role":"system","content":"\u00e9\n"}],"temperature":0.7}"#,
        r#"{"model":"模型-7b","prompt":"你好"}"#,
        r#"  {"messages":[],"model":"m1"}  "#,
        r#"{"model":"m\u0031"}"#,
        r#"{"model":"nope"}"#,
        r#"{"model":"M1"}"#,
        r#"{"model":""}"#,
        r#"{"model":"   "}"#,
        r#"{"model":null}"#,
        r#"{"model":true}"#,
        r#"{"model":0}"#,
        r#"{"model":-1.5e300}"#,
        r#"{"model":123456789012345678901234567890}"#,
        r#"{"model":1e999}"#,
        r#"{"model":["m1"]}"#,
        r#"{"model":{"id":"m1"}}"#,
        r#"{"model":"m1","model":"m2"}"#,
        r#"{"stream":"yes","model":"m1","max_tokens":-0}"#,
        r#"{"model":"m1","n":1e-400}"#,
        r#"{"model":"\ud800"}"#,
        r#"{"model":"m1\u0000"}"#,
        r#"{}"#,
        r#"[]"#,
        r#"[{"model":"m1"}]"#,
        r#""m1""#,
        r#"null"#,
        r#"{"model":"m1""#,
        r#"{"model":"m1"} {}"#,
        r#"{'model':'m1'}"#,
    ]
    .iter()
    .map(|b| b.as_bytes().to_vec())
    .collect();
    s.push(b"\xef\xbb\xbf{\"model\":\"m1\"}".to_vec()); // BOM
    s.push(b"{\"model\":\"m\xff1\"}".to_vec()); // invalid UTF-8 in a string
    s.push(b"{\"model\":\"m1\",\"x\":\"\xc3\"}".to_vec());
    s.push(b"{\"model\":\"m1\"}\xff".to_vec());
    s.push(b"".to_vec());
    s.push(b"\x00".to_vec());
    let deep = |prefix: &str, depth: usize| {
        let mut b = prefix.as_bytes().to_vec();
        b.extend(std::iter::repeat_n(b'[', depth));
        b.extend(std::iter::repeat_n(b']', depth));
        b.push(b'}');
        b
    };
    s.push(deep(r#"{"model":"m1","x":"#, 5_000)); // deep but skipped: routes
    s.push(deep(r#"{"model":"#, 300)); // `model` past the recursion limit
    s.push(deep(r#"{"model":"m1","stream":"#, 300));
    s
}

/// A random JSON value: every type, nesting, huge numbers, escapes.
fn random_json(rng: &mut Rng, depth: usize) -> String {
    match rng.below(if depth > 4 { 7 } else { 9 }) {
        0 => "null".into(),
        1 => (if rng.chance(50) { "true" } else { "false" }).into(),
        2 => rng
            .pick(&["0", "-0", "1", "-1", "1e308", "-1e308", "1e999", "3.14", "18446744073709551616", "1e-999"])
            .to_string(),
        3 => format!("{}", rng.next_u64() as i64),
        4 => serde_json::to_string(*rng.pick(&["m1", "m2", "m3", "", " ", "m1 ", "\u{0}", "模型-7b", "\"", "\\"]))
            .unwrap(),
        5 => rng.pick(&[r#""\ud83d\ude00""#, r#""\udc00""#, r#""\u0000m""#, r#""m\/1""#]).to_string(),
        6 => {
            let len = rng.below(12);
            let s: String = (0..len).map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('x')).collect();
            serde_json::to_string(&s).unwrap()
        }
        7 => {
            let items: Vec<String> = (0..rng.below(4)).map(|_| random_json(rng, depth + 1)).collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let items: Vec<String> = (0..rng.below(4))
                .map(|_| {
                    format!(
                        "{}:{}",
                        serde_json::to_string(rng.pick(&["model", "stream", "x", "messages"])).unwrap(),
                        random_json(rng, depth + 1)
                    )
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

const INTERESTING: &[u8] = b"\x00\xff\xc3\xa9\x80\"{}[],:\\ \n\tmodel0123456789-+.eE";

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = rng.pick(seeds).clone();
    for _ in 0..1 + rng.below(3) {
        let at = |rng: &mut Rng, b: &Vec<u8>| rng.below(b.len() + 1);
        match rng.below(10) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = at(rng, &b);
                b.insert(i, *rng.pick(INTERESTING));
            }
            2 if !b.is_empty() => {
                let i = rng.below(b.len());
                let j = (i + 1 + rng.below(8)).min(b.len());
                b.drain(i..j);
            }
            3 if !b.is_empty() => {
                let i = rng.below(b.len());
                let j = (i + 1 + rng.below(16)).min(b.len());
                let piece = b[i..j].to_vec();
                let k = at(rng, &b);
                b.splice(k..k, piece);
            }
            4 => b.truncate(at(rng, &b)),
            5 => {
                let other = rng.pick(seeds);
                let cut = rng.below(other.len() + 1);
                let i = at(rng, &b);
                b.truncate(i);
                b.extend_from_slice(&other[cut..]);
            }
            6 => b = format!(r#"{{"model":{},"messages":[]}}"#, random_json(rng, 0)).into_bytes(),
            7 => b = random_json(rng, 0).into_bytes(),
            8 => b = (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect(),
            _ => {
                let m = *rng.pick(&["m1", "m2", "m3", "qwen2.5-1.5b-instruct-rkllm", "x"]);
                let pad = "a".repeat(rng.below(3) * MAX_BODY / 2);
                b = format!(r#"{{"model":"{m}","pad":"{pad}"}}"#).into_bytes();
            }
        }
    }
    b
}

/// Splits `body` into 1-8 chunks at random points (empty chunks included); rarely no chunk.
fn random_chunks(rng: &mut Rng, body: &[u8]) -> Vec<Vec<u8>> {
    if body.is_empty() && rng.chance(50) {
        return Vec::new();
    }
    let n = 1 + rng.below(8);
    let mut cuts: Vec<usize> = (1..n).map(|_| rng.below(body.len() + 1)).collect();
    cuts.sort();
    let mut chunks = Vec::new();
    let mut start = 0;
    for c in cuts {
        chunks.push(body[start..c].to_vec());
        start = c;
    }
    chunks.push(body[start..].to_vec());
    chunks
}

fn random_headers(rng: &mut Rng, body_len: usize) -> Vec<(String, String)> {
    let mut h = Vec::new();
    if rng.chance(70) {
        h.push((
            "content-type".into(),
            rng.pick(&["application/json", "text/plain", "application/json; charset=utf-8"]).to_string(),
        ));
    }
    if rng.chance(20) {
        let v = match rng.below(5) {
            0 => body_len.to_string(),
            1 => (body_len + rng.below(100)).to_string(),
            2 => (MAX_BODY + 1 + rng.below(10)).to_string(),
            3 => " 12 ".to_string(),
            _ => rng.pick(&["abc", "-1", "99999999999999999999999", ""]).to_string(),
        };
        h.push(("content-length".into(), v));
    }
    if rng.chance(15) {
        h.push(("x-gateway-destination-endpoint".into(), "6.6.6.6:1,10.0.0.1:52415".into()));
        h.push(("x-envoy-max-retries".into(), "77".into()));
        h.push(("X-Exo-Lb-Model".into(), "forged".into()));
    }
    if rng.chance(10) {
        let id: String =
            (0..rng.below(20)).map(|_| char::from_u32(32 + rng.below(0x2000) as u32).unwrap_or('?')).collect();
        h.push(("x-request-id".into(), id));
    }
    for _ in 0..rng.below(3) {
        let name: String =
            (0..1 + rng.below(12)).map(|_| *rng.pick(b"abcdefghijklmnopqrstuvwxyz-_0123456789") as char).collect();
        let value: String =
            (0..rng.below(30)).map(|_| char::from_u32(32 + rng.below(0x500) as u32).unwrap_or('?')).collect();
        h.push((name, value));
    }
    h
}

fn random_target(rng: &mut Rng) -> (String, String) {
    if rng.chance(85) {
        let path = rng.pick(&INFERENCE).to_string();
        let path = if rng.chance(10) { format!("{path}?api-version=1&x=%00") } else { path };
        return ("POST".into(), path);
    }
    let method = rng.pick(&["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get", "PATCH"]).to_string();
    let path = rng
        .pick(&[
            "/",
            "/healthcheck",
            "/v1/models",
            "/models",
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/static/app.js",
            "//",
            "/v1/models?x#y",
            "*",
            "",
        ])
        .to_string();
    (method, path)
}

#[test]
fn fuzzed_bodies_headers_and_chunkings_never_trap_and_get_the_right_answer() -> R {
    let started = Instant::now();
    let lb = load(&fuzz_config(), 2);
    let mut rng = Rng::new(0x00e8_01b5_f022);
    let mut tally = Tally::default();
    let seeds = seeds();

    // Every split point of every seed body (two chunks, empty ones included).
    for (k, seed) in seeds.iter().enumerate() {
        let splits: Vec<usize> =
            if seed.len() > 2_000 { (0..=seed.len()).step_by(97).collect() } else { (0..=seed.len()).collect() };
        for at in splits {
            let req = Req {
                method: "POST".into(),
                path: INFERENCE[k % 4].into(),
                headers: vec![("content-type".into(), "application/json".into())],
                chunks: vec![seed[..at].to_vec(), seed[at..].to_vec()],
            };
            run(&lb, at % 2, &req, &mut rng, &mut tally)?;
        }
    }
    let split_requests = tally.requests;

    // Mutated and random requests with random chunkings, headers and targets.
    while tally.requests < 100_000 + split_requests {
        let body = if rng.chance(25) { rng.pick(&seeds).clone() } else { mutate(&mut rng, &seeds) };
        let (method, path) = random_target(&mut rng);
        let req =
            Req { method, path, headers: random_headers(&mut rng, body.len()), chunks: random_chunks(&mut rng, &body) };
        run(&lb, rng.below(2), &req, &mut rng, &mut tally)?;
        if tally.requests % 10_000 == 0 {
            assert_eq!(inflight_recorded(&lb), 0, "every request ended, nothing may stay booked");
        }
    }

    eprintln!(
        "fuzz: {} requests ({split_requests} from split points) in {:?}: {:?}",
        tally.requests,
        started.elapsed(),
        tally.by_outcome
    );
    assert!(tally.requests >= 100_000);
    // The fuzz reached every kind of answer.
    for label in [
        "routed",
        "passthrough",
        "answered",
        "400 invalid_json",
        "400 missing_model",
        "404 model_not_found",
        "413 request_too_large",
        "403 path_not_allowed",
    ] {
        assert!(tally.by_outcome.get(label).copied().unwrap_or(0) >= 100, "too few '{label}': {:?}", tally.by_outcome);
    }
    for w in 0..2 {
        assert!(!lb.is_crashed(w));
    }
    let bad: Vec<String> = lb
        .logs()
        .iter()
        .filter(|l| matches!(l.level, LogLevel::Stderr | LogLevel::Host | LogLevel::Error | LogLevel::Critical))
        .map(ToString::to_string)
        .take(10)
        .collect();
    assert!(bad.is_empty(), "panics, host diagnostics or errors: {bad:?}");
    assert_idle(&lb);
    Ok(())
}

#[test]
fn huge_and_deeply_nested_bodies_within_the_limit() -> R {
    let lb = load(&format!(r#"{{"max_body_bytes": 8388608, "nodes": [{}]}}"#, node("a", 0, r#""models": ["m1"]"#)), 1);
    let nested = |prefix: &str, depth: usize| {
        let mut b = prefix.as_bytes().to_vec();
        b.extend(std::iter::repeat_n(b'[', depth));
        b.extend(std::iter::repeat_n(b']', depth));
        b.push(b'}');
        b
    };
    // 2 MB of nesting in a field routing skips: routed, in 64 KiB chunks as Envoy delivers.
    let body = nested(r#"{"model":"m1","x":"#, 1_000_000);
    let s = lb.request("POST", "/v1/chat/completions").chunks(body.chunks(65_536)).start()?;
    assert_eq!(endpoints(&s), [addr(0)]);
    assert_eq!(s.forwarded_request_body().len(), body.len());
    ok(&s)?;
    // Nesting where `model` is: a clean 400, no stack overflow.
    let s = lb.request("POST", "/v1/chat/completions").body(nested(r#"{"model":"#, 1_000_000)).start()?;
    assert_eq!(error_reply(&s).code, "invalid_json");
    // 8 MiB exactly is allowed; one byte more is not (declared or not).
    let mut big = br#"{"model":"m1","pad":""#.to_vec();
    big.resize(8 * 1024 * 1024 - 2, b'a');
    big.extend_from_slice(b"\"}");
    let s = lb.request("POST", "/v1/chat/completions").chunks(big.chunks(1 << 20)).start()?;
    assert_eq!(endpoints(&s), [addr(0)]);
    ok(&s)?;
    big.insert(big.len() - 2, b'a');
    let s = lb.request("POST", "/v1/chat/completions").chunks(big.chunks(1 << 20)).start()?;
    assert_eq!((error_reply(&s).status, error_reply(&s).code.as_str()), (413, "request_too_large"));
    let s = lb.request("POST", "/v1/chat/completions").header("content-length", "8388609").streaming().start()?;
    assert_eq!(error_reply(&s).code, "request_too_large", "refused on the declared length, before the body");
    assert!(!lb.logged("panicked"));
    assert_idle(&lb);
    Ok(())
}

#[test]
fn a_client_that_leaves_before_its_body_is_complete_leaves_nothing_behind() -> R {
    let lb = load(&format!(r#"{{"nodes": [{}]}}"#, node("a", 0, "")), 1);
    let s = lb.request("POST", "/v1/chat/completions").streaming().chunks([&br#"{"model":"#[..]]).start()?;
    assert_eq!(s.outcome(), Outcome::Paused);
    assert_eq!(s.request_body(r#""m1""#, false)?, wasm_host::Action::Pause, "still buffering");
    s.abort()?;
    assert_idle(&lb);
    let next = post(&lb, 0, "m1")?;
    assert_eq!(endpoints(&next), [addr(0)], "the node is free");
    ok(&next)?;
    Ok(())
}

/// Worker 1 is reloaded while it has requests running, queued, granted but not resumed, and
/// half-received; traffic goes on. Within the lease TTL its slots and queue places are
/// reclaimed, and once the survivors finish, nothing is booked.
#[test]
fn a_vm_reloaded_mid_traffic_leaves_no_stuck_state() -> R {
    let cfg = format!(
        r#"{{"max_inflight": 2, "hold_after_abort": false, "queue": {{"timeout": "60s"}}, "nodes": [{}, {}]}}"#,
        node("a", 0, ""),
        node("b", 1, "")
    );
    let lb = load(&cfg, 2);
    let mut rng = Rng::new(42);
    let mut running: Vec<Stream> = Vec::new();
    let mut queued: Vec<Stream> = Vec::new();
    let mut reloaded_at = None;
    // Slots of worker 1 at the reload: (held or granted, held or waiting).
    let mut doomed = (0u64, 0u64);

    for step in 0..4_000 {
        if step == 2_000 {
            // Worker 1: make sure it holds a slot and has more requests waiting or running, and
            // one whose body is half-received; then reload it.
            while !running.iter().any(|s| s.worker() == 1) {
                if let Some(k) = running.iter().position(|s| s.worker() == 0) {
                    ok(&running.remove(k))?;
                }
                let s = post(&lb, 1, "m")?;
                match s.outcome() {
                    Outcome::Forwarded { .. } => running.push(s),
                    _ => queued.push(s),
                }
                advance_ms(&lb, 20)?;
                let (go, stay): (Vec<Stream>, Vec<Stream>) =
                    queued.into_iter().partition(|s| matches!(s.outcome(), Outcome::Forwarded { .. }));
                running.extend(go);
                queued = stay;
            }
            for _ in 0..2 {
                let s = post(&lb, 1, "m")?;
                match s.outcome() {
                    Outcome::Forwarded { .. } => running.push(s),
                    _ => queued.push(s),
                }
            }
            let half = lb.worker(1).request("POST", "/v1/chat/completions").streaming().chunks([b"{\"mo"]).start()?;
            assert_eq!(half.outcome(), Outcome::Paused);
            let st = state(&lb);
            let w1_vms = vm_ids(&lb, 1);
            let granted_w1 =
                st.waiters().filter(|w| matches!(w.grant, Some(Grant::Node { .. })) && w1_vms.contains(&w.vm)).count();
            let running_w1 = running.iter().filter(|s| s.worker() == 1).count();
            let queued_w1 = queued.iter().filter(|s| s.worker() == 1).count();
            doomed = ((running_w1 + granted_w1) as u64, (running_w1 + queued_w1) as u64);
            lb.reload_worker(1)?;
            reloaded_at = Some(lb.clock_ms());
            assert!(half.is_orphaned());
            running.retain(|s| s.worker() != 1);
            queued.retain(|s| s.worker() != 1);
        }
        match rng.below(8) {
            0..=1 => {
                let s = post(&lb, rng.below(2), "m")?;
                match s.outcome() {
                    Outcome::Forwarded { .. } => running.push(s),
                    Outcome::Paused => queued.push(s),
                    other => panic!("step {step}: {other:?}"),
                }
            }
            2..=4 if !running.is_empty() => {
                let s = running.remove(rng.below(running.len()));
                ok(&s)?;
            }
            5 if !queued.is_empty() => {
                let s = queued.remove(rng.below(queued.len()));
                s.abort()?;
            }
            _ => advance_ms(&lb, rng.below(100) as u64)?,
        }
        let (go, stay): (Vec<Stream>, Vec<Stream>) =
            queued.into_iter().partition(|s| matches!(s.outcome(), Outcome::Forwarded { .. }));
        running.extend(go);
        queued = stay;
        assert!(queued.iter().all(|s| s.outcome() == Outcome::Paused), "step {step}: no timeouts at this load");
        // Caps hold throughout, counting the dead worker's slots until they are reclaimed.
        assert!(inflight(&lb, "a") <= 2 && inflight(&lb, "b") <= 2, "step {step}: {:?}", state(&lb));
        let at = reloaded_at.unwrap_or(u64::MAX);
        if lb.clock_ms() > at.saturating_add(11_100) {
            // Past the TTL: the filter's count is exactly the live requests (running, or granted
            // a slot and waiting for their worker's tick).
            let live = running.len() as u64 + granted(&lb, "a") + granted(&lb, "b");
            assert_eq!(inflight_recorded(&lb), live, "step {step}: {:?}", state(&lb));
        }
    }
    let at = reloaded_at.expect("reloaded");
    assert!(lb.clock_ms() > at + 11_100, "the test ran past the lease TTL");
    assert!(doomed.0 > 0, "worker 1 held slots when it was reloaded");
    // Reclaimed: what it held or was granted, plus what its dead waiters were granted later.
    let reclaimed = counter(&lb, "exo_lb_reclaimed_inflight_total") as u64;
    eprintln!("worker 1 at its reload: {doomed:?} (held or granted, held or waiting); reclaimed {reclaimed}");
    assert!((doomed.0..=doomed.1).contains(&reclaimed), "reclaimed {reclaimed}, expected within {doomed:?}");
    // Drain: everything ends, nothing is stuck.
    while !(running.is_empty() && queued.is_empty()) {
        for s in running.drain(..) {
            ok(&s)?;
        }
        advance_ms(&lb, 20)?;
        let (go, stay): (Vec<Stream>, Vec<Stream>) =
            queued.into_iter().partition(|s| matches!(s.outcome(), Outcome::Forwarded { .. }));
        running.extend(go);
        queued = stay;
    }
    assert_idle(&lb);
    Ok(())
}

/// The VM ids worker `w`'s VMs logged when configured ("... role Balancer, vm <id>").
fn vm_ids(lb: &Host, w: usize) -> Vec<u64> {
    lb.worker(w)
        .logs()
        .iter()
        .filter_map(|l| l.message.rsplit_once(", vm ").and_then(|(_, id)| id.trim().parse().ok()))
        .collect()
}
