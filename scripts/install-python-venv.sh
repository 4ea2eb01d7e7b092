#!/usr/bin/env bash
# Debian's python3.X lacks ensurepip until python3.X-venv is installed; `python -m venv` needs it.
set -euo pipefail
python="${1:-python3.11}"
version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "python${version}-venv"
