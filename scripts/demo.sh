#!/usr/bin/env bash
# Sets up a fresh machine, then runs the demo: three simulated exo nodes on
# 127.0.0.11-13:52415, Envoy with exo-lb on 127.0.0.1:8000, and a streamed answer through it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --quiet -p e2e --bin exo-lb-demo
