//! A backend that answers at once (for the overhead and scale benchmarks): any request gets a
//! small chat.completion. It listens on many loopback addresses, one per "node".

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use std::net::SocketAddr;
use tokio::task::JoinHandle;

const REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"qwen2.5-1.5b-instruct-rkllm","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;

pub struct FastBackend {
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

/// The i-th node address: 127.0.4.1, 127.0.4.2, ... (250 per /24).
pub fn node_addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 4 + (i / 250) as u8, 1 + (i % 250) as u8], port))
}

impl FastBackend {
    pub async fn start(n: usize, port: u16) -> Result<FastBackend, String> {
        let app =
            axum::Router::new().fallback(|| async { ([(CONTENT_TYPE, "application/json")], REPLY).into_response() });
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let addr = node_addr(i, port);
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("bind {addr}: {e}"))?;
            let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            addrs.push(addr);
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            }));
        }
        Ok(FastBackend { addrs, tasks })
    }
}

impl Drop for FastBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
