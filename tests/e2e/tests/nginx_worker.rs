//! What crashed or hung nginx workers in the trial of the unmodified filter (see
//! docs/nginx.md) cannot happen with this filter and the rendered configuration: a tick period
//! set again when requests start and stop waiting (it traps on nginx, and the module then
//! re-creates the instance in a loop), a request parked by Pause in the headers callback,
//! resuming a request from a tick (signal 11), and an empty `proxy_pass` address (signal 11).

use e2e::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queueing_errors_and_unrouted_paths_never_crash_an_nginx_worker() {
    if !host_available(Host::Nginx) {
        return;
    }
    let c =
        Cluster::start_on(Host::Nginx, vec![NodeSpec::new("a", &["m"])], json!({"queue": {"max_waiting": 8}})).await;
    // Requests that wait in the queue (so the filter would change its tick period), bodies
    // that the filter must read without pausing the headers, answers decided from a timer.
    for round in 0..3 {
        let replies = futures_util::future::join_all(
            (0..4).map(|_| c.post("/v1/chat/completions", chat_body("m", round % 2 == 0, 5), &[])),
        )
        .await;
        for r in &replies {
            assert_eq!(r.status, 200, "round {round}: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    // Paths and methods the filter routes at the headers stage or refuses.
    for path in ["/", "/v1/other", "/healthcheck", "/v1/models"] {
        let r = c.get(path).await;
        assert!(r.status < 500 || r.status == 503, "GET {path}: {r:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = c.envoy.log();
    for crash in ["exited on signal", "tick_period already set", "panicked", "trap"] {
        assert!(!log.contains(crash), "nginx's error log shows '{crash}':\n{log}");
    }
    // Still serving after all of it.
    let r = c.post("/v1/chat/completions", chat_body("m", false, 3), &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
}
