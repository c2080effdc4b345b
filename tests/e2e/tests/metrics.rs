//! The filter's metrics as Prometheus scrapes them from the real Envoy.

use e2e::{Cluster, NodeSpec};
use exo_sim::Fault;
use serde_json::json;
use std::time::{Duration, Instant};

/// The value of the sample `name{labels}` in a Prometheus text page (labels in Envoy's order).
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_labelled_series() {
    let model = "qwen2.5-1.5b-instruct-rkllm";
    let c = Cluster::start(
        vec![NodeSpec::new("rk1", &[model]), NodeSpec::new("rk2", &[model]).with(|s| s.fault = Fault::Status(503))],
        json!({"model_switch_cost": "0s", "max_fails": 5}),
    )
    .await;
    let mut ok = 0;
    for _ in 0..6 {
        if c.chat(model, false).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(c.chat("not-a-configured-model", false).await.status, 404);
    let url = format!("http://{}/stats/prometheus", c.envoy.admin);
    // Histograms reach the admin page at Envoy's stats flush (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let page = loop {
        let page = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let flushed =
            sample(&page, &format!("exo_lb_request_duration_milliseconds_count{{node=\"rk1\",model=\"{model}\"}}"))
                .is_some_and(|v| v >= 1.0);
        if flushed || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let get = |series: &str| sample(&page, series).unwrap_or_else(|| panic!("no {series} in:\n{}", exo_lines(&page)));
    assert_eq!(get(&format!("exo_lb_requests_total{{node=\"rk1\",model=\"{model}\",status=\"2xx\"}}")), f64::from(ok));
    assert_eq!(
        get(&format!("exo_lb_requests_total{{node=\"rk2\",model=\"{model}\",status=\"5xx\"}}")),
        f64::from(6 - ok)
    );
    assert_eq!(get("exo_lb_node_failures_total{node=\"rk2\",reason=\"status\"}"), f64::from(6 - ok));
    assert_eq!(get("exo_lb_local_replies_total{code=\"model_not_found\"}"), 1.0);
    assert_eq!(get("exo_lb_node_up{node=\"rk1\"}"), 1.0);
    assert_eq!(get("exo_lb_node_inflight{node=\"rk1\"}"), 0.0);
    assert_eq!(get("exo_lb_queue_depth{}"), 0.0);
    assert!(get(&format!("exo_lb_request_duration_milliseconds_count{{node=\"rk1\",model=\"{model}\"}}")) >= 1.0);
    assert!(page.contains(&format!(
        "exo_lb_time_to_first_byte_milliseconds_bucket{{node=\"rk1\",model=\"{model}\",le=\"600000\"}}"
    )));
    // A model nobody configured never becomes a label value.
    assert!(!page.contains("not-a-configured-model"));
}

fn exo_lines(page: &str) -> String {
    page.lines().filter(|l| l.starts_with("exo_lb")).collect::<Vec<_>>().join("\n")
}
