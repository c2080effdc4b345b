//! Passive failure tracking per node, with nginx's documented semantics:
//! `max_fails` failures within `fail_timeout` take a node out for `fail_timeout`; after that one
//! live request probes it, and the first success puts it back with a clean count.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Failures counted in the current window.
    #[serde(default)]
    pub fails: u32,
    /// When the last failure happened (ms since the epoch).
    #[serde(default)]
    pub last_fail_ms: u64,
    /// Set once the node was taken out: out while `now < until`, probing after.
    #[serde(default)]
    pub out_until_ms: Option<u64>,
    /// The VM whose request is probing the node, while a probe is under way.
    #[serde(default)]
    pub probe_vm: Option<u64>,
    /// The last active health check failed: out until one succeeds.
    #[serde(default)]
    pub probe_down: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Takes traffic.
    Up,
    /// Taken out until the given time.
    Out { until_ms: u64 },
    /// `fail_timeout` has passed: the next request may probe it.
    Probing,
    /// Active health checks are on and the node waits for a successful one.
    Down,
}

impl NodeHealth {
    /// Where the node stands. With active health checks (`active`), a node that was out
    /// comes back only through a successful check, never through live traffic.
    pub fn phase(&self, now_ms: u64, active: bool) -> Phase {
        if self.probe_down {
            return Phase::Down;
        }
        match self.out_until_ms {
            None => Phase::Up,
            Some(until_ms) if now_ms < until_ms => Phase::Out { until_ms },
            Some(_) if active => Phase::Down,
            Some(_) => Phase::Probing,
        }
    }

    /// The result of an active health check.
    pub fn record_check(&mut self, ok: bool, now_ms: u64) {
        if !ok {
            self.probe_down = true;
            return;
        }
        self.probe_down = false;
        // A node taken out by live failures still sits out its fail_timeout.
        if self.out_until_ms.is_none_or(|until| now_ms >= until) {
            *self = NodeHealth::default();
        }
    }

    /// Counts one failure. `max_fails == 0` turns tracking off.
    pub fn record_failure(&mut self, now_ms: u64, max_fails: u32, fail_timeout_ms: u64) {
        if max_fails == 0 {
            return;
        }
        self.probe_vm = None;
        if self.out_until_ms.is_some() {
            // Already out, or a probe failed: out again for a full fail_timeout.
            self.fails = self.fails.max(max_fails);
        } else {
            if now_ms.saturating_sub(self.last_fail_ms) > fail_timeout_ms {
                // The window passed without a failure: the count starts over.
                self.fails = 0;
            }
            self.fails = self.fails.saturating_add(1);
        }
        self.last_fail_ms = now_ms;
        if self.fails >= max_fails {
            self.out_until_ms = Some(now_ms.saturating_add(fail_timeout_ms));
        }
    }

    /// Counts a success of a request that started at `started_ms`. Like nginx, only a request
    /// chosen after the last failure can reset the count: a long stream that began before the
    /// node failed says nothing about its health now.
    pub fn record_success(&mut self, started_ms: u64) {
        if started_ms >= self.last_fail_ms {
            *self = NodeHealth::default();
        }
    }

    /// Lets go of a probe that ended without telling anything (client aborted, or the probe node
    /// was never tried).
    pub fn release_probe(&mut self, vm: u64) {
        if self.probe_vm == Some(vm) {
            self.probe_vm = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 30_000;

    #[test]
    fn max_fails_within_window_takes_node_out() {
        let mut h = NodeHealth::default();
        h.record_failure(1_000, 3, T);
        h.record_failure(2_000, 3, T);
        assert_eq!(h.phase(2_000, false), Phase::Up);
        h.record_failure(3_000, 3, T);
        assert_eq!(h.phase(3_000, false), Phase::Out { until_ms: 33_000 });
        assert_eq!(h.phase(32_999, false), Phase::Out { until_ms: 33_000 });
        assert_eq!(h.phase(33_000, false), Phase::Probing);
    }

    #[test]
    fn failures_spaced_beyond_window_do_not() {
        let mut h = NodeHealth::default();
        for i in 0..10 {
            h.record_failure(1_000 + i * (T + 1), 3, T);
            assert_eq!(h.phase(1_000 + i * (T + 1), false), Phase::Up, "failure {i}");
            assert_eq!(h.fails, 1);
        }
    }

    #[test]
    fn probe_success_resets_and_probe_failure_takes_out_again() {
        let mut h = NodeHealth::default();
        for t in [0, 1, 2] {
            h.record_failure(t, 3, T);
        }
        assert_eq!(h.phase(T + 2, false), Phase::Probing);
        // The probe fails, long after the window: out again at once, not a fresh count.
        h.record_failure(T + 100, 3, T);
        assert_eq!(h.phase(T + 100, false), Phase::Out { until_ms: 2 * T + 100 });
        // The next probe succeeds.
        h.record_success(2 * T + 200);
        assert_eq!(h, NodeHealth::default());
        assert_eq!(h.phase(2 * T + 200, false), Phase::Up);
    }

    #[test]
    fn success_of_an_older_request_does_not_reset() {
        let mut h = NodeHealth::default();
        h.record_failure(5_000, 3, T);
        h.record_success(4_000);
        assert_eq!(h.fails, 1);
        h.record_success(5_000);
        assert_eq!(h.fails, 0);
    }

    #[test]
    fn max_fails_zero_disables_tracking() {
        let mut h = NodeHealth::default();
        for t in 0..100 {
            h.record_failure(t, 0, T);
        }
        assert_eq!(h, NodeHealth::default());
    }

    #[test]
    fn active_checks_decide_when_a_node_comes_back() {
        let mut h = NodeHealth::default();
        h.record_check(false, 0);
        assert_eq!(h.phase(0, true), Phase::Down);
        h.record_check(true, 10);
        assert_eq!(h.phase(10, true), Phase::Up);
        // Taken out by live failures: out for fail_timeout, then down until a check passes.
        h.record_failure(100, 1, 1_000);
        h.record_check(true, 500);
        assert_eq!(h.phase(500, true), Phase::Out { until_ms: 1_100 });
        assert_eq!(h.phase(1_100, true), Phase::Down);
        assert_eq!(h.phase(1_100, false), Phase::Probing);
        h.record_check(true, 1_200);
        assert_eq!(h.phase(1_200, true), Phase::Up);
        assert_eq!(h, NodeHealth::default());
    }

    #[test]
    fn max_fails_one() {
        let mut h = NodeHealth::default();
        h.record_failure(10, 1, 500);
        assert_eq!(h.phase(10, false), Phase::Out { until_ms: 510 });
    }
}
