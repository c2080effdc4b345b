#!/usr/bin/env bash
# Installs what the deployment tests need (docker-compose demo, a real Prometheus): Debian's
# docker.io (for the daemon, dockerd), docker-compose and prometheus, and starts dockerd if no
# daemon answers (its pid goes to .run/dockerd.pid so that the caller can stop it; its log to
# .run/dockerd.log).
# Best effort: where something cannot be installed or started, this says why, and the tests
# that need it say SKIPPED and why.
set -uo pipefail
cd "$(dirname "$0")/.."

# The daemon, not the client: a docker client alone (e.g. /usr/local/bin/docker) cannot run the
# demo, and Debian's docker.io is what brings dockerd (and containerd, runc, iptables).
have_dockerd() { command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || [ -x /usr/bin/dockerd ]; }
have_compose() { command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; }

need=()
have_dockerd || need+=(docker.io)
have_compose || need+=(docker-compose)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]} (Debian)"
  apt-cache policy "${need[0]}" 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" \
    || echo "warning: could not install ${need[*]}"
fi

PATH=$PATH:/usr/sbin:/sbin
if docker info >/dev/null 2>&1; then
  echo "==> a docker daemon is running"
elif ! have_dockerd; then
  echo "warning: no dockerd (docker.io did not install): the docker-compose demo test will be skipped"
else
  mkdir -p .run
  start_dockerd() {
    echo "==> starting dockerd $*"
    dockerd "$@" >.run/dockerd.log 2>&1 &
    echo $! >.run/dockerd.pid
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && return 0
      kill -0 "$(cat .run/dockerd.pid)" 2>/dev/null || break
      sleep 0.5
    done
    kill "$(cat .run/dockerd.pid)" 2>/dev/null
    wait "$(cat .run/dockerd.pid)" 2>/dev/null
    rm -f .run/dockerd.pid
    return 1
  }
  # Where the kernel has no netfilter (some VMs and containers), dockerd cannot set up its NAT
  # rules; published ports still work through its userland proxy without them.
  if ! start_dockerd && ! start_dockerd --iptables=false --ip6tables=false; then
    echo "warning: dockerd did not start, so the docker-compose demo test will be skipped; its log (.run/dockerd.log) ends:"
    tail -n 15 .run/dockerd.log | sed 's/^/    /'
  fi
fi
exit 0
