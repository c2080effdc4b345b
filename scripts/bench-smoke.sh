#!/usr/bin/env bash
# A short version of the benchmark (well under 3 minutes once built): every system on a short
# trace, one overhead round, the scale benchmark at 3 and 16 nodes. Exits non-zero if a system
# fails to start or dies, if any request fails, or if the harness breaks; prints one summary
# line ("bench: OK ..."). Needs nginx and wrk (scripts/bench.sh installs them) and Envoy + the
# filter (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nginx wrk; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
    echo "bench-smoke: $tool is missing (scripts/bench.sh installs it with apt-get)" >&2
    exit 1
  fi
done
# The same packages and targets as scripts/test.sh's `cargo test --workspace --exclude
# wasm-host`, so the same feature set: nothing is compiled again for the benchmark.
cargo build -q --workspace --exclude wasm-host --tests --bins
# The floor filter the scale benchmark compares exo-lb with.
cargo build -q --release --target wasm32-wasip1 --manifest-path bench/floor-filter/Cargo.toml --target-dir target
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
target/debug/exo-lb-bench all --no-tune --fail-on-errors --out "$out" \
  --time-scale 100 --requests 30 --utilizations 0.8 \
  --overhead-rounds 1 --overhead-seconds 2 --scale-nodes 3,16 --scale-rounds 1 --scale-seconds 2 \
  >"$out/stdout" 2>"$out/stderr" || {
  code=$?
  cat "$out/stderr" >&2
  tail -n 1 "$out/stdout"
  exit $code
}
test -s "$out/latency-u80.png" && test -s "$out/results.md"
echo "$(tail -n 1 "$out/stdout") [smoke $(($(date +%s) - start)) s]"
