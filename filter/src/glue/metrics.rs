//! The filter's metrics, defined on first use (label values are known only at run time) and
//! cached per VM. Envoy exports them in /stats/prometheus with the labels that the bootstrap's
//! stats_tags extract from the names (see `logic::metrics`).

use crate::glue::host;
use crate::logic::metrics::name;
use proxy_wasm::types::MetricType;
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Default)]
pub struct Metrics {
    ids: RefCell<HashMap<String, Option<u32>>>,
}

impl Metrics {
    fn id(&self, kind: MetricType, base: &str, labels: &[(&str, &str)]) -> Option<u32> {
        let full = name(base, labels);
        if let Some(id) = self.ids.borrow().get(&full) {
            return *id;
        }
        let id = host::define_metric(kind, &full);
        self.ids.borrow_mut().insert(full, id);
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
