//! exo-lb-bench: the side-by-side benchmark of issue 5. Same seeded trace, same simulated
//! cluster: nginx (the seed's configuration), Envoy with a plain least_request cluster, Envoy
//! with exo-lb (default and tuned configuration from `bench/configs/`). Plus an overhead
//! benchmark (wrk) and a scale benchmark (filter CPU per request vs node count).
//! See docs/benchmarks.md.

mod backend;
mod loadgen;
mod offline;
mod procs;
mod report;
mod rng;
mod simulate;
mod sweep;
mod systems;
mod trace;
mod wrk;

use clap::{Args, Parser, Subcommand, ValueEnum};
use report::{percentile, RunResult};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use systems::{Kind, System};
use trace::{Hardware, Workload};

#[derive(Parser)]
#[command(name = "exo-lb-bench", about = "exo-lb vs nginx vs plain Envoy on simulated RK3588 exo nodes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// tune (unless --no-tune), latency, overhead and scale.
    All,
    /// Pick the best exo-lb configuration of configs/tune-candidates.json on the tuning seed
    /// at 80% and write it to configs/tuned.json.
    Tune,
    /// The mixed-model latency benchmark.
    Latency,
    /// wrk through bare Envoy, Envoy + exo-lb and nginx, interleaved.
    Overhead,
    /// The filter's CPU per request as the node count grows.
    Scale,
    /// Scheduling with no options set against nginx, static switch costs and a clairvoyant
    /// reference, across switch times, loads and seeds.
    Sweep,
    /// The sweep's grid through the filter's scheduling logic in virtual time (no Envoy, no
    /// nodes; milliseconds per point): for comparing decision rules over many seeds.
    Simulate,
}

/// What `--offline-allow` adds to the FIFO rules of the offline search.
#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum OfflineAllow {
    Reorder,
    EarlyLoads,
}

#[derive(Args, Clone)]
struct Opts {
    /// Where the exo-lb configurations are: default.json, tuned.json, overhead.json,
    /// tune-candidates.json (filter options without "nodes"; durations in real-world time).
    #[arg(long, global = true, default_value = "bench/configs")]
    configs: PathBuf,
    /// Where results.md and the PNG charts go.
    #[arg(long, global = true, default_value = "docs/bench")]
    out: PathBuf,
    /// Simulated time runs this many times faster than real time (default: the workload's, 60
    /// for `board`, 1 for `issue`). `simulate` ticks as the filter does at this scale.
    #[arg(long, global = true)]
    time_scale: Option<f64>,
    /// Seed of the reported trace.
    #[arg(long, global = true, default_value_t = 1)]
    seed: u64,
    /// Seed of the tuning trace (must differ from --seed).
    #[arg(long, global = true, default_value_t = 2)]
    tune_seed: u64,
    /// Requests per latency run.
    #[arg(long, global = true, default_value_t = 160)]
    requests: usize,
    /// Requests per tuning run.
    #[arg(long, global = true, default_value_t = 120)]
    tune_requests: usize,
    #[arg(long, global = true, value_delimiter = ',', default_value = "0.5,0.8,0.95")]
    utilizations: Vec<f64>,
    /// Simulated nodes.
    #[arg(long, global = true, default_value_t = 3)]
    nodes: usize,
    /// The cluster and traffic: RK3588 boards as exo runs them, or the workload issue 11 was
    /// filed on (generations of 20-100 tokens at 10 ms a token, run in real time by default).
    #[arg(long, global = true, value_enum, default_value = "board")]
    workload: trace::Preset,
    /// A request still unanswered after this many simulated seconds counts as an error.
    #[arg(long, global = true, default_value_t = 1200.0)]
    max_wait: f64,
    /// Envoy --concurrency and nginx worker_processes (latency and overhead benchmarks).
    #[arg(long, global = true, default_value_t = 2)]
    concurrency: u32,
    #[arg(long, global = true, default_value_t = 5)]
    overhead_rounds: u32,
    #[arg(long, global = true, default_value_t = 5.0)]
    overhead_seconds: f64,
    #[arg(long, global = true, default_value_t = 16)]
    connections: u32,
    #[arg(long, global = true, value_delimiter = ',', default_value = "3,16,64,256")]
    scale_nodes: Vec<usize>,
    #[arg(long, global = true, default_value_t = 2)]
    scale_rounds: u32,
    #[arg(long, global = true, default_value_t = 4.0)]
    scale_seconds: f64,
    /// Scale: also time this other build of exo_lb.wasm in the same rounds (e.g. the previous
    /// commit's), and report its filter CPU and the per-round ratio of the two.
    #[arg(long, global = true)]
    baseline_wasm: Option<PathBuf>,
    /// Scale: also record each Envoy with `perf` (CPU-clock samples) and split its CPU per
    /// request into the filter's wasm code (what V8 compiled) and everything else (Envoy,
    /// the host calls, V8's entry and exit, the kernel). With `EXO_LB_PERF_KEEP=<dir>` each
    /// recording is also copied there, for `perf report --sort dso,sym`.
    #[arg(long, global = true)]
    perf: bool,
    /// Sweep: real switch times, as multiples of a mean generation.
    #[arg(long, global = true, value_delimiter = ',', default_value = "0.2,1,2.5,8")]
    switch_factors: Vec<f64>,
    /// Sweep: static model_switch_cost values tried, as multiples of the real switch time.
    #[arg(long, global = true, value_delimiter = ',', default_value = "1,3,10")]
    static_factors: Vec<f64>,
    /// Sweep: seeds of the traces (the percentiles pool every seed's requests).
    #[arg(long, global = true, value_delimiter = ',', default_value = "1,2")]
    seeds: Vec<u64>,
    /// Simulate and sweep: boards that load models unalike: loading model `m` (in the
    /// workload's order) takes this multiple of the switch time (e.g. `1,2,0.5`: the second
    /// model twice as long, the third half). The static settings stay multiples of the switch
    /// time itself.
    #[arg(long, global = true, value_delimiter = ',')]
    switch_by_model: Vec<f64>,
    /// Simulate and sweep: the same per node (e.g. `1,1,3`: the third board's storage three
    /// times slower). A node loads a model in the product of the two.
    #[arg(long, global = true, value_delimiter = ',')]
    switch_by_node: Vec<f64>,
    /// Simulate: extra exo-lb systems, each a JSON object of filter options (repeatable).
    #[arg(long, global = true)]
    variant: Vec<String>,
    /// Simulate: also search each trace for its best schedule knowing the future
    /// (`offline::best_found`), with this many annealing moves per bisection step (0: no
    /// search). About 20 s per seed and point at 1000000.
    #[arg(long, global = true, default_value_t = 0)]
    offline_moves: u64,
    /// Simulate: the offline search's schedules serve each node's requests in arrival order and
    /// load a model only once its request has come, as an online scheduler must (else they may
    /// do either, an optimistic reference).
    #[arg(long, global = true)]
    offline_fifo: bool,
    /// Simulate, with `--offline-fifo`: allow the schedules searched this one thing more
    /// (`reorder`: serve each node's requests in any order; `early-loads`: load a model before
    /// its request comes), to tell which of the two a gap between the rule sets comes from.
    #[arg(long, global = true, value_enum, requires = "offline_fifo")]
    offline_allow: Option<OfflineAllow>,
    /// Simulate, with `--offline-moves`: under each point, where the waits go, model by model,
    /// in exo-lb's schedule and in the one the search found.
    #[arg(long, global = true, requires = "offline_moves")]
    offline_detail: bool,
    /// Simulate, with `--offline-moves`: the schedules searched may make no request wait longer
    /// than exo-lb's worst on the same trace (counted as failed if they do), so that a lower
    /// p95 cannot come from leaving some requests, a rare model's say, to wait far longer.
    #[arg(long, global = true, requires = "offline_moves")]
    offline_cap_at_exo_lb_worst: bool,
    /// Simulate, with `--offline-moves`: the schedules searched may make no request wait longer
    /// than the nginx model's p95 on the same trace (counted as failed if they do): a lower p95
    /// may not come from leaving some requests to wait longer than nginx makes one in twenty.
    #[arg(long, global = true, requires = "offline_moves", conflicts_with = "offline_cap_at_exo_lb_worst")]
    offline_cap_at_nginx_p95: bool,
    /// Simulate: also judge exo-lb against the static settings on samples of this many seeds
    /// each (the real sweep pools 2), to tell how far a verdict on so few seeds can be from the
    /// one over every seed (0: no such table).
    #[arg(long, global = true, default_value_t = 0)]
    seed_samples: usize,
    /// `all` without the tuning step (use the committed configs/tuned.json).
    #[arg(long, global = true)]
    no_tune: bool,
    /// Exit non-zero if any request of any system failed (the smoke test).
    #[arg(long, global = true)]
    fail_on_errors: bool,
}

impl Opts {
    fn time_scale(&self) -> f64 {
        self.time_scale.unwrap_or(self.workload.time_scale())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        procs::clean_up();
        hook(info);
    }));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async {
        tokio::select! {
            r = run(cli.cmd, cli.opts) => match r {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("bench: FAILED (harness): {e}");
                    println!("bench: FAILED (harness): {}", e.lines().next().unwrap_or(""));
                    ExitCode::from(2)
                }
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("bench: interrupted");
                ExitCode::from(130)
            }
        }
    });
    procs::clean_up();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

fn read_options(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !v.is_object() {
        return Err(format!("{}: must be a JSON object of filter options", path.display()));
    }
    Ok(v)
}

struct Summary {
    md: String,
    line: Vec<String>,
    errors: usize,
}

async fn run(cmd: Cmd, o: Opts) -> Result<bool, String> {
    if o.seed == o.tune_seed {
        return Err("--seed and --tune-seed must differ (tune on one trace, report another)".into());
    }
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    report::init_font()?;
    let mut s = Summary { md: String::new(), line: vec![], errors: 0 };
    let started = Instant::now();
    let (mut hw, wl) = o.workload.cluster(o.nodes);
    if o.switch_by_model.iter().chain(&o.switch_by_node).any(|&x| !(x.is_finite() && x > 0.0)) {
        return Err("--switch-by-model and --switch-by-node take positive multiples".into());
    }
    hw.switch_by_model = o.switch_by_model.clone();
    hw.switch_by_node = o.switch_by_node.clone();
    if !hw.switches_alike() && !matches!(cmd, Cmd::Simulate | Cmd::Sweep) {
        return Err("--switch-by-model and --switch-by-node are for `simulate` and `sweep` only".into());
    }
    let unalike = if hw.switches_alike() {
        String::new()
    } else {
        format!(" (times {:?} by model, {:?} by node)", hw.switch_by_model, hw.switch_by_node)
    };
    s.md += &format!(
        "Command: `{}`\n\nSimulated cluster: {} serial nodes on 127.0.2.11+, {:.0} tok/s decode, {:.0} tok/s prefill, {:.1} s model switch{unalike}, every node can load every model; \
         time scale {}. Workload: models {}, {:.0}% streaming, prompt tokens {}, reply tokens {}; \
         expected service time {:.2} s. All times are simulated seconds.\n\n",
        std::env::args().collect::<Vec<_>>().join(" "),
        hw.nodes,
        hw.tokens_per_second,
        hw.prefill_tokens_per_second,
        hw.switch_time_s,
        o.time_scale(),
        wl.models.iter().map(|(m, p)| format!("{m} {:.0}%", p * 100.0)).collect::<Vec<_>>().join(", "),
        wl.stream_share * 100.0,
        wl.prompt.describe(),
        wl.output.describe(),
        wl.expected_service(&hw),
    );
    if cmd == Cmd::Tune || (cmd == Cmd::All && !o.no_tune) {
        tune(&o, &hw, &wl, &mut s).await?;
    }
    if matches!(cmd, Cmd::All | Cmd::Latency) {
        latency(&o, &hw, &wl, &mut s).await?;
    }
    if matches!(cmd, Cmd::All | Cmd::Overhead) {
        overhead(&o, &mut s).await?;
    }
    if matches!(cmd, Cmd::All | Cmd::Scale) {
        scale(&o, &mut s).await?;
    }
    if cmd == Cmd::Sweep {
        sweep(&o, &hw, &wl, &mut s).await?;
    }
    if cmd == Cmd::Simulate {
        simulate(&o, &hw, &wl, &mut s)?;
    }
    s.md += &format!("\nTotal wall time: {:.0} s.\n", started.elapsed().as_secs_f64());
    let path = o.out.join("results.md");
    std::fs::write(&path, &s.md).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{}", s.md);
    let ok = !(o.fail_on_errors && s.errors > 0);
    println!(
        "bench: {} in {:.0} s | {}",
        if ok { "OK" } else { "FAILED (request errors)" },
        started.elapsed().as_secs_f64(),
        s.line.join(" | ")
    );
    Ok(ok)
}

/// Each model's switch as the filter learned it on each of the cluster's nodes, beside the
/// simulated one.
async fn print_learned(status: std::net::SocketAddr, models: &[String], cluster: &loadgen::SimCluster, hw: &Hardware) {
    let Some(page) = systems::status_page(&reqwest::Client::new(), status).await else {
        return eprintln!("learned: no status page at {status}");
    };
    for (index, m) in models.iter().enumerate() {
        let learned = &page["learned"][m];
        eprintln!(
            "learned {m}: service {} ms, warm first token {} ms",
            learned["service_ms"], learned["first_token_ms"]
        );
        for (i, node) in cluster.nodes.iter().enumerate() {
            eprintln!(
                "  node {i}: switch {} ms (simulated {:.0} ms)",
                learned["nodes"][node.name()]["switch_ms"],
                hw.switch_s(i, index) * 1e3
            );
        }
    }
}

async fn run_one(
    o: &Opts,
    hw: &Hardware,
    wl: &Workload,
    system: &System,
    trace: &[trace::Req],
    util: f64,
) -> Result<RunResult, String> {
    let models: Vec<String> = wl.models.iter().map(|m| m.0.clone()).collect();
    let cluster = loadgen::SimCluster::start(hw, &models, o.time_scale()).await?;
    let mut proxy = match systems::start(system, &cluster.backends(), o.time_scale(), o.concurrency).await {
        Ok(p) => p,
        Err(e) => {
            cluster.shutdown().await;
            return Err(e);
        }
    };
    if let Some(status) = proxy.status {
        if !systems::wait_asked(status, cluster.backends().len()).await {
            eprintln!("  {}: the balancer did not learn what every node has loaded within 3 s", system.name);
        }
    }
    let t = Instant::now();
    let outcomes =
        loadgen::replay(&proxy.url("/v1/chat/completions"), trace, &models, o.time_scale(), o.max_wait).await;
    let wall_s = t.elapsed().as_secs_f64();
    let alive = proxy.proc.check_alive();
    if let Some(cost) = match proxy.admin {
        Some(admin) => systems::look_ahead_cost(admin).await,
        None => None,
    } {
        eprintln!(
            "  {}: look-ahead plans {}, p50 {:.0} us, p99 {:.0} us, max {:.0} us (V8)",
            system.name, cost.plans, cost.p50_us, cost.p99_us, cost.max_us
        );
    }
    let stats: Vec<_> = cluster.nodes.iter().map(|n| n.stats()).collect();
    // The filter's reasons for its switches, to set beside `simulate`'s (EXO_LB_SIM_LOG).
    if std::env::var_os("EXO_LB_SIM_LOG").is_some() {
        for line in proxy.proc.log().lines().filter(|l| l.contains("exo-lb: node") && l.contains(" switches ")) {
            eprintln!("{line}");
        }
    }
    // What the filter learned, from its status page, beside `simulate`'s "learned" lines.
    if let (Some(status), true) = (proxy.status, std::env::var_os("EXO_LB_SIM_LOG").is_some()) {
        print_learned(status, &models, &cluster, hw).await;
    }
    drop(proxy);
    cluster.shutdown().await;
    alive?;
    // Request by request, to set beside `simulate`'s log of the same trace (EXO_LB_SIM_LOG).
    if std::env::var_os("EXO_LB_SIM_LOG").is_some() {
        for (r, out) in trace.iter().zip(&outcomes) {
            eprintln!(
                "req {:>3} (at {:>7.1}) model {} -> {} ttft {:>6.1}{}",
                r.id,
                r.at,
                r.model,
                out.node.as_deref().unwrap_or("?"),
                out.ttft,
                out.error.as_deref().map(|e| format!(" ERROR {e}")).unwrap_or_default()
            );
        }
    }
    let r = RunResult {
        system: system.name.clone(),
        utilization: util,
        outcomes,
        model_switches: stats.iter().map(|s| s.model_switches).sum(),
        max_node_concurrency: stats.iter().map(|s| s.max_concurrent_requests).max().unwrap_or(0),
    };
    eprintln!(
        "  u={:.2} {:<15} ok {:>4} errors {:>3} TTFT p50 {:>7.1} p95 {:>7.1} E2E p95 {:>7.1} switches {:>4} max conc {:>3} ({:.0} s)",
        util,
        r.system,
        r.ok().count(),
        r.errors(),
        percentile(&r.ttft(), 50.0),
        percentile(&r.ttft(), 95.0),
        percentile(&r.e2e(), 95.0),
        r.model_switches,
        r.max_node_concurrency,
        wall_s
    );
    Ok(r)
}

async fn tune(o: &Opts, hw: &Hardware, wl: &Workload, s: &mut Summary) -> Result<(), String> {
    let path = o.configs.join("tune-candidates.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cands: Vec<Value> = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let util = 0.8;
    let trace = wl.trace(hw, o.tune_seed, util, o.tune_requests);
    eprintln!("== tuning: {} candidates, seed {}, {} requests at {util}", cands.len(), o.tune_seed, o.tune_requests);
    s.md += &format!(
        "## Tuning (seed {}, {} requests at 80%; the winner is written to `{}`)\n\n| candidate | options | errors | TTFT p95 | E2E p95 | switches |\n|---|---|---|---|---|---|\n",
        o.tune_seed,
        o.tune_requests,
        o.configs.join("tuned.json").display()
    );
    let mut best: Option<((usize, f64), Value)> = None;
    for c in &cands {
        let name = c["name"].as_str().unwrap_or("?").to_string();
        let options = c.get("options").cloned().ok_or(format!("{}: candidate without options", path.display()))?;
        let r = run_one(
            o,
            hw,
            wl,
            &System { name: format!("tune:{name}"), kind: Kind::ExoLb(options.clone()) },
            &trace,
            util,
        )
        .await?;
        let score = (r.errors(), percentile(&r.ttft(), 95.0));
        s.md += &format!(
            "| {name} | `{options}` | {} | {:.1} | {:.1} | {} |\n",
            r.errors(),
            score.1,
            percentile(&r.e2e(), 95.0),
            r.model_switches
        );
        if best.as_ref().is_none_or(|(b, _)| score.0 < b.0 || (score.0 == b.0 && score.1 < b.1)) {
            best = Some((score, options));
        }
    }
    let (_, options) = best.ok_or("no tuning candidates")?;
    let out = o.configs.join("tuned.json");
    std::fs::write(&out, serde_json::to_string_pretty(&options).unwrap_or_default() + "\n")
        .map_err(|e| format!("{}: {e}", out.display()))?;
    s.md += &format!("\nWinner: `{options}`\n\n");
    eprintln!("== tuned: {options}");
    Ok(())
}

async fn latency(o: &Opts, hw: &Hardware, wl: &Workload, s: &mut Summary) -> Result<(), String> {
    let systems = vec![
        System { name: "nginx".into(), kind: Kind::Nginx },
        System { name: "envoy".into(), kind: Kind::Envoy },
        System { name: "exo-lb-default".into(), kind: Kind::ExoLb(read_options(&o.configs.join("default.json"))?) },
        System { name: "exo-lb-tuned".into(), kind: Kind::ExoLb(read_options(&o.configs.join("tuned.json"))?) },
    ];
    s.md += &format!("## Mixed-model latency (seed {}, {} requests per run)\n\n", o.seed, o.requests);
    for sys in &systems[2..] {
        if let Kind::ExoLb(v) = &sys.kind {
            s.md += &format!("- {}: `{}`\n", sys.name, v);
        }
    }
    let mut all = Vec::new();
    for &util in &o.utilizations {
        let trace = wl.trace(hw, o.seed, util, o.requests);
        let bounds = trace::bounds(hw, &trace);
        eprintln!("== latency at {util}: {} requests, offered {:.2}", trace.len(), bounds.offered_utilization);
        let mut rs = Vec::new();
        for sys in &systems {
            rs.push(run_one(o, hw, wl, sys, &trace, util).await?);
        }
        let refs: Vec<&RunResult> = rs.iter().collect();
        let png = format!("latency-u{:.0}.png", util * 100.0);
        report::latency_chart(
            &o.out.join(&png),
            &format!(
                "{} requests at {:.0}% utilization (this trace: {:.0}%), seed {}",
                trace.len(),
                util * 100.0,
                bounds.offered_utilization * 100.0,
                o.seed
            ),
            &refs,
            &bounds,
        )?;
        s.md += &format!(
            "\n### {:.0}% target utilization (this trace: {:.0}%, arrivals over {:.0} s)\n\n{}\n![latency at {:.0}%]({png})\n",
            util * 100.0,
            bounds.offered_utilization * 100.0,
            trace.last().map_or(0.0, |r| r.at),
            report::latency_table(&refs, &bounds),
            util * 100.0
        );
        // The baselines may fail requests (that is what is being measured); exo-lb must not.
        s.errors += rs.iter().filter(|r| r.system.contains("exo-lb")).map(|r| r.errors()).sum::<usize>();
        all.extend(rs);
    }
    let names: Vec<String> = systems.iter().map(|s| s.name.clone()).collect();
    report::summary_chart(&o.out.join("p95-ttft.png"), &names, &o.utilizations, &all)?;
    s.md += "\n![p95 TTFT vs utilization](p95-ttft.png)\n";
    // Headline: the utilization nearest 80%.
    let u = o.utilizations.iter().copied().min_by(|a, b| (a - 0.8).abs().total_cmp(&(b - 0.8).abs())).unwrap_or(0.8);
    let get = |n: &str| all.iter().find(|r| r.system == n && r.utilization == u);
    if let Some(ng) = get("nginx") {
        s.md += &format!("\n### Against the targets at {:.0}% (exo-lb / nginx)\n\n| system | p95 TTFT ratio (≤ 0.33) | switches ratio (≤ 0.33) | throughput ratio (≥ 1) | errors (0) | max node concurrency (≤ 1) |\n|---|---|---|---|---|---|\n", u * 100.0);
        for n in ["exo-lb-default", "exo-lb-tuned", "envoy"] {
            if let Some(r) = get(n) {
                let pt = percentile(&r.ttft(), 95.0) / percentile(&ng.ttft(), 95.0);
                let sw = r.model_switches as f64 / ng.model_switches.max(1) as f64;
                let th = r.throughput_per_min() / ng.throughput_per_min();
                s.md += &format!(
                    "| {n} | {pt:.2} | {sw:.2} ({} vs {}) | {th:.2} | {} | {} |\n",
                    r.model_switches,
                    ng.model_switches,
                    r.errors(),
                    r.max_node_concurrency
                );
                if n.starts_with("exo-lb") {
                    s.line.push(format!(
                        "{n}/nginx @{:.0}%: p95 TTFT {pt:.2}, switches {sw:.2}, throughput {th:.2}, errors {}",
                        u * 100.0,
                        r.errors()
                    ));
                }
            }
        }
        s.line.push(format!("nginx errors {}", ng.errors()));
    }
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

async fn overhead(o: &Opts, s: &mut Summary) -> Result<(), String> {
    let options = read_options(&o.configs.join("overhead.json"))?;
    eprintln!("== overhead: {} rounds of {} s, {} connections", o.overhead_rounds, o.overhead_seconds, o.connections);
    let rows = wrk::overhead(&options, o.overhead_rounds, o.overhead_seconds, o.connections, o.concurrency).await?;
    let base = &rows[0];
    let b99 = mean(&base.rounds.iter().map(|r| r.p99_us).collect::<Vec<_>>());
    s.md += &format!(
        "\n## Overhead (wrk -t1 -c{} , {} interleaved rounds of {} s, backend answers at once, Envoy --concurrency {}, nginx {} workers; exo-lb options `{}`)\n\n\
         Saturated: every proxy serves as many requests as it can at {} connections (its p50 is then the connections over its requests/s).\n\n\
         | system | req/s | p50 µs | p99 µs | req/s vs envoy (median of rounds) | p50 added µs (median) | p99 vs envoy | errors |\n|---|---|---|---|---|---|---|---|\n",
        o.connections, o.overhead_rounds, o.overhead_seconds, o.concurrency, o.concurrency, options, o.connections
    );
    let mut single_md = String::from(
        "\nOne connection (wrk -c1, same rounds): the proxy never queues, so the p50 difference is the latency a \
         proxy adds to one request.\n\n\
         | system | req/s | p50 µs | p99 µs | p50 added µs (median of rounds) | p99 added µs (median) |\n|---|---|---|---|---|---|\n",
    );
    for row in &rows {
        let rps = mean(&row.rounds.iter().map(|r| r.rps).collect::<Vec<_>>());
        let p50 = mean(&row.rounds.iter().map(|r| r.p50_us).collect::<Vec<_>>());
        let p99 = mean(&row.rounds.iter().map(|r| r.p99_us).collect::<Vec<_>>());
        let errors: u64 = row.rounds.iter().chain(&row.single).map(|r| r.errors).sum();
        s.errors += errors as usize;
        // Per-round ratios and differences (each against bare Envoy in the same round), then
        // their medians: one slow round on a shared machine does not move them.
        let ratio: Vec<f64> = row.rounds.iter().zip(&base.rounds).map(|(r, b)| r.rps / b.rps).collect();
        let added: Vec<f64> = row.rounds.iter().zip(&base.rounds).map(|(r, b)| r.p50_us - b.p50_us).collect();
        let single_added: Vec<f64> = row.single.iter().zip(&base.single).map(|(r, b)| r.p50_us - b.p50_us).collect();
        let single_added99: Vec<f64> = row.single.iter().zip(&base.single).map(|(r, b)| r.p99_us - b.p99_us).collect();
        s.md += &format!(
            "| {} | {rps:.0} | {p50:.0} | {p99:.0} | {:.3} (rounds {}) | {:+.0} | {:.2} | {errors} |\n",
            row.system,
            median(&ratio),
            ratio.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" "),
            median(&added),
            p99 / b99,
        );
        single_md += &format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:+.0} (rounds {}) | {:+.0} |\n",
            row.system,
            mean(&row.single.iter().map(|r| r.rps).collect::<Vec<_>>()),
            mean(&row.single.iter().map(|r| r.p50_us).collect::<Vec<_>>()),
            mean(&row.single.iter().map(|r| r.p99_us).collect::<Vec<_>>()),
            median(&single_added),
            single_added.iter().map(|d| format!("{d:+.0}")).collect::<Vec<_>>().join(" "),
            median(&single_added99),
        );
        if row.system != "envoy" {
            s.line.push(format!(
                "{}/envoy rps {:.2} p50 {:+.0}us (1 conn {:+.0}us)",
                row.system,
                median(&ratio),
                median(&added),
                median(&single_added)
            ));
        }
    }
    s.md += &single_md;
    Ok(())
}

/// The median (NaN when empty).
fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let k = v.len() / 2;
    if v.len() % 2 == 1 {
        v[k]
    } else {
        (v[k - 1] + v[k]) / 2.0
    }
}

async fn sweep(o: &Opts, base: &Hardware, wl: &Workload, s: &mut Summary) -> Result<(), String> {
    let mean = wl.expected_service(base);
    s.md += &format!(
        "## Scheduling sweep (mean generation {mean:.1} s; {} requests per run; seeds {:?}; percentiles over all seeds' requests)\n\n\
         Systems: nginx (the seed's configuration), exo-lb with no scheduling option set (`{{}}`), exo-lb with a static \
         `model_switch_cost` of {:?} × the real switch time, and a clairvoyant dispatcher (knows every arrival and length; \
         each request to the node where its first token comes earliest), the simulator's model of nginx on the same traces \
         (`offline::least_conn`; no timeout, node concurrency not computed), and a bound no scheduler reaches (one FIFO queue, \
         every node with every model loaded). A failed request counts as never answered: with more than 5 % failed, p95 is ∞.\n",
        o.requests, o.seeds, o.static_factors
    );
    let mut checks = Vec::new();
    for &u in &o.utilizations {
        let mut series: Vec<(String, Vec<f64>)> = Vec::new();
        for &f in &o.switch_factors {
            let hw = Hardware { switch_time_s: f * mean, ..base.clone() };
            let mut systems = vec![
                System { name: "nginx".into(), kind: Kind::Nginx },
                System { name: "exo-lb".into(), kind: Kind::ExoLb(serde_json::json!({})) },
            ];
            for &k in &o.static_factors {
                systems.push(System {
                    name: format!("exo-lb static {k}x"),
                    kind: Kind::ExoLb(serde_json::json!({
                        "model_switch_cost": format!("{:.3}s", k * hw.switch_time_s),
                        "learn_switch_cost": false,
                    })),
                });
            }
            let mut runs: Vec<RunResult> = Vec::new();
            let mut reference: (Vec<f64>, u64) = (Vec::new(), 0);
            let mut free_switches: Vec<f64> = Vec::new();
            let mut nginx_model: (Vec<f64>, u64) = (Vec::new(), 0);
            for &seed in &o.seeds {
                let trace = wl.trace(&hw, seed, u, o.requests);
                eprintln!("== sweep: switch {f}x ({:.1} s), load {u}, seed {seed}", hw.switch_time_s);
                for sys in &systems {
                    runs.push(run_one(o, &hw, wl, sys, &trace, u).await?);
                }
                let (t, n) = offline::clairvoyant(&hw, &trace, wl.models.len());
                reference.0.extend(t);
                reference.1 += n;
                let (t, n) = offline::least_conn(&hw, &trace, wl.models.len());
                nginx_model.0.extend(t);
                nginx_model.1 += n;
                free_switches.extend(trace::bounds(&hw, &trace).fifo_ttft);
            }
            let mut points: Vec<sweep::Point> = systems
                .iter()
                .map(|sys| {
                    sweep::Point::of(&sys.name, &runs.iter().filter(|r| r.system == sys.name).collect::<Vec<_>>())
                })
                .collect();
            points.push(sweep::Point::computed("clairvoyant", &reference.0, reference.1, 1));
            // The simulator's nginx on the same traces (`simulate` reads it over many seeds): how
            // far from the real one it is (node concurrency not computed: 0).
            points.push(sweep::Point::computed("nginx model (least_conn, computed)", &nginx_model.0, nginx_model.1, 0));
            // What no scheduler reaches: one FIFO queue for all nodes, as if every node had every
            // model loaded (switches free). Where even this is not 5x better than nginx, 5x is
            // out of reach on this trace.
            points.push(sweep::Point::computed("free switches (bound)", &free_switches, 0, 1));
            let nginx_p95 = points.first().map_or(f64::NAN, |p| p.p95);
            s.md += &format!(
                "\n### Switch {f}x a mean generation ({:.1} s), load {:.0}%\n\n| system | TTFT p50 | p95 | p99 | p95 vs nginx | switches | errors | max node concurrency |\n|---|---|---|---|---|---|---|---|\n",
                hw.switch_time_s,
                u * 100.0
            );
            for p in &points {
                s.md += &format!(
                    "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} | {} |\n",
                    p.system,
                    p.p50,
                    p.p95,
                    p.p99,
                    p.p95 / nginx_p95,
                    p.switches,
                    p.errors,
                    p.max_concurrency
                );
                match series.iter_mut().find(|x| x.0 == p.system) {
                    Some(x) => x.1.push(p.p95),
                    None => series.push((p.system.clone(), vec![p.p95])),
                }
            }
            let auto = points.iter().find(|p| p.system == "exo-lb");
            let statics = || points.iter().filter(|p| p.system.starts_with("exo-lb static"));
            let best_static = statics().map(|p| p.p95).fold(f64::INFINITY, f64::min);
            // Where every static setting fails more than 5 % (an overloaded point), p95 cannot
            // tell them apart: the share answered does.
            let fewest_static_errors = statics().map(|p| p.errors).min().unwrap_or(0);
            if let Some(a) = auto {
                let vs_static = if best_static.is_finite() {
                    a.p95 / best_static
                } else {
                    (a.errors as f64 + 1.0) / (fewest_static_errors as f64 + 1.0)
                };
                // Where both fail more than 5 % (no finite p95), the share answered compares them.
                let nginx_errors = points.first().map_or(0, |p| p.errors);
                let both_failed = nginx_p95.is_infinite() && a.p95.is_infinite();
                let vs_nginx =
                    if both_failed { (nginx_errors as f64 + 1.0) / (a.errors as f64 + 1.0) } else { nginx_p95 / a.p95 };
                let want = if (u - 0.8).abs() < 1e-9 {
                    if f >= 1.0 {
                        5.0
                    } else {
                        1.3
                    }
                } else {
                    1.0
                };
                let ok = vs_static <= 1.1 && vs_nginx >= want && (u >= 0.95 || a.errors == 0) && a.max_concurrency <= 1;
                s.md += &format!(
                    "\nexo-lb (no options): {} {:.2}x the best static setting's (target ≤ 1.10), nginx/exo-lb {} {:.2} (target ≥ {want}), errors {}, max node concurrency {}: **{}**\n",
                    if best_static.is_finite() { "p95" } else { "failed requests (+1)" },
                    vs_static,
                    if both_failed { "failed requests (+1)" } else { "p95" },
                    vs_nginx,
                    a.errors,
                    a.max_concurrency,
                    if ok { "met" } else { "missed" }
                );
                checks.push(format!(
                    "{f}x@{:.0}%: {:.2}/static {:.2}x-nginx {}",
                    u * 100.0,
                    vs_static,
                    vs_nginx,
                    if ok { "ok" } else { "MISS" }
                ));
            }
        }
        let png = format!("sweep-u{:.0}.png", u * 100.0);
        sweep::chart(
            &o.out.join(&png),
            &format!("p95 time to first token vs switch time at {:.0}% load", u * 100.0),
            &o.switch_factors,
            &series,
        )?;
        s.md += &format!("\n![p95 TTFT vs switch time at {:.0}%]({png})\n", u * 100.0);
    }
    s.line.push(format!("sweep: {}", checks.join(", ")));
    Ok(())
}

/// p95 of times where a failed request (None) counts as never answered.
/// One request of a point, for `--offline-detail`: its model, its generation's length, and its
/// time to first byte in exo-lb's schedule and in the search's (None: failed).
struct Waited {
    model: usize,
    service_s: f64,
    online: Option<f64>,
    offline: Option<f64>,
}

/// Where a point's waits go, model by model, in exo-lb's schedule and the search's: each
/// model's p50 and p95, how many of the 5 % latest requests (those p95 does not see) are its, and
/// how long the latest requests' generations are against all of them.
fn waits_by_model(point: &str, models: &[(String, f64)], detail: &[Waited]) -> String {
    let time = |t: Option<f64>| t.unwrap_or(f64::INFINITY);
    let latest = |pick: fn(&Waited) -> Option<f64>| {
        let mut all: Vec<&Waited> = detail.iter().collect();
        all.sort_by(|a, b| time(pick(b)).total_cmp(&time(pick(a))));
        all.truncate(detail.len().div_ceil(20));
        all
    };
    let (online, offline) = (latest(|d| d.online), latest(|d| d.offline));
    let mut md = format!(
        "\n#### {point}: where the waits go (TTFT s; exo-lb / the search's schedule)\n\n\
         | model | requests | p50 | p95 | of the latest 5 % |\n|---|---|---|---|---|\n"
    );
    for (m, (name, _)) in models.iter().enumerate() {
        let of = |pick: fn(&Waited) -> Option<f64>| -> Vec<f64> {
            detail.iter().filter(|d| d.model == m).map(|d| time(pick(d))).collect()
        };
        let (a, b) = (of(|d| d.online), of(|d| d.offline));
        md += &format!(
            "| {name} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} |\n",
            a.len(),
            percentile(&a, 50.0),
            percentile(&b, 50.0),
            percentile(&a, 95.0),
            percentile(&b, 95.0),
            online.iter().filter(|d| d.model == m).count(),
            offline.iter().filter(|d| d.model == m).count(),
        );
    }
    let mean = |ds: &[&Waited]| ds.iter().map(|d| d.service_s).sum::<f64>() / ds.len().max(1) as f64;
    md += &format!(
        "\nGeneration of the latest 5 %: {:.1} s / {:.1} s on average, all requests {:.1} s.\n",
        mean(&online),
        mean(&offline),
        mean(&detail.iter().collect::<Vec<_>>()),
    );
    md
}

/// The offline search's column heading in `simulate`'s table: its rules, and what its cells hold.
fn offline_column(o: &Opts) -> String {
    if o.offline_moves == 0 {
        return String::new();
    }
    let rules = match (o.offline_fifo, o.offline_allow) {
        (false, _) => "",
        (true, None) => ", FIFO",
        (true, Some(OfflineAllow::Reorder)) => ", loads as FIFO, any order",
        (true, Some(OfflineAllow::EarlyLoads)) => ", FIFO order, early loads",
    };
    let (cap, over) = if o.offline_cap_at_exo_lb_worst {
        (", none over exo-lb's worst", "over exo-lb's worst")
    } else if o.offline_cap_at_nginx_p95 {
        (", none over the nginx model's p95", "over the nginx model's p95")
    } else {
        ("", "failed")
    };
    format!(" offline search{rules}{cap}, p95 (switches, {over}; nginx model / it) |")
}

fn simulate(o: &Opts, base: &Hardware, wl: &Workload, s: &mut Summary) -> Result<(), String> {
    let mean = wl.expected_service(base);
    let models: Vec<String> = wl.models.iter().map(|m| m.0.clone()).collect();
    let mut variants: Vec<(String, Value)> = Vec::new();
    for v in &o.variant {
        let options: Value = serde_json::from_str(v).map_err(|e| format!("--variant {v}: {e}"))?;
        variants.push((v.clone(), options));
    }
    let column = |name: &str| format!("{name} p95 (switches, failed)");
    let mut header = vec![column("exo-lb")];
    header.extend(o.static_factors.iter().map(|k| column(&format!("static {k}x"))));
    header.extend(variants.iter().map(|(name, _)| column(&format!("`{name}`"))));
    s.md += &format!(
        "## Simulated scheduling (the filter's logic in virtual time; mean generation {mean:.1} s; {} requests x seeds {:?}; \
         p95 TTFT in simulated s, a failed request counted as never answered)\n\n\
         | load | switch | {} | nginx model p95 (switches) | clairvoyant |{} free switches | exo-lb / best static | nginx model / exo-lb |\n|---|---|{}---|---|{}---|---|---|\n",
        o.requests,
        o.seeds,
        header.join(" | "),
        offline_column(o),
        "---|".repeat(header.len()),
        if o.offline_moves > 0 { "---|" } else { "" },
    );
    let mut worst: f64 = 0.0;
    let mut details = String::new();
    let mut samples = if o.seed_samples > 0 {
        format!(
            "\n### The verdict on samples of {} seeds (exo-lb / best static p95, each sample pooled alone)\n\n\
             Against the best static setting of each sample (what a sweep of so few seeds reports) and against \
             the one setting best over every seed above. The middle sample, the worst, and how many are over the \
             1.10 bar (NaN: no finite p95 on either side).\n\n\
             | load | switch | samples | vs the sample's best: middle, worst, over 1.10 | best over all seeds | vs it: middle, worst, over 1.10 |\n\
             |---|---|---|---|---|---|\n",
            o.seed_samples
        )
    } else {
        String::new()
    };
    for &u in &o.utilizations {
        for &f in &o.switch_factors {
            let hw = Hardware { switch_time_s: f * mean, ..base.clone() };
            let mut systems: Vec<Value> = vec![serde_json::json!({})];
            for &factor in &o.static_factors {
                systems.push(serde_json::json!({
                    "model_switch_cost": format!("{:.3}s", factor * hw.switch_time_s),
                    "learn_switch_cost": false,
                }));
            }
            systems.extend(variants.iter().map(|v| v.1.clone()));
            let mut results: Vec<(Vec<Option<f64>>, u64)> = vec![(Vec::new(), 0); systems.len()];
            // Each system's times to first byte, seed by seed (`--seed-samples`).
            let mut by_seed: Vec<Vec<Vec<Option<f64>>>> = vec![Vec::new(); systems.len()];
            let (mut clair, mut free) = (Vec::new(), Vec::new());
            let (mut nginx, mut nginx_switches) = (Vec::new(), 0);
            let (mut searched, mut searched_switches, mut searched_failed) = (Vec::new(), 0, 0);
            let mut detail: Vec<Waited> = Vec::new();
            for &seed in &o.seeds {
                let trace = wl.trace(&hw, seed, u, o.requests);
                let mut exo_lb_order = None;
                let mut exo_lb_ttft = None;
                for ((options, result), seeds) in systems.iter().zip(results.iter_mut()).zip(by_seed.iter_mut()) {
                    let run = simulate::run(&hw, &trace, &models, options, o.time_scale())?;
                    if o.offline_detail || o.offline_cap_at_exo_lb_worst {
                        exo_lb_ttft.get_or_insert_with(|| run.ttft.clone());
                    }
                    if o.seed_samples > 0 {
                        seeds.push(run.ttft.clone());
                    }
                    result.0.extend(run.ttft);
                    result.1 += run.switches;
                    exo_lb_order.get_or_insert(run.order);
                }
                clair.extend(offline::clairvoyant(&hw, &trace, wl.models.len()).0);
                let (ttft, switches) = offline::least_conn(&hw, &trace, wl.models.len());
                let nginx_trace_p95 = o.offline_cap_at_nginx_p95.then(|| percentile(&ttft, 95.0));
                nginx.extend(ttft);
                nginx_switches += switches;
                free.extend(trace::bounds(&hw, &trace).fifo_ttft);
                if o.offline_moves > 0 {
                    let effort = offline::Effort { moves: o.offline_moves, steps: 10, seed };
                    let allow = |what| !o.offline_fifo || o.offline_allow == Some(what);
                    let rules = offline::Rules {
                        early_loads: allow(OfflineAllow::EarlyLoads),
                        reorder: allow(OfflineAllow::Reorder),
                    };
                    // With a cap, exo-lb's worst wait on this trace (the timeout where it
                    // failed one), or the nginx model's p95 on it, is the search's timeout.
                    let timeout_s = if let Some(p95) = nginx_trace_p95 {
                        p95
                    } else if o.offline_cap_at_exo_lb_worst {
                        exo_lb_ttft
                            .iter()
                            .flatten()
                            .try_fold(0.0f64, |worst, t| t.map(|t| worst.max(t)))
                            .unwrap_or(simulate::IDLE_TIMEOUT_S)
                    } else {
                        simulate::IDLE_TIMEOUT_S
                    };
                    let found = offline::best_found(
                        &hw,
                        &trace,
                        wl.models.len(),
                        timeout_s,
                        rules,
                        exo_lb_order.as_deref(),
                        &effort,
                    );
                    let ttft: Vec<Option<f64>> =
                        found.ttft.iter().map(|&t| Some(t).filter(|&t| t <= simulate::IDLE_TIMEOUT_S)).collect();
                    for ((r, &online), &offline) in trace.iter().zip(exo_lb_ttft.iter().flatten()).zip(&ttft) {
                        detail.push(Waited { model: r.model, service_s: hw.service(r), online, offline });
                    }
                    searched.extend(ttft);
                    searched_switches += found.switches;
                    searched_failed += found.failed;
                }
            }
            let nginx_p95 = percentile(&nginx, 95.0);
            let searched = if o.offline_moves > 0 {
                let p95 = simulate::p95_failed_last(&searched);
                format!(" {p95:.1} ({searched_switches}, {searched_failed}; nginx model / it {:.2}) |", nginx_p95 / p95)
            } else {
                String::new()
            };
            let p95: Vec<f64> = results.iter().map(|r| simulate::p95_failed_last(&r.0)).collect();
            let auto = p95.first().copied().unwrap_or(f64::NAN);
            let best = p95.iter().skip(1).take(o.static_factors.len()).copied().fold(f64::INFINITY, f64::min);
            if best.is_finite() {
                worst = worst.max(auto / best);
            }
            let cells: Vec<String> = results
                .iter()
                .zip(&p95)
                .map(|(r, p)| format!("{p:.1} ({}, {})", r.1, r.0.iter().filter(|t| t.is_none()).count()))
                .collect();
            s.md += &format!(
                "| {:.0}% | {f}x | {} | {nginx_p95:.1} ({nginx_switches}) | {:.1} |{searched} {:.1} | {:.3} | {:.3} |\n",
                u * 100.0,
                cells.join(" | "),
                percentile(&clair, 95.0),
                percentile(&free, 95.0),
                auto / best,
                nginx_p95 / auto,
            );
            if o.seed_samples > 0 {
                let statics = by_seed.get(1..=o.static_factors.len()).unwrap_or_default();
                let v =
                    simulate::sample_verdicts(by_seed.first().map_or(&[], |s| s.as_slice()), statics, o.seed_samples);
                samples += &format!(
                    "| {:.0}% | {f}x | {} | {} | {}x | {} |\n",
                    u * 100.0,
                    v.against_best_in_sample.len(),
                    spread(&v.against_best_in_sample),
                    o.static_factors.get(v.best_overall).copied().unwrap_or(f64::NAN),
                    spread(&v.against_best_overall),
                );
            }
            if o.offline_detail {
                details += &waits_by_model(&format!("{:.0}%/{f}x", u * 100.0), &wl.models, &detail);
            }
        }
    }
    s.md += &samples;
    s.md += &details;
    s.line.push(format!("simulate: worst exo-lb / best static p95 {worst:.2}"));
    Ok(())
}

/// Middle, worst and count over 1.10 of sample ratios (NaN ones aside), for a table cell.
fn spread(ratios: &[f64]) -> String {
    let mut known: Vec<f64> = ratios.iter().copied().filter(|r| !r.is_nan()).collect();
    known.sort_by(f64::total_cmp);
    // The middle one (the upper of two): an infinite ratio counts, as `median` would drop it.
    let middle = known.get(known.len() / 2).copied().unwrap_or(f64::NAN);
    let worst = known.last().copied().unwrap_or(f64::NAN);
    let over = known.iter().filter(|&&r| r > 1.10).count();
    format!("{middle:.2}, {worst:.2}, {over} of {}", known.len())
}

/// `a - b`, round by round (interleaved rounds: each pair was measured at nearly the same time).
fn round_differences(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

async fn scale(o: &Opts, s: &mut Summary) -> Result<(), String> {
    let options = read_options(&o.configs.join("overhead.json"))?;
    eprintln!("== scale: {:?} nodes", o.scale_nodes);
    let points = wrk::scale(
        &options,
        o.baseline_wasm.as_deref(),
        &o.scale_nodes,
        o.scale_rounds,
        o.scale_seconds,
        o.connections,
        o.perf,
    )
    .await?;
    s.md += &format!(
        "\n## Scale (Envoy --concurrency 1, V8; CPU of the Envoy process from /proc per request; {} interleaved rounds of {} s; wrk -c{}; medians of the per-round differences)\n\n\
         The floor is Envoy with `bench/floor-filter`, the least a body-routing wasm filter does (pause the headers, read \
         the body, set the destination header): what any such filter costs on this Envoy.\n\n\
         The floor with {} more host calls per request (property reads) gives what one host call costs.\n\n\
         | nodes | bare Envoy µs CPU/req | + floor filter | + exo-lb | **exo-lb filter µs CPU/req** (exo-lb − bare) | floor filter µs/req | exo-lb above the floor | µs per host call | bare req/s | exo-lb req/s | errors |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        o.scale_rounds, o.scale_seconds, o.connections, wrk::FLOOR_EXTRA_CALLS
    );
    for p in &points {
        let diff = |a: &[f64], b: &[f64]| median(&round_differences(a, b));
        let filter = diff(&p.exo_cpu_us, &p.bare_cpu_us);
        let floor = diff(&p.floor_cpu_us, &p.bare_cpu_us);
        let above = diff(&p.exo_cpu_us, &p.floor_cpu_us);
        let per_call = diff(&p.floor_calls_cpu_us, &p.floor_cpu_us) / f64::from(wrk::FLOOR_EXTRA_CALLS);
        let show = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.1}") };
        s.errors += p.errors as usize;
        s.md += &format!(
            "| {} | {:.1} | {} | {:.1} | **{}** | {} | {} | {} | {:.0} | {:.0} | {} |\n",
            p.nodes,
            median(&p.bare_cpu_us),
            show(median(&p.floor_cpu_us)),
            median(&p.exo_cpu_us),
            show(filter),
            show(floor),
            show(above),
            if per_call.is_nan() { "-".to_string() } else { format!("{per_call:.2}") },
            median(&p.bare_rps),
            median(&p.exo_rps),
            p.errors
        );
        s.line.push(format!("filter CPU @{} nodes {}us/req (floor filter {})", p.nodes, show(filter), show(floor)));
    }
    if o.perf {
        s.md += "\nWhere the CPU goes (`--perf`: CPU-clock samples of each Envoy during its rounds, split by \
                 where the sample fell): in the wasm code V8 compiled from the filter, and everywhere else (Envoy, \
                 the host calls, V8's entry and exit, the kernel). Medians of the rounds, µs per request.\n\n\
                 | nodes | system | CPU µs/req | in wasm code | elsewhere |\n|---|---|---|---|---|\n";
        for p in &points {
            for (name, rounds) in &p.perf_split {
                let cpu: Vec<f64> = rounds.iter().map(|r| r.0).collect();
                let wasm: Vec<f64> = rounds.iter().map(|r| r.1).collect();
                let rest: Vec<f64> = rounds.iter().map(|(c, w)| c - w).collect();
                s.md += &format!(
                    "| {} | {name} | {:.1} | {:.1} | {:.1} |\n",
                    p.nodes,
                    median(&cpu),
                    median(&wasm),
                    median(&rest)
                );
            }
            let wasm_of = |n: &str| {
                let rounds = p.perf_split.iter().find(|(m, _)| *m == n).map(|(_, v)| v.as_slice()).unwrap_or_default();
                median(&rounds.iter().map(|r| r.1).collect::<Vec<f64>>())
            };
            s.line.push(format!(
                "exo-lb wasm code @{} nodes {:.1}us/req (floor {:.1})",
                p.nodes,
                wasm_of("exo-lb"),
                wasm_of("floor")
            ));
        }
    }
    if let Some(wasm) = &o.baseline_wasm {
        s.md += &format!(
            "\nThe baseline build ({}) in the same rounds: its filter CPU (baseline − bare) and, per round, \
             exo-lb's filter CPU divided by the baseline's (median; below 1: this build costs less).\n\n\
             | nodes | baseline filter µs CPU/req | **this build / baseline** (per round) |\n|---|---|---|\n",
            wasm.display()
        );
        for p in &points {
            let (this, base) = (
                round_differences(&p.exo_cpu_us, &p.bare_cpu_us),
                round_differences(&p.baseline_cpu_us, &p.bare_cpu_us),
            );
            let ratios: Vec<f64> = this.iter().zip(&base).map(|(a, b)| a / b).collect();
            let rounds: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            s.md += &format!(
                "| {} | {:.1} | **{:.2}** ({}) |\n",
                p.nodes,
                median(&base),
                median(&ratios),
                rounds.join(" ")
            );
            s.line.push(format!("@{} nodes this/baseline filter CPU {:.2}", p.nodes, median(&ratios)));
        }
    }
    Ok(())
}
