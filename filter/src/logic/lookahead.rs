//! Looking ahead before a free node is given a model (issue 11): at each decision the scheduler's
//! rule is checked against sampled futures, and overridden where another choice is clearly
//! cheaper. This is rollout in the sense of Bertsekas' approximate dynamic programming: each
//! choice a free node has (serve the oldest waiting request of one of the models waiting, or
//! hold a tick) is played forward over the same sampled futures, the rest of each future
//! decided by a copy of the scheduler's rule (`World::rule_pick`: serve the node's own model;
//! else switch to a model whose queue takes longer to drain where it is loaded than the switch
//! plus what evicting the node's model costs). The rule's own choice, which the scheduler
//! passes in, stands unless another beats it by [`Z`] standard errors of their paired
//! differences: noise otherwise makes needless switches. It is a one-step improvement on the
//! rule, never a replacement.
//!
//! Each choice is played under two base policies, the rule as it is and the rule weighing
//! switches [`CAUTIOUS_SWITCH_WEIGHT`] times, and costs what the better of them makes of it:
//! parallel rollout (Chang, Givan and Chong, 2004), whose choice is at least as good as the best
//! of its base policies'. One rule plays every future as if the cluster kept switching as eagerly
//! as it does now, which undersells a choice whose best continuation is to hold its nodes: a
//! switch that is worth making only if the nodes stay put afterwards. The simulator showed it:
//! knowing the true future, a rollout over the rule alone did no better than over sampled
//! futures (docs/benchmarks.md, thirty-second session).
//!
//! It knows only what the balancer knows: the requests waiting (their models, expected work and
//! how long they waited), what each node runs and when it should end, each switch's cost, and
//! each model's arrival rate and recent service times. Futures are Poisson arrivals at those
//! rates with service times drawn from each model's recent ones. A future's cost is the sum of
//! its requests' times to first byte, each one's excess over [`TARGET_GENERATIONS`] mean
//! generations counted [`EXCESS_WEIGHT`] times again: the plain sum favours the popular model
//! and bought its p95 with the rare model's waits. And each request later than
//! [`TAIL_GENERATIONS`] costs [`TAIL_PENALTY_GENERATIONS`] once: a percentile counts requests,
//! not seconds, so a choice that saves many requests a little while pushing one more into the
//! tail is a loss there, however the seconds add up.
//!
//! The constants were chosen in the bench's simulator on seeds 1-64 of the workload
//! and checked on seeds 65-128 (docs/benchmarks.md, twenty-second, twenty-third and
//! twenty-fifth sessions).
//! Pure: no host calls; times are seconds from now.

/// Futures sampled per decision (every choice is played on the same ones).
pub const SAMPLES: usize = 32;
/// How far ahead arrivals are sampled, in mean generations.
pub const HORIZON_GENERATIONS: f64 = 6.5;
/// How long a held node waits before it is decided again, in mean generations.
pub const TICK_GENERATIONS: f64 = 1.0 / 6.0;
/// A choice overrides the base rule's only when it beats it by this many standard errors.
pub const Z: f64 = 2.0;
/// The second base policy weighs each switch this many times what it is measured to cost (the
/// setting of `model_switch_cost` the benchmark found best by hand, three times the real switch).
pub const CAUTIOUS_SWITCH_WEIGHT: f64 = 3.0;
/// The base policies each choice is played under: the rule, then the cautious rule (in this
/// order, so that a decision that runs out of budget has the rule's costs whole).
const SWITCH_WEIGHTS: [f64; 2] = [1.0, CAUTIOUS_SWITCH_WEIGHT];
/// A wait longer than this many mean generations costs [`EXCESS_WEIGHT`] times more per second.
pub const TARGET_GENERATIONS: f64 = 4.0;
pub const EXCESS_WEIGHT: f64 = 5.0;
/// A request whose time to first byte exceeds this many mean generations costs
/// [`TAIL_PENALTY_GENERATIONS`] mean generations more, once (chosen in the simulator on seeds
/// 1-64, checked on 65-128: docs/benchmarks.md, twenty-fifth session).
pub const TAIL_GENERATIONS: f64 = 3.5;
pub const TAIL_PENALTY_GENERATIONS: f64 = 12.0;
/// Beyond these the look-ahead stays out (its cost grows with each): the rule decides alone.
pub const MAX_NODES: usize = 16;
pub const MAX_MODELS: usize = 16;
// Model indices are bits of a `u64` ([`NodeView::serves`]).
const _: () = assert!(MAX_MODELS <= 64);
/// Waiting requests looked at (the first ones in the scheduler's order).
pub const MAX_WAITING: usize = 64;
/// Arrivals sampled per future at most (a burst of rates must not make a decision slow).
const MAX_ARRIVALS: usize = 256;
/// Work at most per decision, over all its futures and choices, and per plan (all its free
/// nodes' decisions), counted as the nodes scanned at each event played plus the requests
/// waiting at each node the rule weighs: about 3.5 ns a unit natively, whatever the view. A
/// decision that runs out within the cautious rule's plays decides on the rule's; one that runs
/// out within the rule's keeps the rule's choice. In the simulator's runs (seeds 1-8, every load
/// and switch time; thirty-second session) decisions on 3 nodes took at most 342,000 units
/// (1.2 ms), and on 16 nodes 0.9 % of them reached the cap.
const MAX_WORK_PER_DECISION: u64 = 600_000;
const MAX_WORK_PER_PLAN: u64 = 1_200_000;
/// Generations shorter than this (s) are not looked ahead at: ticks so short would be noise.
const MIN_MEAN_SERVICE_S: f64 = 0.001;

/// How many nodes have each model loaded (by index in [`View::models`]).
type WarmNodes = [usize; MAX_MODELS];

/// A node as the look-ahead sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeView {
    /// The index in [`View::models`] of the model it has loaded; `None`: not known.
    pub loaded: Option<usize>,
    /// When it is expected to be free (s from now; 0 or less: free now).
    pub free_at: f64,
    /// Bit `m` set: it may serve model `m`.
    pub serves: u64,
}

impl NodeView {
    fn can_serve(&self, model: usize) -> bool {
        model < 64 && self.serves & (1u64 << model) != 0
    }
}

/// A request, waiting or to come.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Job {
    /// When it came (s from now: negative for one that waits).
    pub at: f64,
    pub model: usize,
    /// How long it keeps a warm node busy (s).
    pub service: f64,
    /// Its time to first byte on a warm node that starts it at once (s).
    pub first: f64,
}

/// What is known of one model's demand.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelView {
    pub rate_per_s: f64,
    /// Recent service times (s); futures draw from them.
    pub services: Vec<f64>,
    /// Its time to first byte on a warm node (s).
    pub first: f64,
}

impl ModelView {
    fn mean_service(&self) -> Option<f64> {
        (!self.services.is_empty()).then(|| self.services.iter().sum::<f64>() / self.services.len() as f64)
    }
}

/// Everything a decision looks at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub nodes: Vec<NodeView>,
    pub models: Vec<ModelView>,
    /// What loading model `m` costs node `i` (s), at `i * models.len() + m`.
    pub switch_s: Vec<f64>,
    /// In the scheduler's order.
    pub waiting: Vec<Job>,
    /// How long a request may wait (`queue.timeout`, s): the span over which a model evicted is
    /// likely to be asked for again.
    pub timeout_s: f64,
}

/// What the look-ahead tells a free node to do instead of what the rule would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Serve the oldest waiting request of this model (an index in [`View::models`]).
    Serve(usize),
    /// Take nothing until the next decision.
    Hold,
}

impl View {
    fn switch(&self, node: usize, model: usize) -> f64 {
        node.checked_mul(self.models.len())
            .and_then(|at| at.checked_add(model))
            .and_then(|at| self.switch_s.get(at))
            .copied()
            .unwrap_or(f64::INFINITY)
    }

    /// The mean generation: the models' mean service times weighted by their rates (by the
    /// requests waiting while no rate is known).
    pub fn mean_service(&self) -> Option<f64> {
        let total: f64 = self.models.iter().map(|m| m.rate_per_s).sum();
        let weighted: f64 = self.models.iter().filter_map(|m| Some(m.rate_per_s * m.mean_service()?)).sum();
        if total > 0.0 && weighted > 0.0 {
            return Some(weighted / total);
        }
        let n = self.waiting.len();
        let sum: f64 = self.waiting.iter().map(|j| j.service).sum();
        (n > 0 && sum > 0.0).then(|| sum / n as f64)
    }
}

/// A seeded generator (SplitMix64): decisions are reproducible, and every choice of one
/// decision is played on the same futures.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        crate::logic::state::mix(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponential with mean 1 / `rate`.
    fn exp(&mut self, rate: f64) -> f64 {
        -(1.0 - self.unit()).ln() / rate
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The constants of one decision, derived from the view once: the rollouts ask for each model's
/// mean service at every event they play.
struct World<'a> {
    view: &'a View,
    horizon_s: f64,
    target_s: f64,
    tail_s: f64,
    tail_penalty_s: f64,
    tick_s: f64,
    /// Each model's mean service (s; 0 while none is known).
    service_s: Vec<f64>,
    /// The view's mean generation, for arrivals of a model with no service known (s; 0: none).
    mean_service_s: f64,
    /// Work done so far in this decision, and what it may do ([`MAX_WORK_PER_DECISION`]).
    work: std::cell::Cell<u64>,
    budget: u64,
}

impl<'a> World<'a> {
    /// The world of a decision on `view`, whose mean generation is `mean_s` (s), that may do
    /// `budget` units of work.
    fn new(view: &'a View, mean_s: f64, budget: u64) -> World<'a> {
        World {
            view,
            horizon_s: mean_s * HORIZON_GENERATIONS,
            target_s: mean_s * TARGET_GENERATIONS,
            tail_s: mean_s * TAIL_GENERATIONS,
            tail_penalty_s: mean_s * TAIL_PENALTY_GENERATIONS,
            tick_s: mean_s * TICK_GENERATIONS,
            service_s: view.models.iter().map(|m| m.mean_service().unwrap_or(0.0)).collect(),
            mean_service_s: view.mean_service().unwrap_or(0.0),
            work: std::cell::Cell::new(0),
            budget,
        }
    }

    /// Counts `units` of work; whether the budget is spent.
    fn charge(&self, units: usize) -> bool {
        let work = self.work.get().saturating_add(units as u64);
        self.work.set(work);
        work > self.budget
    }

    /// What a request's time to first byte costs.
    fn cost(&self, ttft: f64) -> f64 {
        let tail = if ttft > self.tail_s { self.tail_penalty_s } else { 0.0 };
        ttft + EXCESS_WEIGHT * (ttft - self.target_s).max(0.0) + tail
    }

    /// Starts `job` on node `i` at `t`; returns its time to first byte.
    fn start(&self, nodes: &mut [NodeView], i: usize, job: &Job, t: f64) -> f64 {
        let switch =
            if nodes.get(i).and_then(|n| n.loaded) == Some(job.model) { 0.0 } else { self.view.switch(i, job.model) };
        let begins = t + switch;
        if let Some(n) = nodes.get_mut(i) {
            n.free_at = begins + job.service;
            n.loaded = Some(job.model);
        }
        begins + job.first - job.at
    }

    /// How many nodes' worth of work model `m`'s arrivals bring, and its mean service (s).
    fn demand(&self, m: usize) -> (f64, f64) {
        let service = self.service_s.get(m).copied().unwrap_or(0.0);
        (self.view.models.get(m).map_or(0.0, |x| x.rate_per_s) * service, service)
    }

    /// What model `m`'s queue gains over the scheduler's growth horizon of its generations, or
    /// over `at_least_s` where that is longer, while `nodes` serve it (the scheduler's
    /// `Demand::growth_ms`).
    fn growth(&self, m: usize, nodes: f64, at_least_s: f64) -> f64 {
        let (demand, service) = self.demand(m);
        let horizon = (service * crate::logic::schedule::GROWTH_HORIZON_GENERATIONS as f64).max(at_least_s);
        (demand - nodes).max(0.0) * horizon.min(self.view.timeout_s / 2.0)
    }

    /// The base rule for free node `i`, shaped as the scheduler's (`place` and
    /// `Costs::eviction` in schedule.rs, per node rather than per request): the oldest request
    /// for the node's own model; else, in order, the first model whose queue (with what it gains
    /// where its arrivals outrun its warm nodes) takes longer to drain where it is loaded
    /// (forever where nowhere) than the switch plus what evicting the node's model costs: never
    /// while that model waits and no other node has it; how much longer its queue takes to
    /// drain on one node fewer where others have it and it waits (its growth counted over the
    /// switch there and back where that is longer than the horizon), and where others have it
    /// the switch back weighted by how busy its demand keeps them; else the switch back if it is
    /// asked for again within the timeout, plus the work its arrivals bring while the node is
    /// away. The switch counts `switch_weight` times (one of [`SWITCH_WEIGHTS`]: the base policy
    /// played). `None`: the node holds.
    fn rule_pick(
        &self,
        nodes: &[NodeView],
        warm_nodes: &WarmNodes,
        i: usize,
        waiting: &[Job],
        switch_weight: f64,
    ) -> Option<usize> {
        let node = nodes.get(i)?;
        if let Some(k) =
            node.loaded.filter(|&m| node.can_serve(m)).and_then(|loaded| waiting.iter().position(|j| j.model == loaded))
        {
            return Some(k);
        }
        // Per model: its queued work (summed in queue order).
        let mut queued_work = [0.0f64; MAX_MODELS];
        for j in waiting {
            if let Some(q) = queued_work.get_mut(j.model) {
                *q += j.service;
            }
        }
        let warm = |m: usize| warm_nodes.get(m).copied().unwrap_or(0) as f64;
        let queued = |m: usize| queued_work.get(m).copied().unwrap_or(0.0);
        let eviction = match node.loaded {
            None => 0.0,
            Some(loaded) => {
                let warm = warm(loaded);
                let q = queued(loaded);
                if q > 0.0 && warm <= 1.0 {
                    return None;
                } else if q > 0.0 {
                    let away = 2.0 * self.view.switch(i, loaded);
                    let drain = |n: f64| (q + self.growth(loaded, n, away)) / n;
                    drain(warm - 1.0) - drain(warm) + self.switch_back(i, loaded, warm)
                } else if warm >= 2.0 {
                    self.switch_back(i, loaded, warm)
                } else {
                    let back = self.view.switch(i, loaded);
                    let rate = self.view.models.get(loaded).map_or(0.0, |m| m.rate_per_s);
                    let likely = 1.0 - (-rate * self.view.timeout_s.max(back)).exp();
                    likely * back + self.demand(loaded).0 * 2.0 * back
                }
            }
        };
        let mut weighed: u64 = 0;
        for (k, j) in waiting.iter().enumerate() {
            if j.model >= 64 || weighed & (1u64 << j.model) != 0 || !node.can_serve(j.model) {
                continue;
            }
            weighed |= 1u64 << j.model;
            let warm = warm(j.model);
            let drain = if warm == 0.0 {
                f64::INFINITY
            } else {
                (queued(j.model) + self.growth(j.model, warm, 0.0)) / warm + self.demand(j.model).1 / 2.0
            };
            if switch_weight * self.view.switch(i, j.model) + eviction <= drain {
                return Some(k);
            }
        }
        None
    }

    /// The switch back of node `i` to `loaded`, which `warm` nodes have, weighted by how busy
    /// that model's demand keeps the nodes left (at most 1; the scheduler's `Costs::eviction`).
    fn switch_back(&self, i: usize, loaded: usize, warm: f64) -> f64 {
        self.view.switch(i, loaded) * (self.demand(loaded).0 / (warm - 1.0).max(1.0)).min(1.0)
    }

    /// Arrivals over the horizon.
    fn sample(&self, rng: &mut Rng) -> Vec<Job> {
        let rates: Vec<f64> = self.view.models.iter().map(|m| m.rate_per_s.max(0.0)).collect();
        let total: f64 = rates.iter().sum();
        let mut out = Vec::new();
        if total <= 0.0 || !total.is_finite() {
            return out;
        }
        let mut t = 0.0;
        while out.len() < MAX_ARRIVALS {
            t += rng.exp(total);
            if t > self.horizon_s {
                break;
            }
            let mut x = rng.unit() * total;
            let mut model = rates.len().saturating_sub(1);
            for (m, r) in rates.iter().enumerate() {
                if x < *r {
                    model = m;
                    break;
                }
                x -= r;
            }
            let Some(m) = self.view.models.get(model) else { continue };
            let service = match m.services.get(rng.below(m.services.len())) {
                Some(&s) => s,
                None => self.mean_service_s,
            };
            out.push(Job { at: t, model, service, first: m.first });
        }
        out
    }

    /// The summed costs of `waiting` and `arrivals` served from `t0` by the base rule weighing
    /// switches `switch_weight` times; requests still waiting long after the horizon count as
    /// served then.
    fn play(
        &self,
        mut nodes: Vec<NodeView>,
        mut waiting: Vec<Job>,
        arrivals: &[Job],
        t0: f64,
        switch_weight: f64,
    ) -> f64 {
        let (mut t, mut next, mut total) = (t0, 0usize, 0.0);
        let end = t0 + 4.0 * self.horizon_s;
        // The rule's pick depends only on what the nodes have loaded and on what waits: a free
        // node that held stays held until one of them changes (`version`), and is not weighed
        // again before (the same decisions, fewer of them).
        let mut version: u64 = 0;
        let mut held_at: Vec<Option<u64>> = vec![None; nodes.len()];
        let mut warm_nodes: WarmNodes = [0; MAX_MODELS];
        for m in nodes.iter().filter_map(|n| n.loaded) {
            if let Some(w) = warm_nodes.get_mut(m) {
                *w += 1;
            }
        }
        loop {
            if self.charge(nodes.len() + 1) {
                // Out of budget: a cost that compares as nothing (the rule's choice stands).
                return f64::NAN;
            }
            while let Some(j) = arrivals.get(next).filter(|j| j.at <= t) {
                waiting.push(*j);
                next += 1;
                version += 1;
            }
            // The next event: the next arrival, or the next node to free once each has been
            // decided. (No tick where a free node holds: the rule played here does not depend on
            // the time, so a node that holds holds until a request comes or a node frees.)
            let mut t_next = arrivals.get(next).map_or(f64::INFINITY, |j| j.at);
            for (i, held) in held_at.iter_mut().enumerate() {
                let Some(free_at) = nodes.get(i).map(|n| n.free_at) else { continue };
                if free_at <= t && *held != Some(version) {
                    if self.charge(waiting.len() + 1) {
                        return f64::NAN;
                    }
                    match self.rule_pick(&nodes, &warm_nodes, i, &waiting, switch_weight).filter(|&k| k < waiting.len())
                    {
                        Some(k) => {
                            let job = waiting.remove(k);
                            let had = nodes.get(i).and_then(|n| n.loaded);
                            total += self.cost(self.start(&mut nodes, i, &job, t));
                            if had != Some(job.model) {
                                if let Some(w) = had.and_then(|m| warm_nodes.get_mut(m)) {
                                    *w = w.saturating_sub(1);
                                }
                                if let Some(w) = warm_nodes.get_mut(job.model) {
                                    *w += 1;
                                }
                            }
                            version += 1;
                            *held = None;
                        }
                        None => *held = Some(version),
                    }
                }
                if let Some(n) = nodes.get(i).filter(|n| n.free_at > t) {
                    t_next = t_next.min(n.free_at);
                }
            }
            if waiting.is_empty() && next >= arrivals.len() {
                return total;
            }
            if t_next > end || t_next.is_nan() {
                return total + waiting.iter().map(|j| self.cost(end - j.at + j.first)).sum::<f64>();
            }
            t = t_next;
        }
    }

    /// The cost of one future (`arrivals`) where free node `i` takes `choice` (a position in the
    /// view's waiting requests; `None` or out of range: it holds a tick) and the base policy
    /// that weighs switches `switch_weight` times decides the rest.
    fn play_choice(
        &self,
        nodes: &[NodeView],
        i: usize,
        choice: Option<usize>,
        arrivals: &[Job],
        switch_weight: f64,
    ) -> f64 {
        let (mut ns, mut js) = (nodes.to_vec(), self.view.waiting.clone());
        let mut total = 0.0;
        match choice {
            Some(k) if k < js.len() => {
                let j = js.remove(k);
                total += self.cost(self.start(&mut ns, i, &j, 0.0));
            }
            _ => {
                if let Some(n) = ns.get_mut(i) {
                    n.free_at = self.tick_s;
                }
            }
        }
        total + self.play(ns, js, arrivals, 0.0, switch_weight)
    }

    /// The choice for free node `i` (a position in `waiting`, or `None`: hold): the base
    /// rule's, unless another's futures cost less by more than [`Z`] standard errors, each
    /// choice's futures played under the base policy (of `switch_weights`, [`SWITCH_WEIGHTS`]
    /// but in tests) that makes the least of them.
    fn look_ahead(
        &self,
        switch_weights: &[f64],
        nodes: &[NodeView],
        i: usize,
        base: Option<usize>,
        seed: u64,
    ) -> Option<usize> {
        let waiting = &self.view.waiting;
        let node = nodes.get(i)?;
        // The oldest waiting request of each model the node may serve, and holding.
        let mut choices: Vec<Option<usize>> = Vec::new();
        let mut seen: u64 = 0;
        for (k, j) in waiting.iter().enumerate() {
            if j.model < 64 && seen & (1u64 << j.model) == 0 && node.can_serve(j.model) {
                seen |= 1u64 << j.model;
                choices.push(Some(k));
            }
        }
        choices.push(None);
        let b = choices.iter().position(|c| *c == base)?;
        let futures: Vec<Vec<Job>> =
            (0..SAMPLES).map(|s| self.sample(&mut Rng(seed ^ (s as u64).wrapping_mul(0x51_7CC1_B727)))).collect();
        // Each choice's costs over the futures under the base policy that makes the least of
        // them. A policy whose play ran out of budget (NaN) is not weighed; where the rule's
        // did, its NaNs stand and the rule's choice with them.
        let mut costs: Vec<Vec<f64>> = vec![Vec::new(); choices.len()];
        let mut sums: Vec<f64> = vec![f64::NAN; choices.len()];
        for (p, &weight) in switch_weights.iter().enumerate() {
            for ((choice, best), best_sum) in choices.iter().zip(costs.iter_mut()).zip(sums.iter_mut()) {
                let played: Vec<f64> =
                    futures.iter().map(|arrivals| self.play_choice(nodes, i, *choice, arrivals, weight)).collect();
                let sum: f64 = played.iter().sum();
                if p == 0 || sum < *best_sum {
                    (*best, *best_sum) = (played, sum);
                }
            }
        }
        let base_costs = costs.get(b)?;
        let mut best = (0.0, base);
        for (choice, cost) in choices.iter().zip(&costs) {
            let d: Vec<f64> = cost.iter().zip(base_costs).map(|(x, y)| x - y).collect();
            let n = d.len().max(2) as f64;
            let mean = d.iter().sum::<f64>() / n;
            let se = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt();
            if mean < -Z * se && mean < best.0 {
                best = (mean, *choice);
            }
        }
        best.1
    }
}

/// Decides, in turn, each of the nodes `free` (indices in `view.nodes` that are free now), whose
/// `rule` is the model the scheduler's rule gives it (`None`: none, it holds): each is played as
/// the rule decides it, or as the look-ahead overrides it, and the next is decided with that
/// done. Returns the overrides: (node, what it does instead of the rule's choice). Nothing where
/// the view is too large or nothing is known of the generations; the rule's choice for a node
/// where a switch and the switch back do not fit in the horizon (it cannot see what a switch
/// costs).
pub fn plan(view: &View, free: &[usize], rule: &[Option<usize>], seed: u64) -> Vec<(usize, Choice)> {
    plan_within(view, free, rule, seed, Budget { per_decision: MAX_WORK_PER_DECISION, per_plan: MAX_WORK_PER_PLAN })
}

/// Units of work a plan may do.
#[derive(Debug, Clone, Copy)]
struct Budget {
    per_decision: u64,
    per_plan: u64,
}

fn plan_within(view: &View, free: &[usize], rule: &[Option<usize>], seed: u64, budget: Budget) -> Vec<(usize, Choice)> {
    let mut overrides = Vec::new();
    if view.nodes.len() > MAX_NODES || view.models.len() > MAX_MODELS {
        return overrides;
    }
    let Some(mean) = view.mean_service().filter(|m| m.is_finite() && *m >= MIN_MEAN_SERVICE_S) else {
        return overrides;
    };
    let mut view = view.clone();
    // Requests for a model the view does not describe cannot be weighed.
    let models = view.models.len();
    view.waiting.retain(|j| j.model < models);
    view.waiting.truncate(MAX_WAITING);
    let mut spent: u64 = 0;
    for (turn, &i) in free.iter().enumerate() {
        if view.waiting.is_empty() {
            break;
        }
        let world = World::new(&view, mean, budget.per_decision.min(budget.per_plan.saturating_sub(spent)));
        let tick_s = world.tick_s;
        let mut nodes = view.nodes.clone();
        // The rule's choice: the first waiting request of the model it gives the node.
        let given = rule.get(turn).copied().flatten();
        let base = given.and_then(|m| view.waiting.iter().position(|j| j.model == m));
        let longest_switch = view
            .waiting
            .iter()
            .map(|j| view.switch(i, j.model))
            .chain(nodes.get(i).and_then(|n| n.loaded).map(|m| view.switch(i, m)))
            .fold(0.0, f64::max);
        let choice = if 2.0 * longest_switch > world.horizon_s {
            base
        } else {
            world.look_ahead(&SWITCH_WEIGHTS, &nodes, i, base, crate::logic::state::mix(seed ^ turn as u64))
        };
        spent = spent.saturating_add(world.work.get());
        let chosen = choice.and_then(|k| view.waiting.get(k).copied());
        if choice != base {
            overrides.push((i, chosen.map_or(Choice::Hold, |j| Choice::Serve(j.model))));
        }
        // Done as decided, for the next node's decision.
        match (chosen, choice) {
            (Some(job), Some(k)) => {
                world.start(&mut nodes, i, &job, 0.0);
                view.waiting.remove(k);
            }
            _ => {
                if let Some(n) = nodes.get_mut(i) {
                    n.free_at = tick_s;
                }
            }
        }
        view.nodes = nodes;
    }
    overrides
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(loaded: usize, free_at: f64) -> NodeView {
        NodeView { loaded: Some(loaded), free_at, serves: u64::MAX }
    }

    /// Three nodes, three models at 60/30/10 % of 4 requests a second, generations of 0.6 s and
    /// switches of `switch` s.
    fn cluster(nodes: Vec<NodeView>, waiting: Vec<Job>, switch: f64) -> View {
        let models: Vec<ModelView> = [0.6, 0.3, 0.1]
            .iter()
            .map(|share| ModelView { rate_per_s: 4.0 * share, services: vec![0.4, 0.6, 0.8], first: 0.05 })
            .collect();
        let switch_s = vec![switch; nodes.len() * models.len()];
        View { nodes, models, switch_s, waiting, timeout_s: 300.0 }
    }

    fn job(at: f64, model: usize) -> Job {
        Job { at, model, service: 0.6, first: 0.05 }
    }

    /// Two requests for the popular model, its one warm node busy for another generation, node 1
    /// free on the rare model, switches of a quarter generation.
    fn popular_waits_rare_node_free() -> View {
        cluster(vec![node(0, 0.6), node(2, 0.0), node(1, 0.6)], vec![job(-0.1, 0), job(0.0, 0)], 0.15)
    }

    /// Nothing to override where the rule's choice is plainly right: a free node whose own
    /// model waits serves it.
    #[test]
    fn a_node_whose_model_waits_serves_it() {
        let v = cluster(vec![node(0, 0.0), node(1, 0.5), node(2, 0.3)], vec![job(-0.1, 0)], 0.6);
        assert_eq!(plan(&v, &[0], &[Some(0)], 7), vec![]);
    }

    /// Two requests for the popular model, its one warm node busy for another generation, and a
    /// free node idling on the rare model: where the rule would keep the free node for
    /// its own model, the sampled futures show that a cheap switch now serves the popular
    /// model's arrivals sooner, and the free node switches.
    #[test]
    fn a_cheap_switch_the_rule_would_not_make_is_made_where_the_futures_pay_for_it() {
        let v = popular_waits_rare_node_free();
        assert_eq!(plan(&v, &[1], &[None], 11), vec![(1, Choice::Serve(0))]);
    }

    /// The popular model's only warm node is free and nothing of it waits; a request for the
    /// rare model came just as the rare model's own node is about to free. Where the rule would
    /// switch the popular node away for it, the futures show the popular model's arrivals
    /// paying for that switch and the switch back: the node holds.
    #[test]
    fn a_switch_the_rule_would_make_is_not_made_where_the_futures_show_it_costs_more() {
        let v = cluster(vec![node(0, 0.0), node(1, 0.5), node(2, 0.05)], vec![job(0.0, 2)], 0.6);
        assert_eq!(plan(&v, &[0], &[Some(2)], 5), vec![(0, Choice::Hold)]);
    }

    /// A percentile counts requests: a request pushed past the tail level costs a fixed amount
    /// more, once, however little it crosses it; below the tail a second costs a second.
    #[test]
    fn a_request_pushed_into_the_tail_costs_a_fixed_amount_more() {
        let v = cluster(vec![node(0, 0.0)], vec![job(0.0, 0)], 0.6);
        let mean = v.mean_service().unwrap();
        let w = World::new(&v, mean, u64::MAX);
        let tail = mean * TAIL_GENERATIONS;
        let crossing = w.cost(tail + 0.001) - w.cost(tail - 0.001);
        assert!((crossing - (0.002 + mean * TAIL_PENALTY_GENERATIONS)).abs() < 1e-9, "{crossing}");
        assert!((w.cost(tail / 2.0) - tail / 2.0).abs() < 1e-12);
    }

    /// Work is bounded per decision and per plan: a decision that runs out of its budget, or
    /// comes after the plan's is spent, keeps the rule's choice.
    #[test]
    fn a_decision_out_of_budget_keeps_the_rules_choice() {
        let v = popular_waits_rare_node_free();
        let within = |per_decision, per_plan| plan_within(&v, &[1], &[None], 11, Budget { per_decision, per_plan });
        assert_eq!(within(MAX_WORK_PER_DECISION, MAX_WORK_PER_PLAN), vec![(1, Choice::Serve(0))]);
        assert_eq!(within(1_000, MAX_WORK_PER_PLAN), vec![], "the decision ran out");
        assert_eq!(within(MAX_WORK_PER_DECISION, 1_000), vec![], "the plan ran out");
        // Two free nodes: each decision's work counts against the plan's budget.
        let two = cluster(
            vec![node(0, 0.6), node(1, 0.0), node(2, 0.0)],
            vec![job(0.0, 0), job(-0.2, 0), job(-0.1, 0)],
            0.15,
        );
        let unbounded = Budget { per_decision: u64::MAX, per_plan: u64::MAX };
        assert_eq!(plan_within(&two, &[1, 2], &[None, None], 11, unbounded), vec![(2, Choice::Serve(0))]);
        // What the first decision (node 1, which holds) spends, played alone.
        let first = World::new(&two, two.mean_service().unwrap(), u64::MAX);
        first.look_ahead(&SWITCH_WEIGHTS, &two.nodes, 1, None, crate::logic::state::mix(11));
        let spent = first.work.get();
        let after_first = Budget { per_decision: u64::MAX, per_plan: spent + 10 };
        assert_eq!(plan_within(&two, &[1, 2], &[None, None], 11, after_first), vec![], "node 2's decision ran out");
    }

    /// A switch and the switch back that do not fit in the horizon: the rule decides alone.
    #[test]
    fn switches_longer_than_the_horizon_leave_the_rule_alone() {
        let waiting: Vec<Job> = (0..6).map(|k| job(-0.1 * k as f64, 0)).collect();
        let v = cluster(vec![node(0, 0.6), node(1, 0.0), node(2, 0.6)], waiting, 10.0);
        assert_eq!(plan(&v, &[1], &[None], 11), vec![]);
    }

    /// Views it cannot use give no overrides rather than a guess: no generations known, too
    /// many nodes, nothing waiting.
    #[test]
    fn views_it_cannot_use_give_nothing() {
        let mut v = cluster(vec![node(0, 0.0)], vec![job(0.0, 1)], 0.6);
        v.models.iter_mut().for_each(|m| m.services.clear());
        v.waiting.iter_mut().for_each(|j| j.service = 0.0);
        assert_eq!(plan(&v, &[0], &[None], 1), vec![]);
        let many = cluster(vec![node(0, 0.0); MAX_NODES + 1], vec![job(0.0, 1)], 0.6);
        assert_eq!(plan(&many, &[0], &[None], 1), vec![]);
        let idle = cluster(vec![node(0, 0.0)], vec![], 0.6);
        assert_eq!(plan(&idle, &[0], &[None], 1), vec![]);
    }

    /// Each choice is played under the rule and under the cautious rule, and costs what the
    /// better of them makes of it. One request for the popular model waits, and the popular
    /// model's only node frees in a twentieth of a generation; the rule switches the middle
    /// model's free node for it. Played on under the rule, which keeps switching, that looks no
    /// worse than holding; played under the cautious rule, holding is cheaper: the request
    /// takes the popular node in 0.03 s, and the middle model keeps its node.
    #[test]
    fn a_choice_costs_what_the_better_base_policy_makes_of_it() {
        let v = cluster(vec![node(1, 0.0), node(0, 0.03), node(2, 1.0)], vec![job(-0.07, 0)], 0.6);
        let mean = v.mean_service().unwrap();
        let mut warm: WarmNodes = [0; MAX_MODELS];
        warm[..3].copy_from_slice(&[1, 1, 1]);
        let seed = crate::logic::state::mix(11);
        let both = World::new(&v, mean, u64::MAX);
        assert_eq!(both.rule_pick(&v.nodes, &warm, 0, &v.waiting, 1.0), Some(0), "the rule switches");
        let rule_alone = World::new(&v, mean, u64::MAX);
        assert_eq!(rule_alone.look_ahead(&[1.0], &v.nodes, 0, Some(0), seed), Some(0));
        assert_eq!(both.look_ahead(&SWITCH_WEIGHTS, &v.nodes, 0, Some(0), seed), None);
        assert_eq!(plan(&v, &[0], &[Some(0)], 11), vec![(0, Choice::Hold)]);
        // The rule is played first: a decision whose budget ends within the cautious rule's
        // plays decides on the rule's alone.
        let short = World::new(&v, mean, rule_alone.work.get() + 10);
        assert_eq!(short.look_ahead(&SWITCH_WEIGHTS, &v.nodes, 0, Some(0), seed), Some(0));
    }
}
