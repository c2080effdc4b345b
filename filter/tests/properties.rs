//! Property tests of the pure logic: no input makes it panic, and bookkeeping always balances.

use exo_lb::logic::config::Config;
use exo_lb::logic::outcome::{finish, flags, Ending};
use exo_lb::logic::request::parse_body;
use exo_lb::logic::select::{route, RouteInput};
use exo_lb::logic::state::ClusterState;
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z]{1,8}|model|stream", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn parse_body_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(req) = parse_body(&body) {
            prop_assert!(!req.model.trim().is_empty());
        }
    }

    #[test]
    fn parse_body_reads_model_only_when_it_is_a_string(v in json_value()) {
        let body = serde_json::to_vec(&v).unwrap();
        let result = parse_body(&body);
        match v.get("model") {
            Some(serde_json::Value::String(m)) if !m.trim().is_empty() && v.is_object() => {
                prop_assert_eq!(result.map(|r| r.model), Ok(m.clone()));
            }
            _ => prop_assert!(result.is_err()),
        }
    }

    #[test]
    fn config_parse_never_panics(v in json_value(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Config::parse(&serde_json::to_vec(&v).unwrap());
        let _ = Config::parse(&bytes);
    }
}

#[derive(Debug, Clone)]
enum Step {
    Route {
        model: u8,
        vm: u8,
        random: u64,
    },
    Finish {
        which: usize,
        attempts: u8,
        status: u16,
        flags: u64,
    },
    Advance {
        ms: u32,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let flag = prop_oneof![
        Just(0u64),
        Just(flags::UPSTREAM_CONNECTION_FAILURE),
        Just(flags::DOWNSTREAM_CONNECTION_TERMINATION),
        Just(flags::UPSTREAM_REMOTE_RESET),
        Just(flags::UPSTREAM_REQUEST_TIMEOUT),
        any::<u64>(),
    ];
    prop_oneof![
        (0u8..4, 0u8..3, any::<u64>()).prop_map(|(model, vm, random)| Step::Route {
            model,
            vm,
            random
        }),
        (
            any::<usize>(),
            0u8..5,
            prop_oneof![Just(200u16), Just(503), Just(502), Just(0), any::<u16>()],
            flag
        )
            .prop_map(|(which, attempts, status, flags)| Step::Finish {
                which,
                attempts,
                status,
                flags
            }),
        (0u32..40_000).prop_map(|ms| Step::Advance { ms }),
    ]
}

const POLICIES: [&str; 4] = ["least_conn", "round_robin", "random_two", "hash"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Any interleaving of routing, endings and time leaves no request in flight once every
    /// request has ended, and every route honours the model and the drained nodes.
    #[test]
    fn bookkeeping_balances(policy in 0usize..4, steps in prop::collection::vec(step(), 1..80)) {
        let cfg = Config::parse(format!(r#"{{"policy":"{}","max_fails":2,"fail_timeout":"10s","nodes":[
            {{"name":"a","address":"10.0.0.1:1","models":["m0","m1"]}},
            {{"name":"b","address":"10.0.0.2:1","models":["m0"],"weight":3}},
            {{"name":"c","address":"10.0.0.3:1","models":["m0","m2"],"backup":true}},
            {{"name":"d","address":"10.0.0.4:1","down":true}}]}}"#, POLICIES[policy]).as_bytes()).unwrap();
        let models = ["m0", "m1", "m2", "zz"];
        let mut state = ClusterState::default();
        let mut now = 1_000_000u64;
        let mut open: Vec<(Vec<usize>, bool, u64, u64)> = Vec::new();
        for s in steps {
            match s {
                Step::Route { model, vm, random } => {
                    let m = models[usize::from(model)];
                    let input = RouteInput { model: Some(m), hash_key: Some("k"), now_ms: now, vm: u64::from(vm), random };
                    if let Ok(r) = route(&cfg, &mut state, &input) {
                        prop_assert!(!r.nodes.is_empty());
                        let mut seen = r.nodes.clone();
                        seen.sort_unstable();
                        seen.dedup();
                        prop_assert_eq!(seen.len(), r.nodes.len(), "no node twice");
                        for &i in &r.nodes {
                            prop_assert!(cfg.nodes[i].serves(m) && !cfg.nodes[i].down);
                        }
                        open.push((r.nodes, r.probing, now, u64::from(vm)));
                    }
                }
                Step::Finish { which, attempts, status, flags } => {
                    if !open.is_empty() {
                        let (nodes, probing, started, vm) = open.remove(which % open.len());
                        let end = Ending {
                            route: &nodes, probing, charged: nodes.first().copied(), attempts: u64::from(attempts),
                            served: None, status: u32::from(status), flags, started_ms: started, now_ms: now, vm,
                        };
                        finish(&cfg, &mut state, &end);
                    }
                }
                Step::Advance { ms } => {
                    now += u64::from(ms);
                    // Every VM still ticks.
                    for vm in 0..3 {
                        state.renew_and_prune(vm, now);
                    }
                }
            }
            // The state survives its own encoding.
            prop_assert_eq!(ClusterState::decode(Some(&state.encode())), state.clone());
        }
        for (nodes, probing, started, vm) in open.drain(..) {
            let end = Ending { route: &nodes, probing, charged: nodes.first().copied(), attempts: 0, served: None,
                status: 0, flags: flags::DOWNSTREAM_CONNECTION_TERMINATION, started_ms: started, now_ms: now, vm };
            finish(&cfg, &mut state, &end);
        }
        for n in &cfg.nodes {
            prop_assert_eq!(state.inflight(&n.name, now), 0);
            prop_assert_eq!(state.health(&n.name).probe_vm, None);
        }
        prop_assert!(state.leases.is_empty());
    }
}
