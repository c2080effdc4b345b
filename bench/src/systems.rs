//! The systems under test: nginx with the seed's configuration, Envoy with a plain
//! least_request cluster, and Envoy with exo-lb rendered from the shipped template.
//!
//! Every timeout and duration is given in real-world (simulated) seconds and divided by the time
//! scale, so that, e.g., nginx's 300 s proxy_read_timeout means 300 simulated seconds.

use crate::procs::{temp_dir, Proc};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

pub fn envoy_binary() -> PathBuf {
    std::env::var_os("EXO_LB_ENVOY").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/envoy"))
}

/// The floor filter (`bench/floor-filter`, built by the benchmark scripts).
pub fn floor_wasm_path() -> PathBuf {
    root().join("target/wasm32-wasip1/release/floor_filter.wasm")
}

/// The filter under test; `EXO_LB_WASM` points the benchmark at another build of it.
pub fn wasm_path() -> PathBuf {
    std::env::var_os("EXO_LB_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/wasm32-wasip1/release/exo_lb.wasm"))
}

pub fn free_port() -> u16 {
    exo_sim::free_port([127, 0, 0, 1])
}

#[derive(Clone, Debug)]
pub enum Kind {
    Nginx,
    Envoy,
    /// exo-lb with these top-level filter options (durations in simulated time).
    ExoLb(Value),
    /// Another build of exo-lb (this .wasm), same options: a baseline timed in the same rounds.
    ExoLbBuild(Value, PathBuf),
    /// exo-lb's Envoy configuration with the floor filter (bench/floor-filter) in place of
    /// exo-lb: what any body-routing wasm filter costs; `host_calls` more calls to the host
    /// (property reads) per request measure what one costs.
    Floor {
        host_calls: u32,
    },
}

#[derive(Clone, Debug)]
pub struct System {
    pub name: String,
    pub kind: Kind,
}

/// One backend node as the proxies see it.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub models: Vec<String>,
}

pub struct Proxy {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// exo-lb's status page listener.
    pub status: Option<SocketAddr>,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }
}

/// Simulated seconds as wall-clock milliseconds (at least 1).
fn wall_ms(sim_s: f64, scale: f64) -> u64 {
    ((sim_s * 1000.0 / scale).round() as u64).max(1)
}

/// The filter's duration options (and their defaults) divided by the time scale.
pub fn scale_filter_options(options: &Value, scale: f64) -> Result<Value, String> {
    let mut v = options.clone();
    let obj = v.as_object_mut().ok_or("filter options must be a JSON object")?;
    if obj.contains_key("nodes") {
        return Err("filter options must not contain \"nodes\" (the benchmark supplies them)".into());
    }
    let scaled = |text: Option<&Value>, default_s: f64, min_ms: u64| -> Result<Value, String> {
        let secs = match text {
            Some(Value::String(s)) => exo_sim::parse_duration(s)?.as_secs_f64(),
            Some(other) => return Err(format!("duration {other} is not a string")),
            None => default_s,
        };
        if secs == 0.0 {
            return Ok(json!("0s"));
        }
        Ok(json!(format!("{}ms", wall_ms(secs, scale).max(min_ms))))
    };
    let ft = scaled(obj.get("fail_timeout"), 30.0, 1)?;
    obj.insert("fail_timeout".into(), ft);
    // Absent: "auto" (learned from traffic, in wall-clock time like everything the filter sees).
    if let Some(text) = obj.get("model_switch_cost").filter(|v| v.as_str() != Some("auto")) {
        let msc = scaled(Some(text), 0.0, 1)?;
        obj.insert("model_switch_cost".into(), msc);
    }
    let queue = obj.entry("queue").or_insert_with(|| json!({}));
    let q = queue.as_object_mut().ok_or("queue must be an object")?;
    let t = scaled(q.get("timeout"), 300.0, 1)?;
    q.insert("timeout".into(), t);
    if let Some(p) = obj.get_mut("probe").and_then(Value::as_object_mut) {
        let i = scaled(p.get("interval"), 5.0, 100)?;
        let t = scaled(p.get("timeout"), 2.0, 1)?;
        p.insert("interval".into(), i);
        p.insert("timeout".into(), t);
    }
    Ok(v)
}

fn nginx_conf(dir: &std::path::Path, listen: SocketAddr, backends: &[Backend], scale: f64, workers: u32) -> String {
    let d = dir.display();
    let ms = |s: f64| format!("{}ms", wall_ms(s, scale));
    let servers: String = backends
        .iter()
        // nginx takes whole seconds here.
        .map(|b| {
            format!(
                "        server {} weight=1 max_fails=3 fail_timeout={}s;\n",
                b.addr,
                (30.0 / scale).ceil().max(1.0)
            )
        })
        .collect();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 { "user root root;\n" } else { "" };
    format!(
        r#"# exo-rkllama's exo-load-balancer.conf (the seed), on loopback, timeouts divided by the
# time scale ({scale}).
{user}worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream exo_cluster {{
        least_conn;
{servers}        keepalive 32;
    }}
    server {{
        listen {listen};
        location /v1/ {{
            proxy_pass http://exo_cluster;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_connect_timeout {connect};
            proxy_send_timeout {read};
            proxy_read_timeout {read};
            proxy_buffering off;
            proxy_cache off;
            chunked_transfer_encoding on;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 2;
        }}
        location = /healthcheck {{
            proxy_pass http://exo_cluster;
            proxy_connect_timeout {h};
            proxy_read_timeout {h};
        }}
    }}
}}
"#,
        connect = ms(10.0),
        read = ms(300.0),
        h = ms(5.0),
    )
}

fn bare_envoy_yaml(listen: SocketAddr, admin: SocketAddr, backends: &[Backend], scale: f64) -> String {
    let idle = format!("{}s", idle_timeout_s(scale));
    let connect = format!("{:.3}s", 10.0 / scale);
    let endpoints: String = backends
        .iter()
        .map(|b| {
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: \"{}\", port_value: {} }} }} }}\n",
                b.addr.ip(),
                b.addr.port()
            )
        })
        .collect();
    format!(
        r#"# Plain Envoy: the same listener settings, access log and retry policy as exo-lb's template,
# no wasm filter, a least_request cluster.
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: plain
    address: {{ socket_address: {{ address: {la}, port_value: {lp} }} }}
    per_connection_buffer_limit_bytes: 16777216
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          codec_type: AUTO
          generate_request_id: true
          request_timeout: 0s
          stream_idle_timeout: {idle}
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                json_format:
                  time: "%START_TIME%"
                  client: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
                  method: "%REQ(:METHOD)%"
                  path: "%REQ(:PATH)%"
                  upstream: "%UPSTREAM_HOST%"
                  status: "%RESPONSE_CODE%"
                  flags: "%RESPONSE_FLAGS%"
                  bytes_in: "%BYTES_RECEIVED%"
                  bytes_out: "%BYTES_SENT%"
                  ttfb_ms: "%RESPONSE_DURATION%"
                  duration_ms: "%DURATION%"
                  request_id: "%REQ(X-REQUEST-ID)%"
          route_config:
            virtual_hosts:
            - name: exo
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: exo_nodes
                  timeout: 0s
                  idle_timeout: {idle}
                  retry_policy:
                    retry_on: connect-failure,refused-stream,reset-before-request
                    num_retries: 2
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: exo_nodes
    type: STATIC
    connect_timeout: {connect}
    per_connection_buffer_limit_bytes: 16777216
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100000 }}
    load_assignment:
      cluster_name: exo_nodes
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        admin_port = admin.port(),
        la = listen.ip(),
        lp = listen.port(),
    )
}

/// Envoy's stream idle timeout for 300 simulated seconds (whole seconds: the template's unit).
pub fn idle_timeout_s(scale: f64) -> u64 {
    ((300.0 / scale).ceil() as u64).max(1)
}

/// The exo-lb filter configuration for these backends and options (durations still simulated).
pub fn exo_lb_config(backends: &[Backend], options: &Value, scale: f64) -> Result<Value, String> {
    let mut config = scale_filter_options(options, scale)?;
    let nodes: Vec<Value> =
        backends.iter().map(|b| json!({"name": b.name, "address": b.addr.to_string(), "models": b.models})).collect();
    let obj = config.as_object_mut().ok_or("options")?;
    obj.insert("nodes".into(), Value::Array(nodes));
    Ok(config)
}

/// Starts the system in front of `backends`; returns when it accepts requests.
pub async fn start(system: &System, backends: &[Backend], scale: f64, concurrency: u32) -> Result<Proxy, String> {
    let dir = temp_dir(&system.name);
    let status_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let envoy_cmd = |config: PathBuf| {
        let mut cmd = Command::new(envoy_binary());
        cmd.arg("-c").arg(config).args([
            "--concurrency",
            &concurrency.to_string(),
            "--disable-hot-restart",
            "-l",
            "warning",
        ]);
        // The filter's info lines (why it switched a node), for EXO_LB_SIM_LOG.
        if std::env::var_os("EXO_LB_SIM_LOG").is_some() {
            cmd.args(["--component-log-level", "wasm:info"]);
        }
        cmd
    };
    let (proc, admin) = match &system.kind {
        Kind::Nginx => {
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(&dir, listen, backends, scale, concurrency)).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(nginx_binary());
            cmd.arg("-c").arg(&conf).arg("-p").arg(&dir).args(["-g", "daemon off;"]);
            (Proc::spawn("nginx", cmd, &dir).map_err(|e| format!("start nginx: {e}"))?, None)
        }
        Kind::Envoy => {
            let conf = dir.join("envoy.yaml");
            std::fs::write(&conf, bare_envoy_yaml(listen, admin, backends, scale)).map_err(|e| e.to_string())?;
            (Proc::spawn("envoy", envoy_cmd(conf), &dir).map_err(|e| format!("start envoy: {e}"))?, Some(admin))
        }
        Kind::ExoLb(_) | Kind::ExoLbBuild(..) | Kind::Floor { .. } => {
            let (options, wasm) = match &system.kind {
                Kind::ExoLb(options) => (options.clone(), wasm_path()),
                Kind::ExoLbBuild(options, wasm) => (options.clone(), wasm.clone()),
                _ => (json!({}), floor_wasm_path()),
            };
            let options = &options;
            if !wasm.exists() {
                return Err(format!(
                    "no {}: run scripts/setup.sh (or scripts/bench.sh for the floor filter)",
                    wasm.display()
                ));
            }
            let filter_config = exo_lb_config(backends, options, scale)?;
            let yaml = exo_lb_ctl::render(
                exo_lb_ctl::TEMPLATE,
                &exo_lb_ctl::RenderOptions {
                    listen,
                    admin,
                    status: status_addr,
                    wasm_path: wasm.display().to_string(),
                    filter_config: serde_json::to_string_pretty(&filter_config).map_err(|e| e.to_string())?,
                    source: format!("the benchmark ({})", system.name),
                    idle_timeout_s: idle_timeout_s(scale),
                    ..Default::default()
                },
            )?;
            // The floor filter's own option is not one of exo-lb's (whose validation `render`
            // runs): added to the rendered configuration.
            let yaml = match &system.kind {
                Kind::Floor { host_calls } if *host_calls > 0 => {
                    let marked = yaml.replacen("\"nodes\":", &format!("\"host_calls\": {host_calls}, \"nodes\":"), 1);
                    if marked == yaml {
                        return Err("floor filter: no \"nodes\" in the rendered configuration".into());
                    }
                    marked
                }
                _ => yaml,
            };
            let conf = dir.join("envoy.yaml");
            std::fs::write(&conf, yaml).map_err(|e| e.to_string())?;
            (Proc::spawn("envoy", envoy_cmd(conf), &dir).map_err(|e| format!("start envoy: {e}"))?, Some(admin))
        }
    };
    let status = matches!(system.kind, Kind::ExoLb(_) | Kind::ExoLbBuild(..)).then_some(status_addr);
    let mut proxy = Proxy { proc, listen, admin, status };
    wait_ready(&mut proxy).await?;
    Ok(proxy)
}

/// exo-lb's status page as JSON (`None` when it does not answer with one).
pub async fn status_page(client: &reqwest::Client, status: SocketAddr) -> Option<Value> {
    client.get(format!("http://{status}/status")).send().await.ok()?.json().await.ok()
}

/// Waits (at most 3 s; false then) until the balancer knows what every node has loaded: it asks them on
/// its first tick, a second after it starts. Traffic that comes in that second finds it blind;
/// on boards that second is nothing beside switches of minutes, but the benchmark runs time
/// faster (a second at time scale 60 is a minute of the trace), so it lets the balancer start
/// as a deployment's would have, before its clients came.
pub async fn wait_asked(status: SocketAddr, nodes: usize) -> bool {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let known = status_page(&client, status)
            .await
            .as_ref()
            .and_then(|p| p["nodes"].as_array())
            .map_or(0, |n| n.iter().filter(|node| !node["warm_model"].is_null()).count());
        if known >= nodes {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// What the look-ahead's plans cost in this Envoy (its `exo_lb_look_ahead_microseconds`
/// histogram, read from the admin's JSON stats): how many, and their p50, p99 and largest
/// (Envoy's estimates from its buckets), in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct LookAheadCost {
    pub plans: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

pub async fn look_ahead_cost(admin: SocketAddr) -> Option<LookAheadCost> {
    let url = format!("http://{admin}/stats?format=json&usedonly&histogram_buckets=none&filter=exo_lb_look_ahead");
    let stats: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    let histograms = stats["stats"].as_array()?.iter().find_map(|s| s.get("histograms"))?;
    let quantiles: Vec<f64> = histograms["supported_quantiles"].as_array()?.iter().filter_map(Value::as_f64).collect();
    let values = histograms["computed_quantiles"].as_array()?.first()?["values"].as_array()?;
    let at = |q: f64| {
        let i = quantiles.iter().position(|&x| (x - q).abs() < 1e-9)?;
        values.get(i)?["cumulative"].as_f64()
    };
    // The count is not in the JSON quantiles: the Prometheus form has it.
    let text = reqwest::get(format!("http://{admin}/stats/prometheus?usedonly&filter=exo_lb_look_ahead"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let plans = text
        .lines()
        .find(|l| l.contains("exo_lb_look_ahead_microseconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())? as u64;
    Some(LookAheadCost { plans, p50_us: at(50.0)?, p99_us: at(99.0)?, max_us: at(100.0)? })
}

pub fn nginx_binary() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nginx")
}

async fn wait_ready(proxy: &mut Proxy) -> Result<(), String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        proxy.proc.check_alive()?;
        let ready = match proxy.admin {
            Some(admin) => {
                matches!(client.get(format!("http://{admin}/ready")).send().await, Ok(r) if r.status() == 200)
            }
            None => tokio::net::TcpStream::connect(proxy.listen).await.is_ok(),
        };
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} not ready after 60 s:\n{}", proxy.proc.name, proxy.proc.log()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
