//! `exo-sim`: run one simulated exo node (see the library docs for the behaviour).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use exo_sim::{parse_duration, Dialect, Fault, SimConfig, SimNode};

/// A simulated exo LLM node (RK3588, serial NPU, one model loaded at a time).
#[derive(Parser, Debug)]
#[command(name = "exo-sim", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:52415")]
    listen: SocketAddr,
    /// Node name, sent as `x-exo-node` and `system_fingerprint`.
    #[arg(long, default_value = "exo-sim")]
    name: String,
    /// Models the node can serve, comma separated; the first is loaded at start.
    #[arg(long, value_delimiter = ',', default_value = "qwen2.5-1.5b-instruct-rkllm")]
    models: Vec<String>,
    /// API dialect: old (aiohttp exo) or new (FastAPI exo).
    #[arg(long, default_value = "old")]
    dialect: Dialect,
    /// Decode speed.
    #[arg(long, default_value_t = 16.0)]
    tokens_per_second: f64,
    /// Prefill speed (prompt tokens = chars/4).
    #[arg(long, default_value_t = 60.0)]
    prefill_tokens_per_second: f64,
    /// Reply length when a request has no max_tokens.
    #[arg(long, default_value_t = 20)]
    reply_tokens: u32,
    /// Cost of switching to another served model, e.g. 500ms, 20s, 1m.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    switch_time: Duration,
    /// Models that load in another time, e.g. qwen2.5-3b-rkllm=45s (comma separated).
    #[arg(long, value_delimiter = ',', value_parser = parse_model_time)]
    switch_time_for: Vec<(String, Duration)>,
    /// Divide every simulated duration by this factor.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Keep the NPU busy until the reply would have finished when a client goes away.
    #[arg(long)]
    keep_generating_after_disconnect: bool,
    /// none | status:<code> | hang | die-mid-stream:<n> | slow:<factor> | refuse
    #[arg(long, default_value = "none")]
    fault: Fault,
    /// Do not log one line per request.
    #[arg(long)]
    quiet: bool,
}

/// `MODEL=DURATION`.
fn parse_model_time(s: &str) -> Result<(String, Duration), String> {
    let (model, time) = s.split_once('=').ok_or_else(|| format!("{s:?} is not MODEL=DURATION"))?;
    Ok((model.to_string(), parse_duration(time)?))
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    let cfg = SimConfig {
        name: a.name,
        models: a.models,
        dialect: a.dialect,
        tokens_per_second: a.tokens_per_second,
        prefill_tokens_per_second: a.prefill_tokens_per_second,
        reply_tokens: a.reply_tokens,
        switch_time: a.switch_time,
        switch_time_by_model: a.switch_time_for.into_iter().collect(),
        time_scale: a.time_scale,
        keep_generating_after_disconnect: a.keep_generating_after_disconnect,
        fault: a.fault,
        log_requests: !a.quiet,
    };
    let summary = format!(
        "dialect={} models={} tok/s={} prefill tok/s={} reply={} switch={:?} {:?} scale={} fault={}",
        cfg.dialect,
        cfg.models.join(","),
        cfg.tokens_per_second,
        cfg.prefill_tokens_per_second,
        cfg.reply_tokens,
        cfg.switch_time,
        cfg.switch_time_by_model,
        cfg.time_scale,
        cfg.fault
    );
    let name = cfg.name.clone();
    let node = match SimNode::start(a.listen, cfg).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("[exo-sim {name}] cannot start on {}: {e}", a.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!("[exo-sim {name}] listening on {} {summary}", node.addr());

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("[exo-sim {name}] cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("[exo-sim {name}] shutting down");
    node.shutdown().await;
    ExitCode::SUCCESS
}
