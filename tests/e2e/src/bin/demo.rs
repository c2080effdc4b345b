//! The demo: three simulated exo nodes serving different models (127.0.0.11-13:52415, or the
//! next free loopback addresses), Envoy with exo-lb on 127.0.0.1:8000, a streamed answer through
//! it, how each model is routed and what the balancer learned. Stays up for you to try (curl
//! commands printed) until Ctrl-C when run from a terminal. Logs go to .run/demo/ and stay.

use e2e::{chat_body, root, Cluster, NodeSpec, Placement};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SMALL: &str = "qwen2.5-1.5b-instruct-rkllm";
const LARGE: &str = "qwen2.5-3b-rkllm";
const R1: &str = "deepseek-r1-1.5b-rkllm";
/// What loading another model costs on these simulated nodes (about 30 s on a real RK3588).
const SWITCH: &str = "1.5s";
const SWITCH_TIME: Duration = Duration::from_millis(1500);

const NODES_ENV: &str = "EXO_LB_DEMO_NODES_BASE";
const LISTEN_ENV: &str = "EXO_LB_DEMO_LISTEN";
const USAGE: &str = "\
usage: exo-lb-demo [--nodes-base IP[:PORT]] [--listen IP:PORT]

  --nodes-base IP[:PORT]  the three nodes listen on IP, IP+1 and IP+2 (port 52415 unless given;
                          port 0 picks free ports). Also EXO_LB_DEMO_NODES_BASE. Default: the
                          first free of 127.0.0.11-13:52415, 127.0.0.14-16:52415, ...
  --listen IP:PORT        exo-lb's public listener. Also EXO_LB_DEMO_LISTEN. Default:
                          127.0.0.1:8000, or a free port if that is taken.

Logs (Envoy's access log and its own log) go to .run/demo/ and stay there.";

/// What the user asked for; `None` means the default (with fallbacks when it is taken).
struct Args {
    nodes_base: Option<SocketAddrV4>,
    listen: Option<SocketAddr>,
}

fn parse_nodes_base(text: &str, from: &str) -> Result<SocketAddrV4, String> {
    let text = text.trim();
    text.parse::<SocketAddrV4>()
        .or_else(|_| text.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, 52415)))
        .map_err(|_| format!("{from}: '{text}' is not an IPv4 address, or IPv4:port (e.g. 127.0.0.21)"))
}

fn parse_listen(text: &str, from: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| format!("{from}: '{text}' is not an ip:port (e.g. 127.0.0.1:8001)"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { nodes_base: None, listen: None };
    if let Ok(v) = std::env::var(NODES_ENV) {
        args.nodes_base = Some(parse_nodes_base(&v, NODES_ENV)?);
    }
    if let Ok(v) = std::env::var(LISTEN_ENV) {
        args.listen = Some(parse_listen(&v, LISTEN_ENV)?);
    }
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or(format!("{flag} needs a value\n\n{USAGE}"));
        match flag.as_str() {
            "--nodes-base" => args.nodes_base = Some(parse_nodes_base(&value()?, "--nodes-base")?),
            "--listen" => args.listen = Some(parse_listen(&value()?, "--listen")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'\n\n{USAGE}")),
        }
    }
    Ok(args)
}

/// Whether nothing listens on `addr` (port 0: always).
fn free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

fn why_taken(addr: SocketAddr) -> String {
    match TcpListener::bind(addr) {
        Ok(_) => "free".into(),
        Err(e) => e.to_string(),
    }
}

/// The three node addresses from `base` on (IP, IP+1, IP+2, same port).
fn triple(base: SocketAddrV4) -> Option<[SocketAddr; 3]> {
    let ip = u32::from(*base.ip());
    let at = |k: u32| ip.checked_add(k).map(|i| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(i), base.port())));
    Some([at(0)?, at(1)?, at(2)?])
}

fn range(addrs: &[SocketAddr; 3]) -> String {
    let [a, _, c] = addrs;
    match (a, c) {
        (SocketAddr::V4(a), SocketAddr::V4(c)) if a.port() == c.port() => {
            let last = c.ip().octets()[3];
            format!("{}-{last}:{}", a.ip(), a.port())
        }
        _ => format!("{a}..{c}"),
    }
}

/// The first three free loopback addresses on port 52415 from 127.0.0.11 on (in steps of three).
fn first_free_triple() -> Option<[SocketAddr; 3]> {
    (11..=250u8)
        .step_by(3)
        .filter_map(|first| triple(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, first), 52415)))
        .find(|addrs| addrs.iter().all(|a| free(*a)))
}

/// The node addresses: as asked (an error naming the taken one and the way out), or the first
/// free triple from 127.0.0.11.
fn node_addresses(asked: Option<SocketAddrV4>) -> Result<[SocketAddr; 3], String> {
    if let Some(base) = asked {
        let addrs = triple(base).ok_or(format!("--nodes-base {base}: no room for three addresses"))?;
        if let Some(taken) = addrs.iter().find(|a| !free(**a)) {
            let other = first_free_triple().map(|[a, _, _]| a.ip().to_string()).unwrap_or("127.0.0.11:0".into());
            return Err(format!(
                "{taken} is taken ({}), so node {} cannot listen there.\n\
                 Way out: another base, e.g. `scripts/demo.sh --nodes-base {other}` (or {NODES_ENV}={other}), \
                 port 0 for free ports (`--nodes-base 127.0.0.11:0`), no --nodes-base to let the demo choose, \
                 or stop the program that listens there (`ss -ltnp 'sport = :{}'` names it).",
                why_taken(*taken),
                ["rk1", "rk2", "rk3"][addrs.iter().position(|a| a == taken).unwrap_or(0)],
                taken.port()
            ));
        }
        return Ok(addrs);
    }
    let default = triple(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 52415)).ok_or("no default")?;
    if let Some(taken) = default.iter().find(|a| !free(**a)) {
        if let Some(addrs) = first_free_triple() {
            println!(
                "Note: {taken} is taken ({}): the nodes use {} instead \
                 (--nodes-base IP[:PORT] or {NODES_ENV} chooses).",
                why_taken(*taken),
                range(&addrs)
            );
            return Ok(addrs);
        }
        let addrs = triple(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 0)).ok_or("no default")?;
        println!("Note: {taken} is taken, and so is port 52415 on 127.0.0.14-250: the nodes use free ports.");
        return Ok(addrs);
    }
    Ok(default)
}

/// `preferred` when free, else a free port on the same address (saying so).
fn preferred_or_free(what: &str, preferred: SocketAddr) -> SocketAddr {
    if free(preferred) {
        return preferred;
    }
    let any = SocketAddr::new(preferred.ip(), e2e::free_port(preferred.ip()));
    println!("Note: {preferred} is taken ({}): {what} uses {any} instead.", why_taken(preferred));
    any
}

fn relative(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    path.strip_prefix(&cwd).map(|p| p.display().to_string()).unwrap_or_else(|_| path.display().to_string())
}

fn main() -> ExitCode {
    // A failure is a message, not a backtrace: the harness's panics (Envoy did not start, ...)
    // carry what went wrong and Envoy's log.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or(info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unexpected failure");
        eprintln!("exo-lb-demo: {msg}\n(logs in .run/demo/)");
    }));
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("exo-lb-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("exo-lb-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exo-lb-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: Args) -> Result<(), String> {
    let addrs = node_addresses(args.nodes_base)?;
    let listen = match args.listen {
        Some(l) if !free(l) => {
            return Err(format!(
                "{l} is taken ({}), so exo-lb cannot listen there.\n\
                 Way out: another address, e.g. `scripts/demo.sh --listen 127.0.0.1:8001` (or {LISTEN_ENV}=127.0.0.1:8001).",
                why_taken(l)
            ))
        }
        Some(l) => l,
        None => preferred_or_free("exo-lb", SocketAddr::from(([127, 0, 0, 1], 8000))),
    };
    let dir: PathBuf = root().join(".run/demo");
    let placement = Placement {
        listen: Some(listen),
        admin: Some(preferred_or_free("Envoy's admin interface", SocketAddr::from(([127, 0, 0, 1], 9901)))),
        status: Some(preferred_or_free("the status page", SocketAddr::from(([127, 0, 0, 1], 8080)))),
        dir: Some(dir.clone()),
    };
    let specs: Vec<NodeSpec> = [("rk1", &[SMALL][..]), ("rk2", &[SMALL, LARGE][..]), ("rk3", &[LARGE, R1][..])]
        .iter()
        .zip(addrs)
        .map(|((name, models), addr)| {
            // Each node is told what it has loaded at start (its first model): the filter's
            // `loaded` hint. Without it the balancer would learn it from its own traffic.
            NodeSpec::new(name, models).at(addr).extra(json!({"loaded": models.first()})).with(|c| {
                c.time_scale = 1.0;
                c.tokens_per_second = 16.0;
                c.reply_tokens = 24;
                c.switch_time = SWITCH_TIME;
                c.log_requests = false;
            })
        })
        .collect();

    println!("Starting three simulated exo nodes and Envoy with exo-lb...");
    // model_switch_cost is learned from traffic ("auto"); the configured value is only where it
    // starts.
    let options = json!({"policy": "least_conn", "model_switch_cost": SWITCH});
    let cluster = Cluster::try_start_placed(specs, options, 300, &placement).await.map_err(|e| {
        format!(
            "{e}\nWay out: `scripts/demo.sh --nodes-base 127.0.0.21` (or {NODES_ENV}=127.0.0.21) puts the nodes elsewhere."
        )
    })?;
    let envoy = &cluster.envoy;
    for n in &cluster.nodes {
        println!(
            "  node {} at {:<17} serves {:<50} (loaded at start: {})",
            n.name(),
            n.addr().to_string(),
            n.models().join(", "),
            n.stats().loaded_model
        );
    }
    println!("  exo-lb       http://{}", envoy.listen);
    println!("  status page  http://{}/status   (the balancer's view of the nodes)", envoy.status);
    println!("  Envoy admin  http://{}   (e.g. /stats/prometheus)", envoy.admin);
    println!(
        "  logs         {} (access log, one JSON line per request), {} (Envoy's log)",
        relative(&envoy.access_log_path()),
        relative(&envoy.log_path())
    );
    println!(
        "\nexo-lb is told which model each node has loaded at start (each node's `loaded` in its\n\
         configuration; without it, it learns that from the requests it sends). For a model it picks\n\
         a free node where the model is warm, and makes a node switch models only when the queued\n\
         work for that model would wait longer than the switch (which it measures: about 1.5 s here,\n\
         30 s or more on a real board) plus the cost of evicting what the node has loaded.\n"
    );

    println!("A streamed answer from {SMALL} through the load balancer:");
    let resp = cluster
        .client
        .post(envoy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(SMALL, true, 24))
        .send()
        .await
        .map_err(|e| format!("request through exo-lb at {}: {e}", envoy.listen))?;
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
            if let Ok(v) = serde_json::from_str::<Value>(data) {
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

    println!("Routing by model (two requests each, one after the other):");
    for model in [SMALL, LARGE, R1, "llama-70b"] {
        let mut line = String::new();
        for _ in 0..2 {
            let before: Vec<String> = cluster.nodes.iter().map(|n| n.stats().loaded_model).collect();
            let started = Instant::now();
            let r = cluster.chat(model, false).await;
            let took = started.elapsed();
            let Some(node) = r.node() else {
                line = format!("{} {}", r.status, r.json()["error"]["message"].as_str().unwrap_or(&r.body));
                break;
            };
            let i = cluster.nodes.iter().position(|n| n.name() == node);
            let had = i.and_then(|i| before.get(i)).cloned().unwrap_or_default();
            let what = if had == model {
                format!("{node} (had it loaded, {} ms)", took.as_millis())
            } else {
                format!("{node} (had {had} loaded: switched, {} ms)", took.as_millis())
            };
            line = if line.is_empty() { format!("{} {what}", r.status) } else { format!("{line}, then {what}") };
        }
        println!("  {model:<28} -> {line}");
    }

    println!("\nWhat the balancer learned (GET http://{}/status) and what the nodes have:", envoy.status);
    let status = reqwest::get(format!("http://{}/status", envoy.status))
        .await
        .map_err(|e| format!("status page: {e}"))?
        .json::<Value>()
        .await
        .map_err(|e| format!("status page: {e}"))?;
    println!(
        "  {:<5} {:<30} {:<30} {:>9} {:>9}",
        "node", "warm model (balancer)", "loaded (node)", "switches", "(node)"
    );
    for n in &cluster.nodes {
        let seen = status["nodes"].as_array().and_then(|a| a.iter().find(|v| v["name"] == n.name()));
        let field = |k: &str| seen.map(|v| v[k].clone()).unwrap_or(Value::Null);
        let warm = field("warm_model").as_str().unwrap_or("(none yet)").to_string();
        let switches = field("model_switches").as_u64().map(|v| v.to_string()).unwrap_or("?".into());
        let stats = n.stats();
        println!(
            "  {:<5} {:<30} {:<30} {:>9} {:>9}",
            n.name(),
            warm,
            stats.loaded_model,
            switches,
            stats.model_switches
        );
    }
    println!("  (the balancer counts a switch only where it knew the model before; the nodes count every one)");
    let health = cluster.get("/healthcheck").await;
    println!("\nGET /healthcheck -> {} {}\n", health.status, health.body);

    let logs = relative(&dir);
    if std::io::stdin().is_terminal() {
        let listen = envoy.listen;
        println!("Try it yourself while this runs (Ctrl-C to stop):");
        println!("  curl -N http://{listen}/v1/chat/completions -H 'content-type: application/json' \\");
        println!("       -d '{{\"model\":\"{R1}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'");
        println!("  curl http://{listen}/healthcheck ; curl http://{listen}/v1/models");
        println!("  curl http://{}/status          # warm models, in-flight, failures", envoy.status);
        println!("  tail -f {}            # one JSON line per request", relative(&envoy.access_log_path()));
        let _ = tokio::signal::ctrl_c().await;
    }
    println!("Stopping. The logs stay in {logs}/.");
    Ok(())
}
