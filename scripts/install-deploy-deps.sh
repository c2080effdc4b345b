#!/usr/bin/env bash
# Installs what the deployment tests need (docker-compose demo, a real Prometheus): Debian's
# docker.io, docker-compose and prometheus, the musl Rust target for the static node image, and
# starts dockerd if none runs (its pid goes to .run/dockerd.pid so that the caller can stop it).
# Best effort: where something cannot be installed or started, the tests that need it say
# SKIPPED and why.
set -uo pipefail
cd "$(dirname "$0")/.."
need=()
command -v docker >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]} (Debian)"
  apt-cache policy "${need[0]}" 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" || echo "warning: could not install ${need[*]}"
fi
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl || true
if command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  echo "==> starting dockerd"
  mkdir -p .run
  dockerd >.run/dockerd.log 2>&1 &
  echo $! > .run/dockerd.pid
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || echo "warning: dockerd did not start (see .run/dockerd.log)"
fi
exit 0
