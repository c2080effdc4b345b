//! Cold start: what each node has loaded, asked of the node itself.
//!
//! After a start (or a new node list) the balancer does not know which model each node holds,
//! and a first request sent to a node that holds another model costs a whole switch. Newer
//! exo (FastAPI) says what it runs at `GET /state`: its `instances`, each tagged by kind
//! (`{"MlxRingInstance": {...}}`) with `shardAssignments.modelId`. Older exo (aiohttp) has no
//! such endpoint (its `/v1/models` lists every model card as ready, loaded or not) and answers
//! 404; there the balancer learns from traffic instead (a first token at warm speed shows that
//! the node had the model). Each node is asked until it answers, by one VM at a time (the ask
//! is booked in the node's shared record).

use crate::logic::config::Config;
use crate::logic::state::{model_key, ClusterState};
use serde_json::Value;

/// Where newer exo tells what it runs.
pub const PATH: &str = "/state";
/// A node that did not answer is asked again after this long.
pub const RETRY_MS: u64 = 30_000;
/// A `/state` body longer than this is not read (a board's is a few kB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The nodes to ask now: enabled, in the node list, loaded model unknown, not asked lately.
/// Books each ask in the node's record, so that no other VM sends the same one.
pub fn due(cfg: &Config, state: &mut ClusterState, now: u64) -> Vec<usize> {
    if !cfg.discover_loaded {
        return Vec::new();
    }
    let mut due = Vec::new();
    for (i, node) in cfg.nodes.iter().enumerate() {
        if node.down || state.warm(i).is_some() || state.next_discovery(i) > now {
            continue;
        }
        state.set_next_discovery(i, now.saturating_add(RETRY_MS));
        due.push(i);
    }
    due
}

/// Applies node `node`'s answer (`status` 0: none came). A node that answered is not asked
/// again; one that did not is asked again after [`RETRY_MS`]. Returns the model it has loaded,
/// when that was news.
pub fn record(cfg: &Config, state: &mut ClusterState, node: usize, status: u32, body: &[u8]) -> Option<String> {
    let n = cfg.nodes.get(node)?;
    if status == 0 || status >= 500 {
        return None;
    }
    state.set_next_discovery(node, u64::MAX);
    if !(200..300).contains(&status) || body.len() > MAX_BODY_BYTES {
        return None;
    }
    // One model the node serves: that is what it holds. None, or several (a node that holds
    // more than one model at once), tell nothing the scheduler can use.
    let mut models = loaded_models(body).into_iter().filter(|m| n.serves(m));
    let (Some(model), None) = (models.next(), models.next()) else { return None };
    if state.warm(node).is_some() {
        return None;
    }
    state.set_warm(node, model_key(&model));
    Some(model)
}

/// The distinct model ids of the instances in a newer exo `/state` body (none for anything
/// else). Accepts instances with or without their kind tag, in camelCase (as exo serialises
/// them) or snake_case.
pub fn loaded_models(body: &[u8]) -> Vec<String> {
    let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else { return Vec::new() };
    let Some(Value::Object(instances)) = root.get("instances") else { return Vec::new() };
    let mut models: Vec<String> = Vec::new();
    for instance in instances.values() {
        let Some(model) = instance_model(instance) else { continue };
        if !models.iter().any(|m| m == model) {
            models.push(model.to_string());
        }
    }
    models
}

/// `{"<Kind>": {"shardAssignments": {"modelId": m}}}`, or the same untagged -> `m`.
fn instance_model(instance: &Value) -> Option<&str> {
    let shards = assignments(instance).or_else(|| match instance {
        Value::Object(tagged) if tagged.len() == 1 => tagged.values().next().and_then(assignments),
        _ => None,
    })?;
    let model = shards.get("modelId").or_else(|| shards.get("model_id"))?.as_str()?;
    (!model.is_empty()).then_some(model)
}

fn assignments(v: &Value) -> Option<&Value> {
    v.get("shardAssignments").or_else(|| v.get("shard_assignments"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single-board exo's `/state`, trimmed to the parts that matter (field names and tags as
    /// exo serialises them).
    const STATE: &str = r#"{"instances":{"9f1c":{"MlxRingInstance":{"instanceId":"9f1c",
        "shardAssignments":{"modelId":"m2","runnerToShard":{"r1":{"PipelineShardMetadata":{"deviceRank":0,"worldSize":1}}},
        "nodeToRunner":{"n1":"r1"}},"hosts":[]}}},
        "runners":{"r1":{"RunnerReady":{}}},"downloads":{},"tasks":{},"lastEventAppliedIdx":42}"#;

    fn cfg(extra: &str) -> Config {
        Config::parse(
            format!(
                r#"{{{extra}"nodes":[{{"name":"a","address":"10.0.0.1:1","models":["m1","m2"]}},{{"name":"b","address":"10.0.0.2:1","models":["m1","m2"]}},{{"name":"c","address":"10.0.0.3:1","down":true}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn reads_the_models_of_newer_exos_instances() {
        assert_eq!(loaded_models(STATE.as_bytes()), vec!["m2"]);
        let two = r#"{"instances":{"x":{"MlxJacclInstance":{"shardAssignments":{"modelId":"m1"}}},
            "y":{"shard_assignments":{"model_id":"m2"}},"z":{"LlamaCppInstance":{"shardAssignments":{"modelId":"m1"}}}}}"#;
        assert_eq!(loaded_models(two.as_bytes()), vec!["m1", "m2"], "tagged or not, each model once");
        for other in [
            "",
            "not json",
            "[]",
            r#"{"instances":{}}"#,
            r#"{"instances":[]}"#,
            r#"{"instances":{"x":{"A":{"shardAssignments":{"modelId":""}}}}}"#,
            r#"{"instances":{"x":{"A":{},"B":{}}}}"#,
            r#"{"object":"list","data":[{"id":"m1","ready":true}]}"#,
        ] {
            assert!(loaded_models(other.as_bytes()).is_empty(), "{other}");
        }
    }

    #[test]
    fn asks_each_node_with_an_unknown_model_once_until_it_answers() {
        let c = cfg("");
        let mut s = c.new_state();
        s.set_warm(1, model_key("m1"));
        assert_eq!(due(&c, &mut s, 0), vec![0], "b's model is known, c is drained");
        assert_eq!(due(&c, &mut s, 1), Vec::<usize>::new(), "booked: no other VM asks a again");
        // No answer: asked again later.
        assert_eq!(record(&c, &mut s, 0, 0, b""), None);
        assert_eq!(due(&c, &mut s, RETRY_MS - 1), Vec::<usize>::new());
        assert_eq!(due(&c, &mut s, RETRY_MS), vec![0]);
        assert_eq!(record(&c, &mut s, 0, 200, STATE.as_bytes()), Some("m2".to_string()));
        assert_eq!(s.warm(0), Some(model_key("m2")));
        assert_eq!(s.counters(0).switches, 0, "not a switch");
        assert_eq!(due(&c, &mut s, u64::MAX - 1), Vec::<usize>::new());
    }

    #[test]
    fn older_exo_and_answers_that_tell_nothing_end_the_asking() {
        let c = cfg("");
        for (status, body) in [
            (404, "Not Found"),
            (200, r#"{"instances":{}}"#),
            (
                200,
                r#"{"instances":{"x":{"A":{"shardAssignments":{"modelId":"m1"}}},"y":{"A":{"shardAssignments":{"modelId":"m2"}}}}}"#,
            ),
            (200, r#"{"instances":{"x":{"A":{"shardAssignments":{"modelId":"m9"}}}}}"#),
        ] {
            let mut s = c.new_state();
            assert_eq!(due(&c, &mut s, 0), vec![0, 1]);
            assert_eq!(record(&c, &mut s, 0, status, body.as_bytes()), None, "{status} {body}");
            assert_eq!(s.warm(0), None);
            assert_eq!(due(&c, &mut s, u64::MAX - 1), vec![1], "a is not asked again after {status} {body}");
        }
        // A body over the limit is not parsed.
        let mut s = c.new_state();
        due(&c, &mut s, 0);
        let big = format!("{}{}", STATE, " ".repeat(MAX_BODY_BYTES));
        assert_eq!(record(&c, &mut s, 0, 200, big.as_bytes()), None);
        assert_eq!(
            record(&c, &mut s, 0, 200, STATE.as_bytes()),
            Some("m2".to_string()),
            "the same without the padding"
        );
    }

    #[test]
    fn what_traffic_showed_first_is_kept_and_the_option_turns_asking_off() {
        let c = cfg("");
        let mut s = c.new_state();
        assert_eq!(due(&c, &mut s, 0), vec![0, 1]);
        // A request was sent to a for m1 while the ask was under way.
        s.set_warm(0, model_key("m1"));
        assert_eq!(record(&c, &mut s, 0, 200, STATE.as_bytes()), None);
        assert_eq!(s.warm(0), Some(model_key("m1")));
        let off = cfg(r#""discover_loaded":false,"#);
        assert_eq!(due(&off, &mut off.new_state(), 0), Vec::<usize>::new());
        assert!(Config::parse(br#"{"discover_loaded":"yes","nodes":[{"name":"a","address":"10.0.0.1:1"}]}"#).is_err());
    }
}
