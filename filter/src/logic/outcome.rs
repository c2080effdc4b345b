//! The end of a request: what it tells about each node it tried, and giving back its booking.

use crate::logic::config::Config;
use crate::logic::estimates::{Estimates, Sample};
use crate::logic::schedule;
use crate::logic::state::{model_key, ClusterState};

/// A generation held after its client left is assumed to end within this.
const MAX_HOLD_MS: u64 = 600_000;
/// How long a node is held after an abort when the model's service time is not measured yet
/// (every restart, every model's first use): a typical RK3588 reply takes 10-60 s.
pub const DEFAULT_HOLD_MS: u64 = 30_000;

/// Envoy's response flags as the `response.flags` property encodes them (a bit set).
pub mod flags {
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2; // UH
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4; // UT
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10; // UR
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20; // UF
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40; // UC
    pub const UPSTREAM_OVERFLOW: u64 = 0x80; // UO
    pub const NO_ROUTE_FOUND: u64 = 0x100; // NR
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000; // DC
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 0x8000; // URX
    pub const STREAM_IDLE_TIMEOUT: u64 = 0x10000; // SI
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 0x80_0000; // UPE

    /// Flags that mean Envoy answered by itself instead of relaying a node's response.
    pub const LOCAL_REPLY: u64 = NO_HEALTHY_UPSTREAM
        | UPSTREAM_REQUEST_TIMEOUT
        | UPSTREAM_CONNECTION_FAILURE
        | UPSTREAM_OVERFLOW
        | NO_ROUTE_FOUND
        | UPSTREAM_RETRY_LIMIT_EXCEEDED
        | STREAM_IDLE_TIMEOUT;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Connect failure or refused stream (including attempts Envoy retried past).
    Connect,
    /// No response in time.
    Timeout,
    /// The connection or stream was cut.
    Reset,
    /// A status listed in `fail_on_status`.
    Status,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Connect => "connect",
            FailureReason::Timeout => "timeout",
            FailureReason::Reset => "reset",
            FailureReason::Status => "status",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure(FailureReason),
}

/// What the glue knows when a routed request ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ending<'a> {
    /// The ranked node list given to Envoy.
    pub route: &'a [usize],
    /// The request claimed a probe of `route[0]`.
    pub probing: bool,
    /// The node whose in-flight count this request holds.
    pub charged: Option<usize>,
    /// `upstream.request_attempt_count` (0 when the request never reached a node).
    pub attempts: u64,
    /// The node behind `upstream.address`, when known.
    pub served: Option<usize>,
    /// `response.code` (0 or absent: no response).
    pub status: u32,
    /// `response.flags`.
    pub flags: u64,
    /// When the request was routed.
    pub started_ms: u64,
    pub now_ms: u64,
    pub vm: u64,
    /// The model of an inference request (None for other requests).
    pub model: Option<&'a str>,
    /// The node had to load the model for it; `cold`: what the node had loaded was unknown.
    pub switched: bool,
    pub cold: bool,
    /// When the first byte of a streamed reply body came, and how many body chunks came.
    pub first_byte_ms: Option<u64>,
    pub chunks: Option<u64>,
    /// The request's `max_tokens`, when it said.
    pub max_tokens: Option<u64>,
}

#[cfg(test)]
impl<'a> Ending<'a> {
    /// A request of VM `vm` that its first node answered 200 at once, for tests.
    pub fn answered(route: &'a [usize], vm: u64, started_ms: u64, now_ms: u64) -> Ending<'a> {
        Ending {
            route,
            charged: route.first().copied(),
            attempts: 1,
            served: route.first().copied(),
            status: 200,
            started_ms,
            now_ms,
            vm,
            ..Ending::default()
        }
    }
}

/// What the request tells about each node it tried.
pub fn judge(cfg: &Config, end: &Ending) -> Vec<(usize, Verdict)> {
    let tried = usize::try_from(end.attempts).unwrap_or(usize::MAX).min(end.route.len());
    let last = end.served.or_else(|| tried.checked_sub(1).and_then(|k| end.route.get(k).copied()));
    let Some(last) = last else { return Vec::new() };
    // Envoy moved on from every node before the one that answered: each of those failed to
    // take the request (the retry policy only retries connect failures and refused streams).
    let mut verdicts: Vec<(usize, Verdict)> = end
        .route
        .iter()
        .take(tried.saturating_sub(1))
        .filter(|&&i| i != last)
        .map(|&i| (i, Verdict::Failure(FailureReason::Connect)))
        .collect();
    let f = end.flags;
    let verdict = if f & flags::DOWNSTREAM_CONNECTION_TERMINATION != 0 {
        None // the client left: says nothing about the node
    } else if f & flags::UPSTREAM_CONNECTION_FAILURE != 0 {
        Some(Verdict::Failure(FailureReason::Connect))
    } else if f & (flags::UPSTREAM_REQUEST_TIMEOUT | flags::STREAM_IDLE_TIMEOUT) != 0 {
        Some(Verdict::Failure(FailureReason::Timeout))
    } else if f
        & (flags::UPSTREAM_REMOTE_RESET | flags::UPSTREAM_CONNECTION_TERMINATION | flags::UPSTREAM_PROTOCOL_ERROR)
        != 0
    {
        Some(Verdict::Failure(FailureReason::Reset))
    } else if f & flags::LOCAL_REPLY != 0 || end.status == 0 {
        None
    } else if end.status <= u32::from(u16::MAX) && cfg.fail_on_status.contains(&(end.status as u16)) {
        Some(Verdict::Failure(FailureReason::Status))
    } else {
        Some(Verdict::Success)
    };
    if let Some(v) = verdict {
        verdicts.push((last, v));
    }
    verdicts
}

/// What a finished request leaves behind besides the state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// What it told about each node it tried (for metrics and logs).
    pub verdicts: Vec<(usize, Verdict)>,
    /// Its timings, for the estimates (a generation answered with a 2xx only).
    pub sample: Option<Sample>,
}

/// Applies the request's verdicts to the shared state and gives back its in-flight count and
/// probe claim.
pub fn finish(cfg: &Config, state: &mut ClusterState, est: &Estimates, end: &Ending) -> Finished {
    let charged = end.charged.filter(|&i| i < cfg.nodes.len());
    if let Some(node) = charged {
        state.release(end.vm, node);
    }
    if end.switched || end.cold {
        if let Some(&node) = end.route.first() {
            state.end_switch(node, end.now_ms);
        }
    }
    let verdicts = judge(cfg, end);
    let elapsed = end.now_ms.saturating_sub(end.started_ms);
    let mut sample = None;
    for &(i, verdict) in &verdicts {
        let Some(node) = cfg.nodes.get(i) else {
            continue;
        };
        match verdict {
            Verdict::Success => {
                state.update_health(i, |h| h.record_success(end.started_ms));
                state.count_served(i);
                // Only a generation teaches the estimates: a node's quick 4xx is not one.
                let generated = (200..300).contains(&end.status);
                sample = end.model.filter(|_| generated).map(|m| Sample {
                    model: m.to_string(),
                    node: cfg.index.layout.nodes.get(i).copied().unwrap_or(0),
                    switched: if end.cold { None } else { Some(end.switched) },
                    first_token_ms: end.first_byte_ms.map(|t| t.saturating_sub(end.started_ms)),
                    total_ms: elapsed,
                    tokens: end.first_byte_ms.and(end.chunks),
                    at_ms: end.now_ms,
                });
            }
            Verdict::Failure(_) => {
                state.update_health(i, |h| h.record_failure(end.now_ms, node.max_fails, node.fail_timeout_ms));
                state.count_failure(i);
            }
        }
    }
    // The client left while the node was generating: a real node keeps going until the reply
    // is done, so its slot stays taken until then. How long is a guess, best first:
    // - the request's own limit: its `max_tokens` less the tokens already streamed, at the
    //   node's measured token rate (the generation cannot run longer);
    // - the model's usual service time (a generation already past it is given a quarter more);
    // - with nothing measured yet, `DEFAULT_HOLD_MS`.
    // exo has no way to ask a node whether it is still generating, so the hold is not ended
    // sooner than that.
    let node_started = end.attempts > 0 && end.flags & flags::UPSTREAM_CONNECTION_FAILURE == 0;
    if cfg.hold_after_abort && node_started && end.flags & flags::DOWNSTREAM_CONNECTION_TERMINATION != 0 {
        let node = end.served.or(charged);
        if let (Some(node), Some(model)) = (node, end.model) {
            let key = model_key(model);
            let node_key = cfg.index.layout.nodes.get(node).copied().unwrap_or(0);
            let by_limit = end.max_tokens.zip(est.per_token_us(node_key, key)).map(|(limit, per_token_us)| {
                limit.saturating_sub(end.chunks.unwrap_or(0)).saturating_mul(per_token_us) / 1_000
            });
            let by_average = est.service_ms(key).map(|service| service.saturating_sub(elapsed).max(service / 4));
            let remaining = match (by_limit, by_average) {
                (Some(limit), Some(average)) => limit.min(average.max(limit / 2)),
                (Some(limit), None) => limit,
                (None, Some(average)) => average,
                (None, None) => DEFAULT_HOLD_MS,
            };
            state.add_hold(node, end.now_ms.saturating_add(remaining.min(MAX_HOLD_MS)));
        }
    }
    if end.probing {
        if let Some(&node) = end.route.first() {
            state.update_health(node, |h| h.release_probe(end.vm));
        }
    }
    schedule::schedule(cfg, state, est, end.now_ms);
    Finished { verdicts, sample }
}

/// Newer exo answers 404 "No instance found for model X" when X is not running on that node:
/// stop sending X there until an active check lists it again, or, without active checks, for
/// the node's `fail_timeout`.
pub fn mark_not_running(cfg: &Config, state: &mut ClusterState, node: usize, model: &str, now: u64) {
    let Some(n) = cfg.nodes.get(node) else { return };
    let until = if cfg.probe.is_some() { u64::MAX } else { now.saturating_add(n.fail_timeout_ms) };
    state.mark_not_running(node, model_key(model), until);
}

/// Whether a node's 404 body says the model is not running there.
pub fn says_not_running(body: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"No instance found for model";
    body.windows(NEEDLE.len()).any(|w| w == NEEDLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::health::Phase;
    use crate::logic::schedule::{admit, Admission, Arrival};
    use crate::logic::select::{route, RouteInput};

    fn cfg() -> Config {
        Config::parse(
            br#"{"nodes":[{"name":"a","address":"10.0.0.1:1"},{"name":"b","address":"10.0.0.2:1"},{"name":"c","address":"10.0.0.3:1"}]}"#,
        )
        .unwrap()
    }

    fn ending(route: &[usize]) -> Ending<'_> {
        Ending { model: Some("m"), ..Ending::answered(route, 1, 0, 10) }
    }

    #[test]
    fn success_and_status_failure() {
        let c = cfg();
        assert_eq!(judge(&c, &ending(&[0, 1])), vec![(0, Verdict::Success)]);
        let mut e = ending(&[0, 1]);
        e.status = 503;
        assert_eq!(judge(&c, &e), vec![(0, Verdict::Failure(FailureReason::Status))]);
        e.status = 500; // not in the default fail_on_status
        assert_eq!(judge(&c, &e), vec![(0, Verdict::Success)]);
    }

    #[test]
    fn retried_past_nodes_failed() {
        let c = cfg();
        let mut e = ending(&[2, 0, 1]);
        e.attempts = 3;
        e.served = Some(1);
        assert_eq!(
            judge(&c, &e),
            vec![
                (2, Verdict::Failure(FailureReason::Connect)),
                (0, Verdict::Failure(FailureReason::Connect)),
                (1, Verdict::Success)
            ]
        );
    }

    #[test]
    fn all_attempts_failed() {
        let c = cfg();
        let mut e = ending(&[0, 1]);
        e.attempts = 2;
        e.served = Some(1);
        e.status = 503;
        e.flags = flags::UPSTREAM_CONNECTION_FAILURE | flags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
        let v = judge(&c, &e);
        assert_eq!(
            v,
            vec![(0, Verdict::Failure(FailureReason::Connect)), (1, Verdict::Failure(FailureReason::Connect))]
        );
    }

    #[test]
    fn client_abort_and_no_attempt_say_nothing() {
        let c = cfg();
        let mut e = ending(&[0]);
        e.flags = flags::DOWNSTREAM_CONNECTION_TERMINATION;
        e.status = 0;
        assert!(judge(&c, &e).is_empty());
        let mut e = ending(&[0]);
        e.attempts = 0;
        e.served = None;
        e.status = 0;
        assert!(judge(&c, &e).is_empty());
    }

    #[test]
    fn resets_and_timeouts_fail() {
        let c = cfg();
        for (flag, reason) in [
            (flags::UPSTREAM_REMOTE_RESET, FailureReason::Reset),
            (flags::UPSTREAM_CONNECTION_TERMINATION, FailureReason::Reset),
            (flags::UPSTREAM_REQUEST_TIMEOUT, FailureReason::Timeout),
            (flags::STREAM_IDLE_TIMEOUT, FailureReason::Timeout),
        ] {
            let mut e = ending(&[1]);
            e.flags = flag;
            assert_eq!(judge(&c, &e), vec![(1, Verdict::Failure(reason))]);
        }
    }

    static NO_EST: Estimates = Estimates::new();

    #[test]
    fn finish_returns_state_to_empty() {
        let c = cfg();
        let mut s = c.new_state();
        let arrival = Arrival {
            vm: 4,
            ctx: 7,
            model: "m",
            model_key: model_key("m"),
            hash_key: None,
            random: 0,
            now_ms: 0,
            client: 0,
            max_tokens: None,
            stream: true,
        };
        let Admission::Granted(r) = admit(&c, &mut s, &NO_EST, &arrival) else { panic!() };
        assert_eq!(s.inflight(r.nodes[0], 0), 1);
        let mut e = ending(&r.nodes);
        e.vm = 4;
        let done = finish(&c, &mut s, &NO_EST, &e);
        assert!((0..3).all(|i| s.inflight(i, 10) == 0 && s.health(i) == Default::default()), "{s:?}");
        assert_eq!(s.counters(r.nodes[0]).served, 1);
        let sample = done.sample.unwrap();
        assert_eq!((sample.model.as_str(), sample.total_ms, sample.switched), ("m", 10, Some(false)));
        // A node's error reply teaches nothing.
        let Admission::Granted(r) = admit(&c, &mut s, &NO_EST, &arrival) else { panic!() };
        let mut e = ending(&r.nodes);
        e.vm = 4;
        e.status = 404;
        assert_eq!(finish(&c, &mut s, &NO_EST, &e).sample, None);
    }

    #[test]
    fn an_abort_mid_generation_holds_the_node() {
        let c = cfg();
        let mut est = Estimates::default();
        est.record(
            &[Sample {
                model: "m".into(),
                node: 0,
                switched: Some(false),
                first_token_ms: None,
                total_ms: 1_000,
                tokens: None,
                at_ms: 0,
            }],
            |_| true,
        );
        let mut s = c.new_state();
        s.acquire(1, 0, 0);
        let mut e = ending(&[0]);
        e.started_ms = 0;
        e.now_ms = 300;
        e.status = 200;
        e.flags = flags::DOWNSTREAM_CONNECTION_TERMINATION;
        finish(&c, &mut s, &est, &e);
        assert_eq!(s.inflight(0, 300), 0);
        assert_eq!(s.busy(0, 300), 1, "held until the generation would end");
        assert_eq!(s.busy(0, 1_000), 0);
        // A generation that already ran longer than the average is held a while more.
        let mut s1 = c.new_state();
        e.now_ms = 5_000;
        finish(&c, &mut s1, &est, &e);
        assert_eq!((s1.busy(0, 5_249), s1.busy(0, 5_250)), (1, 0), "a quarter of the average more");
        // Before anything is measured (a restart, a model's first use): the default hold.
        let mut s2 = c.new_state();
        finish(&c, &mut s2, &NO_EST, &e);
        assert_eq!((s2.busy(0, 5_000 + DEFAULT_HOLD_MS - 1), s2.busy(0, 5_000 + DEFAULT_HOLD_MS)), (1, 0));
        // Not when the node was never reached.
        let mut s3 = c.new_state();
        e.attempts = 0;
        finish(&c, &mut s3, &est, &e);
        assert_eq!(s3.busy(0, 5_000), 0);
    }

    #[test]
    fn not_running_bodies() {
        assert!(says_not_running(br#"{"error":{"message":"No instance found for model m1"}}"#));
        assert!(!says_not_running(b"{}"));
    }

    #[test]
    fn probe_claim_released_on_abort_and_cleared_on_success() {
        let c = cfg();
        let mut s = c.new_state();
        for t in 0..3 {
            s.update_health(0, |h| h.record_failure(t, 3, 1_000));
        }
        for _ in 0..5 {
            s.count_pick(1);
            s.count_pick(2);
        }
        let input = RouteInput { model: Some(model_key("m")), hash_key: None, now_ms: 2_000, vm: 4, random: 0 };
        let r = route(&c, &mut s, &input).unwrap();
        assert!(r.probing && r.nodes[0] == 0);
        let mut e = ending(&r.nodes);
        e.vm = 4;
        e.probing = true;
        e.started_ms = 2_000;
        // The client left before the node took the request (so nothing holds the node).
        e.attempts = 0;
        e.flags = flags::DOWNSTREAM_CONNECTION_TERMINATION;
        finish(&c, &mut s, &NO_EST, &e);
        assert_eq!(s.health(0).probe_vm, None);
        assert_eq!(s.health(0).phase(2_000, false), Phase::Probing);
        let r = route(&c, &mut s, &input).unwrap();
        assert!(r.probing);
        let mut e = ending(&r.nodes);
        e.vm = 4;
        e.probing = true;
        e.started_ms = 2_000;
        finish(&c, &mut s, &NO_EST, &e);
        assert_eq!(s.health(0).phase(2_000, false), Phase::Up);
        assert_eq!(s.inflight(0, 2_000), 0);
    }

    #[test]
    fn an_abort_is_held_no_longer_than_the_requests_own_token_limit_allows() {
        let c = cfg();
        let mut est = Estimates::default();
        // 10 ms per token on this node, replies of 50 tokens (a 1 s average generation).
        let sample = Sample {
            model: "m".into(),
            node: c.index.layout.nodes[0],
            switched: Some(false),
            first_token_ms: Some(100),
            total_ms: 100 + 49 * 10,
            tokens: Some(50),
            at_ms: 0,
        };
        est.record(&[sample], |_| true);
        let mut s = c.new_state();
        s.acquire(1, 0, 0);
        let mut e = ending(&[0]);
        e.now_ms = 300;
        e.flags = flags::DOWNSTREAM_CONNECTION_TERMINATION;
        // It asked for at most 40 tokens and got 20: 20 more at 10 ms is 200 ms at most.
        e.max_tokens = Some(40);
        e.chunks = Some(20);
        finish(&c, &mut s, &est, &e);
        assert_eq!((s.busy(0, 499), s.busy(0, 500)), (1, 0));
    }
}
