//! The answers the balancer gives by itself: its health check and the model list.

use crate::logic::config::Config;
use crate::logic::estimates::Estimates;
use crate::logic::health::Phase;
use crate::logic::schedule::{self, queue_depth};
use crate::logic::state::{ClusterState, Planned};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// A node takes new requests: not drained, not out (a node due for a probe counts as up).
pub fn node_is_up(cfg: &Config, state: &ClusterState, index: usize, now_ms: u64) -> bool {
    cfg.nodes.get(index).is_some_and(|n| {
        !n.down && matches!(state.health(index).phase(now_ms, cfg.probe.is_some()), Phase::Up | Phase::Probing)
    })
}

/// `GET <healthcheck_path>`: status 200 when at least one node is up, else 503.
pub fn healthcheck(cfg: &Config, state: &ClusterState, now_ms: u64) -> (u32, String) {
    let up: Vec<bool> = (0..cfg.nodes.len()).map(|i| node_is_up(cfg, state, i, now_ms)).collect();
    let up_count = up.iter().filter(|u| **u).count();
    let mut models: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (node, is_up) in cfg.nodes.iter().zip(&up) {
        let ids = if node.serves_any_model() { vec!["*".to_string()] } else { node.models.clone() };
        for id in ids {
            let entry = models.entry(id).or_insert((0, 0));
            entry.1 += 1;
            if *is_up {
                entry.0 += 1;
            }
        }
    }
    let models: Map<String, Value> =
        models.into_iter().map(|(id, (u, t))| (id, json!({"up": u, "total": t}))).collect();
    let status = if up_count > 0 { 200 } else { 503 };
    let body = json!({
        "status": if up_count > 0 { "ok" } else { "unavailable" },
        "nodes": {"up": up_count, "total": cfg.nodes.len()},
        "models": models,
    });
    (status, body.to_string())
}

/// `GET /v1/models`: the models of the nodes that are up, in OpenAI's list format. `None` when
/// an available node serves any model: then only a node can say what it has.
pub fn model_list(cfg: &Config, state: &ClusterState, now_ms: u64) -> Option<String> {
    let mut ids = std::collections::BTreeSet::new();
    for (i, node) in cfg.nodes.iter().enumerate() {
        if !node_is_up(cfg, state, i, now_ms) {
            continue;
        }
        if node.serves_any_model() {
            return None;
        }
        ids.extend(node.models.iter().cloned());
    }
    let data: Vec<Value> =
        ids.into_iter().map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "exo"})).collect();
    Some(json!({"object": "list", "data": data}).to_string())
}

/// The status page (on the admin-side listener): per node state, load, warm model and
/// counters, the queue and the learned service times.
pub fn status(cfg: &Config, state: &ClusterState, est: &Estimates, now_ms: u64) -> String {
    let model_name = |key: u64| -> Value {
        match cfg.model_name(key).or_else(|| est.model_name(key)) {
            Some(name) => Value::from(name),
            None => Value::from(format!("(model #{key:016x})")),
        }
    };
    let nodes: Vec<Value> = cfg
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let health = state.health(i);
            let phase = if n.down {
                "drained"
            } else {
                match health.phase(now_ms, cfg.probe.is_some()) {
                    Phase::Up => "up",
                    Phase::Out { .. } => "out",
                    Phase::Probing => "probing",
                    Phase::Down => "down",
                }
            };
            let counters = state.counters(i);
            let report = cfg.index.layout.nodes.get(i).and_then(|&key| est.own_report(key));
            json!({
                "name": n.name,
                "address": n.address,
                "state": phase,
                "inflight": state.inflight(i, now_ms),
                "held_after_abort": state.held(i, now_ms),
                "max_inflight": n.max_inflight,
                "warm_model": state.warm(i).map(model_name),
                // The look-ahead's current plan for the node, where it overrides the rule.
                "look_ahead": match state.planned(i) {
                    Some(Planned::Hold) => json!("hold"),
                    Some(Planned::Serve(m)) => json!({ "serve": model_name(m) }),
                    None => Value::Null,
                },
                "failures": health.fails,
                "failures_total": counters.failures,
                "served": counters.served,
                "model_switches": counters.switches,
                "not_running": state.not_running(i, now_ms).into_iter().map(model_name).collect::<Vec<_>>(),
                "reported_load_ms": report.map(|r| r.load_ms),
                // The model that load was, where it was one load of one model.
                "reported_load_of": report.and_then(|r| r.model).map(model_name),
            })
        })
        .collect();
    let (depth, oldest) = queue_depth(state, now_ms);
    let learned: Map<String, Value> = est
        .models
        .iter()
        .map(|m| {
            let per_node: Map<String, Value> = cfg
                .nodes
                .iter()
                .zip(&cfg.index.layout.nodes)
                .map(|(n, &key)| {
                    (
                        n.name.clone(),
                        json!({
                            "switch_ms": est.switch_ms(key, m.key),
                            "first_token_ms": est.warm_first_token_ms(key, m.key),
                            "per_token_us": est.per_token_us(key, m.key),
                        }),
                    )
                })
                .collect();
            (
                m.model.clone(),
                json!({
                    "service_ms": est.service_ms(m.key),
                    "first_token_ms": m.timing.warm_first_token.median(),
                    "switch_ms": est.switch_ms(0, m.key),
                    "per_token_us": m.timing.per_token_us.median(),
                    "reply_tokens": m.tokens.median(),
                    "arrivals_per_minute": round2(schedule::arrival_rate_per_s(cfg, est, m.key, now_ms) * 60.0),
                    "demand_nodes": round2(schedule::demand_nodes(cfg, est, m.key, now_ms)),
                    "samples": m.samples,
                    "nodes": per_node,
                }),
            )
        })
        .collect();
    json!({
        "nodes": nodes,
        "queue": {"depth": depth, "oldest_wait_ms": oldest, "max_waiting": cfg.queue.max_waiting, "timeout_ms": cfg.queue.timeout_ms, "fair_share": cfg.queue.fair_share},
        "model_switch_cost": match cfg.model_switch_cost_ms { None => Value::from("auto"), Some(ms) => Value::from(ms) },
        "learned": learned,
    })
    .to_string()
}

/// Two decimals are all a person reads (and keep the page short).
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nodes: &str) -> Config {
        Config::parse(format!(r#"{{"nodes":[{nodes}]}}"#).as_bytes()).unwrap()
    }

    #[test]
    fn healthcheck_counts_up_nodes_per_model() {
        let c = cfg(
            r#"{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]},{"name":"b","address":"10.0.0.2:1","models":["m1"]},{"name":"c","address":"10.0.0.3:1","down":true}"#,
        );
        let mut s = c.new_state();
        s.update_health(1, |h| h.record_failure(0, 1, 1_000));
        let (status, body) = healthcheck(&c, &s, 10);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["nodes"], json!({"up": 1, "total": 3}));
        assert_eq!(v["models"]["m1"], json!({"up": 1, "total": 2}));
        assert_eq!(v["models"]["*"], json!({"up": 0, "total": 1}));
        s.update_health(0, |h| h.record_failure(0, 1, 1_000));
        assert_eq!(healthcheck(&c, &s, 10).0, 503);
        assert_eq!(healthcheck(&c, &s, 1_000).0, 200, "back (probing) after fail_timeout");
    }

    #[test]
    fn model_list_is_union_of_up_nodes() {
        let c = cfg(
            r#"{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]},{"name":"b","address":"10.0.0.2:1","models":["m3"]}"#,
        );
        let mut s = c.new_state();
        let v: Value = serde_json::from_str(&model_list(&c, &s, 0).unwrap()).unwrap();
        let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["m1", "m2", "m3"]);
        s.update_health(1, |h| h.record_failure(0, 1, 1_000));
        let v: Value = serde_json::from_str(&model_list(&c, &s, 0).unwrap()).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        let wild = cfg(r#"{"name":"a","address":"10.0.0.1:1"}"#);
        assert_eq!(model_list(&wild, &s, 0), None);
    }

    #[test]
    fn status_shows_nodes_and_queue() {
        let c = cfg(
            r#"{"name":"a","address":"10.0.0.1:1","models":["m1"]},{"name":"b","address":"10.0.0.2:1","down":true}"#,
        );
        let mut s = c.new_state();
        s.acquire(1, 0, 0);
        s.set_warm(0, crate::logic::state::model_key("m1"));
        s.set_warm(1, crate::logic::state::model_key("made-up"));
        s.set_plan(7, &[(0, Planned::Serve(crate::logic::state::model_key("m1")))]);
        let v: Value = serde_json::from_str(&status(&c, &s, &Estimates::default(), 5)).unwrap();
        assert_eq!(v["nodes"][0]["look_ahead"]["serve"], "m1");
        assert_eq!(v["nodes"][1]["look_ahead"], Value::Null);
        assert_eq!(v["nodes"][0]["state"], "up");
        assert_eq!(v["nodes"][0]["inflight"], 1);
        assert_eq!(v["nodes"][0]["warm_model"], "m1");
        assert_eq!(v["nodes"][1]["state"], "drained");
        assert!(v["nodes"][1]["warm_model"].as_str().unwrap().starts_with("(model #"), "{v}");
        assert_eq!(v["queue"]["depth"], 0);
    }

    #[test]
    fn status_shows_each_models_demand() {
        use crate::logic::estimates::{Arrived, Sample};
        use crate::logic::state::model_key;
        let c = cfg(r#"{"name":"a","address":"10.0.0.1:1","models":["m1"]}"#);
        let mut e = Estimates::default();
        let warm = Sample {
            model: "m1".into(),
            node: 0,
            switched: Some(false),
            first_token_ms: Some(500),
            total_ms: 20_000,
            tokens: Some(40),
            at_ms: 0,
        };
        e.record(&[warm], |_| true);
        // 6 arrivals in the last 300 s (the starvation bound with the default 300 s timeout is
        // 150 s): 1.2 a minute, each 20 s of work: 0.4 of a node.
        let arrivals: Vec<Arrived> = (0..6).map(|k| Arrived { model: model_key("m1"), at_ms: k * 60_000 }).collect();
        e.record_arrivals(&arrivals);
        let v: Value = serde_json::from_str(&status(&c, &c.new_state(), &e, 300_000)).unwrap();
        assert_eq!(v["learned"]["m1"]["service_ms"], 20_000);
        assert_eq!(v["learned"]["m1"]["arrivals_per_minute"], 1.2);
        assert_eq!(v["learned"]["m1"]["demand_nodes"], 0.4);
    }
}
