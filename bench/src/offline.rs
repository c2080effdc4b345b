//! The best schedule a search finds when it knows the whole trace in advance: how low p95 can go
//! at all on a trace, to tell a scheduler's shortfall from the trace's own limit. The greedy
//! clairvoyant dispatcher ([`clairvoyant`], the sweep's reference) knows the future too but
//! decides one request at a time, and does worse than exo-lb where switches are dear; the search
//! ([`best_found`]) goes over whole schedules (which node serves which requests, in which order)
//! by simulated annealing, starting from it.
//!
//! By default ([`Rules`]) its schedules may also do what no online scheduler can: load a model
//! before the request that needs it arrives, and serve a node's requests in any order (short
//! ones first, some left to wait almost to the timeout). With both off they are what a
//! dispatcher that knew the future could do serving in arrival order. Either way the p95 found
//! is a schedule that exists, not a proven optimum: the best possible is at most that.

use crate::report::percentile;
use crate::rng::Rng;
use crate::trace::{Hardware, Req};

/// A schedule found: each request's time to first byte and the switches it makes.
pub struct Found {
    pub ttft: Vec<f64>,
    pub switches: u64,
    /// Requests whose first byte comes later than the timeout (they would fail).
    pub failed: usize,
}

/// How hard to search: annealing moves per bisection step, bisection steps over the p95, and
/// the seed of the search's random moves.
pub struct Effort {
    pub moves: u64,
    pub steps: u32,
    pub seed: u64,
}

/// What the schedules searched may do beyond what any scheduler does online.
#[derive(Clone, Copy)]
pub struct Rules {
    /// A node may load a model before the request that needs it arrives.
    pub early_loads: bool,
    /// A node may serve its requests in any order (else in the order they arrived).
    pub reorder: bool,
}

struct Problem<'a> {
    hw: &'a Hardware,
    trace: &'a [Req],
    initial: Vec<usize>,
    timeout_s: f64,
    rules: Rules,
    /// How many requests may exceed a target and leave p95 at or under it (nearest rank, as
    /// `report::percentile` takes it).
    allowed_over: usize,
}

impl<'a> Problem<'a> {
    /// Node `i` starts with model `i % models`, as the simulated nodes do.
    fn new(hw: &'a Hardware, trace: &'a [Req], models: usize, timeout_s: f64, rules: Rules) -> Problem<'a> {
        let n = trace.len();
        Problem {
            hw,
            trace,
            initial: (0..hw.nodes).map(|i| i % models.max(1)).collect(),
            timeout_s,
            rules,
            allowed_over: n - ((0.95 * n as f64).ceil() as usize).min(n),
        }
    }

    /// Serves each node's requests in order (in arrival order unless the rules allow any),
    /// each as early as its node and arrival allow (a switch starting before the request
    /// arrives where the rules allow); fills `ttft`, returns the switches.
    fn decode(&self, order: &[Vec<usize>], ttft: &mut [f64]) -> u64 {
        let mut switches = 0;
        for (node, seq) in order.iter().enumerate() {
            let mut free = 0.0f64;
            let mut loaded = self.initial.get(node).copied().unwrap_or(usize::MAX);
            // Requests are numbered in arrival order.
            let mut sorted;
            let seq = if self.rules.reorder {
                seq
            } else {
                sorted = seq.clone();
                sorted.sort_unstable();
                &sorted
            };
            for &k in seq {
                let (Some(r), Some(slot)) = (self.trace.get(k), ttft.get_mut(k)) else { continue };
                let switch = if loaded == r.model { 0.0 } else { self.hw.switch_s(node, r.model) };
                switches += u64::from(switch > 0.0);
                let start = if self.rules.early_loads { (free + switch).max(r.at) } else { free.max(r.at) + switch };
                *slot = start + self.hw.min_ttft(r) - r.at;
                free = start + self.hw.service(r);
                loaded = r.model;
            }
        }
        switches
    }

    /// Requests whose first byte comes later than the timeout.
    fn failed(&self, ttft: &[f64]) -> usize {
        ttft.iter().filter(|&&t| t > self.timeout_s).count()
    }

    /// How far a schedule is from p95 <= `target` with nothing failed: failures weigh most,
    /// then the excess over `target` of every request but the `allowed_over` latest (zero when
    /// the target is met).
    fn cost(&self, ttft: &[f64], target: f64, excess: &mut Vec<f64>) -> f64 {
        // Each failure weighs most, and past the timeout each second weighs as much as a
        // hundred under it, so that a move shortening a failing request's wait counts too (a
        // count alone would leave the search nothing to follow).
        let over = |t: f64| (t - self.timeout_s).max(0.0);
        let failed = self.failed(ttft) as f64 * 1e4 + ttft.iter().map(|&t| over(t)).sum::<f64>() * 100.0;
        excess.clear();
        excess.extend(ttft.iter().map(|&t| (t - target).max(0.0)));
        excess.sort_by(|a, b| b.total_cmp(a));
        let kept: f64 = excess.iter().skip(self.allowed_over).sum();
        failed + kept
    }
}

/// Searches for the schedule of `trace` with the lowest p95 time to first byte and nothing
/// over `timeout_s`; node `i` starts with model `i % models`, as the simulated nodes do.
pub fn best_found(
    hw: &Hardware,
    trace: &[Req],
    models: usize,
    timeout_s: f64,
    rules: Rules,
    start: Option<&[Vec<usize>]>,
    effort: &Effort,
) -> Found {
    let n = trace.len();
    let p = Problem::new(hw, trace, models, timeout_s, rules);
    let mut rng = Rng::new(effort.seed);
    let mut ttft = vec![0.0; n];
    let mut excess = Vec::with_capacity(n);
    // The search starts from the better of the greedy clairvoyant's schedule and `start` (a
    // scheduler's own, so that what is found is never worse than it).
    let mut best = greedy(&p);
    // A scheduler that answered some requests without a node (too late to serve) left them out
    // of its schedule: the search then starts from the greedy one alone.
    if let Some(start) = start.filter(|s| s.len() == hw.nodes && s.iter().map(Vec::len).sum::<usize>() == n) {
        let score = |order: &[Vec<usize>], ttft: &mut Vec<f64>| {
            p.decode(order, ttft);
            (p.failed(ttft), percentile(ttft, 95.0))
        };
        if score(start, &mut ttft) < score(&best, &mut ttft) {
            best = start.to_vec();
        }
    }
    p.decode(&best, &mut ttft);
    // Bisection on the target p95, each step annealing from the best schedule so far; a step
    // that meets its target lowers the ceiling.
    let mut hi = percentile(&ttft, 95.0);
    let mut lo = trace.iter().map(|r| hw.min_ttft(r)).fold(f64::INFINITY, f64::min).min(hi);
    let mut best_failed = p.failed(&ttft);
    for _ in 0..effort.steps {
        let target = if best_failed > 0 { hi } else { (lo + hi) / 2.0 };
        let found = anneal(&p, best.clone(), target, effort.moves, &mut rng, &mut ttft, &mut excess);
        p.decode(&found, &mut ttft);
        let failed = p.failed(&ttft);
        let p95 = percentile(&ttft, 95.0);
        if failed < best_failed || (failed == best_failed && p95 <= hi) {
            best = found;
            best_failed = failed;
            hi = p95.min(hi);
        } else if best_failed == 0 {
            lo = target;
        }
        if best_failed == 0 && hi - lo < 0.5 {
            break;
        }
    }
    let switches = p.decode(&best, &mut ttft);
    if std::env::var_os("EXO_LB_SIM_LOG").is_some() {
        for (node, seq) in best.iter().enumerate() {
            let line: Vec<String> = seq
                .iter()
                .filter_map(|&k| {
                    Some(format!("{k}:m{}@{:.0}+{:.0}", trace.get(k)?.model, trace.get(k)?.at, ttft.get(k)?))
                })
                .collect();
            eprintln!("node {node}: {}", line.join(" "));
        }
    }
    Found { failed: p.failed(&ttft), ttft, switches }
}

/// A dispatcher that knows every request's arrival, model and length in advance: each request,
/// in arrival order, goes to the node where its first token comes earliest (a switch costs
/// `hw.switch_s`, starting once the request has come; node `i` starts with model
/// `i % models`, as the simulated nodes do). Returns the time to first token of each request
/// and the number of switches.
pub fn clairvoyant(hw: &Hardware, trace: &[Req], models: usize) -> (Vec<f64>, u64) {
    let p = Problem::new(hw, trace, models, f64::INFINITY, Rules { early_loads: false, reorder: false });
    let mut ttft = vec![0.0; trace.len()];
    let switches = p.decode(&greedy(&p), &mut ttft);
    (ttft, switches)
}

/// nginx as the seed configures it (`least_conn`, one upstream view): each request, on arrival,
/// goes to the node with the fewest requests open on it (queued in the node or running), ties
/// broken by nginx's smooth weighted round robin over the tied nodes (equal weights); a node
/// serves what it was sent in arrival order, switching models as they come. It knows nothing of
/// lengths or models, so it is a reference the simulator can run on any number of seeds for the
/// nginx ratios the real sweep measures on two (`simulate` reports it beside exo-lb, `sweep`
/// beside the real nginx). Returns the time to first token of each request and the number of
/// switches.
pub fn least_conn(hw: &Hardware, trace: &[Req], models: usize) -> (Vec<f64>, u64) {
    let p = Problem::new(hw, trace, models, f64::INFINITY, Rules { early_loads: false, reorder: false });
    let nodes = p.initial.len();
    // When each request still open on a node ends, and when the node is next free and what it
    // has loaded (requests come in arrival order, so each node's FIFO can be run as they are
    // sent, and a request ended by one arrival is ended for every later one).
    let mut ends: Vec<Vec<f64>> = vec![Vec::new(); nodes];
    let mut free = vec![0.0f64; nodes];
    let mut loaded = p.initial.clone();
    let mut current_weight = vec![0i64; nodes];
    let mut order = vec![Vec::new(); nodes];
    for (k, r) in trace.iter().enumerate() {
        for e in &mut ends {
            e.retain(|&end| end > r.at);
        }
        let open: Vec<usize> = ends.iter().map(Vec::len).collect();
        let Some(&fewest) = open.iter().min() else { break };
        let tied: Vec<usize> = (0..nodes).filter(|&i| open.get(i) == Some(&fewest)).collect();
        let mut best: Option<usize> = None;
        for &i in &tied {
            if let Some(w) = current_weight.get_mut(i) {
                *w += 1;
            }
            if best.is_none_or(|b| current_weight.get(i) > current_weight.get(b)) {
                best = Some(i);
            }
        }
        let Some(i) = best else { break };
        if let Some(w) = current_weight.get_mut(i) {
            *w -= tied.len() as i64;
        }
        let (Some(f), Some(l), Some(e), Some(o)) =
            (free.get_mut(i), loaded.get_mut(i), ends.get_mut(i), order.get_mut(i))
        else {
            break;
        };
        let switch = if *l == r.model { 0.0 } else { hw.switch_s(i, r.model) };
        *f = f.max(r.at) + switch + hw.service(r);
        *l = r.model;
        e.push(*f);
        o.push(k);
    }
    let mut ttft = vec![0.0; trace.len()];
    let switches = p.decode(&order, &mut ttft);
    (ttft, switches)
}

/// [`clairvoyant`]'s assignment (with early loads where the rules allow them) as per-node
/// orders, each in arrival order: where the search starts.
fn greedy(p: &Problem) -> Vec<Vec<usize>> {
    let (hw, nodes) = (p.hw, p.initial.len());
    let mut free = vec![0.0f64; nodes];
    let mut loaded = p.initial.clone();
    let mut order = vec![Vec::new(); nodes];
    for (k, r) in p.trace.iter().enumerate() {
        let start = |i: usize| {
            let switch = if loaded.get(i) == Some(&r.model) { 0.0 } else { hw.switch_s(i, r.model) };
            free.get(i).map_or(f64::INFINITY, |&f| {
                if p.rules.early_loads {
                    (f + switch).max(r.at)
                } else {
                    f.max(r.at) + switch
                }
            })
        };
        let first_token = |i: usize| start(i) + hw.min_ttft(r);
        let Some(i) = (0..nodes).min_by(|&a, &b| first_token(a).total_cmp(&first_token(b))) else { break };
        let begins = start(i);
        if let (Some(f), Some(l), Some(o)) = (free.get_mut(i), loaded.get_mut(i), order.get_mut(i)) {
            *f = begins + hw.service(r);
            *l = r.model;
            o.push(k);
        }
    }
    order
}

/// A change to a schedule: request `i` of node `a` and request `j` of node `b` trade places, or
/// request `i` of node `a` moves to position `j` of node `b`.
#[derive(Clone, Copy)]
enum Move {
    Swap { a: usize, i: usize, b: usize, j: usize },
    Relocate { a: usize, i: usize, b: usize, j: usize },
}

impl Move {
    /// A random move that `order` allows (None: the node drawn has nothing to move).
    fn draw(order: &[Vec<usize>], rng: &mut Rng) -> Option<Move> {
        let pick = |rng: &mut Rng, len: usize| (rng.next_u64() % len.max(1) as u64) as usize;
        let len = |n: usize| order.get(n).map_or(0, Vec::len);
        let (a, b) = (pick(rng, order.len()), pick(rng, order.len()));
        let i = pick(rng, len(a));
        if len(a) == 0 {
            return None;
        }
        if rng.f64() < 0.4 {
            (len(b) > 0).then(|| Move::Swap { a, i, b, j: pick(rng, len(b)) })
        } else {
            // Removing from `a` first shortens it when `b` is `a`.
            let room = if a == b { len(b) } else { len(b) + 1 };
            Some(Move::Relocate { a, i, b, j: pick(rng, room) })
        }
    }

    fn apply(self, order: &mut [Vec<usize>]) {
        match self {
            Move::Swap { a, i, b, j } => {
                let x = order.get(a).and_then(|s| s.get(i)).copied();
                let y = order.get(b).and_then(|s| s.get(j)).copied();
                if let (Some(x), Some(y)) = (x, y) {
                    Move::put(order, a, i, y);
                    Move::put(order, b, j, x);
                }
            }
            Move::Relocate { a, i, b, j } => Move::shift(order, a, i, b, j),
        }
    }

    fn undo(self, order: &mut [Vec<usize>]) {
        match self {
            Move::Swap { .. } => self.apply(order),
            Move::Relocate { a, i, b, j } => Move::shift(order, b, j, a, i),
        }
    }

    fn put(order: &mut [Vec<usize>], n: usize, at: usize, v: usize) {
        if let Some(slot) = order.get_mut(n).and_then(|s| s.get_mut(at)) {
            *slot = v;
        }
    }

    fn shift(order: &mut [Vec<usize>], a: usize, i: usize, b: usize, j: usize) {
        let Some(k) = order.get_mut(a).filter(|s| i < s.len()).map(|s| s.remove(i)) else { return };
        if let Some(s) = order.get_mut(b) {
            s.insert(j.min(s.len()), k);
        }
    }
}

/// Simulated annealing over per-node orders toward p95 <= `target`, by [`Move`]s.
fn anneal(
    p: &Problem,
    mut order: Vec<Vec<usize>>,
    target: f64,
    moves: u64,
    rng: &mut Rng,
    ttft: &mut [f64],
    excess: &mut Vec<f64>,
) -> Vec<Vec<usize>> {
    if order.is_empty() || p.trace.is_empty() {
        return order;
    }
    p.decode(&order, ttft);
    let mut cost = p.cost(ttft, target, excess);
    let mut best = (cost, order.clone());
    // Hot enough at first to accept a move that fails ten requests more (a failure weighs 1e4),
    // which the search needs to leave a schedule whose switches are badly placed; cold at the
    // end (a twentieth of a second).
    let (t0, t1) = (1e5f64, 0.05f64);
    for step in 0..moves {
        if best.0 == 0.0 {
            break;
        }
        let temperature = t0 * (t1 / t0).powf(step as f64 / moves as f64);
        let Some(m) = Move::draw(&order, rng) else { continue };
        m.apply(&mut order);
        p.decode(&order, ttft);
        let next = p.cost(ttft, target, excess);
        if next <= cost || rng.f64() < (-(next - cost) / temperature).exp() {
            cost = next;
            if cost < best.0 {
                best = (cost, order.clone());
            }
        } else {
            m.undo(&mut order);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: Rules = Rules { early_loads: true, reorder: true };

    fn req(at: f64, model: usize) -> Req {
        Req { id: 0, at, model, prompt_tokens: 60, max_tokens: 10, stream: true }
    }

    #[test]
    fn clairvoyant_prefers_the_warm_node_and_switches_when_it_pays() {
        let hw = Hardware { nodes: 2, switch_time_s: 5.0, ..Hardware::default() };
        // Each request: 1 s prefill + 1 s of tokens; first token at 1.1 s on a warm idle node.
        let (ttft, switches) = clairvoyant(&hw, &[req(0.0, 0), req(0.0, 0), req(0.0, 0)], 2);
        // The first goes to node 0 (warm); the second waits 2 s for it rather than switch
        // node 1 (5 s); the third likewise.
        assert_eq!(switches, 0);
        assert!(
            (ttft[0] - 1.1).abs() < 1e-9 && (ttft[1] - 3.1).abs() < 1e-9 && (ttft[2] - 5.1).abs() < 1e-9,
            "{ttft:?}"
        );
        // With four queued, switching node 1 wins for the last one.
        let (_, switches) = clairvoyant(&hw, &[req(0.0, 0), req(0.0, 0), req(0.0, 0), req(0.0, 0)], 2);
        assert_eq!(switches, 1);
    }

    #[test]
    fn least_conn_sends_each_request_to_the_node_with_fewest_open_and_rotates_ties() {
        let hw = Hardware { nodes: 3, switch_time_s: 5.0, ..Hardware::default() };
        // Each request: 1 s prefill + 1 s of tokens (2 s of work); node i starts with model i.
        // Three model-0 requests at once: one per node (ties rotate), two of them switching.
        let (ttft, switches) = least_conn(&hw, &[req(0.0, 0), req(0.0, 0), req(0.0, 0)], 3);
        assert_eq!(switches, 2);
        let mut sorted = ttft.clone();
        sorted.sort_by(f64::total_cmp);
        assert!((sorted[0] - 1.1).abs() < 1e-9 && (sorted[2] - 6.1).abs() < 1e-9, "{ttft:?}");
        // A fourth at 1 s: every node has one open, so it queues behind one of them in arrival
        // order (it knows nothing of which finishes first) ...
        let trace = [req(0.0, 0), req(0.0, 0), req(0.0, 0), req(1.0, 0)];
        let (ttft, _) = least_conn(&hw, &trace, 3);
        assert!(ttft[3] >= 1.0 + 1.1 - 1e-9, "{ttft:?}");
        // ... and at 3 s the node that served the warm request is done (ends at 2 s) and the
        // others are still switching: it goes there, warm.
        let trace = [req(0.0, 0), req(0.0, 0), req(0.0, 0), req(3.0, 0)];
        let (ttft, switches) = least_conn(&hw, &trace, 3);
        assert!((ttft[3] - 1.1).abs() < 1e-9, "{ttft:?}");
        assert_eq!(switches, 2);
        // Ties on an idle cluster go round: six requests far apart visit each node twice.
        let trace: Vec<Req> = (0..6).map(|k| req(k as f64 * 100.0, 0)).collect();
        let (_, switches) = least_conn(&hw, &trace, 3);
        assert_eq!(switches, 2, "nodes 1 and 2 each switch once, then stay on model 0");
    }

    #[test]
    fn it_switches_only_when_a_switch_pays() {
        // Two nodes with models 0 and 1; five requests for model 0 at once, each 2 s of work,
        // and nothing for model 1: switching node 1 to model 0 (20 s) never beats waiting, so
        // node 0 serves all five in turn.
        let hw = Hardware { nodes: 2, switch_time_s: 20.0, ..Hardware::default() };
        let trace: Vec<Req> = (0..5).map(|_| req(0.0, 0)).collect();
        let found = best_found(&hw, &trace, 2, 300.0, ANY, None, &Effort { moves: 20_000, steps: 8, seed: 1 });
        assert_eq!(found.switches, 0);
        assert_eq!(found.failed, 0);
        // First tokens at 1.1, 3.1, 5.1, 7.1, 9.1: p95 is the last.
        assert!((percentile(&found.ttft, 95.0) - 9.1).abs() < 1e-9, "{:?}", found.ttft);
        // With a cheap switch, node 1 takes some: p95 falls well below 9.1.
        let hw = Hardware { switch_time_s: 1.0, ..hw };
        let found = best_found(&hw, &trace, 2, 300.0, ANY, None, &Effort { moves: 20_000, steps: 8, seed: 1 });
        assert!(percentile(&found.ttft, 95.0) < 6.5, "{:?}", found.ttft);
        assert!(found.switches >= 1);
    }

    #[test]
    fn only_the_optimistic_rules_reorder_and_load_early() {
        let hw = Hardware { nodes: 1, switch_time_s: 20.0, ..Hardware::default() };
        let effort = Effort { moves: 5_000, steps: 8, seed: 1 };
        let fifo = Rules { early_loads: false, reorder: false };
        // A long request, then a short one just after: served in turn, the short one waits for
        // the long one (11 s); served first, it holds the long one back by 1.1 s only (2.201 s to its first token).
        let long = Req { max_tokens: 100, ..req(0.0, 0) };
        let short = Req { max_tokens: 1, ..req(0.001, 0) };
        let trace = [long, short];
        let in_turn = best_found(&hw, &trace, 1, 300.0, fifo, None, &effort);
        assert!((percentile(&in_turn.ttft, 95.0) - 12.099).abs() < 1e-6, "{:?}", in_turn.ttft);
        let any = best_found(&hw, &trace, 1, 300.0, ANY, None, &effort);
        assert!((percentile(&any.ttft, 95.0) - 2.201).abs() < 1e-6, "{:?}", any.ttft);
        // A request for a model the node does not have, long after start: loaded early, the
        // switch is over when it comes.
        let hw = Hardware { nodes: 1, ..hw };
        let trace = [req(100.0, 1)];
        let late = best_found(&hw, &trace, 2, 300.0, fifo, None, &effort);
        assert!((late.ttft[0] - 21.1).abs() < 1e-9, "{:?}", late.ttft);
        let early = best_found(&hw, &trace, 2, 300.0, ANY, None, &effort);
        assert!((early.ttft[0] - 1.1).abs() < 1e-9, "{:?}", early.ttft);
        assert_eq!((late.switches, early.switches), (1, 1));
    }

    #[test]
    fn a_timeout_keeps_the_search_from_leaving_one_request_to_the_end() {
        // One node with model 0: nineteen model-0 requests back to back (2 s of work every 2 s,
        // first token 1.1 s after each arrives) and one model-1 request at 0 (a 5 s switch).
        // p95 of 20 lets one request over: left to the end, the model-1 request gets its first
        // token at 44.1 s and every other at 1.1 s.
        let hw = Hardware { nodes: 1, switch_time_s: 5.0, ..Hardware::default() };
        let mut trace: Vec<Req> = (0..19).map(|k| req(k as f64 * 2.0, 0)).collect();
        trace.push(req(0.0, 1));
        let effort = Effort { moves: 50_000, steps: 8, seed: 1 };
        let free = best_found(&hw, &trace, 1, 300.0, ANY, None, &effort);
        assert!((percentile(&free.ttft, 95.0) - 1.1).abs() < 1e-9, "{:?}", free.ttft);
        assert!(free.ttft.iter().any(|&t| t > 40.0), "{:?}", free.ttft);
        // With 30 s as the timeout (what `--offline-cap-at-exo-lb-worst` passes) it must come
        // in sooner, and the switch there and back (12 s with its generation) delays every
        // model-0 request after it on a node with no slack: p95 rises to 13.1 s, none fail.
        let capped = best_found(&hw, &trace, 1, 30.0, ANY, None, &effort);
        assert_eq!(capped.failed, 0, "{:?}", capped.ttft);
        assert!(capped.ttft.iter().all(|&t| t <= 30.0), "{:?}", capped.ttft);
        assert!(percentile(&capped.ttft, 95.0) > 10.0, "{:?}", capped.ttft);
    }

    #[test]
    fn it_never_does_worse_than_the_greedy_clairvoyant() {
        let hw = Hardware { nodes: 3, switch_time_s: 8.0, ..Hardware::default() };
        let trace: Vec<Req> = (0..40).map(|k| req(k as f64 * 0.7, [0, 0, 1, 2, 0][k % 5])).collect();
        let (greedy_ttft, _) = clairvoyant(&hw, &trace, 3);
        let fifo = Rules { early_loads: false, reorder: false };
        let found = best_found(&hw, &trace, 3, 300.0, fifo, None, &Effort { moves: 50_000, steps: 8, seed: 1 });
        assert!(percentile(&found.ttft, 95.0) <= percentile(&greedy_ttft, 95.0) + 1e-9);
    }
}
