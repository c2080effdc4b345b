//! Replays a trace against a proxy with a real HTTP client and measures each request: time to
//! the first SSE data chunk (or the whole body when not streaming), end to end, tokens, status.
//! Also starts the simulated cluster.

use crate::systems::Backend;
use crate::trace::{Hardware, Req};
use exo_sim::{SimConfig, SimNode};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The request's index in the trace.
    #[allow(dead_code)]
    pub id: usize,
    pub ok: bool,
    /// HTTP status (0: no response).
    pub status: u16,
    /// Why it failed: "status 503", "cut stream", "client timeout", "connect: ...".
    pub error: Option<String>,
    /// Simulated seconds from the request's arrival.
    pub ttft: f64,
    pub e2e: f64,
    /// Simulated seconds from the start of the trace to the end of the request.
    pub end: f64,
    pub tokens: u32,
    #[allow(dead_code)]
    pub stream: bool,
    /// The node that answered, as exo-lb names it (`x-exo-lb-node`; None through nginx and
    /// plain Envoy).
    pub node: Option<String>,
}

pub fn body(req: &Req, model: &str) -> String {
    // The simulator counts prompt tokens as chars/4.
    let word = "lorem ipsum dolor sit amet ";
    let chars = req.prompt_tokens as usize * 4;
    let content: String = word.chars().cycle().take(chars).collect();
    json!({
        "model": model,
        "stream": req.stream,
        "max_tokens": req.max_tokens,
        "messages": [{"role": "user", "content": content}],
    })
    .to_string()
}

/// The simulated cluster: `hw.nodes` serial nodes on 127.0.2.11.. port 52415, every node able
/// to load every model (node i starts with model i mod models).
pub struct SimCluster {
    pub nodes: Vec<SimNode>,
}

impl SimCluster {
    pub async fn start(hw: &Hardware, models: &[String], scale: f64) -> Result<SimCluster, String> {
        let mut nodes = Vec::new();
        for i in 0..hw.nodes {
            let mut m: Vec<&str> = models.iter().map(String::as_str).collect();
            m.rotate_left(i % models.len());
            let mut cfg = SimConfig::rk3588(&format!("rk{}", i + 1), &m);
            cfg.tokens_per_second = hw.tokens_per_second;
            cfg.prefill_tokens_per_second = hw.prefill_tokens_per_second;
            cfg.switch_time = Duration::from_secs_f64(hw.node_switch_s(i));
            cfg.switch_time_by_model = models
                .iter()
                .enumerate()
                .map(|(j, name)| (name.clone(), Duration::from_secs_f64(hw.switch_s(i, j))))
                .collect();
            cfg.time_scale = scale;
            let addr = SocketAddr::from(([127, 0, 2, 11 + i as u8], 52415));
            nodes.push(SimNode::start(addr, cfg).await.map_err(|e| format!("start node {i} at {addr}: {e}"))?);
        }
        Ok(SimCluster { nodes })
    }

    pub fn backends(&self) -> Vec<Backend> {
        self.nodes
            .iter()
            .map(|n| Backend { name: n.name().to_string(), addr: n.addr(), models: n.models().to_vec() })
            .collect()
    }

    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// Sends every request of `trace` at its arrival time (simulated seconds / `scale`); gives up
/// on a request after `max_wait_s` simulated seconds.
pub async fn replay(url: &str, trace: &[Req], models: &[String], scale: f64, max_wait_s: f64) -> Vec<Outcome> {
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(1024).tcp_nodelay(true).build().expect("http client");
    let t0 = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for r in trace {
        let (client, url, r) = (client.clone(), url.to_string(), r.clone());
        let body = body(&r, &models[r.model]);
        tasks.push(tokio::spawn(async move {
            let at = t0 + Duration::from_secs_f64(r.at / scale);
            tokio::time::sleep_until(at.into()).await;
            let sent = Instant::now();
            let mut out = Outcome { id: r.id, stream: r.stream, ..Outcome::default() };
            let limit = Duration::from_secs_f64(max_wait_s / scale);
            match tokio::time::timeout(limit, one(&client, &url, body, r.stream, sent, scale, &mut out)).await {
                Ok(Ok(())) => out.ok = true,
                Ok(Err(e)) => out.error = Some(e),
                Err(_) => out.error = Some("client timeout".into()),
            }
            out.e2e = sent.elapsed().as_secs_f64() * scale;
            out.end = (Instant::now() - t0).as_secs_f64() * scale;
            out
        }));
    }
    let mut outs = Vec::new();
    for t in tasks {
        outs.push(t.await.unwrap_or_else(|e| Outcome { error: Some(format!("task: {e}")), ..Outcome::default() }));
    }
    outs
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    body: String,
    stream: bool,
    sent: Instant,
    scale: f64,
    out: &mut Outcome,
) -> Result<(), String> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("request failed: {}", short_error(&e)))?;
    out.status = resp.status().as_u16();
    out.node = resp.headers().get("x-exo-lb-node").and_then(|v| v.to_str().ok()).map(str::to_string);
    let since = |t: Instant| t.duration_since(sent).as_secs_f64() * scale;
    if out.status != 200 {
        let _ = resp.bytes().await;
        out.ttft = since(Instant::now());
        return Err(format!("status {}", out.status));
    }
    if !stream {
        let bytes = resp.bytes().await.map_err(|e| format!("cut body: {}", short_error(&e)))?;
        out.ttft = since(Instant::now());
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| "bad JSON body".to_string())?;
        out.tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32;
        if v["choices"][0]["finish_reason"] != "stop" {
            return Err("reply without finish_reason".into());
        }
        return Ok(());
    }
    let mut s = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut first = true;
    let mut finished = false;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|_| "cut stream".to_string())?;
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:") else { continue };
                if first {
                    out.ttft = since(Instant::now());
                    first = false;
                }
                let data = data.trim();
                if data == "[DONE]" {
                    finished = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data).map_err(|_| "bad SSE JSON".to_string())?;
                let c = &v["choices"][0];
                if c["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()) {
                    out.tokens += 1;
                }
                if c["finish_reason"] == "stop" {
                    finished = true;
                }
            }
        }
    }
    if !finished {
        return Err("stream ended without finish_reason".into());
    }
    Ok(())
}

fn short_error(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connect".into()
    } else if e.is_timeout() {
        "timeout".into()
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(x) = src {
            s = x.to_string();
            src = x.source();
        }
        s
    }
}
