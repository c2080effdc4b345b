//! What the balancer learns from its own traffic, so that scheduling needs no tuning: per node
//! and model (falling back to the model, then to the whole cluster), how long the first token
//! takes on a warm node, what loading the model costs (the first-token time of requests that
//! made the node load it, minus the warm one), how long each further token takes, and how long
//! replies are.
//!
//! Every figure is the median of a small window of recent samples, so one odd request (a node
//! that stalled, a client that asked for 4,000 tokens) does not move it. The estimates live in
//! their own shared-data key, apart from the cluster state: each VM gathers samples as its
//! requests end and folds them in on its tick, so the request path never writes them; every VM
//! reads them back on the same tick. Bounded: at most `MAX_MODELS` models and `MAX_PAIRS`
//! (node, model) pairs (models the configuration names are kept before any other), and keyed
//! by node name, so they survive configuration changes.
//!
//! Besides timings, how often each model is asked for: the last `MAX_ARRIVALS` arrivals of the
//! whole cluster (model and time), gathered per VM as requests are admitted and folded in on the
//! tick like samples, so the scheduler sees a model's demand grow before its queue does.
//!
//! Beside what traffic shows, what the nodes say: older exo reports how long its model loads
//! took (see [`crate::logic::discover`]), which stands for a node's switch cost until one is
//! measured, so the scheduler need not learn it by making switches.
//!
//! A switch not yet measured on its node is taken as the product of a model's part and a
//! node's part ([`SwitchParts`]): boards differ in storage, models in size, and a model's own
//! median mixes whichever boards happened to load it. With one board three times slower, that
//! median had a model measured only there cost three times too much on every other board, and a
//! model never loaded there cost a third of what it does.

use crate::logic::state::model_key;
use serde::{Deserialize, Serialize};

/// The shared-data key of the estimates. Its version moves with their encoding (postcard is not
/// self-describing), so a VM of a newer build never reads an older build's bytes as its own; it
/// learns afresh instead.
pub const ESTIMATES_KEY: &str = "exo-lb/estimates/v6";
/// Models remembered at once.
pub const MAX_MODELS: usize = 64;
/// (node, model) pairs remembered at once.
pub const MAX_PAIRS: usize = 256;
/// Samples a VM keeps between two ticks (more are dropped: the estimates do not need them).
pub const MAX_PENDING_SAMPLES: usize = 256;
/// Samples per window (the median of the last `WINDOW`).
pub const WINDOW: usize = 9;
/// Arrivals kept, over all models (the cluster's latest; a model's share of them and their span
/// give its rate).
pub const MAX_ARRIVALS: usize = 48;
/// Arrivals a VM keeps between two ticks.
pub const MAX_PENDING_ARRIVALS: usize = 256;

/// One finished generation's measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub model: String,
    /// [`crate::logic::state::node_key`] of the node that served it.
    pub node: u64,
    /// Whether the node had to load the model for it: `None` when the balancer did not know
    /// what the node had loaded (after a start); the timing then tells.
    pub switched: Option<bool>,
    /// From routing to the first byte of the reply body (the first token when streaming).
    pub first_token_ms: Option<u64>,
    /// From routing to the end of the reply.
    pub total_ms: u64,
    /// Body chunks of a streamed reply (about one per token).
    pub tokens: Option<u64>,
    pub at_ms: u64,
}

/// The last few values of one measurement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window(Vec<u64>);

impl Window {
    fn push(&mut self, value: u64, cap: usize) {
        if self.0.len() >= cap {
            self.0.remove(0);
        }
        self.0.push(value);
    }

    /// The median (the upper one of an even count); `None` when empty.
    pub fn median(&self) -> Option<u64> {
        let mut v = self.0.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    /// The median of `values` (each table is bounded, so all of them fit).
    fn median_of(values: impl Iterator<Item = u64>) -> Option<u64> {
        Window(values.collect()).median()
    }

    /// The smallest value in the window; `None` when empty.
    pub fn min(&self) -> Option<u64> {
        self.0.iter().copied().min()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The values, oldest first.
    pub fn values(&self) -> &[u64] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Timing windows for one model, or one model on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// First-token time when the model was already loaded.
    pub warm_first_token: Window,
    /// First-token time when the node had to load the model first.
    pub switched_first_token: Window,
    /// Microseconds per token after the first.
    pub per_token_us: Window,
    /// Whole reply time on a warm node.
    pub warm_total: Window,
    /// Whole reply time of replies not streamed that made the node load the model (what a
    /// switch costs when no first token is seen: this minus the warm reply time).
    pub switched_total: Window,
}

impl Timing {
    /// `warm_first`: the first-token time a warm node would have shown (what a switched
    /// reply's own first token, a switch later, cannot tell).
    fn record(&mut self, s: &Sample, switched: bool, warm_first: Option<u64>) {
        if let Some(first) = s.first_token_ms {
            if switched {
                self.switched_first_token.push(first, WINDOW);
            } else {
                self.warm_first_token.push(first, WINDOW);
            }
            if let Some(tokens) = s.tokens.filter(|&t| t >= 2) {
                let rest_us = s.total_ms.saturating_sub(first).saturating_mul(1_000);
                self.per_token_us.push(rest_us / (tokens - 1), WINDOW);
            }
        }
        match (switched, s.first_token_ms) {
            (false, _) => self.warm_total.push(s.total_ms, WINDOW),
            // Streamed after a switch: once loaded, the node served it as a warm one, in a warm
            // first token plus what came after its own first token. Without it a model that is
            // only ever switched to (the rare one, on a busy cluster) had no service time: its
            // nodes' requests were taken to take the prior, a thirtieth of `queue.timeout`,
            // and the look-ahead stayed out while it waited (docs/benchmarks.md,
            // twenty-eighth session).
            (true, Some(first)) => {
                if let Some(warm_first) = warm_first {
                    self.warm_total.push(s.total_ms.saturating_sub(first).saturating_add(warm_first), WINDOW);
                }
            }
            (true, None) => self.switched_total.push(s.total_ms, WINDOW),
        }
    }

    /// What loading the model costs, from this timing alone (`warm` overrides the warm
    /// first-token time when this timing has none), as `pick` reads the switched windows:
    /// [`Window::median`] for what a switch is expected to cost, [`Window::min`] for the least
    /// one was seen to cost.
    fn switch_ms(&self, warm: Option<u64>, pick: fn(&Window) -> Option<u64>) -> Option<u64> {
        match pick(&self.switched_first_token) {
            Some(switched) => Some(switched.saturating_sub(self.warm_first_token.median().or(warm).unwrap_or(0))),
            // Only whole replies seen: the switched ones' excess over the warm ones.
            None => Some(pick(&self.switched_total)?.saturating_sub(self.warm_total.median()?)),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEstimate {
    pub key: u64,
    pub model: String,
    pub timing: Timing,
    /// Tokens per streamed reply.
    pub tokens: Window,
    pub samples: u64,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairEstimate {
    pub node: u64,
    pub model: u64,
    pub timing: Timing,
    pub updated_ms: u64,
}

/// A request admitted for a model (a [`model_key`]) at `at_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrived {
    pub model: u64,
    pub at_ms: u64,
}

/// How long a node said its model loads take.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedLoad {
    pub node: u64,
    pub load_ms: u64,
    /// The model it loaded, where the figure is one load of one model (a board that has not
    /// switched since it booted); none where it is a mean that may mix models.
    pub model: Option<u64>,
    pub at_ms: u64,
}

/// What a switch is taken to cost where it was not measured: model `m` on node `n` costs
/// `model(m) * node(n)`, fitted to the switches measured (pairs) by alternating medians, a
/// robust two-way fit. A node with no switch measured takes its part from what it said its
/// loads take, against what the others said; where it said which model that load was (one load
/// since it booted), the fit counts it as a switch of that model on that node until one is
/// measured there, so a board that booted a heavy model reads as typical once that model is
/// measured on others. Derived from the tables, never stored.
#[derive(Debug, Clone, Default, PartialEq)]
struct SwitchParts {
    /// Sorted by model key: its switch on a typical node (ms).
    model: Vec<(u64, f64)>,
    /// Sorted by node key: how much slower than a typical node it loads (1: alike).
    node: Vec<(u64, f64)>,
}

impl SwitchParts {
    /// Node parts are kept within this factor of a typical node's, so one odd figure cannot
    /// make a board look free or useless.
    const MAX_NODE_FACTOR: f64 = 64.0;
    /// Node parts within this factor of a typical node's are taken as typical: a switch is
    /// measured as a first-token time less a warm one, so where switches are short it carries
    /// the prompts' noise (at 0.12 s switches, prefill alone varies by tens of ms), and boards
    /// that differ (SD card, eMMC, NVMe) differ by more. Without it, noise read as slow boards cost
    /// the simulator's 80 %/0.2x point 1.32x -> 1.305x nginx (docs/benchmarks.md, twenty-seventh
    /// session).
    const TYPICAL_WITHIN: f64 = 1.5;

    fn model(&self, model: u64) -> Option<f64> {
        self.model.binary_search_by(|(k, _)| k.cmp(&model)).ok().and_then(|k| self.model.get(k)).map(|x| x.1)
    }

    fn node(&self, node: u64) -> f64 {
        self.node.binary_search_by(|(k, _)| k.cmp(&node)).ok().and_then(|k| self.node.get(k)).map_or(1.0, |x| x.1)
    }

    /// `measured`: (node, model, switch ms) of every pair with a switch measured; `said`: the
    /// same of pairs a node named in what it said (one load of one model), none measured;
    /// `model_only`: models measured with no pair left (the pair table is bounded);
    /// `reported`: (node, ms) of what nodes said their loads take.
    fn fit(
        measured: &[(u64, u64, f64)],
        said: &[(u64, u64, f64)],
        model_only: &[(u64, f64)],
        reported: &[(u64, f64)],
    ) -> SwitchParts {
        // The nodes' parts start from what they said, against what the others said (1 where a
        // node said nothing): with few switches measured the fit alone cannot tell a slow
        // board from a heavy model, and what the boards said sets the scale.
        let typical = median_f64(reported.iter().map(|x| x.1).filter(|&ms| ms > 0.0).collect());
        let said_parts: Vec<(u64, f64)> = reported
            .iter()
            .filter(|x| x.1 > 0.0)
            .filter_map(|&(node, ms)| Some((node, bounded(ms / typical?))))
            .collect();
        let mut parts = SwitchParts { model: Vec::new(), node: said_parts.clone() };
        let all = || measured.iter().chain(said);
        let mut models: Vec<u64> = all().map(|x| x.1).collect();
        models.sort_unstable();
        models.dedup();
        let mut nodes_seen: Vec<u64> = all().map(|x| x.0).collect();
        nodes_seen.sort_unstable();
        nodes_seen.dedup();
        // A node's switches measured where it has any, else the load it said it made: its own
        // measurements come first, and what another board said cannot outvote them.
        let observed = |node: u64| -> Vec<(u64, u64, f64)> {
            let m: Vec<(u64, u64, f64)> = measured.iter().filter(|x| x.0 == node).copied().collect();
            if m.is_empty() {
                said.iter().filter(|x| x.0 == node).copied().collect()
            } else {
                m
            }
        };
        // Two rounds: the models' parts from the nodes' (every pair measured or said), then the
        // nodes' from the models'; again with those.
        for _ in 0..2 {
            let mut fitted: Vec<(u64, f64)> = models
                .iter()
                .filter_map(|&m| {
                    // A model measured only as a whole (its pairs gone) is not replaced by a word.
                    let whole = model_only.iter().find(|x| x.0 == m).filter(|_| !measured.iter().any(|x| x.1 == m));
                    if let Some(&known) = whole {
                        return Some(known);
                    }
                    let each = all().filter(|x| x.1 == m).map(|x| x.2 / parts.node(x.0)).collect();
                    Some((m, median_f64(each)?))
                })
                .collect();
            fitted.extend(model_only.iter().filter(|(m, _)| models.binary_search(m).is_err()).copied());
            fitted.sort_by_key(|x| x.0);
            parts.model = fitted;
            let mut nodes: Vec<(u64, f64)> = Vec::new();
            for &node in &nodes_seen {
                let ratios = observed(node)
                    .iter()
                    .filter_map(|x| Some(x.2 / parts.model(x.1).filter(|&b| b > 0.0)?))
                    .filter(|r| *r > 0.0)
                    .collect();
                if let Some(r) = median_f64(ratios) {
                    nodes.push((node, bounded(r)));
                }
            }
            // Nodes with no switch measured or named keep what they said.
            for &(node, r) in &said_parts {
                if let Err(at) = nodes.binary_search_by(|(k, _)| k.cmp(&node)) {
                    nodes.insert(at, (node, r));
                }
            }
            parts.node = nodes;
        }
        parts
    }
}

/// A node's part kept within [`SwitchParts::MAX_NODE_FACTOR`] of a typical node's, and taken
/// as typical (1) within [`SwitchParts::TYPICAL_WITHIN`] of it or where it is not a number.
fn bounded(r: f64) -> f64 {
    if r.is_nan() || (r < SwitchParts::TYPICAL_WITHIN && r > 1.0 / SwitchParts::TYPICAL_WITHIN) {
        1.0
    } else {
        r.clamp(1.0 / SwitchParts::MAX_NODE_FACTOR, SwitchParts::MAX_NODE_FACTOR)
    }
}

/// The median of `v` (the upper one of an even count); `None` when empty.
fn median_f64(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// [`SwitchParts`], derived on first use after the tables change. Compares as always equal:
/// it is a cache of what the tables say, not part of what is learned.
#[derive(Debug, Clone, Default)]
struct Derived(std::sync::OnceLock<SwitchParts>);

impl PartialEq for Derived {
    fn eq(&self, _: &Derived) -> bool {
        true
    }
}

impl Eq for Derived {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimates {
    /// Sorted by key.
    pub models: Vec<ModelEstimate>,
    /// Sorted by (node, model).
    pub pairs: Vec<PairEstimate>,
    /// Sorted by node; at most `MAX_PAIRS`.
    pub reported_loads: Vec<ReportedLoad>,
    /// The cluster's latest arrivals, oldest first; at most `MAX_ARRIVALS`.
    pub arrivals: Vec<Arrived>,
    #[serde(skip)]
    derived: Derived,
}

impl Estimates {
    /// Nothing learned yet.
    pub const fn new() -> Estimates {
        Estimates {
            models: Vec::new(),
            pairs: Vec::new(),
            reported_loads: Vec::new(),
            arrivals: Vec::new(),
            derived: Derived(std::sync::OnceLock::new()),
        }
    }

    pub fn decode(bytes: Option<&[u8]>) -> Estimates {
        bytes.and_then(|b| postcard::from_bytes(b).ok()).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn model(&self, key: u64) -> Option<&ModelEstimate> {
        self.models.binary_search_by_key(&key, |m| m.key).ok().and_then(|k| self.models.get(k))
    }

    fn pair(&self, node: u64, model: u64) -> Option<&PairEstimate> {
        self.pairs.binary_search_by_key(&(node, model), |p| (p.node, p.model)).ok().and_then(|k| self.pairs.get(k))
    }

    /// The model id behind a key, once measured.
    pub fn model_name(&self, key: u64) -> Option<&str> {
        self.model(key).map(|m| m.model.as_str())
    }

    /// How long a request for the model keeps a warm node busy (median), once measured.
    pub fn service_ms(&self, key: u64) -> Option<u64> {
        self.model(key).and_then(|m| m.timing.warm_total.median())
    }

    /// First-token time of the model on a warm node: this node's, else the model's, else the
    /// median over the models measured (a model never seen warm yet still has a baseline for
    /// its switch cost).
    pub fn warm_first_token_ms(&self, node: u64, model: u64) -> Option<u64> {
        self.pair(node, model)
            .and_then(|p| p.timing.warm_first_token.median())
            .or_else(|| self.model_warm_first_token_ms(model))
    }

    /// First-token time of the model on a warm node, over every node; else the median over the
    /// models measured.
    fn model_warm_first_token_ms(&self, model: u64) -> Option<u64> {
        self.model(model)
            .and_then(|m| m.timing.warm_first_token.median())
            .or_else(|| Window::median_of(self.models.iter().filter_map(|m| m.timing.warm_first_token.median())))
    }

    /// What it costs node `node` to load `model`: measured on this node, else the model's part
    /// times the node's ([`SwitchParts`]: what the model costs a typical board, times how much
    /// slower this board loads), else what the node said its loads take
    /// ([`Estimates::reported_load_ms`]), else the median over every model measured.
    pub fn switch_ms(&self, node: u64, model: u64) -> Option<u64> {
        self.pair_switch_ms(node, model, Window::median)
            .or_else(|| {
                let parts = self.derived.0.get_or_init(|| self.switch_parts());
                Some((parts.model(model)? * parts.node(node)).round() as u64)
            })
            .or_else(|| self.reported_load_ms(node))
            .or_else(|| self.cluster_switch_ms())
    }

    /// The switches measured, fitted as a model's part times a node's ([`SwitchParts`]).
    fn switch_parts(&self) -> SwitchParts {
        let measured: Vec<(u64, u64, f64)> = self
            .pairs
            .iter()
            .filter_map(|p| Some((p.node, p.model, self.pair_switch_ms(p.node, p.model, Window::median)? as f64)))
            .collect();
        // A node's word of one load of one model stands for that pair until it is measured.
        let said: Vec<(u64, u64, f64)> = self
            .reported_loads
            .iter()
            .filter(|r| r.load_ms > 0)
            .filter_map(|r| Some((r.node, r.model?, r.load_ms as f64)))
            .filter(|&(node, model, _)| !measured.iter().any(|x| x.0 == node && x.1 == model))
            .collect();
        let model_only: Vec<(u64, f64)> = self
            .models
            .iter()
            .filter_map(|m| {
                Some((m.key, m.timing.switch_ms(self.model_warm_first_token_ms(m.key), Window::median)? as f64))
            })
            .collect();
        let reported: Vec<(u64, f64)> = self.reported_loads.iter().map(|r| (r.node, r.load_ms as f64)).collect();
        SwitchParts::fit(&measured, &said, &model_only, &reported)
    }

    /// A switch of `model` measured on `node` itself, as `pick` reads its window.
    fn pair_switch_ms(&self, node: u64, model: u64, pick: fn(&Window) -> Option<u64>) -> Option<u64> {
        let warm = self.warm_first_token_ms(node, model);
        self.pair(node, model).and_then(|p| p.timing.switch_ms(warm, pick))
    }

    /// How long node `node` said its model loads take, else the median of what the others said
    /// (boards of one kind load alike).
    pub fn reported_load_ms(&self, node: u64) -> Option<u64> {
        self.own_reported_load_ms(node).or_else(|| Window::median_of(self.reported_loads.iter().map(|r| r.load_ms)))
    }

    /// How long node `node` itself said its model loads take.
    pub fn own_reported_load_ms(&self, node: u64) -> Option<u64> {
        self.own_report(node).map(|r| r.load_ms)
    }

    /// What node `node` itself said of its loads.
    pub fn own_report(&self, node: u64) -> Option<&ReportedLoad> {
        let k = self.reported_loads.binary_search_by_key(&node, |r| r.node).ok()?;
        self.reported_loads.get(k)
    }

    /// Node `node` said its model loads take `load_ms`; `model`: the model that was, where the
    /// figure is one load of one model.
    pub fn report_load(&mut self, node: u64, load_ms: u64, model: Option<u64>, at_ms: u64) {
        self.derived = Derived::default();
        let report = ReportedLoad { node, load_ms, model, at_ms };
        match self.reported_loads.binary_search_by_key(&node, |r| r.node) {
            Ok(k) => {
                if let Some(r) = self.reported_loads.get_mut(k) {
                    *r = report;
                }
            }
            Err(k) => self.reported_loads.insert(k, report),
        }
        while self.reported_loads.len() > MAX_PAIRS {
            match self.reported_loads.iter().enumerate().min_by_key(|(_, r)| r.at_ms).map(|x| x.0) {
                Some(k) => {
                    self.reported_loads.remove(k);
                }
                None => break,
            }
        }
    }

    /// The least loading `model` on `node` was seen to cost lately (ms): the fastest of the
    /// recent switches on this node, else of the model's on any node, else of any model's.
    /// Where [`Estimates::switch_ms`] is what a switch is expected to cost, this is how soon
    /// one can be over.
    pub fn switch_floor_ms(&self, node: u64, model: u64) -> Option<u64> {
        self.own_switch_ms(node, model, Window::min)
            .or_else(|| self.models.iter().filter_map(|m| m.timing.switch_ms(None, Window::min)).min())
    }

    /// A switch of `model` on `node` as `pick` reads the windows: this node's, else the model's.
    fn own_switch_ms(&self, node: u64, model: u64, pick: fn(&Window) -> Option<u64>) -> Option<u64> {
        self.pair_switch_ms(node, model, pick).or_else(|| {
            let warm = self.warm_first_token_ms(node, model);
            self.model(model).and_then(|m| m.timing.switch_ms(warm, pick))
        })
    }

    /// Whether a switch to `model` was measured, on any node.
    pub fn switch_measured(&self, model: u64) -> bool {
        self.model(model).is_some_and(|m| m.timing.switch_ms(None, Window::median).is_some())
    }

    /// Whether anything tells what a switch costs here: one measured, or a node's word on how
    /// long its loads take.
    pub fn switch_known(&self) -> bool {
        !self.reported_loads.is_empty() || self.cluster_switch_ms().is_some()
    }

    /// The median switch cost over the models measured.
    pub fn cluster_switch_ms(&self) -> Option<u64> {
        Window::median_of(self.models.iter().filter_map(|m| m.timing.switch_ms(None, Window::median)))
    }

    /// Microseconds per token after the first on this node, else for the model.
    pub fn per_token_us(&self, node: u64, model: u64) -> Option<u64> {
        self.pair(node, model)
            .and_then(|p| p.timing.per_token_us.median())
            .or_else(|| self.model(model).and_then(|m| m.timing.per_token_us.median()))
    }

    /// The work a request for `model` brings (ms on a warm node): its first-token time plus
    /// its expected reply length at the model's token rate, where the reply length is the
    /// model's usual one capped by the request's own `max_tokens`; else the model's usual
    /// service time.
    pub fn work_ms(&self, model: u64, max_tokens: Option<u64>) -> Option<u64> {
        let m = self.model(model)?;
        let per_token = m.timing.per_token_us.median();
        let usual = m.tokens.median();
        match (m.timing.warm_first_token.median(), per_token, usual.or(max_tokens)) {
            (Some(first), Some(per_token), Some(tokens)) => {
                let tokens = max_tokens.map_or(tokens, |cap| tokens.min(cap));
                Some(first.saturating_add(tokens.saturating_mul(per_token) / 1_000))
            }
            _ => m.timing.warm_total.median(),
        }
    }

    /// How many requests for the model arrived per second lately (0 when none did): its share
    /// of the cluster's latest arrivals over their span, a span taken as at least
    /// `min_span_ms` so that a few arrivals close together do not read as a flood.
    pub fn arrival_rate_per_s(&self, model: u64, now_ms: u64, min_span_ms: u64) -> f64 {
        let Some(first) = self.arrivals.first() else { return 0.0 };
        let n = self.arrivals.iter().filter(|a| a.model == model).count();
        let span_ms = now_ms.saturating_sub(first.at_ms).max(min_span_ms).max(1);
        n as f64 * 1_000.0 / span_ms as f64
    }

    /// Folds a VM's arrivals in, keeping the latest `MAX_ARRIVALS` in time order (VMs fold on
    /// their own ticks, so one VM's arrivals may predate another's already folded).
    pub fn record_arrivals(&mut self, arrivals: &[Arrived]) {
        self.arrivals.extend_from_slice(arrivals);
        self.arrivals.sort_by_key(|a| a.at_ms);
        let excess = self.arrivals.len().saturating_sub(MAX_ARRIVALS);
        self.arrivals.drain(..excess);
    }

    /// Whether a sample whose node's loaded model was unknown was a switch, judging by its
    /// first-token time; `None` while the estimates cannot tell.
    fn classify(&self, s: &Sample, key: u64) -> Option<bool> {
        let first = s.first_token_ms?;
        let warm = self.warm_first_token_ms(s.node, key)?;
        let switch = self.switch_ms(s.node, key)?;
        if first <= warm.saturating_add(switch / 4) {
            Some(false)
        } else if first >= warm.saturating_add(switch / 2) {
            Some(true)
        } else {
            None
        }
    }

    /// Folds samples in. `configured` tells which models the configuration names: they are
    /// kept before any other when a table is full.
    pub fn record(&mut self, samples: &[Sample], configured: impl Fn(u64) -> bool) {
        self.derived = Derived::default();
        for s in samples {
            let key = model_key(&s.model);
            let Some(switched) = s.switched.or_else(|| self.classify(s, key)) else {
                continue;
            };
            let k = match self.models.binary_search_by_key(&key, |m| m.key) {
                Ok(k) => k,
                Err(k) => {
                    self.models.insert(k, ModelEstimate { key, model: s.model.clone(), ..ModelEstimate::default() });
                    k
                }
            };
            let warm_first = if switched { self.warm_first_token_ms(s.node, key) } else { None };
            if let Some(m) = self.models.get_mut(k) {
                m.timing.record(s, switched, warm_first);
                if let Some(tokens) = s.tokens.filter(|_| s.first_token_ms.is_some()) {
                    m.tokens.push(tokens, WINDOW);
                }
                m.samples = m.samples.saturating_add(1);
                m.updated_ms = m.updated_ms.max(s.at_ms);
            }
            let p = match self.pairs.binary_search_by_key(&(s.node, key), |p| (p.node, p.model)) {
                Ok(p) => p,
                Err(p) => {
                    self.pairs.insert(p, PairEstimate { node: s.node, model: key, ..PairEstimate::default() });
                    p
                }
            };
            if let Some(pair) = self.pairs.get_mut(p) {
                pair.timing.record(s, switched, warm_first);
                pair.updated_ms = pair.updated_ms.max(s.at_ms);
            }
        }
        // Evict the stalest entries, those of models the configuration does not name first.
        while self.models.len() > MAX_MODELS {
            match self.models.iter().enumerate().min_by_key(|(_, m)| (configured(m.key), m.updated_ms)).map(|x| x.0) {
                Some(k) => {
                    self.models.remove(k);
                }
                None => break,
            }
        }
        while self.pairs.len() > MAX_PAIRS {
            match self.pairs.iter().enumerate().min_by_key(|(_, p)| (configured(p.model), p.updated_ms)).map(|x| x.0) {
                Some(k) => {
                    self.pairs.remove(k);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(model: &str, node: u64, switched: Option<bool>, first: u64, total: u64, tokens: u64) -> Sample {
        Sample {
            model: model.into(),
            node,
            switched,
            first_token_ms: Some(first),
            total_ms: total,
            tokens: Some(tokens),
            at_ms: 0,
        }
    }

    #[test]
    fn learns_warm_first_token_switch_cost_and_token_time() {
        let mut e = Estimates::default();
        let m = model_key("m");
        // Warm: 400 ms to the first token, then 10 ms per token.
        let warm: Vec<Sample> = (0..5).map(|k| sample("m", 1, Some(false), 400 + k, 400 + k + 10 * 49, 50)).collect();
        // Switched: 5 s more before the first token; one outlier at 60 s.
        let mut switched: Vec<Sample> = (0..4).map(|k| sample("m", 1, Some(true), 5_400 + k, 5_890 + k, 50)).collect();
        switched.push(sample("m", 1, Some(true), 60_000, 60_490, 50));
        e.record(&warm, |_| true);
        e.record(&switched, |_| true);
        assert_eq!(e.warm_first_token_ms(1, m), Some(402));
        assert_eq!(e.switch_ms(1, m), Some(5_000), "the median ignores the outlier");
        assert_eq!(e.per_token_us(1, m), Some(10_000));
        // Another node falls back to the model's figures; another model to the cluster's.
        assert_eq!(e.switch_ms(2, m), Some(5_000));
        assert_eq!(e.switch_ms(2, model_key("other")), Some(5_000));
        // The fastest switch lately (5,400 ms to the first token less the warm 402), the same
        // fallbacks.
        assert_eq!(e.switch_floor_ms(1, m), Some(4_998));
        assert_eq!(e.switch_floor_ms(2, model_key("other")), Some(4_998));
        assert_eq!(Estimates::default().switch_floor_ms(1, m), None);
        // A request's own max_tokens caps its expected work.
        assert_eq!(e.work_ms(m, None), Some(402 + 500));
        assert_eq!(e.work_ms(m, Some(10)), Some(402 + 100));
        assert_eq!(Estimates::decode(Some(&e.encode())), e);
        assert_eq!(Estimates::decode(Some(b"\xff")), Estimates::default());
    }

    #[test]
    fn a_model_only_ever_switched_to_has_a_service_time_from_its_streamed_replies() {
        let r = model_key("r");
        // Nothing warm measured anywhere: a switched reply cannot tell its work from its switch.
        let mut e = Estimates::default();
        e.record(&[sample("r", 2, Some(true), 2_100, 2_590, 50)], |_| true);
        assert_eq!(e.service_ms(r), None);
        // p was seen warm (100 ms to its first token); r only ever after a 2 s switch. Once
        // loaded, r's reply took a warm first token (p's, the cluster's) and 490 ms more.
        let mut e = Estimates::default();
        e.record(&[sample("p", 1, Some(false), 100, 590, 50)], |_| true);
        e.record(&[sample("r", 2, Some(true), 2_100, 2_590, 50)], |_| true);
        assert_eq!(e.service_ms(r), Some(590));
        assert_eq!(e.switch_ms(2, r), Some(2_000), "the switch is still its first token less a warm one");
    }

    /// A warm reply and a switched one of `model` on `node` (100 ms to a warm first token, 50
    /// tokens), the switch costing `switch_ms`.
    fn warm_and_switched(model: &str, node: u64, switch_ms: u64) -> [Sample; 2] {
        [
            sample(model, node, Some(false), 100, 590, 50),
            sample(model, node, Some(true), 100 + switch_ms, 590 + switch_ms, 50),
        ]
    }

    #[test]
    fn a_switch_not_measured_on_its_node_is_the_models_part_times_the_nodes() {
        // Node 3 loads three times slower than nodes 1 and 2 (its storage); model m is twice as
        // heavy as p, r half as heavy. p was loaded on every node, m only on the slow one, r
        // only on node 1.
        let mut e = Estimates::default();
        for (model, node, ms) in [("p", 1, 1_000), ("p", 2, 1_000), ("p", 3, 3_000), ("m", 3, 6_000), ("r", 1, 500)] {
            e.record(&warm_and_switched(model, node, ms), |_| true);
        }
        let (p, m, r) = (model_key("p"), model_key("m"), model_key("r"));
        assert_eq!(e.switch_ms(3, p), Some(3_000), "measured on its node");
        // m's own median is node 3's 6 s: on the fast nodes it costs a third of that.
        assert_eq!(e.switch_ms(1, m), Some(2_000));
        assert_eq!(e.switch_ms(2, m), Some(2_000));
        // r's own median is node 1's 0.5 s: on the slow node it costs three times that.
        assert_eq!(e.switch_ms(3, r), Some(1_500));
        // A node never seen: a typical one.
        assert_eq!(e.switch_ms(4, m), Some(2_000));
        // A node 1.4 times slower than the others at p is taken as typical: within
        // `TYPICAL_WITHIN`, a difference is the noise of the measurements (a switch is a
        // first-token time less a warm one), so m, measured only there, costs the others as much.
        let mut close = Estimates::default();
        for (model, node, ms) in [("p", 1, 1_000), ("p", 2, 1_000), ("p", 3, 1_400), ("m", 3, 2_800)] {
            close.record(&warm_and_switched(model, node, ms), |_| true);
        }
        assert_eq!(close.switch_ms(1, m), Some(2_800));
    }

    #[test]
    fn what_a_node_said_of_its_loads_sets_its_part_until_it_switches() {
        let mut e = Estimates::default();
        e.report_load(1, 1_000, None, 0);
        e.report_load(2, 1_000, None, 0);
        e.report_load(3, 3_000, None, 0);
        let (p, m) = (model_key("p"), model_key("m"));
        assert_eq!(e.switch_ms(2, m), Some(1_000), "nothing measured: what the node said");
        e.record(&warm_and_switched("p", 1, 1_200), |_| true);
        assert_eq!(e.switch_ms(1, p), Some(1_200));
        assert_eq!(e.switch_ms(2, p), Some(1_200));
        assert_eq!(e.switch_ms(3, p), Some(3_600), "three times slower, as it said");
        // Measured on the slow node, m costs the fast ones a third (the parts were derived
        // again after the new samples).
        e.record(&warm_and_switched("m", 3, 6_000), |_| true);
        assert_eq!(e.switch_ms(2, m), Some(2_000));
        assert_eq!(e.switch_ms(3, m), Some(6_000));
        // A node that said its loads take nothing, or that nothing can be made of, is typical.
        let mut odd = Estimates::default();
        odd.report_load(1, 0, None, 0);
        odd.report_load(2, 1_000, None, 0);
        odd.record(&warm_and_switched("p", 2, 1_000), |_| true);
        assert_eq!(odd.switch_ms(1, p), Some(1_000));
    }

    #[test]
    fn a_board_that_booted_a_heavy_model_is_typical_once_that_model_is_measured_elsewhere() {
        // Every board loads alike; m is twice as heavy as p and r. Node 2 booted m, the others
        // p and r, and each said its one load so far.
        let (p, m, r) = (model_key("p"), model_key("m"), model_key("r"));
        let mut e = Estimates::default();
        e.report_load(1, 1_000, Some(p), 0);
        e.report_load(2, 2_000, Some(m), 0);
        e.report_load(3, 1_000, Some(r), 0);
        // Nothing measured: a slow board and a heavy model read alike, as they said.
        assert_eq!((e.switch_ms(2, p), e.switch_ms(1, m)), (Some(2_000), Some(1_000)));
        // m measured on node 1: it is m that is heavy, and node 2 is a typical board.
        e.record(&warm_and_switched("m", 1, 2_000), |_| true);
        assert_eq!(e.switch_ms(2, p), Some(1_000));
        assert_eq!(e.switch_ms(2, r), Some(1_000));
        assert_eq!(e.switch_ms(3, m), Some(2_000));
        // The same word as a mean over loads that may mix models tells only of the board.
        let mut mixed = Estimates::default();
        mixed.report_load(1, 1_000, None, 0);
        mixed.report_load(2, 2_000, None, 0);
        mixed.report_load(3, 1_000, None, 0);
        mixed.record(&warm_and_switched("m", 1, 2_000), |_| true);
        assert_eq!(mixed.switch_ms(2, p), Some(2_000));
        // A board's own switches come before what it said: node 2 measured loading p at 1 s, so
        // it is typical, and m, which only it named, is heavy on every board.
        let mut own = Estimates::default();
        own.report_load(1, 1_000, Some(p), 0);
        own.report_load(2, 2_000, Some(m), 0);
        own.report_load(3, 1_000, Some(r), 0);
        own.record(&warm_and_switched("p", 2, 1_000), |_| true);
        assert_eq!((own.switch_ms(2, r), own.switch_ms(1, m)), (Some(1_000), Some(2_000)));
        assert_eq!(Estimates::decode(Some(&own.encode())), own);
    }

    #[test]
    fn unknown_loads_are_classified_by_their_timing() {
        let mut e = Estimates::default();
        let m = model_key("m");
        e.record(&[sample("m", 1, Some(false), 400, 900, 50), sample("m", 1, Some(true), 5_400, 6_000, 50)], |_| true);
        // After a restart: a fast first token was a warm node, a slow one a switch.
        e.record(&[sample("m", 1, None, 410, 900, 50), sample("m", 1, None, 5_600, 6_000, 50)], |_| true);
        let pair = e.pair(1, m).unwrap();
        assert_eq!((pair.timing.warm_first_token.len(), pair.timing.switched_first_token.len()), (2, 2));
        // Nothing measured yet: nothing to judge by, the sample is left out.
        let mut fresh = Estimates::default();
        fresh.record(&[sample("m", 1, None, 400, 900, 50)], |_| true);
        assert!(fresh.models.is_empty());
    }

    #[test]
    fn bounded_and_configured_models_stay() {
        let mut e = Estimates::default();
        let kept = model_key("configured");
        e.record(&[sample("configured", 1, Some(false), 10, 10, 1)], |_| true);
        let made_up: Vec<Sample> = (0..1_000)
            .map(|k| Sample { at_ms: 1 + k, ..sample(&format!("x{k}"), k % 7, Some(false), 1, 1, 1) })
            .collect();
        e.record(&made_up, |k| k == kept);
        assert_eq!(e.models.len(), MAX_MODELS);
        assert!(e.pairs.len() <= MAX_PAIRS);
        assert_eq!(e.service_ms(kept), Some(10));
        assert_eq!(e.service_ms(model_key("x999")), Some(1), "the newest stay");
    }

    #[test]
    fn replies_not_streamed_teach_the_switch_cost_too() {
        let mut e = Estimates::default();
        let whole = |switched: bool, total: u64| Sample {
            model: "m".into(),
            node: 1,
            switched: Some(switched),
            first_token_ms: None,
            total_ms: total,
            tokens: None,
            at_ms: 0,
        };
        e.record(&[whole(false, 900), whole(false, 1_100), whole(true, 6_000)], |_| true);
        assert_eq!(e.switch_ms(1, model_key("m")), Some(6_000 - 1_100));
    }

    #[test]
    fn arrival_rates_come_from_the_clusters_latest_arrivals() {
        let (m, other) = (model_key("m"), model_key("other"));
        let at = |model: u64, at_ms: u64| Arrived { model, at_ms };
        let mut e = Estimates::default();
        assert_eq!(e.arrival_rate_per_s(m, 1_000, 1), 0.0);
        // Two VMs fold on their own ticks: the second's arrivals predate the first's.
        e.record_arrivals(&[at(m, 20_000), at(m, 30_000), at(other, 40_000)]);
        e.record_arrivals(&[at(m, 10_000), at(other, 35_000)]);
        let times: Vec<u64> = e.arrivals.iter().map(|a| a.at_ms).collect();
        assert_eq!(times, [10_000, 20_000, 30_000, 35_000, 40_000]);
        // 3 of 5 since 10 s, at 50 s: 3 per 40 s; a short span counts as the least one given.
        assert_eq!(e.arrival_rate_per_s(m, 50_000, 1), 0.075);
        assert_eq!(e.arrival_rate_per_s(m, 50_000, 100_000), 0.03);
        assert_eq!(e.arrival_rate_per_s(model_key("never"), 50_000, 1), 0.0);
        // Bounded: the latest stay, whatever order they come in.
        let many: Vec<Arrived> = (0..200).rev().map(|k| at(other, 100_000 + k)).collect();
        e.record_arrivals(&many);
        assert_eq!(e.arrivals.len(), MAX_ARRIVALS);
        assert_eq!(e.arrivals.first().map(|a| a.at_ms), Some(100_200 - MAX_ARRIVALS as u64));
        assert_eq!(e.arrival_rate_per_s(m, 200_000, 1), 0.0, "m's arrivals are no longer among the latest");
        assert_eq!(Estimates::decode(Some(&e.encode())), e);
    }

    #[test]
    fn what_nodes_say_their_loads_take_stands_until_switches_are_measured() {
        let (m, other) = (model_key("m"), model_key("other"));
        let mut e = Estimates::default();
        e.report_load(1, 30_000, None, 5);
        e.report_load(2, 50_000, None, 5);
        e.report_load(3, 40_000, None, 5);
        assert_eq!(e.switch_ms(1, m), Some(30_000), "node 1's own word");
        assert_eq!(e.switch_ms(9, m), Some(40_000), "a node that said nothing: the others' median");
        e.report_load(1, 20_000, None, 6);
        assert_eq!((e.reported_load_ms(1), e.reported_loads.len()), (Some(20_000), 3), "replaced");
        // A measured switch comes first on its node; on the others it is scaled by what each
        // said against what the others said: node 1 said 20 s, half the typical 40, and took
        // 25, so m costs a typical board 50 s, node 2 among them (its 50 s are within
        // `TYPICAL_WITHIN` of 40). Another model still has only the nodes' word.
        let warm = sample("m", 1, Some(false), 400, 900, 50);
        e.record(&[warm, sample("m", 1, Some(true), 25_400, 25_900, 50)], |_| true);
        assert_eq!((e.switch_ms(1, m), e.switch_ms(2, m)), (Some(25_000), Some(50_000)));
        assert_eq!(e.switch_ms(2, other), Some(50_000));
        assert!(!e.switch_measured(other), "a report is not a measurement");
        assert_eq!(e.switch_floor_ms(2, other), Some(25_000), "the floor is measured only");
        // Survives the shared-data round trip; bounded.
        assert_eq!(Estimates::decode(Some(&e.encode())), e);
        for node in 10..(10 + MAX_PAIRS as u64) {
            e.report_load(node, 1_000, None, node);
        }
        assert_eq!(e.reported_loads.len(), MAX_PAIRS);
        assert_eq!(e.reported_load_ms(1), Some(1_000), "the oldest reports went first");
    }
}
