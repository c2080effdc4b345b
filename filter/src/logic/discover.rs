//! Cold start: what each node has loaded, asked of the node itself.
//!
//! After a start (or a new node list) the balancer does not know which model each node holds,
//! and a first request sent to a node that holds another model costs a whole switch. Each exo
//! dialect tells in its own place ([`Source`]): newer exo (FastAPI) lists what it runs at
//! `GET /state`: its `instances`, each tagged by kind (`{"MlxRingInstance": {...}}`) with
//! `shardAssignments.modelId`. Older exo as RK3588 boards run it (exo-rkllama, aiohttp) has no
//! `/state` (its `/v1/models` lists every model card as ready, loaded or not) but exports
//! Prometheus metrics at `GET /metrics`: `exo_model_info{model_id="..."}` names the model it
//! loaded, and the histogram `rkllm_model_load_duration_seconds` says how long its loads took,
//! which is what a switch costs before the balancer has measured one. Each node is asked both,
//! until it answers, by one VM at a time (the ask is booked in the node's shared record); a node
//! that tells neither is learned from traffic (a first token at warm speed shows that the node
//! had the model).

use crate::logic::config::{Config, DEFAULT_PROBE_TIMEOUT_MS};
use crate::logic::state::{model_key, ClusterState};
use serde_json::Value;

/// Where a node may tell what it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Newer exo: `GET /state`, its running instances (JSON).
    State,
    /// Older exo (exo-rkllama): `GET /metrics`, Prometheus text.
    Metrics,
}

impl Source {
    /// Both are asked: a node answers one and not the other (404).
    pub const ALL: [Source; 2] = [Source::State, Source::Metrics];

    pub fn path(self) -> &'static str {
        match self {
            Source::State => "/state",
            Source::Metrics => "/metrics",
        }
    }

    /// Its bit in a node's unanswered asks ([`ClusterState::discovery_asks`]).
    pub fn bit(self) -> u64 {
        match self {
            Source::State => 1,
            Source::Metrics => 2,
        }
    }
}

/// What one answer told about a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Told {
    /// The model it has loaded, when that was news to the balancer.
    pub model: Option<String>,
    /// How long loading a model took it (ms, the mean of its loads), when it says.
    pub load_ms: Option<u64>,
    /// The model `load_ms` is the load of, where it is one load of the model the node holds (a
    /// board that has not switched since it booted): a heavy model booted is then not read as a
    /// slow board once that model's loads are measured elsewhere. A mean over several loads may
    /// mix models, and tells only of the board.
    pub load_of: Option<String>,
}

/// A node that did not answer is asked again after this long.
pub const RETRY_MS: u64 = 30_000;
/// An answer longer than this is not read (a board's `/state` or `/metrics` is a few kB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How long an ask may take before it counts as unanswered: the health check's timeout
/// (`probe.timeout`, else its default).
pub fn ask_timeout_ms(cfg: &Config) -> u64 {
    cfg.probe.as_ref().map_or(DEFAULT_PROBE_TIMEOUT_MS, |p| p.timeout_ms)
}

/// Whether node `i` may yet tell what it has loaded: not known, and an ask of it is out and not
/// older than an ask may take (an answer lost with the VM that asked holds nothing up).
pub fn awaited(cfg: &Config, state: &ClusterState, i: usize, now: u64) -> bool {
    let asked = state.next_discovery(i).saturating_sub(RETRY_MS);
    state.warm(i).is_none() && state.discovery_asks(i) != 0 && now < asked.saturating_add(ask_timeout_ms(cfg))
}

/// The nodes to ask now: enabled, in the node list, loaded model unknown, not asked lately.
/// Books each ask in the node's record (and marks both of its places as asked), so that no
/// other VM sends the same one.
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
        state.set_discovery_asks(i, Source::ALL.iter().fold(0, |bits, s| bits | s.bit()));
        state.set_discovery_answered(i, false);
        due.push(i);
    }
    due
}

/// Applies node `node`'s answer from `source` (`status` 0: none came, or the ask could not be
/// sent). A node one of whose places answered is not asked again once the other has answered
/// too (or failed); one where neither answered is asked again after [`RETRY_MS`], as is one
/// whose answer never came back (its asking VM went away).
pub fn record(cfg: &Config, state: &mut ClusterState, node: usize, source: Source, status: u32, body: &[u8]) -> Told {
    let Some(n) = cfg.nodes.get(node) else { return Told::default() };
    let asks = state.discovery_asks(node) & !source.bit();
    state.set_discovery_asks(node, asks);
    let answered = status != 0 && status < 500;
    if answered {
        state.set_discovery_answered(node, true);
    }
    if asks == 0 && state.discovery_answered(node) {
        state.set_next_discovery(node, u64::MAX);
    }
    if !answered || !(200..300).contains(&status) || body.len() > MAX_BODY_BYTES {
        return Told::default();
    }
    let (models, load_ms, load_of) = match source {
        Source::State => (loaded_models(body), None, None),
        Source::Metrics => {
            let m = NodeMetrics::parse(body);
            let load_of = m.model.clone().filter(|model| m.loads == 1 && n.serves(model));
            (m.model.into_iter().collect(), m.load_ms, load_of)
        }
    };
    // One model the node serves: that is what it holds. None, or several (a node that holds
    // more than one model at once), tell nothing the scheduler can use.
    let mut models = models.into_iter().filter(|m| n.serves(m));
    let model = match (models.next(), models.next()) {
        (Some(model), None) if state.warm(node).is_none() => {
            state.set_warm(node, model_key(&model));
            Some(model)
        }
        _ => None,
    };
    Told { model, load_ms, load_of }
}

/// What older exo's Prometheus metrics tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMetrics {
    /// `exo_model_info{model_id="m"} 1`: the model it loaded last.
    pub model: Option<String>,
    /// `rkllm_model_load_duration_seconds` `_sum / _count`, in ms (none before its first load).
    pub load_ms: Option<u64>,
    /// `rkllm_model_load_duration_seconds_count`: how many loads `load_ms` is the mean of (0
    /// where there is no `load_ms`).
    pub loads: u64,
}

impl NodeMetrics {
    pub fn parse(body: &[u8]) -> NodeMetrics {
        let Ok(text) = std::str::from_utf8(body) else { return NodeMetrics::default() };
        let (mut model, mut sum_s, mut count) = (None, None, None);
        for (name, labels, value) in text.lines().filter_map(sample_line) {
            match name {
                "exo_model_info" if value != 0.0 => {
                    model = label(labels, "model_id").filter(|m| !m.is_empty()).or(model);
                }
                "rkllm_model_load_duration_seconds_sum" => sum_s = Some(value),
                "rkllm_model_load_duration_seconds_count" => count = Some(value),
                _ => {}
            }
        }
        let load_ms = match (sum_s, count) {
            (Some(sum), Some(n)) if n >= 1.0 && sum >= 0.0 && (sum / n).is_finite() => {
                Some((sum / n * 1_000.0).round().min(u64::MAX as f64) as u64)
            }
            _ => None,
        };
        let loads = if load_ms.is_some() { count.filter(|n| n.fract() == 0.0).map_or(0, |n| n as u64) } else { 0 };
        NodeMetrics { model, load_ms, loads }
    }
}

/// One sample line of the Prometheus text format, `name{labels} value [timestamp]`, as
/// (name, the text between the braces, value); `None` for comments, blank lines and anything
/// that does not parse.
fn sample_line(line: &str) -> Option<(&str, &str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, rest) = line.split_at(name_end);
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => {
            let close = closing_brace(inner)?;
            (inner.get(..close)?, inner.get(close + 1..)?)
        }
        None => ("", rest),
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, labels, value))
}

/// Where the label set that `inner` starts (just after its `{`) ends: the first `}` outside a
/// quoted value.
fn closing_brace(inner: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in inner.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The value of label `key` in a label set (`a="x",b="y"`), unescaped.
fn label(labels: &str, key: &str) -> Option<String> {
    let mut rest = labels;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let eq = rest.find('=')?;
        let name = rest.get(..eq)?.trim();
        let after = rest.get(eq + 1..)?.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut end = None;
        let mut chars = after.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        if name == key {
            return Some(value);
        }
        rest = after.get(end + 1..)?;
    }
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
        assert_eq!(record(&c, &mut s, 0, Source::State, 0, b"").model, None);
        assert_eq!(due(&c, &mut s, RETRY_MS - 1), Vec::<usize>::new());
        assert_eq!(due(&c, &mut s, RETRY_MS), vec![0]);
        assert_eq!(record(&c, &mut s, 0, Source::State, 200, STATE.as_bytes()).model, Some("m2".to_string()));
        assert_eq!(s.warm(0), Some(model_key("m2")));
        assert_eq!(s.counters(0).switches, 0, "not a switch");
        assert_eq!(due(&c, &mut s, u64::MAX - 1), Vec::<usize>::new());
    }

    /// Each place asked is awaited until it answers, whatever the answer (a failure too), and no
    /// longer than an ask may take: the scheduler holds requests only while an answer may still
    /// come. A node is left alone once both places are done and one answered.
    #[test]
    fn a_node_is_awaited_until_both_places_answered_or_it_told_its_model() {
        let c = cfg("");
        let mut s = c.new_state();
        assert!(!awaited(&c, &s, 0, 0), "not asked yet");
        assert_eq!(due(&c, &mut s, 0), vec![0, 1]);
        assert!(awaited(&c, &s, 0, 10) && awaited(&c, &s, 1, 10));
        record(&c, &mut s, 0, Source::State, 0, b"");
        assert!(awaited(&c, &s, 0, 10), "its metrics may still tell");
        record(&c, &mut s, 0, Source::Metrics, 0, b"");
        assert!(!awaited(&c, &s, 0, 10), "no answer came from either: nothing more to wait for");
        record(&c, &mut s, 1, Source::Metrics, 200, METRICS.as_bytes());
        assert_eq!(s.warm(1), Some(model_key("m1")));
        assert!(!awaited(&c, &s, 1, 10), "it told its model; its /state may answer later");
        assert_eq!(s.discovery_asks(1), Source::State.bit());
        // Asked again after the retry (a, which did not answer): awaited again, b's model kept.
        s.set_warm(1, model_key("m2"));
        assert_eq!(due(&c, &mut s, RETRY_MS), vec![0]);
        assert!(awaited(&c, &s, 0, RETRY_MS + 10));
        assert_eq!(s.warm(1), Some(model_key("m2")));
        // /state: 404 (older exo). /metrics' answer is lost (the VM that asked went away): not
        // awaited past the ask's timeout, and asked again after the retry.
        record(&c, &mut s, 0, Source::State, 404, b"Not Found");
        assert!(awaited(&c, &s, 0, RETRY_MS + 1_999), "its metrics may still tell");
        assert!(!awaited(&c, &s, 0, RETRY_MS + 2_000));
        assert_eq!(due(&c, &mut s, 2 * RETRY_MS), vec![0]);
        // Both answer, one with a 404: never asked again.
        record(&c, &mut s, 0, Source::State, 404, b"Not Found");
        record(&c, &mut s, 0, Source::Metrics, 0, b"");
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
            assert_eq!(record(&c, &mut s, 0, Source::State, status, body.as_bytes()).model, None, "{status} {body}");
            assert_eq!(s.warm(0), None);
            // Its other place does not answer either.
            record(&c, &mut s, 0, Source::Metrics, 0, b"");
            assert_eq!(due(&c, &mut s, u64::MAX - 1), vec![1], "a is not asked again after {status} {body}");
        }
        // A body over the limit is not parsed.
        let mut s = c.new_state();
        due(&c, &mut s, 0);
        let big = format!("{}{}", STATE, " ".repeat(MAX_BODY_BYTES));
        assert_eq!(record(&c, &mut s, 0, Source::State, 200, big.as_bytes()).model, None);
        assert_eq!(
            record(&c, &mut s, 0, Source::State, 200, STATE.as_bytes()).model,
            Some("m2".to_string()),
            "the same without the padding"
        );
    }

    /// An exo-rkllama `/metrics` page as prometheus_client writes it (trimmed), after two loads
    /// that took 38.5 s together, the last of them m1's.
    const METRICS: &str = "# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation=\"0\"} 1234.0
# HELP exo_requests_in_progress Number of requests currently being processed
# TYPE exo_requests_in_progress gauge
exo_requests_in_progress 0.0
# HELP exo_model_info Information about the currently loaded model
# TYPE exo_model_info gauge
exo_model_info{layers=\"28\",model_id=\"m1\",rkllm_name=\"Qwen2.5-1.5B-Instruct\"} 1.0
# HELP rkllm_model_load_duration_seconds Time to load model on RKLLM server
# TYPE rkllm_model_load_duration_seconds histogram
rkllm_model_load_duration_seconds_bucket{le=\"1.0\"} 0.0
rkllm_model_load_duration_seconds_bucket{le=\"30.0\"} 2.0
rkllm_model_load_duration_seconds_bucket{le=\"+Inf\"} 2.0
rkllm_model_load_duration_seconds_count 2.0
rkllm_model_load_duration_seconds_sum 38.5
# HELP rkllm_model_load_duration_seconds_created Time to load model on RKLLM server
# TYPE rkllm_model_load_duration_seconds_created gauge
rkllm_model_load_duration_seconds_created 1.7e+09
";

    #[test]
    fn reads_the_loaded_model_and_its_load_time_from_older_exos_metrics() {
        assert_eq!(
            NodeMetrics::parse(METRICS.as_bytes()),
            NodeMetrics { model: Some("m1".into()), load_ms: Some(19_250), loads: 2 }
        );
        // Labels in any order, escapes, a timestamp, a label value holding `}` and `,`.
        let odd = "exo_model_info{rkllm_name=\"a}b,c=\\\"d\\\"\", model_id=\"m\\\\2\"} 1 1700000000\n\
                   rkllm_model_load_duration_seconds_sum{} 30\nrkllm_model_load_duration_seconds_count 1\n";
        assert_eq!(
            NodeMetrics::parse(odd.as_bytes()),
            NodeMetrics { model: Some("m\\2".into()), load_ms: Some(30_000), loads: 1 }
        );
        for (body, what) in [
            ("", "nothing"),
            ("\u{ff}\u{fe}", "not text"),
            ("exo_model_info 1.0\n", "Info without labels: nothing loaded yet"),
            ("exo_model_info{model_id=\"m1\"} 0\n", "a zero sample"),
            ("exo_model_info{model_id=\"\"} 1\n", "an empty id"),
            ("exo_model_info{model_id=\"m1} 1\n", "an unclosed value"),
            ("exo_model_info{model_id=m1} 1\n", "an unquoted value"),
            ("rkllm_model_load_duration_seconds_count 0.0\nrkllm_model_load_duration_seconds_sum 0.0\n", "no load yet"),
            ("rkllm_model_load_duration_seconds_count 1\nrkllm_model_load_duration_seconds_sum NaN\n", "not a number"),
            ("rkllm_model_load_duration_seconds_sum 3\n", "no count"),
            (r#"{"instances":{}}"#, "JSON"),
        ] {
            assert_eq!(NodeMetrics::parse(body.as_bytes()), NodeMetrics::default(), "{what}");
        }
    }

    #[test]
    fn older_exo_tells_through_its_metrics_and_newer_exo_through_its_state() {
        let c = cfg("");
        let mut s = c.new_state();
        assert_eq!(due(&c, &mut s, 0), vec![0, 1]);
        // a is older exo: /state is not found, /metrics tells.
        assert_eq!(record(&c, &mut s, 0, Source::State, 404, b"Not Found"), Told::default());
        assert_eq!(
            record(&c, &mut s, 0, Source::Metrics, 200, METRICS.as_bytes()),
            Told { model: Some("m1".into()), load_ms: Some(19_250), load_of: None }
        );
        assert_eq!(s.warm(0), Some(model_key("m1")));
        // b is newer exo: the other way round.
        assert_eq!(record(&c, &mut s, 1, Source::Metrics, 404, b"Not Found"), Told::default());
        assert_eq!(record(&c, &mut s, 1, Source::State, 200, STATE.as_bytes()).model, Some("m2".into()));
        assert_eq!(due(&c, &mut s, u64::MAX - 1), Vec::<usize>::new(), "both answered");
        // A load time still counts when the model is already known, or not one the node serves.
        let mut s = c.new_state();
        s.set_warm(0, model_key("m2"));
        let other = METRICS.replace("model_id=\"m1\"", "model_id=\"m9\"");
        assert_eq!(
            record(&c, &mut s, 0, Source::Metrics, 200, other.as_bytes()),
            Told { model: None, load_ms: Some(19_250), load_of: None }
        );
        assert_eq!(s.warm(0), Some(model_key("m2")));
        // A board that has loaded once, the model it holds: the load is that model's. One that
        // holds a model it is not configured to serve tells only of itself.
        let once =
            METRICS.replace("seconds_count 2.0", "seconds_count 1.0").replace("seconds_sum 38.5", "seconds_sum 19.25");
        let told = record(&c, &mut c.new_state(), 0, Source::Metrics, 200, once.as_bytes());
        assert_eq!((told.load_ms, told.load_of), (Some(19_250), Some("m1".into())));
        let once_other = once.replace("model_id=\"m1\"", "model_id=\"m9\"");
        let told = record(&c, &mut c.new_state(), 0, Source::Metrics, 200, once_other.as_bytes());
        assert_eq!((told.load_ms, told.load_of), (Some(19_250), None));
        assert_eq!(Source::ALL.map(Source::path), ["/state", "/metrics"]);
    }

    #[test]
    fn what_traffic_showed_first_is_kept_and_the_option_turns_asking_off() {
        let c = cfg("");
        let mut s = c.new_state();
        assert_eq!(due(&c, &mut s, 0), vec![0, 1]);
        // A request was sent to a for m1 while the ask was under way.
        s.set_warm(0, model_key("m1"));
        assert_eq!(record(&c, &mut s, 0, Source::State, 200, STATE.as_bytes()).model, None);
        assert_eq!(s.warm(0), Some(model_key("m1")));
        let off = cfg(r#""discover_loaded":false,"#);
        assert_eq!(due(&off, &mut off.new_state(), 0), Vec::<usize>::new());
        assert!(Config::parse(br#"{"discover_loaded":"yes","nodes":[{"name":"a","address":"10.0.0.1:1"}]}"#).is_err());
    }
}
