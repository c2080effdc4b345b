//! The JSON access log has what an operator needs, per request.

use e2e::{Cluster, NodeSpec};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_every_field() {
    let mut c = Cluster::start(vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("b", &["m1"])], json!({})).await;
    let b = c.node("b").addr().to_string();
    let dead = c.kill("a").await.to_string();
    // Until the filter learns that a is gone, requests sent there fail over to b.
    for _ in 0..4 {
        let r = c.chat("m1", true).await;
        assert_eq!((r.status, r.node().as_deref()), (200, Some("b")), "{}", r.body);
    }
    let log = c.envoy.access_log_lines(4).await;
    assert_eq!(log.len(), 4, "{log:?}");
    for line in &log {
        let fields: Vec<&str> = line.as_object().unwrap().keys().map(String::as_str).collect();
        for f in [
            "time",
            "client",
            "method",
            "path",
            "model",
            "node",
            "upstream",
            "status",
            "flags",
            "details",
            "bytes_in",
            "bytes_out",
            "ttfb_ms",
            "duration_ms",
            "attempts",
            "request_id",
        ] {
            assert!(fields.contains(&f), "{f} missing: {line}");
        }
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
        assert_eq!(line["client"], "127.0.0.1");
        assert_eq!((line["method"].as_str(), line["path"].as_str()), (Some("POST"), Some("/v1/chat/completions")));
        assert_eq!((line["model"].as_str(), line["node"].as_str()), (Some("m1"), Some("b")));
        assert_eq!(line["upstream"].as_str(), Some(b.as_str()), "the address actually used");
        assert_eq!(line["status"], 200);
        assert!(line["bytes_in"].as_u64().unwrap() > 0 && line["bytes_out"].as_u64().unwrap() > 0);
        let (ttfb, duration) = (line["ttfb_ms"].as_u64().unwrap(), line["duration_ms"].as_u64().unwrap());
        assert!(ttfb <= duration, "{line}");
        assert!(!line["request_id"].as_str().unwrap().is_empty());
    }
    let retried: Vec<_> = log.iter().filter(|l| l["attempts"] == 2).collect();
    assert!(!retried.is_empty(), "a request first sent to {dead} was retried on b: {log:?}");
    assert!(log.iter().all(|l| l["attempts"] == 1 || l["attempts"] == 2));
}
