//! Starts the real thing on loopback: Envoy (from the project's `.venv`) with the built
//! `exo_lb.wasm`, configured from the same template as production, in front of simulated exo
//! nodes. Used by the end-to-end tests and by the demo.
//!
//! The same `exo_lb.wasm` also runs in nginx with Kong's ngx_wasm_module (`.nginx-wasm/sbin/nginx`,
//! built by `scripts/setup-nginx.sh`), configured by `exo-lb-ctl render-nginx`: a test picks the
//! host with [`Host`] ([`Cluster::start_on`]), and [`both_hosts!`] runs one test body on both.
//! [`Envoy`] is then the running proxy, whichever it is.
//!
//! ```no_run
//! # async fn t() {
//! use e2e::{Cluster, NodeSpec};
//! let cluster = Cluster::start(vec![NodeSpec::new("rk1", &["m1"]), NodeSpec::new("rk2", &["m1"])], serde_json::json!({})).await;
//! let reply = cluster.chat("m1", false).await;
//! assert_eq!(reply.status, 200);
//! # }
//! ```

use exo_lb_ctl::{render, RenderOptions, TEMPLATE};
use exo_sim::{SimConfig, SimNode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// Envoy from the project's venv (scripts/setup.sh installs it), or `$EXO_LB_ENVOY`.
pub fn envoy_binary() -> PathBuf {
    let path = std::env::var_os("EXO_LB_ENVOY").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/envoy"));
    assert!(path.exists(), "no Envoy at {}: run scripts/setup.sh first", path.display());
    path
}

pub fn wasm_path() -> PathBuf {
    let path = root().join("target/wasm32-wasip1/release/exo_lb.wasm");
    assert!(
        path.exists(),
        "no {}: run `cargo build --release --target wasm32-wasip1 -p exo-lb` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The proxy that runs the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Envoy,
    /// nginx with Kong's ngx_wasm_module.
    Nginx,
}

/// nginx-wasm (scripts/setup-nginx.sh links it), or `$EXO_LB_NGINX`.
pub fn nginx_binary() -> PathBuf {
    std::env::var_os("EXO_LB_NGINX").map(PathBuf::from).unwrap_or_else(|| root().join(".nginx-wasm/sbin/nginx"))
}

/// Whether tests can run on `host`. nginx-wasm missing skips its tests on a developer's machine
/// (with a note), and fails them in CI (`CI=true`) or with `EXO_LB_REQUIRE_NGINX=1`.
pub fn host_available(host: Host) -> bool {
    if host == Host::Envoy || nginx_binary().exists() {
        return true;
    }
    let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("EXO_LB_REQUIRE_NGINX").is_ok_and(|v| v == "1");
    assert!(!required, "no nginx-wasm at {}: run scripts/setup-nginx.sh", nginx_binary().display());
    eprintln!("skipped: no nginx-wasm at {} (scripts/setup-nginx.sh builds it)", nginx_binary().display());
    false
}

/// Runs an async test body `fn(Host)` once per host, as `<name>::envoy` and `<name>::nginx`
/// (skipped without nginx-wasm, except in CI: see [`host_available`]).
#[macro_export]
macro_rules! both_hosts {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn envoy() {
                super::$name($crate::Host::Envoy).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nginx() {
                if $crate::host_available($crate::Host::Nginx) {
                    super::$name($crate::Host::Nginx).await
                }
            }
        }
    )+};
}

pub use exo_sim::free_port;

static NEXT_RUN: AtomicU32 = AtomicU32::new(0);

/// Who holds the harness (a thread and how many times it took it).
static SERIAL: Mutex<Option<(ThreadId, u32)>> = Mutex::new(None);
static SERIAL_FREED: Condvar = Condvar::new();

/// One test at a time: while alive, no other thread of this process gets one. Every [`Envoy`]
/// (and so every [`Cluster`]) holds one, so that tests of a binary run their Envoys and nodes
/// one after another even when the test harness runs them on parallel threads (their stream
/// timings would be skewed on a small machine otherwise), and `cargo test` needs no
/// `--test-threads=1`. A thread may take it again while it holds it (a test with two Envoys);
/// tests that use other shared resources (docker, fixed ports) take it directly.
pub struct Serial(());

/// Takes the harness, waiting for the test that holds it to finish.
pub fn serial() -> Serial {
    let me = std::thread::current().id();
    let mut holder = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match holder.as_mut() {
            None => {
                *holder = Some((me, 1));
                return Serial(());
            }
            Some((id, n)) if *id == me => {
                *n += 1;
                return Serial(());
            }
            Some(_) => holder = SERIAL_FREED.wait(holder).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        let mut holder = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = holder.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                *holder = None;
                SERIAL_FREED.notify_one();
            }
        }
    }
}

/// Where a harness Envoy listens and keeps its files. `None` picks a free loopback port, or a
/// temporary directory that is removed when Envoy stops (kept if the test fails).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub status: Option<SocketAddr>,
    /// Envoy's configuration, its log (`envoy.log`) and the access log (`access.log`) go here,
    /// and stay after Envoy stops.
    pub dir: Option<PathBuf>,
}

impl Placement {
    /// Only the public listener given (or not).
    pub fn listen(listen: Option<SocketAddr>) -> Placement {
        Placement { listen, ..Placement::default() }
    }
}

/// A running Envoy (or nginx, see [`Host`]), stopped when dropped.
pub struct Envoy {
    pub host: Host,
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// The status page listener.
    pub status: SocketAddr,
    dir: PathBuf,
    keep_dir: bool,
    /// Set when started with [`Envoy::start_dynamic`].
    dynamic: Option<RenderOptions>,
    /// Declared last: released after Envoy has stopped.
    _serial: Serial,
}

impl Envoy {
    /// Renders the production template for `filter_config` and starts Envoy with two workers;
    /// returns once Envoy reports ready.
    pub async fn start(filter_config: &Value, idle_timeout_s: u64, listen: Option<SocketAddr>) -> Envoy {
        Self::start_placed(filter_config, idle_timeout_s, &Placement::listen(listen)).await
    }

    /// Like [`Envoy::start`], with the addresses and the directory of `placement`.
    pub async fn start_placed(filter_config: &Value, idle_timeout_s: u64, placement: &Placement) -> Envoy {
        let (serial, dir, opts, keep) = Self::prepare(filter_config, idle_timeout_s, placement);
        let yaml = render(TEMPLATE, &opts).unwrap_or_else(|e| panic!("render: {e}"));
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml).expect("write envoy.yaml");
        let mut envoy = Self::launch(serial, dir, &config_path, &opts).await;
        envoy.keep_dir |= keep;
        envoy
    }

    /// Like [`Envoy::start`], with the optional features of `features` (`tls`,
    /// `redirect_http_to_https`, `api_keys`, `cors_origins`, `hide_node_details`); addresses,
    /// paths and the filter configuration are the harness's. With `tls`, [`Envoy::listen`] is
    /// the plain-HTTP listener and `features.tls.listen` the HTTPS one.
    pub async fn start_rendered(
        filter_config: &Value,
        idle_timeout_s: u64,
        listen: Option<SocketAddr>,
        features: RenderOptions,
    ) -> Envoy {
        let (serial, dir, base, _) = Self::prepare(filter_config, idle_timeout_s, &Placement::listen(listen));
        let opts = RenderOptions {
            tls: features.tls,
            redirect_http_to_https: features.redirect_http_to_https,
            api_keys: features.api_keys,
            cors_origins: features.cors_origins,
            hide_node_details: features.hide_node_details,
            limits: features.limits,
            ..base
        };
        let yaml = render(TEMPLATE, &opts).unwrap_or_else(|e| panic!("render: {e}"));
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml).expect("write envoy.yaml");
        Self::launch(serial, dir, &config_path, &opts).await
    }

    /// Like [`Envoy::start`], but with the dynamic configuration (bootstrap plus the LDS and CDS
    /// files Envoy watches), so that [`Envoy::reload`] can change the nodes while it runs.
    pub async fn start_dynamic(filter_config: &Value, idle_timeout_s: u64) -> Envoy {
        let (serial, dir, opts, _) = Self::prepare(filter_config, idle_timeout_s, &Placement::default());
        let yaml = render(TEMPLATE, &opts).unwrap_or_else(|e| panic!("render: {e}"));
        let xds = dir.join("xds");
        let files = exo_lb_ctl::dynamic::split(&yaml, &xds).unwrap_or_else(|e| panic!("split: {e}"));
        exo_lb_ctl::dynamic::write_all(&xds, &files).unwrap_or_else(|e| panic!("write: {e}"));
        let mut envoy = Self::launch(serial, dir, &xds.join(exo_lb_ctl::dynamic::BOOTSTRAP_FILE), &opts).await;
        envoy.dynamic = Some(opts);
        envoy
    }

    /// Changes a dynamically configured Envoy over to `filter_config` (same ports), the way
    /// `exo-lb-ctl render-dynamic --apply` does.
    pub async fn reload(&self, filter_config: &Value) -> Result<(), String> {
        let opts = self.dynamic.clone().ok_or("not started with start_dynamic")?;
        let opts = RenderOptions { filter_config: serde_json::to_string_pretty(filter_config).expect("json"), ..opts };
        let xds = self.dir.join("xds");
        let admin = self.admin.to_string();
        tokio::task::spawn_blocking(move || {
            let files = exo_lb_ctl::dynamic::split(&render(TEMPLATE, &opts)?, &xds)?;
            exo_lb_ctl::dynamic::apply(&xds, &files, &admin)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The harness (held before ports are picked, so that no other test's nodes take them), the
    /// directory, the render options and whether the directory is the caller's (kept).
    fn prepare(
        filter_config: &Value,
        idle_timeout_s: u64,
        placement: &Placement,
    ) -> (Serial, PathBuf, RenderOptions, bool) {
        let serial = serial();
        let run = NEXT_RUN.fetch_add(1, Ordering::SeqCst);
        let keep = placement.dir.is_some();
        let dir = placement
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("exo-lb-e2e-{}-{run}", std::process::id())));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let any = || SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1])));
        let opts = RenderOptions {
            listen: placement.listen.unwrap_or_else(any),
            admin: placement.admin.unwrap_or_else(any),
            status: placement.status.unwrap_or_else(any),
            wasm_path: wasm_path().display().to_string(),
            filter_config: serde_json::to_string_pretty(filter_config).expect("json"),
            source: "the e2e harness".into(),
            idle_timeout_s,
            ..RenderOptions::default()
        };
        (serial, dir, opts, keep)
    }

    async fn launch(serial: Serial, dir: PathBuf, config_path: &Path, opts: &RenderOptions) -> Envoy {
        let stdout = std::fs::File::create(dir.join("access.log")).expect("log file");
        let stderr = std::fs::File::create(dir.join("envoy.log")).expect("log file");
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(config_path)
            .args([
                "--concurrency",
                "2",
                "--disable-hot-restart",
                // The access log is written out every 10 s by default: tests that read it waited
                // for that.
                "--file-flush-interval-msec",
                "100",
                "-l",
                "info",
                "--component-log-level",
                "upstream:warning,http:warning,router:warning,connection:warning,main:warning,config:warning",
            ])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start envoy");
        let mut envoy = Envoy {
            host: Host::Envoy,
            child,
            listen: opts.listen,
            admin: opts.admin,
            status: opts.status,
            dir,
            keep_dir: false,
            dynamic: None,
            _serial: serial,
        };
        envoy.wait_ready().await;
        envoy
    }

    /// Renders nginx.conf with `exo-lb-ctl render-nginx` for `filter_config` and starts nginx
    /// (one worker, as rendered); returns once the filter answers on both listeners.
    pub async fn start_nginx(filter_config: &Value, idle_timeout_s: u64, placement: &Placement) -> Envoy {
        let (serial, dir, opts, keep) = Self::prepare(filter_config, idle_timeout_s, placement);
        let nginx_opts = exo_lb_ctl::nginx::NginxOptions {
            listen: opts.listen,
            status: opts.status,
            wasm_path: opts.wasm_path.clone(),
            filter_config: opts.filter_config.clone(),
            source: opts.source.clone(),
            idle_timeout_s,
            log_dir: dir.join("logs").display().to_string(),
        };
        let conf = exo_lb_ctl::nginx::render_nginx(&nginx_opts).unwrap_or_else(|e| panic!("render-nginx: {e}"));
        std::fs::create_dir_all(dir.join("logs")).expect("logs directory");
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, conf).expect("write nginx.conf");
        let stderr = std::fs::File::create(dir.join("logs/stderr.log")).expect("log file");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nginx");
        let mut nginx = Envoy {
            host: Host::Nginx,
            child,
            listen: opts.listen,
            admin: opts.admin,
            status: opts.status,
            dir,
            keep_dir: keep,
            dynamic: None,
            _serial: serial,
        };
        nginx.wait_ready().await;
        nginx
    }

    /// Starts `host` with the harness's placement (see [`Envoy::start_placed`]).
    pub async fn start_on(host: Host, filter_config: &Value, idle_timeout_s: u64, placement: &Placement) -> Envoy {
        match host {
            Host::Envoy => Self::start_placed(filter_config, idle_timeout_s, placement).await,
            Host::Nginx => Self::start_nginx(filter_config, idle_timeout_s, placement).await,
        }
    }

    /// The process id of Envoy, or of nginx's master process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let ready_url = match self.host {
            Host::Envoy => format!("http://{}/ready", self.admin),
            // The filter itself answers (its module is compiled by the worker after start).
            Host::Nginx => format!("http://{}/healthcheck", self.status),
        };
        let name = format!("{:?}", self.host).to_lowercase();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.keep_dir = true;
                panic!("{name} exited with {status} during start-up:\n{}", self.log());
            }
            if let Ok(r) = client.get(&ready_url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                self.keep_dir = true;
                panic!("{name} not ready after 60 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// Where Envoy's configuration and logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The JSON access log's file (Envoy's standard output; nginx's logs/access.log).
    pub fn access_log_path(&self) -> PathBuf {
        match self.host {
            Host::Envoy => self.dir.join("access.log"),
            Host::Nginx => self.dir.join("logs/access.log"),
        }
    }

    /// Envoy's own log file (standard error; nginx's logs/error.log).
    pub fn log_path(&self) -> PathBuf {
        match self.host {
            Host::Envoy => self.dir.join("envoy.log"),
            Host::Nginx => self.dir.join("logs/error.log"),
        }
    }

    /// Envoy's own log (warnings, and the filter's log lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The JSON access log, one value per request.
    pub fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.access_log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The access log once it has at least `lines` lines (Envoy writes it out every few
    /// seconds), or whatever it has after 20 s.
    pub async fn access_log_lines(&self, lines: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.access_log();
            if log.len() >= lines || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The balancer's status page (`GET /status` on the status listener).
    pub async fn status_page(&self) -> Value {
        reqwest::get(format!("http://{}/status", self.status)).await.expect("status").json().await.expect("status JSON")
    }

    /// The status page once `ready` holds of it, or as it is after `within` (the caller
    /// asserts): the workers fold what they learn into the shared state on their ticks.
    pub async fn status_page_when(&self, within: Duration, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status_page().await;
            if ready(&status) || Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`Envoy::connect_failures`] once it is at least `expected`, or whatever it is after 5 s:
    /// nginx writes a request's access log line just after its reply, so a client can read the
    /// log before its own request is in it.
    pub async fn connect_failures_reaching(&self, endpoint: SocketAddr, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.connect_failures(endpoint).await;
            if n >= expected || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many times the proxy failed to connect to `endpoint` (Envoy: its `cx_connect_fail`;
    /// nginx: attempts in the access log that got no response headers, status 502).
    pub async fn connect_failures(&self, endpoint: SocketAddr) -> u64 {
        match self.host {
            Host::Envoy => self.endpoint_stat(endpoint, "cx_connect_fail").await,
            Host::Nginx => {
                let entries = |v: &Value| -> Vec<String> {
                    v.as_str()
                        .unwrap_or_default()
                        .replace(" : ", ",")
                        .split(',')
                        .map(|e| e.trim().to_string())
                        .collect()
                };
                let mut n = 0;
                for line in self.access_log() {
                    let (addrs, statuses, times) =
                        (entries(&line["upstream"]), entries(&line["upstream_status"]), entries(&line["ttfb_s"]));
                    for (i, a) in addrs.iter().enumerate() {
                        let no_reply = times.get(i).is_none_or(|t| t == "-");
                        if *a == endpoint.to_string() && no_reply && statuses.get(i).is_some_and(|s| s == "502") {
                            n += 1;
                        }
                    }
                }
                n
            }
        }
    }

    /// A per-endpoint counter of the node cluster from the admin `/clusters` page, e.g.
    /// `cx_connect_fail` or `rq_total` (Envoy only).
    pub async fn endpoint_stat(&self, endpoint: SocketAddr, stat: &str) -> u64 {
        assert_eq!(self.host, Host::Envoy, "endpoint stats come from Envoy's admin interface");
        let text = reqwest::get(format!("http://{}/clusters", self.admin))
            .await
            .expect("admin")
            .text()
            .await
            .unwrap_or_default();
        let prefix = format!("exo_nodes::{endpoint}::{stat}::");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }

    /// A value from the admin `/stats` page (e.g. `wasmcustom.exo_lb_upstream_mismatch_total`;
    /// Envoy only: stock nginx exports no wasm metrics).
    pub async fn stat(&self, name: &str) -> u64 {
        assert_eq!(self.host, Host::Envoy, "stats come from Envoy's admin interface");
        let text = reqwest::get(format!("http://{}/stats?filter=^{name}$", self.admin))
            .await
            .expect("admin")
            .text()
            .await
            .unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if self.host == Host::Nginx {
            // SIGTERM to the master, which stops its workers (SIGKILL would orphan them).
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {:?} log ({}) ---\n{}", self.host, self.dir.display(), self.log());
        } else if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One simulated node and its entry in the filter's node list.
pub struct NodeSpec {
    pub sim: SimConfig,
    /// Where it listens; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Extra fields of its filter configuration entry (`weight`, `backup`, ...).
    pub extra: Value,
}

static NEXT_IP: AtomicU32 = AtomicU32::new(0);

impl NodeSpec {
    /// A fast node (time scale 20) on its own loopback address.
    pub fn new(name: &str, models: &[&str]) -> NodeSpec {
        let mut sim = SimConfig::new(name, models);
        sim.time_scale = 20.0;
        let n = NEXT_IP.fetch_add(1, Ordering::SeqCst);
        let addr = SocketAddr::from(([127, 0, 1 + (n / 200) as u8, 10 + (n % 200) as u8], 0));
        NodeSpec { sim, addr, extra: json!({}) }
    }

    pub fn with(mut self, f: impl FnOnce(&mut SimConfig)) -> NodeSpec {
        f(&mut self.sim);
        self
    }

    pub fn extra(mut self, extra: Value) -> NodeSpec {
        self.extra = extra;
        self
    }

    pub fn at(mut self, addr: SocketAddr) -> NodeSpec {
        self.addr = addr;
        self
    }
}

/// Starts the simulated nodes and builds the filter configuration that lists them (plus the
/// top-level `options`).
async fn start_nodes(specs: Vec<NodeSpec>, options: &Value) -> (Vec<SimNode>, Value) {
    try_start_nodes(specs, options).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Like `start_nodes`, with an error naming the node and its address.
async fn try_start_nodes(specs: Vec<NodeSpec>, options: &Value) -> Result<(Vec<SimNode>, Value), String> {
    let mut nodes = Vec::new();
    let mut entries = Vec::new();
    for spec in specs {
        let node = SimNode::start(spec.addr, spec.sim.clone())
            .await
            .map_err(|e| format!("cannot start node {} on {}: {e}", spec.sim.name, spec.addr))?;
        let mut entry = json!({"name": spec.sim.name, "address": node.addr().to_string(), "models": spec.sim.models});
        if let (Some(e), Some(extra)) = (entry.as_object_mut(), spec.extra.as_object()) {
            e.extend(extra.clone());
        }
        entries.push(entry);
        nodes.push(node);
    }
    // Tests count the requests that reach each node; the balancer's own asks of what a node has
    // loaded (`GET /state` at start) would add to them at a moment of the tick's choosing. So
    // they are off unless a test turns them on (the tests of that feature do).
    let mut filter_config = json!({"nodes": entries, "discover_loaded": false});
    if let (Some(c), Some(o)) = (filter_config.as_object_mut(), options.as_object()) {
        c.extend(o.clone());
    }
    Ok((nodes, filter_config))
}

/// A reply through the load balancer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The node that served it, per the load balancer.
    pub fn node(&self) -> Option<String> {
        self.headers.get("x-exo-lb-node").and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
}

/// Envoy with exo-lb in front of simulated nodes.
pub struct Cluster {
    pub nodes: Vec<SimNode>,
    /// The filter configuration Envoy runs with.
    pub filter_config: Value,
    pub client: reqwest::Client,
    pub envoy: Envoy,
}

impl Cluster {
    /// Starts the nodes, then Envoy with a filter configuration of those nodes plus `options`
    /// (top-level filter fields such as `policy` or `max_fails`).
    pub async fn start(specs: Vec<NodeSpec>, options: Value) -> Cluster {
        Self::start_with(specs, options, 30, None).await
    }

    /// Like [`Cluster::start`], on `host`.
    pub async fn start_on(host: Host, specs: Vec<NodeSpec>, options: Value) -> Cluster {
        Self::start_with_on(host, specs, options, 30).await
    }

    /// Like [`Cluster::start_with`], on `host`.
    pub async fn start_with_on(host: Host, specs: Vec<NodeSpec>, options: Value, idle_timeout_s: u64) -> Cluster {
        let _serial = serial(); // before the nodes start: they are part of the test
        let (nodes, filter_config) = start_nodes(specs, &options).await;
        let envoy = Envoy::start_on(host, &filter_config, idle_timeout_s, &Placement::default()).await;
        Cluster::assemble(nodes, filter_config, envoy)
    }

    pub async fn start_with(
        specs: Vec<NodeSpec>,
        options: Value,
        idle_timeout_s: u64,
        listen: Option<SocketAddr>,
    ) -> Cluster {
        let _serial = serial(); // before the nodes start: they are part of the test
        let (nodes, filter_config) = start_nodes(specs, &options).await;
        let envoy = Envoy::start(&filter_config, idle_timeout_s, listen).await;
        Cluster::assemble(nodes, filter_config, envoy)
    }

    /// Like [`Cluster::start_with`], with Envoy's addresses and directory from `placement`;
    /// a node that cannot start (its address taken) is an error naming it, not a panic.
    pub async fn try_start_placed(
        specs: Vec<NodeSpec>,
        options: Value,
        idle_timeout_s: u64,
        placement: &Placement,
    ) -> Result<Cluster, String> {
        let _serial = serial(); // before the nodes start: they are part of the test
        let (nodes, filter_config) = try_start_nodes(specs, &options).await?;
        let envoy = Envoy::start_placed(&filter_config, idle_timeout_s, placement).await;
        Ok(Cluster::assemble(nodes, filter_config, envoy))
    }

    /// Like [`Cluster::start`], with optional features: see [`Envoy::start_rendered`].
    pub async fn start_rendered(
        specs: Vec<NodeSpec>,
        options: Value,
        listen: Option<SocketAddr>,
        features: RenderOptions,
    ) -> Cluster {
        let _serial = serial(); // before the nodes start: they are part of the test
        let (nodes, filter_config) = start_nodes(specs, &options).await;
        let envoy = Envoy::start_rendered(&filter_config, 30, listen, features).await;
        Cluster::assemble(nodes, filter_config, envoy)
    }

    /// Like [`Cluster::start`], with Envoy's dynamic configuration: see [`Cluster::change_nodes`].
    pub async fn start_dynamic(specs: Vec<NodeSpec>, options: Value) -> Cluster {
        let _serial = serial(); // before the nodes start: they are part of the test
        let (nodes, filter_config) = start_nodes(specs, &options).await;
        let envoy = Envoy::start_dynamic(&filter_config, 30).await;
        Cluster::assemble(nodes, filter_config, envoy)
    }

    /// Starts nodes for `specs` and changes the running balancer over to `keep` (names of
    /// current nodes) plus the new ones, with `options`; the nodes not kept keep running (a
    /// drained board still finishes its work).
    pub async fn change_nodes(&mut self, keep: &[&str], specs: Vec<NodeSpec>, options: Value) -> Result<(), String> {
        let (new_nodes, new_config) = start_nodes(specs, &options).await;
        let mut entries: Vec<Value> = self.filter_config["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n["name"].as_str().is_some_and(|name| keep.contains(&name)))
            .collect();
        entries.extend(new_config["nodes"].as_array().cloned().unwrap_or_default());
        let mut filter_config = new_config;
        filter_config["nodes"] = Value::Array(entries);
        self.envoy.reload(&filter_config).await?;
        self.filter_config = filter_config;
        self.nodes.extend(new_nodes);
        Ok(())
    }

    fn assemble(nodes: Vec<SimNode>, filter_config: Value, envoy: Envoy) -> Cluster {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        Cluster { nodes, filter_config, client, envoy }
    }

    pub fn node(&self, name: &str) -> &SimNode {
        self.nodes.iter().find(|n| n.name() == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Takes a node away (its port refuses connections), returning its address.
    pub async fn kill(&mut self, name: &str) -> SocketAddr {
        let i = self.nodes.iter().position(|n| n.name() == name).unwrap_or_else(|| panic!("no node {name}"));
        let node = self.nodes.remove(i);
        let addr = node.addr();
        node.shutdown().await;
        addr
    }

    /// Starts a node again on the address it had.
    pub async fn revive(&mut self, addr: SocketAddr, sim: SimConfig) {
        self.nodes.push(SimNode::start(addr, sim).await.expect("restart node"));
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.client.post(self.envoy.url(path)).header("content-type", "application/json").body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request through envoy");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        Reply { status, headers, body }
    }

    pub async fn get(&self, path: &str) -> Reply {
        let resp = self.client.get(self.envoy.url(path)).send().await.expect("request through envoy");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        Reply { status, headers, body }
    }

    /// A chat completion for `model` with a short reply.
    pub async fn chat(&self, model: &str, stream: bool) -> Reply {
        self.post("/v1/chat/completions", chat_body(model, stream, 4), &[]).await
    }
}

pub fn chat_body(model: &str, stream: bool, max_tokens: u32) -> String {
    json!({"model": model, "stream": stream, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello"}]}).to_string()
}
