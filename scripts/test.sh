#!/usr/bin/env bash
# Sets up a fresh machine, builds exo_lb.wasm, then runs every test: the filter's native unit
# and property tests, the wasmtime-hosted tests of the compiled .wasm, and the end-to-end tests
# through a real Envoy with simulated exo nodes; then a short smoke run of the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/install-bench-deps.sh
scripts/install-deploy-deps.sh
# Stop the dockerd that install-deploy-deps.sh started, whatever happens.
trap '[ -f .run/dockerd.pid ] && kill "$(cat .run/dockerd.pid)" 2>/dev/null; rm -f .run/dockerd.pid' EXIT
echo "==> nginx-wasm (nginx + ngx_wasm_module: the e2e tests run on it too; ~8 min the first time, cached after)"
scripts/setup-nginx.sh
# Its tests fail rather than skip without it.
export EXO_LB_REQUIRE_NGINX=1
echo "==> clippy (the filter denies unwrap/expect/panic/indexing)"
cargo clippy --release --target wasm32-wasip1 -p exo-lb -- -D warnings
echo "==> the host self-tests' probe filter"
cargo build --release --target wasm32-wasip1 --manifest-path tests/wasm-host/fixtures/probe-filter/Cargo.toml
echo "==> tests"
# One build for all of them: with --workspace every crate sees one feature set of the shared
# dependencies (tokio, reqwest, ...), so none is compiled twice (the benchmark smoke run below
# reuses it too). The end-to-end tests start real Envoys and time streams: their harness runs
# them one at a time by itself (e2e::serial), so that a 2-core machine does not skew timings.
cargo test --workspace
echo "==> benchmark smoke run (nginx, plain Envoy and exo-lb on a short trace)"
scripts/bench-smoke.sh
