//! The workload: a seeded trace of requests (Poisson arrivals at a target utilization, skewed
//! model popularity, log-normal prompt and reply lengths, a share of streaming requests), and
//! what the simulated hardware makes of it (service times, lower bounds, a reference schedule).

use crate::rng::Rng;

/// The simulated RK3588 board (real-world units; the nodes run them `time_scale` times faster).
#[derive(Clone, Debug)]
pub struct Hardware {
    pub nodes: usize,
    /// Decode speed: between Qwen2.5-1.5B's 7.8-16.7 tok/s and 3B models' 3.5-10 tok/s.
    pub tokens_per_second: f64,
    /// Prefill speed (prompt tokens per second).
    pub prefill_tokens_per_second: f64,
    /// Unloading one model and loading another.
    pub switch_time_s: f64,
    /// Boards and models do not load alike (storage, model size): loading model `m` on node `i`
    /// takes `switch_time_s` times `switch_by_model[m]` times `switch_by_node[i]` (1 where a list
    /// is shorter).
    pub switch_by_model: Vec<f64>,
    pub switch_by_node: Vec<f64>,
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            nodes: 3,
            tokens_per_second: 10.0,
            prefill_tokens_per_second: 60.0,
            switch_time_s: 30.0,
            switch_by_model: Vec::new(),
            switch_by_node: Vec::new(),
        }
    }
}

/// A distribution of token counts.
#[derive(Clone, Copy, Debug)]
pub enum Tokens {
    /// Log-normal with this median and sigma, clipped to [lo, hi].
    LogNormal { median: f64, sigma: f64, lo: f64, hi: f64 },
    /// Every whole count in [lo, hi] alike.
    Uniform { lo: u32, hi: u32 },
}

impl Tokens {
    fn draw(self, rng: &mut Rng) -> u32 {
        match self {
            Tokens::LogNormal { median, sigma, lo, hi } => rng.lognormal(median, sigma, lo, hi).round() as u32,
            Tokens::Uniform { lo, hi } => {
                let span = hi.saturating_sub(lo).saturating_add(1);
                lo + ((rng.f64() * span as f64) as u32).min(span - 1)
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            Tokens::LogNormal { median, lo, hi, .. } => format!("log-normal (median {median:.0}, {lo:.0}-{hi:.0})"),
            Tokens::Uniform { lo, hi } => format!("uniform {lo}-{hi}"),
        }
    }
}

/// The cluster and traffic a benchmark runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// RK3588 boards as exo runs them: 10 tok/s, prompts of about 120 tokens, replies of about 160
    /// (log-normal), 70 % streamed; a generation takes about 20 s, `queue.timeout` (300 s) is 15 of
    /// them.
    Board,
    /// The workload issue 11 was filed on: replies of 20-100 tokens (uniform) at 10 ms a token,
    /// every request streamed, short prompts; a generation takes about 0.6 s, so `queue.timeout`
    /// is 500 of them and nothing but the scheduling decides the tail.
    Issue,
}

impl Preset {
    /// How much faster than real time its benchmark runs by default: board generations of
    /// 20 s take a third of a second (the real sweep's scale); the issue's run as they are.
    pub fn time_scale(self) -> f64 {
        match self {
            Preset::Board => 60.0,
            Preset::Issue => 1.0,
        }
    }

    pub fn cluster(self, nodes: usize) -> (Hardware, Workload) {
        match self {
            Preset::Board => (Hardware { nodes, ..Hardware::default() }, Workload::default()),
            Preset::Issue => (
                Hardware {
                    nodes,
                    tokens_per_second: 100.0,
                    prefill_tokens_per_second: 2000.0,
                    switch_time_s: 0.6,
                    ..Hardware::default()
                },
                Workload {
                    stream_share: 1.0,
                    prompt: Tokens::LogNormal { median: 40.0, sigma: 0.5, lo: 8.0, hi: 200.0 },
                    output: Tokens::Uniform { lo: 20, hi: 100 },
                    ..Workload::default()
                },
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Workload {
    /// Model ids and their popularity.
    pub models: Vec<(String, f64)>,
    /// Share of requests with `"stream": true`.
    pub stream_share: f64,
    pub prompt: Tokens,
    /// Reply tokens (`max_tokens`).
    pub output: Tokens,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            models: vec![
                ("qwen2.5-1.5b-instruct-rkllm".into(), 0.6),
                ("qwen2.5-3b-rkllm".into(), 0.3),
                ("deepseek-r1-1.5b-rkllm".into(), 0.1),
            ],
            stream_share: 0.7,
            prompt: Tokens::LogNormal { median: 120.0, sigma: 0.8, lo: 16.0, hi: 1024.0 },
            output: Tokens::LogNormal { median: 160.0, sigma: 0.6, lo: 50.0, hi: 500.0 },
        }
    }
}

#[derive(Clone, Debug)]
pub struct Req {
    pub id: usize,
    /// Arrival, simulated seconds from the start.
    pub at: f64,
    pub model: usize,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub stream: bool,
}

impl Hardware {
    /// How long node `node` takes to load `model` (s).
    pub fn switch_s(&self, node: usize, model: usize) -> f64 {
        self.node_switch_s(node) * self.switch_by_model.get(model).copied().unwrap_or(1.0)
    }

    /// How long node `node` takes to load a model whose own factor is 1.
    pub fn node_switch_s(&self, node: usize) -> f64 {
        self.switch_time_s * self.switch_by_node.get(node).copied().unwrap_or(1.0)
    }

    /// Whether every node loads every model alike.
    pub fn switches_alike(&self) -> bool {
        self.switch_by_model.iter().chain(&self.switch_by_node).all(|&x| x == 1.0)
    }

    /// Time on the NPU without a model switch.
    pub fn service(&self, r: &Req) -> f64 {
        self.prefill(r) + r.max_tokens as f64 / self.tokens_per_second
    }

    pub fn prefill(&self, r: &Req) -> f64 {
        r.prompt_tokens as f64 / self.prefill_tokens_per_second
    }

    /// Time to the first byte the client measures with no wait and no switch: the first SSE
    /// token, or the whole body when not streaming.
    pub fn min_ttft(&self, r: &Req) -> f64 {
        if r.stream {
            self.prefill(r) + 1.0 / self.tokens_per_second
        } else {
            self.service(r)
        }
    }
}

impl Workload {
    fn draw(&self, rng: &mut Rng, id: usize, at: f64) -> Req {
        let weights: Vec<f64> = self.models.iter().map(|m| m.1).collect();
        let model = rng.weighted(&weights);
        let prompt_tokens = self.prompt.draw(rng);
        let max_tokens = self.output.draw(rng);
        let stream = rng.f64() < self.stream_share;
        Req { id, at, model, prompt_tokens, max_tokens, stream }
    }

    /// Expected NPU time of one request (no switch), from 200 000 draws of a fixed seed.
    pub fn expected_service(&self, hw: &Hardware) -> f64 {
        let mut rng = Rng::new(0xE0);
        let n = 200_000;
        (0..n).map(|i| hw.service(&self.draw(&mut rng, i, 0.0))).sum::<f64>() / n as f64
    }

    /// `n` requests with Poisson arrivals at `utilization` of the cluster's capacity.
    pub fn trace(&self, hw: &Hardware, seed: u64, utilization: f64, n: usize) -> Vec<Req> {
        let rate = utilization * hw.nodes as f64 / self.expected_service(hw);
        // One stream per utilization, so the 50% and 80% traces are not scaled copies.
        let mut rng = Rng::new(seed ^ ((utilization * 1000.0) as u64).wrapping_mul(0x1234_5678_9ABC));
        let mut at = 0.0;
        (0..n)
            .map(|id| {
                if id > 0 {
                    at += rng.exp(rate);
                }
                self.draw(&mut rng, id, at)
            })
            .collect()
    }
}

/// What no balancer can beat on this trace, and a reference schedule.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// Per request, with no wait and no switch.
    pub min_ttft: Vec<f64>,
    pub min_e2e: Vec<f64>,
    /// Completed requests per minute can be at most this (makespan bound).
    pub max_throughput_per_min: f64,
    /// Offered utilization of this very trace: total work / (nodes x arrival span).
    pub offered_utilization: f64,
    /// An ideal central FIFO queue with free model switches (every node always has the
    /// model): a reference for a scheduler with perfect information, not a strict bound.
    pub fifo_ttft: Vec<f64>,
    pub fifo_e2e: Vec<f64>,
}

pub fn bounds(hw: &Hardware, trace: &[Req]) -> Bounds {
    let work: f64 = trace.iter().map(|r| hw.service(r)).sum();
    let first = trace.first().map_or(0.0, |r| r.at);
    let last_end = trace.iter().map(|r| r.at + hw.service(r)).fold(0.0, f64::max);
    let makespan = (last_end - first).max(work / hw.nodes as f64);
    let span = trace.last().map_or(0.0, |r| r.at) - first;
    // Ideal FIFO: each request goes, in arrival order, to the node that frees first.
    let mut free = vec![first; hw.nodes];
    let mut fifo_ttft = Vec::new();
    let mut fifo_e2e = Vec::new();
    for r in trace {
        let (i, t) = free.iter().copied().enumerate().fold((0, f64::MAX), |a, b| if b.1 < a.1 { b } else { a });
        let start = t.max(r.at);
        free[i] = start + hw.service(r);
        fifo_ttft.push(start - r.at + hw.min_ttft(r));
        fifo_e2e.push(free[i] - r.at);
    }
    Bounds {
        min_ttft: trace.iter().map(|r| hw.min_ttft(r)).collect(),
        min_e2e: trace.iter().map(|r| hw.service(r)).collect(),
        max_throughput_per_min: trace.len() as f64 / makespan * 60.0,
        offered_utilization: if span > 0.0 { work / (hw.nodes as f64 * span) } else { 0.0 },
        fifo_ttft,
        fifo_e2e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_reproducible_and_at_the_utilization() {
        let (w, hw) = (Workload::default(), Hardware::default());
        let a = w.trace(&hw, 1, 0.8, 3000);
        let b = w.trace(&hw, 1, 0.8, 3000);
        assert_eq!(
            a.iter().map(|r| (r.at, r.max_tokens)).collect::<Vec<_>>(),
            b.iter().map(|r| (r.at, r.max_tokens)).collect::<Vec<_>>()
        );
        let u = bounds(&hw, &a).offered_utilization;
        assert!((u - 0.8).abs() < 0.08, "{u}");
        assert!(a.iter().all(|r| (50..=500).contains(&r.max_tokens)));
        let streamed = a.iter().filter(|r| r.stream).count() as f64 / a.len() as f64;
        assert!((streamed - 0.7).abs() < 0.05);
    }

    #[test]
    fn the_issues_workload_streams_generations_of_20_to_100_tokens_at_10_ms_a_token() {
        let (hw, w) = Preset::Issue.cluster(3);
        let a = w.trace(&hw, 1, 0.8, 3000);
        assert!(a.iter().all(|r| r.stream && (20..=100).contains(&r.max_tokens)));
        // Every count of the range comes up, the ends too.
        assert!(a.iter().any(|r| r.max_tokens == 20) && a.iter().any(|r| r.max_tokens == 100));
        let mean_tokens = a.iter().map(|r| f64::from(r.max_tokens)).sum::<f64>() / a.len() as f64;
        assert!((mean_tokens - 60.0).abs() < 2.0, "{mean_tokens}");
        let service = w.expected_service(&hw);
        assert!((0.6..0.66).contains(&service), "{service}");
        let u = bounds(&hw, &a).offered_utilization;
        assert!((u - 0.8).abs() < 0.08, "{u}");
    }
}
