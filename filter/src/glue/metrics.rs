//! The filter's metrics, defined on first use (label values are known only at run time) and
//! cached per VM. Envoy exports them in /stats/prometheus with the labels that the bootstrap's
//! stats_tags extract from the names (see `logic::metrics`).

use crate::glue::host;
use crate::glue::id_map::IdMap;
use crate::logic::metrics::name;
use crate::logic::state::{fnv1a, FNV_OFFSET};
use proxy_wasm::types::MetricType;
use std::cell::{Cell, RefCell};

#[derive(Default)]
pub struct Metrics {
    /// Hash of the metric's name and labels -> its id (found without building the name).
    ids: RefCell<IdMap<u64, Option<u32>>>,
}

/// A hash of a metric's full name, computed from its parts.
fn key(base: &str, labels: &[(&str, &str)]) -> u64 {
    let mut h = fnv1a(base.as_bytes(), FNV_OFFSET);
    for (k, v) in labels {
        h = fnv1a(v.as_bytes(), fnv1a(b"=", fnv1a(k.as_bytes(), fnv1a(b";", h))));
    }
    h
}

impl Metrics {
    fn id(&self, kind: MetricType, base: &str, labels: &[(&str, &str)]) -> Option<u32> {
        let key = key(base, labels);
        if let Some(id) = self.ids.borrow().get(&key) {
            return *id;
        }
        let id = host::define_metric(kind, &name(base, labels));
        self.ids.borrow_mut().insert(key, id);
        id
    }

    pub fn count(&self, base: &str, labels: &[(&str, &str)]) {
        self.add(base, labels, 1);
    }

    pub fn add(&self, base: &str, labels: &[(&str, &str)], n: u64) {
        if let Some(id) = self.id(MetricType::Counter, base, labels) {
            host::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn gauge(&self, base: &str, labels: &[(&str, &str)], value: u64) {
        if let Some(id) = self.id(MetricType::Gauge, base, labels) {
            host::record_metric(id, value);
        }
    }

    pub fn histogram(&self, base: &str, labels: &[(&str, &str)], value: u64) {
        if let Some(id) = self.id(MetricType::Histogram, base, labels) {
            host::record_metric(id, value);
        }
    }
}

/// The look-ahead's plans, timed in microseconds by the host's clock: the state update that
/// made each (the plan, and the rest of that scheduling pass), which is what it costs a worker
/// in this host's wasm runtime. (nginx-wasm's clock counts whole milliseconds.)
pub const LOOK_AHEAD_MICROSECONDS: &str = "exo_lb_look_ahead_microseconds";

thread_local! {
    /// Its id, defined on first use (one per VM: label-free, whatever the configuration).
    static LOOK_AHEAD_ID: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Records one plan's time.
pub fn look_ahead_took(us: u64) {
    let id = LOOK_AHEAD_ID.with(|cell| {
        let id = cell.get().or_else(|| host::define_metric(MetricType::Histogram, LOOK_AHEAD_MICROSECONDS));
        cell.set(id);
        id
    });
    if let Some(id) = id {
        host::record_metric(id, us);
    }
}
