//! Tests of the host itself, against the probe filter in fixtures/probe-filter.
//! Build it first:
//!   cargo build --release --target wasm32-wasip1 --manifest-path tests/wasm-host/fixtures/probe-filter/Cargo.toml

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wasm_host::{Action, Host, Outcome};

fn probe() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/probe-filter/target/wasm32-wasip1/release/probe_filter.wasm");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is missing; build it with: cargo build --release --target wasm32-wasip1 \
             --manifest-path tests/wasm-host/fixtures/probe-filter/Cargo.toml",
            p.display()
        );
        None
    }
}

macro_rules! host {
    ($config:expr, $workers:expr) => {{
        let Some(path) = probe() else { return Ok(()) };
        Host::load(path, $config, $workers)?
    }};
}

type R = anyhow::Result<()>;

#[test]
fn start_sequence_and_config_rejection() -> R {
    let Some(path) = probe() else { return Ok(()) };
    let ok = Host::try_load(&path, "tick=100", 2)?;
    assert!(ok.accepted);
    assert!(ok.logged("vm started"));
    assert!(ok.logged("configured at 1764000000000 ms: tick=100"));
    assert_eq!(ok.host.tick_period_ms(1), 100);
    let bad = Host::try_load(&path, "reject=1", 1)?;
    assert!(!bad.accepted);
    assert!(bad.logged("field `reject`"));
    let err = Host::load(&path, "reject=1", 1).err().expect("load must fail");
    assert!(format!("{err:#}").contains("rejected its configuration"));
    Ok(())
}

#[test]
fn headers_body_and_forwarding() -> R {
    let lb = host!("", 1);
    let s = lb
        .request("POST", "/v1/chat/completions")
        .header("X-Strip", "secret")
        .property_str("source.address", "10.0.0.9:5555")
        .body("hello")
        .start()?;
    let Outcome::Forwarded { request_headers } = s.outcome() else {
        panic!("not forwarded: {:?}", s.outcome());
    };
    let get = |k: &str| request_headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("x-strip"), None);
    assert_eq!(get("x-probe-seen").as_deref(), Some("1"));
    assert_eq!(get("x-probe-source").as_deref(), Some("10.0.0.9:5555"));
    assert_eq!(get("x-body-len").as_deref(), Some("5"));
    assert_eq!(get("content-length").as_deref(), Some("5"));
    assert_eq!(s.forwarded_request_body(), b"hello");
    assert_eq!(lb.metric("probe_requests"), Some(1));
    assert_eq!(lb.metric("probe_inflight"), Some(1));
    assert_eq!(lb.histogram("probe_body_size"), Some(vec![5]));

    let headers = s.upstream_response(200, &[("server", "exo"), ("content-type", "text/plain")])?;
    assert!(headers.contains(&("x-probe-code".into(), "200".into())));
    assert!(!headers.iter().any(|(k, _)| k == "server"));
    assert_eq!(s.response_body("abc", false)?, Action::Continue);
    assert_eq!(s.response_body("de", true)?, Action::Continue);
    assert_eq!(s.forwarded_response_body(), b"abcde");
    s.attempt_count(2).upstream_address("127.0.0.1:18102");
    s.finish()?;
    assert!(lb.logged("code=200 upstream=127.0.0.1:18102 attempts=2 resp_body=5"));
    assert_eq!(lb.metric("probe_inflight"), Some(0));
    assert_eq!(lb.worker(0).live_streams(), 0);
    Ok(())
}

#[test]
fn chunked_body_is_buffered_cumulatively() -> R {
    let lb = host!("", 1);
    let s = lb.request("POST", "/x").chunks(["re", "wri", "te"]).start()?;
    // The probe pauses until end of stream, then reads all 7 bytes and rewrites them.
    assert_eq!(s.request_header("x-body-len").as_deref(), Some("7"));
    assert_eq!(s.forwarded_request_body(), b"rewritten");
    assert!(matches!(s.outcome(), Outcome::Forwarded { .. }));

    let s = lb.request("POST", "/x").streaming().start()?;
    assert_eq!(s.outcome(), Outcome::Paused);
    assert_eq!(s.request_body("ab", false)?, Action::Pause);
    assert_eq!(s.outcome(), Outcome::Paused);
    assert_eq!(s.request_body("c", true)?, Action::Continue);
    assert_eq!(s.outcome().forwarded_header("x-body-len").as_deref(), Some("3"));
    Ok(())
}

#[test]
fn headers_only_request() -> R {
    let lb = host!("", 1);
    let s = lb.request("GET", "/v1/models").start()?;
    assert!(matches!(s.outcome(), Outcome::Forwarded { .. }));
    assert_eq!(s.outcome().forwarded_header(":path").as_deref(), Some("/v1/models"));
    Ok(())
}

#[test]
fn local_response_ends_the_stream() -> R {
    let lb = host!("", 1);
    let s = lb.request("POST", "/x").header("x-local", "1").body("zzz").start()?;
    let Outcome::LocalResponse { status, headers, body, .. } = s.outcome() else {
        panic!("expected a local response: {:?}", s.outcome());
    };
    assert_eq!(status, 403);
    assert_eq!(body, b"denied");
    assert!(headers.contains(&("x-probe".into(), "local".into())));
    assert!(s.is_finished());
    assert!(lb.logged("code=403 upstream=none"));
    // The body was never delivered: the stream ended first.
    assert_eq!(lb.histogram("probe_body_size"), Some(vec![]));
    assert_eq!(s.request_body("more", true)?, Action::Skipped);
    s.finish()?; // no-op
    assert_eq!(lb.worker(0).live_streams(), 0);
    Ok(())
}

#[test]
fn ticks_release_held_requests_and_share_data() -> R {
    let lb = host!("tick=200", 2);
    let a = lb.worker(0).request("POST", "/x").body("hold").start()?;
    let b = lb.worker(1).request("POST", "/x").body("hold").start()?;
    assert_eq!(a.outcome(), Outcome::Paused);
    assert_eq!(b.outcome(), Outcome::Paused);
    assert_eq!(a.id(), 2);
    assert_eq!(b.id(), 2);
    lb.advance(Duration::from_millis(199))?;
    assert_eq!(a.outcome(), Outcome::Paused);
    lb.advance(Duration::from_millis(1))?;
    assert_eq!(a.outcome().forwarded_header("x-released-by-tick").as_deref(), Some("1"));
    assert_eq!(b.outcome().forwarded_header("x-released-by-tick").as_deref(), Some("1"));
    // Two workers, two ticks each after 400 ms; the shared counter saw all of them.
    lb.advance(Duration::from_millis(200))?;
    assert_eq!(lb.shared_data("ticks").map(|(v, _)| v), Some(4u64.to_le_bytes().to_vec()));
    assert_eq!(lb.shared_data("requests").map(|(v, _)| v), Some(2u64.to_le_bytes().to_vec()));
    assert!(lb.logged(&format!("tick 4 at {}", 1_764_000_000_000u64 + 400)));
    assert_eq!(lb.clock_ms(), 1_764_000_000_400);
    Ok(())
}

#[test]
fn http_calls_are_scripted() -> R {
    let lb = host!("tick=1000;probe=1", 1);
    lb.advance(Duration::from_secs(1))?;
    let calls = lb.pending_http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header(":path"), Some("/healthcheck"));
    assert_eq!(calls[0].upstream, "exo");
    lb.answer_http_call(calls[0].token, 200, &[("x-a", "b")], b"ok")?;
    assert!(lb.logged("answered: headers=2 status=200 body=ok"));
    assert_eq!(lb.shared_data("probe_status").map(|(v, _)| v), Some(b"200".to_vec()));
    assert!(lb.answer_http_call(calls[0].token, 200, &[], b"").is_err());
    // The next call times out after 2 s without an answer: Envoy reports 0 headers.
    lb.advance(Duration::from_secs(1))?;
    let token = lb.pending_http_calls()[0].token;
    lb.fail_http_call(token)?;
    assert!(lb.logged(&format!("call {token} answered: headers=0 status= body=")));
    lb.advance(Duration::from_millis(3500))?;
    assert!(lb.logs().iter().filter(|l| l.message.contains("headers=0")).count() >= 2);
    Ok(())
}

#[test]
fn trap_is_an_error_with_the_log_and_reload_recovers() -> R {
    let lb = host!("", 2);
    let held = lb.worker(0).request("POST", "/x").body("hold").start()?;
    let err =
        lb.worker(0).request("POST", "/x").header("x-panic", "1").start().err().expect("the panic must be an error");
    let text = format!("{err:#}");
    eprintln!("{text}");
    assert!(text.contains("probe panic on request headers"), "{text}");
    assert!(text.contains("vm started"), "{text}");
    assert!(lb.is_crashed(0));
    assert!(lb.worker(0).request("GET", "/").start().is_err());
    // Worker 1 is unaffected.
    lb.worker(1).request("GET", "/").start()?;
    lb.reload_worker(0)?;
    assert!(!lb.is_crashed(0));
    assert!(held.is_orphaned());
    held.finish()?; // the new VM never hears of it
    let s = lb.worker(0).request("GET", "/").start()?;
    assert!(matches!(s.outcome(), Outcome::Forwarded { .. }));
    // Shared data survived the reload (3 bodies: hold + 2 others? only the hold had a body).
    assert_eq!(lb.shared_data("requests").map(|(v, _)| v), Some(1u64.to_le_bytes().to_vec()));
    Ok(())
}

#[test]
fn unimplemented_import_fails_the_test_with_its_name() -> R {
    let lb = host!("", 1);
    assert!(lb.stubbed_imports().iter().any(|i| i.ends_with("proxy_grpc_call")));
    let err = lb.request("GET", "/").header("x-unimpl", "1").start().err().expect("must fail");
    let text = format!("{err:#}");
    assert!(text.contains("unimplemented import env::proxy_grpc_call called"), "{text}");
    Ok(())
}

#[test]
fn abort_runs_log_done_delete() -> R {
    let lb = host!("", 1);
    let s = lb.request("POST", "/x").body("hold").start()?;
    assert_eq!(lb.metric("probe_inflight"), Some(1));
    s.abort()?;
    assert!(s.is_finished());
    assert_eq!(lb.metric("probe_inflight"), Some(0));
    assert!(lb.logged("log 2: code=0 upstream=none"));
    Ok(())
}

#[test]
fn timing() -> R {
    let Some(path) = probe() else { return Ok(()) };
    let t = Instant::now();
    let lb = Host::load(&path, "", 2)?;
    let first = t.elapsed();
    let t = Instant::now();
    let lb2 = Host::load(&path, "", 2)?;
    let second = t.elapsed();
    let t = Instant::now();
    let n = 2000;
    for i in 0..n {
        let s = lb2.worker(i % 2).request("POST", "/v1/chat/completions").body(br#"{"model":"m1"}"#).start()?;
        s.respond(200, &[], b"data: x\n\n")?;
        s.finish()?;
    }
    let per_req = t.elapsed() / n as u32;
    eprintln!(
        "compile {:?} (first load incl. compile {:?}); load of 2 VMs from cache {:?}; one request {:?}",
        lb.compile_time(),
        first,
        second,
        per_req
    );
    Ok(())
}
