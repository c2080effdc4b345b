//! Smoke test: the real exo_lb.wasm links against the host (no missing imports), starts, and
//! handles one request end to end. Filter-behaviour tests live in their own files.

use wasm_host::Host;

const CONFIG: &str = r#"{"nodes": [
    {"name": "a", "address": "10.0.0.5:52415", "models": ["m1"]},
    {"name": "b", "address": "10.0.0.6:52415", "models": ["m1"]}
]}"#;

#[test]
fn real_filter_loads_and_routes_one_request() -> anyhow::Result<()> {
    let path = Host::wasm_path();
    let lb = Host::load(&path, CONFIG, 2)?;
    eprintln!("stubbed imports of exo_lb.wasm: {:?}", lb.stubbed_imports());
    eprintln!("compile time: {:?}", lb.compile_time());
    let s = lb
        .worker(1)
        .request("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(br#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#)
        .start()?;
    eprintln!("outcome: {:?}", s.outcome());
    eprintln!("endpoint header: {:?}", s.request_header("x-gateway-destination-endpoint"));
    if s.local_response().is_none() {
        s.respond(200, &[("content-type", "text/event-stream")], b"data: [DONE]\n\n")?;
    }
    s.finish()?;
    eprintln!("{}", lb.logs_text());

    let t = std::time::Instant::now();
    let n = 2000u32;
    for i in 0..n {
        let s = lb
            .worker(i as usize % 2)
            .request("POST", "/v1/chat/completions")
            .body(br#"{"model":"m1","messages":[]}"#)
            .start()?;
        if s.local_response().is_none() {
            s.respond(200, &[], b"data: [DONE]\n\n")?;
        }
        s.finish()?;
    }
    eprintln!("one request through exo_lb.wasm: {:?}", t.elapsed() / n);
    let t = std::time::Instant::now();
    let _again = Host::load(&path, CONFIG, 2)?;
    eprintln!("load of 2 VMs from the cached module: {:?}", t.elapsed());
    Ok(())
}
