//! The filter's metrics, defined on first use (label values are known only at run time) and
//! cached per VM. Envoy exports them in /stats/prometheus with the labels that the bootstrap's
//! stats_tags extract from the names (see `logic::metrics`).

use crate::glue::host;
use crate::glue::id_map::IdMap;
use crate::logic::metrics::name;
use crate::logic::state::{fnv1a, FNV_OFFSET};
use proxy_wasm::types::MetricType;
use std::cell::RefCell;

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
