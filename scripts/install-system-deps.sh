#!/usr/bin/env bash
# Debian packages the test suite needs. Idempotent: installs only what is missing.
# Servers are never started here: the tests start their own, on 127.0.0.1 only.
#   curl          a real agent-side client (curl -x)
#   redis-server  the shared approval/revocation/task store tests (started by tests/redis_server.py)
#   chromium      the approver page test (headless, driven by Playwright or Selenium)
#   prometheus    for promtool, which checks the /metrics exposition
#   nginx         the one-proxy-hop floor in the benchmark
#   wrk           the benchmark's closed-loop peak (bench/wrk.py)
#   iptables, iproute2  the iptables init script is run for real in a throw-away network namespace
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v promtool >/dev/null || need+=(prometheus)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || need+=(iptables)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
if ((${#need[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
  # Debian starts packaged services on install; nothing may listen but what the tests start.
  for service in redis-server nginx prometheus; do
    $SUDO systemctl stop "$service" 2>/dev/null || $SUDO service "$service" stop 2>/dev/null || true
  done
  pkill -x prometheus 2>/dev/null || true
fi
