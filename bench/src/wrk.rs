//! The overhead benchmark (wrk through bare Envoy, Envoy + exo-lb and nginx, interleaved) and the
//! scale benchmark (the filter's CPU per request as the node count grows).

use crate::backend::FastBackend;
use crate::procs::temp_dir;
use crate::systems::{self, Backend, Kind, System};
use serde_json::Value;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

const MODEL: &str = "qwen2.5-1.5b-instruct-rkllm";

fn script() -> std::path::PathBuf {
    let dir = temp_dir("wrk");
    let path = dir.join("post.lua");
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Hello"}}],"max_tokens":1}}"#);
    std::fs::write(
        &path,
        format!("wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"),
    )
    .expect("write wrk script");
    path
}

fn parse_time_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

pub fn parse_wrk(out: &str) -> Result<WrkResult, String> {
    let mut r = WrkResult::default();
    let mut seen_rps = false;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().map_err(|_| format!("bad rps line {t:?}"))?;
            seen_rps = true;
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_us = parse_time_us(v).ok_or_else(|| format!("bad p50 {t:?}"))?;
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_us = parse_time_us(v).ok_or_else(|| format!("bad p99 {t:?}"))?;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(1);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            r.errors += v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        } else if t.contains(" requests in ") {
            r.requests = t.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    if !seen_rps || r.requests == 0 {
        return Err(format!("wrk printed no result:\n{out}"));
    }
    Ok(r)
}

pub async fn run_wrk(url: &str, connections: u32, seconds: f64) -> Result<WrkResult, String> {
    let secs = (seconds.ceil() as u64).max(1);
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s"), "--timeout", "5s", "--latency", "-s"])
        .arg(script())
        .arg(url)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(secs + 30), cmd.output())
        .await
        .map_err(|_| "wrk did not finish".to_string())?
        .map_err(|e| format!("run wrk (apt-get install wrk): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("wrk failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr)));
    }
    parse_wrk(&text)
}

fn backends(fast: &FastBackend) -> Vec<Backend> {
    fast.addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Backend { name: format!("n{}", i + 1), addr: *a, models: vec![MODEL.to_string()] })
        .collect()
}

pub struct OverheadRow {
    pub system: String,
    /// At `connections` (the proxy saturated: its throughput).
    pub rounds: Vec<WrkResult>,
    /// At one connection (the proxy not saturated: the latency it adds to one request).
    pub single: Vec<WrkResult>,
}

/// Interleaved rounds (A B C A B C ...) of `seconds` each, every system first at `connections`
/// and then at one connection; the proxies stay up throughout.
///
/// Why both: with the proxy saturated, its p50 at a fixed number of connections is that number
/// over its requests/s (Little's law), the throughput figure again; what a filter adds to one
/// request's latency shows only when requests do not queue in the proxy.
pub async fn overhead(
    exo_options: &Value,
    rounds: u32,
    seconds: f64,
    connections: u32,
    concurrency: u32,
) -> Result<Vec<OverheadRow>, String> {
    let fast = FastBackend::start(3, 18080).await?;
    let b = backends(&fast);
    let mut systems = vec![
        System { name: "envoy".into(), kind: Kind::Envoy },
        System { name: "exo-lb".into(), kind: Kind::ExoLb(exo_options.clone()) },
        System { name: "nginx".into(), kind: Kind::Nginx },
    ];
    // The floor filter (the least a body-routing wasm filter does) shows how much of Envoy's
    // requests/s any such filter keeps on this machine.
    if systems::floor_wasm_path().exists() {
        systems.insert(2, System { name: "floor".into(), kind: Kind::Floor { host_calls: 0 } });
    }
    let mut proxies = Vec::new();
    for s in &systems {
        // Scale 1: real timeouts.
        proxies.push(systems::start(s, &b, 1.0, concurrency).await?);
    }
    let mut rows: Vec<OverheadRow> =
        systems.iter().map(|s| OverheadRow { system: s.name.clone(), rounds: vec![], single: vec![] }).collect();
    // Warm-up: connections, V8 tiering.
    for p in &proxies {
        run_wrk(&p.url("/v1/chat/completions"), connections, 1.0).await?;
    }
    for round in 0..rounds {
        // Each round starts with the next system, as in `scale`.
        let n = proxies.len();
        // Saturated first, then one connection.
        for single in [false, true] {
            let (conns, label) = if single { (1, "1 connection: ") } else { (connections, "") };
            for i in (0..n).map(|k| (k + round as usize) % n) {
                let (Some(p), Some(row)) = (proxies.get_mut(i), rows.get_mut(i)) else { continue };
                p.proc.check_alive()?;
                let r = run_wrk(&p.url("/v1/chat/completions"), conns, seconds).await?;
                eprintln!(
                    "  overhead round {} {:<7} {label}{:>8.0} req/s p50 {:>6.0} us p99 {:>6.0} us errors {}",
                    round + 1,
                    row.system,
                    r.rps,
                    r.p50_us,
                    r.p99_us,
                    r.errors
                );
                if single {
                    row.single.push(r)
                } else {
                    row.rounds.push(r)
                }
            }
        }
    }
    Ok(rows)
}

/// Extra host calls (property reads) per request of the floor filter's second variant: the
/// difference to the plain floor, divided by this, is what one host call costs.
pub const FLOOR_EXTRA_CALLS: u32 = 20;

pub struct ScalePoint {
    pub nodes: usize,
    pub bare_cpu_us: Vec<f64>,
    /// Envoy with the floor filter (empty when it was not built).
    pub floor_cpu_us: Vec<f64>,
    /// The floor filter making [`FLOOR_EXTRA_CALLS`] more host calls per request.
    pub floor_calls_cpu_us: Vec<f64>,
    pub exo_cpu_us: Vec<f64>,
    /// Envoy with the baseline build of exo-lb (`--baseline-wasm`; empty without one).
    pub baseline_cpu_us: Vec<f64>,
    pub bare_rps: Vec<f64>,
    pub exo_rps: Vec<f64>,
    pub errors: u64,
    /// With `perf`: per system, per round, the CPU per request (µs) and the part of it spent in
    /// the wasm code V8 compiled.
    pub perf_split: Vec<(&'static str, Vec<(f64, f64)>)>,
}

/// `perf record` of one process (CPU-clock samples) while a round runs.
struct PerfRecording {
    child: std::process::Child,
    path: std::path::PathBuf,
}

impl PerfRecording {
    fn start(pid: u32, path: std::path::PathBuf) -> Result<PerfRecording, String> {
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "4000", "-p", &pid.to_string(), "-o"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("perf: {e} (install linux-perf, or run without --perf)"))?;
        Ok(PerfRecording { child, path })
    }

    /// Stops the recording; returns the share of the samples in code V8 compiled (perf's
    /// `[JIT]` objects: the filter's wasm), 0-1.
    fn stop(mut self) -> Result<f64, String> {
        // SAFETY: signals the perf process this recording started; SIGINT makes it write its file.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
        let out = std::process::Command::new("perf")
            .args(["report", "-q", "--stdio", "--sort", "dso", "-i"])
            .arg(&self.path)
            .output()
            .map_err(|e| format!("perf report: {e}"))?;
        if let Some(dir) = std::env::var_os("EXO_LB_PERF_KEEP") {
            let _ =
                std::fs::copy(&self.path, std::path::Path::new(&dir).join(self.path.file_name().unwrap_or_default()));
        }
        let _ = std::fs::remove_file(&self.path);
        Ok(jit_share(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// The `[JIT]` objects' share in `perf report --sort dso` output ("  8.60%  [JIT] tid 123").
fn jit_share(report: &str) -> f64 {
    report
        .lines()
        .filter_map(|l| l.trim().split_once('%'))
        .filter(|(_, dso)| dso.trim_start().starts_with("[JIT]"))
        .filter_map(|(pct, _)| pct.trim().parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}

/// Envoy CPU per request (from /proc) with exo-lb, with the floor filter and without a filter
/// (and with `baseline`, another build of exo-lb, when given), `--concurrency 1`, V8, in
/// interleaved rounds.
#[allow(clippy::too_many_arguments)]
pub async fn scale(
    exo_options: &Value,
    baseline: Option<&std::path::Path>,
    counts: &[usize],
    rounds: u32,
    seconds: f64,
    connections: u32,
    perf: bool,
) -> Result<Vec<ScalePoint>, String> {
    let mut points = Vec::new();
    let with_floor = systems::floor_wasm_path().exists();
    for (k, &n) in counts.iter().enumerate() {
        let fast = FastBackend::start(n, 18100 + k as u16).await?;
        let b = backends(&fast);
        let mut proxies = vec![
            ("envoy", systems::start(&System { name: "envoy".into(), kind: Kind::Envoy }, &b, 1.0, 1).await?),
            (
                "exo-lb",
                systems::start(&System { name: "exo-lb".into(), kind: Kind::ExoLb(exo_options.clone()) }, &b, 1.0, 1)
                    .await?,
            ),
        ];
        if let Some(wasm) = baseline {
            let kind = Kind::ExoLbBuild(exo_options.clone(), wasm.to_path_buf());
            proxies.push((
                "baseline",
                systems::start(&System { name: "exo-lb-baseline".into(), kind }, &b, 1.0, 1).await?,
            ));
        }
        if with_floor {
            for (name, host_calls) in [("floor", 0), ("floor+calls", FLOOR_EXTRA_CALLS)] {
                let kind = Kind::Floor { host_calls };
                proxies.push((name, systems::start(&System { name: name.into(), kind }, &b, 1.0, 1).await?));
            }
        }
        let mut p = ScalePoint {
            nodes: n,
            bare_cpu_us: vec![],
            floor_cpu_us: vec![],
            floor_calls_cpu_us: vec![],
            exo_cpu_us: vec![],
            baseline_cpu_us: vec![],
            bare_rps: vec![],
            exo_rps: vec![],
            errors: 0,
            perf_split: proxies.iter().map(|(name, _)| (*name, Vec::new())).collect(),
        };
        for (_, proxy) in &proxies {
            run_wrk(&proxy.url("/v1/chat/completions"), connections, 1.0).await?;
        }
        for _ in 0..rounds {
            // Each round starts with the next system: whatever drifts within a round (the CPU's
            // speed on a shared VM, caches) does not always favour the same one.
            proxies.rotate_left(1);
            for (name, proxy) in proxies.iter_mut() {
                proxy.proc.check_alive()?;
                let recording = if perf {
                    let path = proxy.proc.dir.join(format!("perf-{name}.data"));
                    Some(PerfRecording::start(proxy.proc.pid(), path)?)
                } else {
                    None
                };
                let before = proxy.proc.cpu_seconds();
                let r = run_wrk(&proxy.url("/v1/chat/completions"), connections, seconds).await?;
                let cpu = proxy.proc.cpu_seconds() - before;
                let per = cpu / r.requests.max(1) as f64 * 1e6;
                if let Some(recording) = recording {
                    let share = recording.stop()?;
                    if let Some((_, v)) = p.perf_split.iter_mut().find(|(n, _)| *n == *name) {
                        v.push((per, per * share));
                    }
                }
                p.errors += r.errors;
                match *name {
                    "exo-lb" => {
                        p.exo_cpu_us.push(per);
                        p.exo_rps.push(r.rps);
                    }
                    "floor" => p.floor_cpu_us.push(per),
                    "floor+calls" => p.floor_calls_cpu_us.push(per),
                    "baseline" => p.baseline_cpu_us.push(per),
                    _ => {
                        p.bare_cpu_us.push(per);
                        p.bare_rps.push(r.rps);
                    }
                }
                eprintln!(
                    "  scale {n:>3} nodes {name:<6} {:>8.0} req/s {:>6.1} us CPU/request errors {}",
                    r.rps, per, r.errors
                );
            }
        }
        points.push(p);
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_jit_share_of_a_perf_report() {
        let report = "    74.03%  envoy\n    12.08%  [kernel.kallsyms]\n     8.60%  [JIT] tid 21497\n     0.40%  [JIT] tid 21498\n     4.45%  libc.so.6\n";
        assert!((jit_share(report) - 0.09).abs() < 1e-9);
        assert_eq!(jit_share("# nothing\n"), 0.0);
    }

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  300.00us   9.00ms   90.00%
  Latency Distribution
     50%  843.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.37ms
  50000 requests in 5.00s, 10.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  10000.50
Transfer/sec:      2.00MB
";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 50000);
        assert_eq!(r.rps, 10000.5);
        assert_eq!(r.p50_us, 843.0);
        assert_eq!(r.p99_us, 2370.0);
        assert_eq!(r.errors, 7);
    }
}
