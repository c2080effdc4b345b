//! The demo: three simulated exo nodes on 127.0.0.11-13:52415 serving different models, Envoy
//! with exo-lb on 127.0.0.1:8000, and a streamed answer through it. Stays up for you to try
//! (curl commands printed) until Ctrl-C when run from a terminal.

use e2e::{chat_body, Cluster, NodeSpec};
use futures_util::StreamExt;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

const SMALL: &str = "qwen2.5-1.5b-instruct-rkllm";
const LARGE: &str = "qwen2.5-3b-rkllm";
const R1: &str = "deepseek-r1-1.5b-rkllm";

#[tokio::main]
async fn main() {
    let listen: SocketAddr = std::env::var("EXO_LB_DEMO_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:8000".into())
        .parse()
        .expect("EXO_LB_DEMO_LISTEN is ip:port");
    let node = |name: &str, ip: u8, models: &[&str]| {
        NodeSpec::new(name, models).at(SocketAddr::from(([127, 0, 0, ip], 52415))).with(|c| {
            c.time_scale = 1.0;
            c.tokens_per_second = 16.0;
            c.reply_tokens = 24;
            c.log_requests = false;
        })
    };
    println!("Starting three simulated exo nodes and Envoy with exo-lb...");
    let cluster = Cluster::start_with(
        vec![node("rk1", 11, &[SMALL]), node("rk2", 12, &[SMALL, LARGE]), node("rk3", 13, &[LARGE, R1])],
        json!({"policy": "least_conn"}),
        300,
        Some(listen),
    )
    .await;
    for n in &cluster.nodes {
        println!("  node {} at {} (model loaded: {})", n.name(), n.addr(), n.stats().loaded_model);
    }
    println!("  exo-lb at http://{listen}  (Envoy admin at http://{})\n", cluster.envoy.admin);

    println!("A streamed answer from {SMALL} through the load balancer:");
    let resp = cluster
        .client
        .post(cluster.envoy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(SMALL, true, 24))
        .send()
        .await
        .expect("request through exo-lb");
    let served_by = resp.headers().get("x-exo-lb-node").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
    let mut body = resp.bytes_stream();
    let mut pending = String::new();
    print!("  ");
    while let Some(Ok(chunk)) = body.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
                let piece = v["choices"][0]["delta"]["content"]
                    .as_str()
                    .or(v["choices"][0]["message"]["content"].as_str())
                    .unwrap_or("");
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
        }
    }
    println!("\n  (served by {served_by})\n");

    println!("Routing by model:");
    for model in [SMALL, LARGE, R1, "llama-70b"] {
        let r = cluster.chat(model, false).await;
        let what = match r.node() {
            Some(n) => format!("served by {n}"),
            None => r.json()["error"]["message"].as_str().unwrap_or(&r.body).to_string(),
        };
        println!("  {model:<30} -> {} {what}", r.status);
    }
    let health = cluster.get("/healthcheck").await;
    println!("\nGET /healthcheck -> {} {}\n", health.status, health.body);

    if std::io::stdin().is_terminal() {
        println!("Try it yourself while this runs (Ctrl-C to stop):");
        println!("  curl -N http://{listen}/v1/chat/completions -H 'content-type: application/json' \\");
        println!("       -d '{{\"model\":\"{LARGE}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'");
        println!("  curl http://{listen}/healthcheck ; curl http://{listen}/v1/models");
        let _ = tokio::signal::ctrl_c().await;
    }
    println!("Stopping.");
}
