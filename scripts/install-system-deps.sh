#!/usr/bin/env bash
# Debian packages the test suite needs (curl as a real agent-side client; more as issues land).
# Idempotent: installs only what is missing. Servers are started by the tests, on loopback only.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
