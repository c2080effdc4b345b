//! What the balancer learns from its own traffic: per model, how long a request keeps a node
//! busy. The estimates live in their own shared-data key, apart from the cluster state: each VM
//! gathers samples as its requests end and folds them in on its tick, so the request path never
//! writes them; every VM reads them back on the same tick. Bounded: at most `MAX_MODELS`
//! models (configured ones are never evicted by models clients made up for any-model nodes).

use crate::logic::state::model_key;
use serde::{Deserialize, Serialize};

/// The shared-data key of the estimates.
pub const ESTIMATES_KEY: &str = "exo-lb/estimates/v1";
/// Models remembered at once.
pub const MAX_MODELS: usize = 64;
/// Samples a VM keeps between two ticks (more are dropped: the estimate does not need them).
pub const MAX_PENDING_SAMPLES: usize = 256;
/// Weight of a new sample in the moving average of service times.
const SERVICE_EWMA_PERCENT: u64 = 20;

/// One finished request's measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub model: String,
    /// From routing to the end of the response.
    pub service_ms: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEstimate {
    pub key: u64,
    pub model: String,
    /// Moving average of the service time (ms).
    pub service_ms: u64,
    pub samples: u64,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimates {
    /// Sorted by key.
    pub models: Vec<ModelEstimate>,
}

impl Estimates {
    pub fn decode(bytes: Option<&[u8]>) -> Estimates {
        bytes.and_then(|b| postcard::from_bytes(b).ok()).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    fn get(&self, key: u64) -> Option<&ModelEstimate> {
        self.models.binary_search_by_key(&key, |m| m.key).ok().and_then(|k| self.models.get(k))
    }

    /// The average service time of the model with [`model_key`] `key`, once measured.
    pub fn service_ms(&self, key: u64) -> Option<u64> {
        self.get(key).map(|m| m.service_ms)
    }

    /// The model id behind a key, when it was measured.
    pub fn model_name(&self, key: u64) -> Option<&str> {
        self.get(key).map(|m| m.model.as_str())
    }

    /// Folds samples in. `configured` tells which models the configuration names: they are
    /// kept before any other when the table is full.
    pub fn record(&mut self, samples: &[Sample], configured: impl Fn(u64) -> bool) {
        for s in samples {
            let key = model_key(&s.model);
            match self.models.binary_search_by_key(&key, |m| m.key) {
                Ok(k) => {
                    if let Some(m) = self.models.get_mut(k) {
                        m.service_ms = (m.service_ms.saturating_mul(100 - SERVICE_EWMA_PERCENT)
                            + s.service_ms.saturating_mul(SERVICE_EWMA_PERCENT))
                            / 100;
                        m.samples = m.samples.saturating_add(1);
                        m.updated_ms = m.updated_ms.max(s.at_ms);
                    }
                }
                Err(k) => self.models.insert(
                    k,
                    ModelEstimate {
                        key,
                        model: s.model.clone(),
                        service_ms: s.service_ms,
                        samples: 1,
                        updated_ms: s.at_ms,
                    },
                ),
            }
        }
        while self.models.len() > MAX_MODELS {
            // Evict the stalest model, unconfigured ones first.
            let victim =
                self.models.iter().enumerate().min_by_key(|(_, m)| (configured(m.key), m.updated_ms)).map(|(k, _)| k);
            match victim {
                Some(k) => {
                    self.models.remove(k);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(model: &str, ms: u64, at: u64) -> Sample {
        Sample { model: model.into(), service_ms: ms, at_ms: at }
    }

    #[test]
    fn moving_average_per_model() {
        let mut e = Estimates::default();
        e.record(&[sample("m", 1_000, 1), sample("m", 2_000, 2), sample("n", 50, 3)], |_| true);
        assert_eq!(e.service_ms(model_key("m")), Some(1_200));
        assert_eq!(e.service_ms(model_key("n")), Some(50));
        assert_eq!(e.model_name(model_key("n")), Some("n"));
        assert_eq!(Estimates::decode(Some(&e.encode())), e);
        assert_eq!(Estimates::decode(Some(b"\xff")), Estimates::default());
    }

    #[test]
    fn bounded_and_configured_models_stay() {
        let mut e = Estimates::default();
        let kept = model_key("configured");
        e.record(&[sample("configured", 10, 0)], |_| true);
        let made_up: Vec<Sample> = (0..1_000).map(|k| sample(&format!("x{k}"), 1, 1 + k)).collect();
        e.record(&made_up, |k| k == kept);
        assert_eq!(e.models.len(), MAX_MODELS);
        assert_eq!(e.service_ms(kept), Some(10));
        assert_eq!(e.service_ms(model_key("x999")), Some(1), "the newest stay");
    }
}
