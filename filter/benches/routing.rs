//! The filter's routing decision, natively: one request's admission and its end as the glue
//! runs them (state read from its shared bytes, the pure decision, state written back), on
//! clusters of 3 to 256 nodes. `cargo bench -p exo-lb --features bench --bench routing`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use exo_lb::logic::config::Config;
use exo_lb::logic::estimates::Estimates;
use exo_lb::logic::outcome::{finish, Ending};
use exo_lb::logic::schedule::{admit, Admission, Arrival};
use exo_lb::logic::state::{model_key, ClusterState};

fn config(nodes: usize) -> Config {
    let list: Vec<String> = (0..nodes)
        .map(|i| {
            format!(r#"{{"name":"n{i}","address":"10.0.{}.{}:52415","models":["m1","m2","m3"]}}"#, i / 250, i % 250 + 1)
        })
        .collect();
    let json = format!(r#"{{"max_inflight":10000,"nodes":[{}]}}"#, list.join(","));
    match Config::parse(json.as_bytes()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("admit_and_finish");
    for nodes in [3usize, 16, 64, 256] {
        let cfg = config(nodes);
        let est = Estimates::default();
        let layout = &cfg.index.layout;
        // A cluster in use: every node has served and holds a model.
        let mut bytes = cfg.new_state().encode().to_vec();
        let mut now = 1_000_000u64;
        let mut ctx = 0u32;
        group.bench_with_input(BenchmarkId::from_parameter(nodes), &nodes, |b, _| {
            b.iter(|| {
                now += 1;
                ctx = ctx.wrapping_add(1);
                let a = Arrival {
                    vm: 1,
                    ctx,
                    model: "m1",
                    model_key: model_key("m1"),
                    random: u64::from(ctx),
                    now_ms: now,
                    ..Arrival::default()
                };
                let mut state = ClusterState::from_bytes(std::mem::take(&mut bytes), layout);
                let route = match admit(&cfg, &mut state, &est, black_box(&a)) {
                    Admission::Granted(r) => r,
                    other => panic!("{other:?}"),
                };
                bytes = state.encode().to_vec();
                let mut state = ClusterState::from_bytes(std::mem::take(&mut bytes), layout);
                let end = Ending {
                    route: &route.nodes,
                    charged: route.nodes.first().copied(),
                    served: route.nodes.first().copied(),
                    attempts: 1,
                    status: 200,
                    started_ms: now,
                    now_ms: now,
                    vm: 1,
                    model: Some("m1"),
                    ..Ending::default()
                };
                black_box(finish(&cfg, &mut state, &est, &end));
                bytes = state.encode().to_vec();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
