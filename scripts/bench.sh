#!/usr/bin/env bash
# The full benchmark of issue 5 (not part of CI; takes about 15-20 minutes): tunes exo-lb on one
# seed, then runs nginx, plain Envoy and Envoy + exo-lb (default and tuned) on the same trace and
# simulated cluster at 50/80/95% utilization, the wrk overhead benchmark and the scale benchmark.
# Writes docs/bench/results.md and the PNG charts; see docs/benchmarks.md.
#   scripts/bench.sh                 # everything, as reported in docs/benchmarks.md
#   scripts/bench.sh --no-tune       # keep bench/configs/tuned.json as it is
#   scripts/bench.sh latency --requests 60 --out /tmp/b   # one part, other sizes
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-bench-deps.sh
scripts/setup.sh
echo "==> building the benchmark"
cargo build -p exo-lb-bench
cargo build --release --target wasm32-wasip1 --manifest-path bench/floor-filter/Cargo.toml --target-dir target
BIN=target/debug/exo-lb-bench

if [ $# -eq 0 ] || [[ "$1" == --* ]]; then
  set -- all --time-scale 30 --seed 1 --tune-seed 2 --requests 120 --tune-requests 90 "$@"
fi
echo "==> $BIN $*"
exec "$BIN" "$@"
