//! Configuration through the real .wasm: on_configure rejects each invalid configuration and
//! the log names the field (`exo-lb: invalid configuration: <field>: <message>`); a
//! configuration with every option is accepted and each option takes effect.

use crate::common::*;
use wasm_host::Host;

/// A valid node, for cases where another field is wrong.
const N: &str = r#"{"name": "a", "address": "10.0.0.1:52415"}"#;

/// (configuration, field named in the log, words of the message).
fn invalid_cases() -> Vec<(String, &'static str, &'static str)> {
    let with = |extra: &str| format!(r#"{{"nodes": [{N}], {extra}}}"#);
    let one =
        |node_extra: &str| format!(r#"{{"nodes": [{{"name": "a", "address": "10.0.0.1:52415", {node_extra}}}]}}"#);
    vec![
        // The document itself.
        ("".into(), "configuration", "is empty"),
        ("   \n ".into(), "configuration", "is empty"),
        ("[]".into(), "configuration", "JSON object"),
        (r#""nodes""#.into(), "configuration", "JSON object"),
        (format!(r#"{{"nodes": [{N}]}} trailing"#), "configuration", "trailing"),
        (r#"{"policy": "hash"}"#.into(), "configuration", "missing field `nodes`"),
        (with(r#""colour": "blue""#), "colour", "unknown field `colour`"),
        // nodes
        (r#"{"nodes": []}"#.into(), "nodes", "is empty"),
        (r#"{"nodes": {}}"#.into(), "nodes", "invalid type"),
        (r#"{"nodes": ["10.0.0.1:52415"]}"#.into(), "nodes[0]", "invalid type"),
        (r#"{"nodes": [{"address": "10.0.0.1:52415"}]}"#.into(), "nodes[0]", "missing field `name`"),
        (r#"{"nodes": [{"name": "a"}]}"#.into(), "nodes[0]", "missing field `address`"),
        (one(r#""colour": 1"#), "nodes[0].colour", "unknown field `colour`"),
        (r#"{"nodes": [{"name": "", "address": "10.0.0.1:1"}]}"#.into(), "nodes[0].name", "is empty"),
        (r#"{"nodes": [{"name": "rk 1", "address": "10.0.0.1:1"}]}"#.into(), "nodes[0].name", "may hold only"),
        (r#"{"nodes": [{"name": "a;b", "address": "10.0.0.1:1"}]}"#.into(), "nodes[0].name", "may hold only"),
        (
            format!(r#"{{"nodes": [{N}, {{"name": "a", "address": "10.0.0.2:1"}}]}}"#),
            "nodes[1].name",
            "used by another node",
        ),
        (r#"{"nodes": [{"name": "a", "address": "rk2.local:52415"}]}"#.into(), "nodes[0].address", "not an ip:port"),
        (r#"{"nodes": [{"name": "a", "address": "10.0.0.1"}]}"#.into(), "nodes[0].address", "not an ip:port"),
        (r#"{"nodes": [{"name": "a", "address": "::1:52415"}]}"#.into(), "nodes[0].address", "not an ip:port"),
        (r#"{"nodes": [{"name": "a", "address": "10.0.0.1:0"}]}"#.into(), "nodes[0].address", "port 0"),
        (r#"{"nodes": [{"name": "a", "address": "0.0.0.0:52415"}]}"#.into(), "nodes[0].address", "unspecified"),
        (r#"{"nodes": [{"name": "a", "address": 52415}]}"#.into(), "nodes[0].address", "invalid type"),
        (
            format!(r#"{{"nodes": [{N}, {{"name": "b", "address": " 10.0.0.1:52415"}}]}}"#),
            "nodes[1].address",
            "used by another node",
        ),
        (
            r#"{"nodes": [{"name": "a", "address": "[::1]:1"}, {"name": "b", "address": "[0:0::1]:1"}]}"#.into(),
            "nodes[1].address",
            "used by another node",
        ),
        (one(r#""models": []"#), "nodes[0].models", "is empty"),
        (one(r#""models": ["*", "m1"]"#), "nodes[0].models", "cannot be combined"),
        (one(r#""models": ["m1", "m1"]"#), "nodes[0].models[1]", "listed twice"),
        (one(r#""models": ["m1", " m2"]"#), "nodes[0].models[1]", "not a model id"),
        (one(r#""models": [""]"#), "nodes[0].models[0]", "not a model id"),
        (one(r#""models": "m1""#), "nodes[0].models", "invalid type"),
        (one(r#""weight": 0"#), "nodes[0].weight", "at least 1"),
        (one(r#""weight": 1001"#), "nodes[0].weight", "maximum of 1000"),
        (one(r#""weight": -1"#), "nodes[0].weight", "invalid value"),
        (one(r#""weight": 1.5"#), "nodes[0].weight", "invalid type"),
        (one(r#""down": "yes""#), "nodes[0].down", "invalid type"),
        (one(r#""backup": 1"#), "nodes[0].backup", "invalid type"),
        (one(r#""max_fails": -3"#), "nodes[0].max_fails", "invalid value"),
        (one(r#""fail_timeout": "3 days""#), "nodes[0].fail_timeout", "unit"),
        (one(r#""fail_timeout": "0ms""#), "nodes[0].fail_timeout", "longer than 0"),
        (one(r#""max_inflight": 0"#), "nodes[0].max_inflight", "outside 1..=10000"),
        (one(r#""max_inflight": 10001"#), "nodes[0].max_inflight", "outside 1..=10000"),
        (one(r#""probe_path": "healthcheck""#), "nodes[0].probe_path", "starting with '/'"),
        (one(r#""probe_path": "/health check""#), "nodes[0].probe_path", "starting with '/'"),
        // Top-level options.
        (with(r#""policy": "fastest""#), "policy", "unknown variant `fastest`"),
        (with(r#""policy": 1"#), "policy", "line 1"),
        (with(r#""hash_on": "cookie""#), "hash_on", "client_ip"),
        (with(r#""hash_on": "header:""#), "hash_on", "header:<name>"),
        (with(r#""hash_on": "header:x session""#), "hash_on", "header:<name>"),
        (with(r#""max_fails": "3""#), "max_fails", "invalid type"),
        (with(r#""fail_timeout": "0s""#), "fail_timeout", "longer than 0"),
        (with(r#""fail_timeout": 30"#), "fail_timeout", "invalid type"),
        (with(r#""fail_timeout": "30""#), "fail_timeout", "no unit"),
        (with(r#""fail_timeout": "1.0005s""#), "fail_timeout", "finer than a millisecond"),
        (with(r#""fail_timeout": "99999999999999999999s""#), "fail_timeout", "too large"),
        (with(r#""fail_on_status": [502, 200]"#), "fail_on_status[1]", "not an HTTP error status"),
        (with(r#""fail_on_status": [600]"#), "fail_on_status[0]", "not an HTTP error status"),
        (with(r#""fail_on_status": [70000]"#), "fail_on_status[0]", "invalid value"),
        (with(r#""max_body_bytes": 0"#), "max_body_bytes", "outside"),
        (with(r#""max_body_bytes": 8388609"#), "max_body_bytes", "outside"),
        (with(r#""healthcheck_path": "health""#), "healthcheck_path", "starting with '/'"),
        (with(r#""healthcheck_path": "/health?x=1""#), "healthcheck_path", "starting with '/'"),
        (with(r#""max_inflight": 0"#), "max_inflight", "outside 1..=10000"),
        (with(r#""queue": {"max_waiting": 100001}"#), "queue.max_waiting", "maximum of 100000"),
        (with(r#""queue": {"timeout": "0s"}"#), "queue.timeout", "longer than 0"),
        (with(r#""queue": {"timeout": "soon"}"#), "queue.timeout", "does not start with a number"),
        (with(r#""queue": {"size": 3}"#), "queue.size", "unknown field `size`"),
        (with(r#""queue": 64"#), "queue", "invalid type"),
        (with(r#""model_switch_cost": "fast""#), "model_switch_cost", "does not start with a number"),
        (with(r#""model_switch_cost": 20"#), "model_switch_cost", "invalid type"),
        (with(r#""hold_after_abort": "yes""#), "hold_after_abort", "invalid type"),
        (with(r#""discover_loaded": 1"#), "discover_loaded", "invalid type"),
        (with(r#""probe": {"interval": "50ms"}"#), "probe.interval", "at least 100ms"),
        (with(r#""probe": {"interval": "0s"}"#), "probe.interval", "longer than 0"),
        (with(r#""probe": {"timeout": "0s"}"#), "probe.timeout", "longer than 0"),
        (with(r#""probe": {"path": "v1/models"}"#), "probe.path", "starting with '/'"),
        (with(r#""probe": {"every": "5s"}"#), "probe.every", "unknown field `every`"),
        (with(r#""probe": true"#), "probe", "invalid type"),
        (with(r#""cluster": """#), "cluster", "is empty"),
    ]
}

#[test]
fn each_invalid_configuration_is_rejected_naming_its_field() -> R {
    let mut failures = Vec::new();
    for (json, field, words) in invalid_cases() {
        let loaded = Host::try_load(Host::wasm_path(), &json, 1)?;
        let prefix = format!("exo-lb: invalid configuration: {field}: ");
        let line = loaded.logs.iter().find(|l| l.message.starts_with("exo-lb: invalid configuration: "));
        let ok = !loaded.accepted
            && line.is_some_and(|l| l.message.starts_with(&prefix) && l.message[prefix.len()..].contains(words));
        if !ok {
            failures.push(format!(
                "{json}\n  expected rejection naming `{field}` with '{words}'; accepted={}, log: {:?}",
                loaded.accepted,
                line.map(|l| &l.message)
            ));
        }
    }
    assert!(failures.is_empty(), "{} case(s) wrong:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

/// A configuration that is not even JSON names "configuration" (or the field it broke in),
/// never a placeholder.
#[test]

fn a_syntax_error_names_the_configuration_not_a_placeholder() -> R {
    let mut wrong = Vec::new();
    for json in [
        "{",
        r#"{"nodes": ["#,
        r#"{"nodes": [{"name": "a", "address": "10.0.0.1:1"}]"#,
        r#"{"nodes": [{"name": "a", "address": "10.0.0.1:1",}]}"#,
        r#"{"nodes": [{"name": "a" "address": "10.0.0.1:1"}]}"#,
        r#"{"nodes": [{"name": "a", "address": "10.0.0.1:1"}], "policy": least_conn}"#,
    ] {
        let loaded = Host::try_load(Host::wasm_path(), json, 1)?;
        assert!(!loaded.accepted, "{json}");
        let line = loaded.logs.iter().find(|l| l.message.starts_with("exo-lb: invalid configuration: "));
        let message = line.map(|l| l.message.clone()).unwrap_or_default();
        if message.contains("configuration: ?") || message.contains("?:") || line.is_none() {
            wrong.push(format!("{json} -> {message}"));
        }
    }
    assert!(wrong.is_empty(), "placeholders instead of field names:\n{}", wrong.join("\n"));
    Ok(())
}

#[test]
fn a_rejected_configuration_answers_503_and_never_routes() -> R {
    let loaded = Host::try_load(Host::wasm_path(), r#"{"nodes": []}"#, 2)?;
    assert!(!loaded.accepted);
    let lb = loaded.host;
    for w in 0..2 {
        let s = lb.worker(w).request("POST", "/v1/chat/completions").body(chat("m1")).start()?;
        let lr = s.local_response().expect("answered locally");
        assert_eq!(lr.status, 503);
        assert!(String::from_utf8_lossy(&lr.body).contains("no valid configuration"));
        assert_eq!(s.request_header("x-gateway-destination-endpoint"), None);
        let g = lb.worker(w).request("GET", "/").start()?;
        assert_eq!(g.outcome().local_status(), Some(503));
    }
    // Ticks do nothing harmful without a configuration.
    advance_ms(&lb, 5_000)?;
    assert_eq!(lb.shared_data(STATE_KEY), None, "an unconfigured filter writes no state");
    Ok(())
}

/// Every option, top-level and per node, with a non-default value.
const FULL: &str = r#"{
  "nodes": [
    {"name": "rk1", "address": "10.0.0.1:52415", "models": ["m1", "m2"], "weight": 3,
     "max_fails": 2, "fail_timeout": "10s", "max_inflight": 2, "probe_path": "/healthcheck"},
    {"name": "rk2", "address": "[::1]:52415", "models": ["*"], "backup": true},
    {"name": "rk3", "address": "10.0.0.3:52415", "models": ["m1"], "down": true}
  ],
  "policy": "hash",
  "hash_on": "header:X-Session",
  "max_fails": 5,
  "fail_timeout": "1m",
  "fail_on_status": [500, 502],
  "max_body_bytes": 2048,
  "healthcheck_path": "/lb-health",
  "max_inflight": 3,
  "queue": {"max_waiting": 7, "timeout": "45s"},
  "model_switch_cost": "45s",
  "hold_after_abort": false,
  "probe": {"path": "/v1/models", "interval": "2s", "timeout": "0.5s"},
  "discover_loaded": false,
  "cluster": "my_exo_nodes"
}"#;

#[test]
fn a_configuration_with_every_option_is_accepted_and_takes_effect() -> R {
    let loaded = Host::try_load(Host::wasm_path(), FULL, 2)?;
    assert!(loaded.accepted, "{:?}", loaded.logs);
    assert!(loaded.logged("exo-lb: configured 3 node(s), policy Hash, role Balancer"), "{:?}", loaded.logs);
    let lb = loaded.host;

    // healthcheck_path: the balancer answers its own health at the configured path only.
    let h = lb.request("GET", "/lb-health").start()?;
    let (status, body) = json_reply(&h);
    assert_eq!(status, 200);
    assert_eq!(body["nodes"], serde_json::json!({"up": 2, "total": 3}), "rk3 is drained (down)");
    let old = lb.request("GET", "/healthcheck").start()?;
    assert!(matches!(old.outcome(), wasm_host::Outcome::Forwarded { .. }), "the default path is just a path now");
    old.finish()?;

    // max_body_bytes: 2048.
    let big = lb.request("POST", "/v1/chat/completions").body(vec![b' '; 2049]).start()?;
    assert_eq!(error_reply(&big).code, "request_too_large");

    // probe: every non-drained node is checked through `cluster`, rk1 at its own probe_path;
    // discover_loaded off: no node is asked what it has loaded (no `/state`).
    advance_ms(&lb, 1_000)?;
    let calls = lb.pending_http_calls();
    let mut seen: Vec<(String, String, String, u32)> = calls
        .iter()
        .map(|c| {
            let h = |k: &str| c.header(k).unwrap_or_default().to_string();
            (c.upstream.clone(), h("x-gateway-destination-endpoint"), h(":path"), c.timeout_ms)
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("my_exo_nodes".into(), "10.0.0.1:52415".into(), "/healthcheck".into(), 500),
            ("my_exo_nodes".into(), "[::1]:52415".into(), "/v1/models".into(), 500),
        ]
    );
    for c in calls {
        lb.answer_http_call(c.token, 200, &[], br#"{"data":[]}"#)?;
    }

    // policy hash on header x-session: the same session sticks to one primary node; the
    // backup (rk2) is only a failover; rk3 (down) never appears.
    let send = |session: &str| -> anyhow::Result<Vec<String>> {
        let s = lb.request("POST", "/v1/chat/completions").header("x-session", session).body(chat("m1")).start()?;
        let list = endpoints(&s);
        ok(&s)?;
        Ok(list)
    };
    for session in ["s1", "s2", "s3"] {
        assert_eq!(send(session)?, ["10.0.0.1:52415", "[::1]:52415"], "primary first, then backup");
    }

    // fail_on_status [500, 502] with rk1's own max_fails 2: two 500s take rk1 out.
    for _ in 0..2 {
        let s = post(&lb, 0, "m2")?;
        assert_eq!(first(&s), "10.0.0.1:52415");
        complete(&s, "10.0.0.1:52415", 500)?;
    }
    let s = post(&lb, 1, "m2")?;
    assert_eq!(endpoints(&s), ["[::1]:52415"], "rk1 out after its max_fails (2) of fail_on_status 500");
    ok(&s)?;
    // rk1's fail_timeout is 10 s; with probes on it then waits for a successful check.
    let out_until = state(&lb).health(index(&lb, "rk1")).out_until_ms;
    assert_eq!(out_until, Some(lb.clock_ms() + 10_000));
    Ok(())
}

#[test]
fn max_inflight_queue_and_hold_options_take_effect() -> R {
    let cfg = format!(
        r#"{{"nodes": [{}], "max_inflight": 2, "queue": {{"max_waiting": 1, "timeout": "3s"}}, "hold_after_abort": false}}"#,
        node("a", 0, "")
    );
    let lb = load(&cfg, 1);
    let r1 = post(&lb, 0, "m")?;
    let r2 = post(&lb, 0, "m")?;
    assert_eq!((first(&r1), first(&r2)), (addr(0), addr(0)), "max_inflight 2: two at once");
    let q = post(&lb, 0, "m")?;
    assert_eq!(q.outcome(), wasm_host::Outcome::Paused, "the third waits");
    let full = post(&lb, 0, "m")?;
    assert_eq!(error_reply(&full).code, "queue_full", "queue.max_waiting 1");
    advance_ms(&lb, 3_100)?;
    assert_eq!(error_reply(&q).code, "queue_timeout", "queue.timeout 3s");
    // hold_after_abort false: a client leaving mid-generation frees the node at once.
    r1.upstream_response(200, &[])?;
    r1.response_flags(flags::DC);
    r1.abort()?;
    ok(&r2)?;
    assert_idle(&lb);
    Ok(())
}

#[test]
fn defaults_need_only_nodes_and_accept_bare_minimum() -> R {
    for cfg in [
        r#"{"nodes": [{"name": "a", "address": "10.0.0.1:52415"}]}"#,
        r#" {"nodes": [{"name": "a.b_c-1", "address": "[fe80::1]:1", "models": ["*"]}], "model_switch_cost": "0s"} "#,
        r#"{"nodes": [{"name": "a", "address": "10.0.0.1:52415", "max_fails": 0, "weight": 1000}], "max_body_bytes": 8388608}"#,
    ] {
        let loaded = Host::try_load(Host::wasm_path(), cfg, 1)?;
        assert!(loaded.accepted, "{cfg}: {:?}", loaded.logs);
        assert!(!loaded.logged("invalid configuration"));
        // Defaults in force: least_conn, max_inflight 1 (a second request waits).
        let lb = loaded.host;
        let s1 = post(&lb, 0, "m")?;
        assert_eq!(endpoints(&s1).len(), 1);
        let s2 = post(&lb, 0, "m")?;
        assert_eq!(s2.outcome(), wasm_host::Outcome::Paused, "{cfg}: default max_inflight is 1");
        ok(&s1)?;
        advance_ms(&lb, 20)?;
        ok(&s2)?;
        assert_idle(&lb);
    }
    Ok(())
}
