#!/usr/bin/env bash
# Sets up a fresh machine, builds exo_lb.wasm, then runs every test: the filter's native unit
# and property tests, the wasmtime-hosted tests of the compiled .wasm, and the end-to-end tests
# through a real Envoy with simulated exo nodes; then a short smoke run of the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
# Stop the dockerd that install-deploy-deps.sh starts, and the background build below,
# whatever happens.
host_build=
cleanup() {
  [ -n "$host_build" ] && kill -KILL -- "-$host_build" 2>/dev/null
  [ -f .run/dockerd.pid ] && kill "$(cat .run/dockerd.pid)" 2>/dev/null
  rm -f .run/dockerd.pid
}
trap cleanup EXIT
# The wasmtime host (tests/wasm-host: wasmtime and cranelift, about half of all the compiling)
# builds in the background from the start, in its own target directory (its features differ)
# and process group, only on CPU time nothing else wants (SCHED_IDLE; nice 19 where that is
# refused): it uses what the set-up steps (waiting on the network), the other build and the
# end-to-end tests (mostly waiting on timed streams) leave idle. Its tests run last.
mkdir -p .run
if chrt --idle 0 true 2>/dev/null; then idle=(chrt --idle 0); else idle=(nice -n 19); fi
# Its own process group (job control on just for this), not its own session: a new session
# would be its own scheduling autogroup, sharing the CPU equally with everything else.
set -m
"${idle[@]}" cargo test -p wasm-host --no-run --target-dir target/wasm-host >.run/wasm-host-build.log 2>&1 &
host_build=$!
set +m
scripts/setup.sh
scripts/install-bench-deps.sh
scripts/install-deploy-deps.sh
echo "==> nginx-wasm (nginx + ngx_wasm_module: the e2e tests run on it too; ~8 min the first time, cached after)"
scripts/setup-nginx.sh
# Its tests fail rather than skip without it.
export EXO_LB_REQUIRE_NGINX=1
echo "==> clippy (the filter denies unwrap/expect/panic/indexing)"
cargo clippy --release --target wasm32-wasip1 -p exo-lb -- -D warnings
echo "==> the host self-tests' probe filter"
cargo build --release --target wasm32-wasip1 --manifest-path tests/wasm-host/fixtures/probe-filter/Cargo.toml
echo "==> tests"
# One build for all but the wasmtime host: with --workspace every crate sees one feature set of
# the shared dependencies (tokio, reqwest, ...), so none is compiled twice (the benchmark smoke
# run below reuses it too). The end-to-end tests start real Envoys and time streams: their
# harness runs them one at a time by itself (e2e::serial), so that a 2-core machine does not
# skew timings.
cargo test --workspace --exclude wasm-host --no-run
cargo test --workspace --exclude wasm-host
echo "==> the compiled filter in the wasmtime host (tests/wasm-host)"
if ! wait "$host_build"; then
  host_build=
  cat .run/wasm-host-build.log
  echo "building the wasmtime host failed (above)" >&2
  exit 1
fi
host_build=
cargo test -p wasm-host --target-dir target/wasm-host
echo "==> benchmark smoke run (nginx, plain Envoy and exo-lb on a short trace)"
scripts/bench-smoke.sh
