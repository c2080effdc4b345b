//! What `deploy/` ships: the docker-compose demo (brought up for real where docker runs), the
//! Prometheus scrape configuration (used by a real Prometheus where one is installed) and the
//! Grafana dashboard. The tests that need docker or Prometheus skip, saying so on stderr, where
//! they are missing.

use e2e::{chat_body, free_port, root, Cluster, NodeSpec};
use exo_lb_ctl::{render, RenderOptions, TEMPLATE};
use exo_sim::{SimConfig, SimNode};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The metrics the filter defines (the README's list); histograms without their suffixes.
const FILTER_METRICS: &[&str] = &[
    "exo_lb_requests_total",
    "exo_lb_node_failures_total",
    "exo_lb_local_replies_total",
    "exo_lb_queued_total",
    "exo_lb_model_switches_total",
    "exo_lb_upstream_mismatch_total",
    "exo_lb_reclaimed_inflight_total",
    "exo_lb_node_up",
    "exo_lb_node_inflight",
    "exo_lb_queue_depth",
    "exo_lb_queue_oldest_wait_milliseconds",
    "exo_lb_request_duration_milliseconds",
    "exo_lb_time_to_first_byte_milliseconds",
    "exo_lb_queue_wait_milliseconds",
    // What the scheduler learned (the other learned gauges are on the status page and in the
    // README, not on the dashboard).
    "exo_lb_model_demand_millinodes",
    "exo_lb_model_switch_milliseconds",
];
const HISTOGRAMS: &[&str] = &[
    "exo_lb_request_duration_milliseconds",
    "exo_lb_time_to_first_byte_milliseconds",
    "exo_lb_queue_wait_milliseconds",
    "rkllm_model_load_duration_seconds",
];
const SMALL: &str = "qwen2.5-1.5b-instruct-rkllm";
/// The compose network (deploy/docker-compose.yaml).
const SUBNET: &str = "172.28.87.0/24";

/// Says on the test's real stderr (not captured by the harness) why a test did not run.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "\nSKIPPED {test}: {why}");
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Whether `program args` runs and exits 0.
fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Runs `cmd`, killing it after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| {
            panic!("cannot run {what}: {e}");
        });
    // Read the pipes while it runs, so that a chatty command does not block on them.
    let out = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let err = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Output { status, stdout: join(out), stderr: join(err) }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

// ------------------------------------------------------------------------------------------------
// The compose demo's configuration.

/// `docker-compose` (v1) or the `docker compose` plugin, whichever is installed.
fn compose_command() -> Option<Vec<String>> {
    if on_path("docker-compose").is_some() && succeeds("docker-compose", &["version"]) {
        return Some(vec!["docker-compose".into()]);
    }
    if on_path("docker").is_some() && succeeds("docker", &["compose", "version"]) {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    None
}

fn compose(base: &[String], project: &str, env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(&base[0]);
    cmd.args(&base[1..])
        .arg("-f")
        .arg(deploy("docker-compose.yaml"))
        .args(["-p", project])
        .args(args)
        .current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// The lines of the compose file's service `name` (its key at two spaces and what is indented
/// under it).
fn service_block<'a>(file: &'a str, name: &str) -> &'a str {
    let key = format!("\n  {name}:\n");
    let start = file.find(&key).unwrap_or_else(|| panic!("no service {name} in deploy/docker-compose.yaml")) + 1;
    let body = &file[start + key.len() - 1..];
    let end = body
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| {
            body[i..].starts_with(|c: char| c != ' ' && c != '\n')
                || body[i..].starts_with("  ") && !body[i..].starts_with("   ")
        })
        .unwrap_or(body.len());
    &file[start..start + key.len() - 1 + end]
}

/// deploy/exo-lb.json renders with the production template, and its nodes are the compose
/// file's containers, at the addresses the compose network gives them.
#[test]
fn compose_nodes_match_the_filter_config() {
    let json_path = deploy("exo-lb.json");
    let config: Value = serde_json::from_str(&read(&json_path)).expect("deploy/exo-lb.json is JSON");
    let yaml = render(
        TEMPLATE,
        &RenderOptions {
            listen: "0.0.0.0:8000".parse().unwrap(),
            admin: "0.0.0.0:9901".parse().unwrap(),
            status: "0.0.0.0:8080".parse().unwrap(),
            wasm_path: "/etc/exo-lb/exo_lb.wasm".into(),
            filter_config: read(&json_path),
            source: "deploy/exo-lb.json".into(),
            ..RenderOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("deploy/exo-lb.json does not render: {e}"));
    let compose_file = read(&deploy("docker-compose.yaml"));
    let prometheus = read(&deploy("prometheus.yml"));
    let nodes = config["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        let name = node["name"].as_str().unwrap();
        let addr: SocketAddr = node["address"].as_str().unwrap().parse().unwrap();
        assert_eq!(addr.port(), 52415);
        assert!(yaml.contains(&format!("address: \"{}\", port_value: 52415", addr.ip())), "{name} not an endpoint");
        // The service of that name listens on 52415 at that address, serving those models.
        let service = service_block(&compose_file, name);
        assert!(service.contains(&format!("ipv4_address: {}", addr.ip())), "{name}: not at {}:\n{service}", addr.ip());
        assert!(service.contains(&format!("\"--name\", \"{name}\"")), "{name}: --name");
        assert!(service.contains("\"0.0.0.0:52415\""), "{name}: --listen");
        let models: Vec<&str> = node["models"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        assert!(service.contains(&format!("\"--models\", \"{}\"", models.join(","))), "{name}: --models {models:?}");
        assert!(prometheus.contains(&format!("\"{name}:52415\"")), "prometheus.yml does not scrape {name}");
    }
    assert!(compose_file.contains(&format!("subnet: {SUBNET}")));
    assert!(prometheus.contains("\"envoy:9901\"") && prometheus.contains("/stats/prometheus"));
}

/// `docker-compose config` accepts the compose file (with and without the Grafana profile).
#[test]
fn compose_config_passes() {
    let Some(base) = compose_command() else {
        skip("compose_config_passes", "neither docker-compose nor `docker compose` is installed");
        return;
    };
    for args in [&["config", "-q"][..], &["--profile", "grafana", "config", "-q"][..]] {
        let out = run(&mut compose(&base, "exo-lb-config-check", &[], args), Duration::from_secs(60));
        assert!(out.status.success(), "{base:?} {args:?} failed:\n{}", text(&out));
    }
}

// ------------------------------------------------------------------------------------------------
// The docker-compose demo, for real.

/// Takes the stack down (also when the test fails), printing its logs on failure.
struct Stack {
    base: Vec<String>,
    project: String,
    env: Vec<(&'static str, String)>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = run(
                &mut compose(&self.base, &self.project, &self.env, &["logs", "--tail", "40"]),
                Duration::from_secs(60),
            );
            eprintln!("--- compose logs ---\n{}", text(&logs));
        }
        let out = run(
            &mut compose(
                &self.base,
                &self.project,
                &self.env,
                &["--profile", "grafana", "down", "-v", "--remove-orphans"],
            ),
            Duration::from_secs(120),
        );
        if !out.status.success() {
            eprintln!("docker-compose down failed:\n{}", text(&out));
        }
    }
}

/// Why docker cannot run the demo here, if it cannot.
fn docker_unavailable() -> Option<String> {
    if on_path("docker").is_none() {
        return Some("docker is not installed (Debian: apt-get install docker.io docker-compose)".into());
    }
    if !succeeds("docker", &["info"]) {
        let log = root().join(".run/dockerd.log");
        let tail = std::fs::read_to_string(&log)
            .map(|t| {
                let lines: Vec<&str> = t.lines().collect();
                format!("; {} ends:\n    {}", log.display(), lines[lines.len().saturating_sub(5)..].join("\n    "))
            })
            .unwrap_or_default();
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"].iter().any(|p| Path::new(p).exists())
            || on_path("dockerd").is_some();
        return Some(if dockerd {
            format!(
                "the docker daemon is not running or not reachable (scripts/install-deploy-deps.sh starts it){tail}"
            )
        } else {
            "only a docker client is installed, no daemon (Debian: apt-get install docker.io; scripts/install-deploy-deps.sh does)"
                .into()
        });
    }
    if compose_command().is_none() {
        return Some(
            "neither docker-compose nor `docker compose` is installed (Debian: apt-get install docker-compose)".into(),
        );
    }
    if !root().join(".venv/bin/envoy").exists() {
        return Some("no Envoy in .venv: run scripts/setup.sh".into());
    }
    // A demo already up holds the compose network's subnet.
    let names = Command::new("docker").args(["network", "ls", "-q"]).output().map(|o| o.stdout).unwrap_or_default();
    for id in String::from_utf8_lossy(&names).split_whitespace() {
        let subnets = Command::new("docker")
            .args(["network", "inspect", "-f", "{{.Name}} {{range .IPAM.Config}}{{.Subnet}} {{end}}", id])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        if subnets.split_whitespace().any(|s| s == SUBNET) {
            return Some(format!(
                "docker network {} already uses {SUBNET} (is the demo up? scripts/docker-demo.sh down)",
                subnets.split_whitespace().next().unwrap_or(id)
            ));
        }
    }
    None
}

/// Builds the images with scripts/docker-demo.sh, starts the stack under its own project name
/// and ports, streams a chat completion through the published port, sees Prometheus (in the
/// stack) scrape the balancer, and tears it all down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_compose_demo_streams() {
    if let Some(why) = docker_unavailable() {
        skip("docker_compose_demo_streams", &why);
        return;
    }
    // Not beside the harness's other tests: the build and the stack take both cores.
    let _serial = e2e::serial();
    let started = Instant::now();
    let base = compose_command().expect("compose");
    // Builds nothing that is already built; installs nothing that the checks above did not find.
    // The test build's exo-sim and exo-lb-ctl where `cargo test --workspace` made them (for
    // their integration tests): building them again for the image took two minutes.
    let built = |name: &str| Some(root().join("target/debug").join(name)).filter(|p| p.is_file());
    let prebuilt: Vec<(&str, PathBuf)> = [("EXO_LB_SIM", "exo-sim"), ("EXO_LB_CTL", "exo-lb-ctl")]
        .into_iter()
        .filter_map(|(var, name)| built(name).map(|p| (var, p)))
        .collect();
    let build = tokio::task::spawn_blocking(move || {
        run(
            Command::new("bash")
                .arg(root().join("scripts/docker-demo.sh"))
                .arg("build")
                .envs(prebuilt)
                .current_dir(root()),
            Duration::from_secs(900),
        )
    })
    .await
    .expect("build");
    assert!(build.status.success(), "scripts/docker-demo.sh build failed:\n{}", text(&build));
    let build_time = started.elapsed();
    let services = read(&deploy("build/services"));
    let services: Vec<&str> = services.split_whitespace().collect();

    let ip = [127, 0, 0, 1];
    let (http, admin, status, prom) = (free_port(ip), free_port(ip), free_port(ip), free_port(ip));
    let stack = Stack {
        base,
        project: format!("exo-lb-test-{}", std::process::id()),
        env: vec![
            ("EXO_LB_HTTP_PORT", http.to_string()),
            ("EXO_LB_ADMIN_PORT", admin.to_string()),
            ("EXO_LB_STATUS_PORT", status.to_string()),
            ("EXO_LB_PROMETHEUS_PORT", prom.to_string()),
            ("EXO_LB_BIND", "127.0.0.1".into()),
        ],
    };
    let mut args = vec!["up", "-d", "--no-build"];
    args.extend(&services);
    let up = run(&mut compose(&stack.base, &stack.project, &stack.env, &args), Duration::from_secs(180));
    assert!(up.status.success(), "docker-compose up failed:\n{}", text(&up));

    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = client.get(format!("http://127.0.0.1:{admin}/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "Envoy in the stack not ready after 90 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A streamed chat completion through the published port.
    let resp = client
        .post(format!("http://127.0.0.1:{http}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(SMALL, true, 8))
        .send()
        .await
        .expect("request through the stack");
    assert_eq!(resp.status(), 200);
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(header("content-type").starts_with("text/event-stream"), "content-type {}", header("content-type"));
    let node = header("x-exo-lb-node");
    assert!(node == "rk1" || node == "rk2", "{SMALL} served by '{node}', not a node that has it");
    let mut chunks = 0;
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        chunks += 1;
        body.push_str(&String::from_utf8_lossy(&chunk.expect("stream")));
    }
    let events: Vec<&str> = body.split("\n\n").filter_map(|e| e.trim().strip_prefix("data: ")).collect();
    // exo's (older) dialect, as the nodes run: no `[DONE]`; the last chunk has a finish_reason.
    assert!(events.len() >= 8, "8 tokens expected:\n{body}");
    let last: Value = serde_json::from_str(events[events.len() - 1]).expect("an SSE chunk is JSON");
    assert!(last["choices"][0]["finish_reason"].is_string(), "the stream did not finish:\n{body}");
    let first: Value = serde_json::from_str(events[0]).expect("an SSE chunk is JSON");
    assert_eq!(first["system_fingerprint"], json!(node), "{body}");
    assert!(chunks >= 2, "the answer came in {chunks} read(s): not streamed");

    // The balancer's own endpoints and metrics, through the published ports.
    let health: Value =
        client.get(format!("http://127.0.0.1:{http}/healthcheck")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["nodes"]["total"], 3, "{health}");
    let page =
        client.get(format!("http://127.0.0.1:{admin}/stats/prometheus")).send().await.unwrap().text().await.unwrap();
    assert!(
        page.contains(&format!("exo_lb_requests_total{{node=\"{node}\",model=\"{SMALL}\",status=\"2xx\"}} 1")),
        "{}",
        page.lines().filter(|l| l.starts_with("exo_lb")).collect::<Vec<_>>().join("\n")
    );

    // Prometheus in the stack scrapes Envoy (by its service name) and the nodes.
    if services.contains(&"prometheus") {
        let series = wait_for_series(&client, prom, "exo_lb_requests_total", Duration::from_secs(60)).await;
        assert!(series.iter().any(|m| m["node"] == json!(node) && m["model"] == json!(SMALL)), "{series:?}");
        wait_for(&client, prom, "exo_tokens_per_second", Duration::from_secs(30), |s| node_labels(s).len() == 3).await;
    } else {
        skip("docker_compose_demo_streams (Prometheus part)", "no prometheus binary to build its image from");
    }
    drop(stack);
    let _ = writeln!(
        std::io::stderr(),
        "docker_compose_demo_streams: build {:.0?}, total {:.0?}",
        build_time,
        started.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------
// A real Prometheus with the shipped scrape configuration.

/// A process killed (and its directory removed) when dropped.
struct Proc {
    child: Child,
    dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- prometheus log ---\n{}",
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The label sets of the series `query` returns, once they satisfy `done` (bounded by `limit`).
async fn wait_for(
    client: &reqwest::Client,
    port: u16,
    query: &str,
    limit: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    loop {
        if let Ok(r) =
            client.get(format!("http://127.0.0.1:{port}/api/v1/query")).query(&[("query", query)]).send().await
        {
            last = r.json().await.unwrap_or(Value::Null);
            let series: Vec<Value> =
                last["data"]["result"].as_array().into_iter().flatten().map(|s| s["metric"].clone()).collect();
            if !series.is_empty() && done(&series) {
                return series;
            }
        }
        assert!(Instant::now() < deadline, "Prometheus: {query} not as expected after {limit:?}: {last}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The label sets of the series `query` returns, once it returns some (bounded by `limit`).
async fn wait_for_series(client: &reqwest::Client, port: u16, query: &str, limit: Duration) -> Vec<Value> {
    wait_for(client, port, query, limit, |_| true).await
}

/// The `node` labels among `series`.
fn node_labels(series: &[Value]) -> BTreeSet<String> {
    series.iter().filter_map(|m| m["node"].as_str()).map(String::from).collect()
}

/// deploy/prometheus.yml with the targets of this machine: Envoy's admin and the nodes.
fn scrape_config_for(admin: SocketAddr, nodes: &[SocketAddr]) -> String {
    let shipped = read(&deploy("prometheus.yml"));
    assert!(shipped.contains("\"envoy:9901\""), "deploy/prometheus.yml no longer scrapes envoy:9901");
    let targets = nodes.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    let mut replaced_nodes = false;
    let config: String = shipped
        .replace("\"envoy:9901\"", &format!("\"{admin}\""))
        .lines()
        .map(|l| {
            if l.contains("\"rk1:52415\"") {
                replaced_nodes = true;
                let start = l.find('[').expect("targets list");
                format!("{}[{targets}]\n", &l[..start])
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(replaced_nodes, "deploy/prometheus.yml no longer lists rk1:52415");
    config
}

/// A real Prometheus, with the shipped scrape configuration pointed at a running cluster, finds
/// the filter's labelled series and the nodes' metrics, and can evaluate every query of the
/// Grafana dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_the_balancer() {
    let Some(prometheus) = on_path("prometheus") else {
        skip("real_prometheus_scrapes_the_balancer", "no `prometheus` binary (Debian: apt-get install prometheus)");
        return;
    };
    let started = Instant::now();
    if on_path("promtool").is_some() {
        let out = run(
            Command::new("promtool").arg("check").arg("config").arg(deploy("prometheus.yml")),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "promtool rejects deploy/prometheus.yml:\n{}", text(&out));
    }
    let large = "qwen2.5-3b-rkllm";
    let c =
        Cluster::start(vec![NodeSpec::new("rk1", &[SMALL]), NodeSpec::new("rk2", &[SMALL, large])], json!({})).await;
    let node_addrs: Vec<SocketAddr> = c.nodes.iter().map(|n| n.addr()).collect();

    let dir = std::env::temp_dir().join(format!("exo-lb-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("prometheus.yml"), scrape_config_for(c.envoy.admin, &node_addrs)).unwrap();
    let port = free_port([127, 0, 0, 1]);
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let _prometheus = Proc { child, dir };

    // Traffic: both models, streamed and not, and a model nobody serves.
    for (model, stream) in [(SMALL, true), (SMALL, false), (large, true), (SMALL, true)] {
        assert_eq!(c.chat(model, stream).await.status, 200);
    }
    assert_eq!(c.chat("not-a-configured-model", false).await.status, 404);

    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.get(format!("http://127.0.0.1:{port}/-/ready")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "Prometheus not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let series = wait_for_series(&client, port, "exo_lb_requests_total", Duration::from_secs(45)).await;
    let labelled: Vec<&Value> = series.iter().filter(|m| m["node"].is_string() && m["model"].is_string()).collect();
    assert!(!labelled.is_empty(), "no exo_lb_requests_total series with node and model labels: {series:?}");
    for m in &labelled {
        assert!(["rk1", "rk2"].contains(&m["node"].as_str().unwrap()), "{m}");
        assert!([SMALL, large].contains(&m["model"].as_str().unwrap()), "{m}");
        assert_eq!(m["job"], "exo-lb");
    }
    assert!(labelled.iter().any(|m| m["node"] == "rk2" && m["model"] == large), "{series:?}");
    let tps =
        wait_for(&client, port, "exo_tokens_per_second", Duration::from_secs(30), |s| node_labels(s).len() == 2).await;
    assert_eq!(node_labels(&tps), BTreeSet::from(["rk1".to_string(), "rk2".to_string()]), "{tps:?}");
    wait_for_series(&client, port, "exo_lb_time_to_first_byte_milliseconds_bucket", Duration::from_secs(30)).await;

    // Every query of the dashboard is valid PromQL; the main panels have data once two scrapes
    // are in (rates need two samples).
    let must_have_data = ["Requests per second by node", "Nodes up", "Decode speed", "Tokens generated per second"];
    let deadline = Instant::now() + Duration::from_secs(30);
    for (title, expr) in dashboard_queries() {
        let q = expr.replace("$__rate_interval", "1m").replace("$node", ".*").replace("$model", ".*");
        loop {
            let r: Value = client
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", &q)])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(r["status"], "success", "panel '{title}': {q}: {r}");
            let empty = r["data"]["result"].as_array().is_none_or(|a| a.is_empty());
            if !(empty && must_have_data.contains(&title.as_str())) {
                break;
            }
            assert!(Instant::now() < deadline, "panel '{title}' has no data: {q}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = writeln!(std::io::stderr(), "real_prometheus_scrapes_the_balancer: {:.0?}", started.elapsed());
}

// ------------------------------------------------------------------------------------------------
// The Grafana dashboard.

fn dashboard() -> Value {
    serde_json::from_str(&read(&deploy("grafana/exo-lb-dashboard.json"))).expect("the dashboard is JSON")
}

/// (panel title, PromQL) of every query of the dashboard.
fn dashboard_queries() -> Vec<(String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((p["title"].as_str().unwrap_or("").to_string(), t["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

/// The metric names in a PromQL expression (words that start with `exo_`), histograms without
/// their `_bucket`/`_sum`/`_count`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    // exo's own names, and exo-rkllama's.
    while let Some(i) = [rest.find("exo_"), rest.find("rkllm_")].into_iter().flatten().min() {
        let word: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + word.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| word.strip_suffix(s).filter(|b| HISTOGRAMS.contains(b)))
            .unwrap_or(&word);
        names.push(base.to_string());
    }
    names
}

/// The dashboard shows every metric of the filter and of the nodes' /metrics, and nothing else.
#[tokio::test]
async fn grafana_dashboard_covers_the_metrics() {
    let d = dashboard();
    assert_eq!(d["uid"], "exo-lb");
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(vars, ["datasource", "node", "model"]);
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
            assert!(!p["targets"].as_array().expect("targets").is_empty(), "panel {} has no query", p["title"]);
        }
    }

    // The node's metric names, from a real simulated node.
    let node = SimNode::start("127.0.0.1:0".parse().unwrap(), SimConfig::new("n1", &[SMALL])).await.expect("node");
    let page = reqwest::get(format!("http://{}/metrics", node.addr())).await.unwrap().text().await.unwrap();
    let node_metrics: BTreeSet<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    assert!(node_metrics.contains("exo_requests_total") && node_metrics.contains("exo_tokens_per_second"), "{page}");
    node.shutdown().await;

    let known: BTreeSet<String> =
        FILTER_METRICS.iter().map(|s| s.to_string()).chain(node_metrics.iter().cloned()).collect();
    let mut used = BTreeSet::new();
    for (title, expr) in dashboard_queries() {
        for name in metric_names(&expr) {
            assert!(known.contains(&name), "panel '{title}' queries {name}, which nothing exports");
            used.insert(name);
        }
    }
    let missing: Vec<&String> = known.difference(&used).collect();
    assert!(missing.is_empty(), "the dashboard does not show {missing:?}");
}
