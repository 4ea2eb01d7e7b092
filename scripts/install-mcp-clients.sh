#!/usr/bin/env bash
# The MCP clients tests/test_mcp_clients.py drives as subprocesses, each against an SDK-built
# MCP server behind the sidecar (the 2.x Python SDK is already in .venv from pyproject.toml):
#
#   .venv-mcp1/                          the latest mcp 1.x Python SDK, pinned below, in its own venv
#   tests/mcp_clients/ts/node_modules/   @modelcontextprotocol/sdk from the committed package-lock.json
#
# Idempotent and quick when done: each part has a stamp naming what it installed and is skipped
# when the stamp matches. Packages come from PyPI and the npm registry only. A part that cannot be
# installed says why and the other part is still tried; the exit status is then 1, and the tests of
# that client are skipped with the reason (tests/test_mcp_clients.py reads the stamps).
#
#   bash scripts/install-mcp-clients.sh [python1|ts]...   (default: both)
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
MCP1_VERSION=1.30.0   # `pip index versions mcp`: the newest 1.x release
MCP1_VENV=${MCP1_VENV:-.venv-mcp1}
TS_DIR=tests/mcp_clients/ts

install_python1() {
    local stamp="$MCP1_VENV/.installed-mcp-$MCP1_VERSION"
    [ -f "$stamp" ] && return 0
    echo "install-mcp-clients: mcp==$MCP1_VERSION into $MCP1_VENV"
    rm -rf "$MCP1_VENV"
    "$PYTHON" -m venv "$MCP1_VENV" &&
        "$MCP1_VENV/bin/python" -m pip install -q --disable-pip-version-check "mcp==$MCP1_VERSION" &&
        "$MCP1_VENV/bin/python" -c "import mcp.client.streamable_http" &&
        touch "$stamp"
}

install_ts() {
    local lock_sum stamp="$TS_DIR/node_modules/.installed-lock"
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "install-mcp-clients: node and npm are needed for the TypeScript SDK client" >&2
        return 1
    fi
    lock_sum=$(sha256sum "$TS_DIR/package-lock.json" | cut -d' ' -f1)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_sum" ] && return 0
    echo "install-mcp-clients: npm ci in $TS_DIR"
    (cd "$TS_DIR" && npm ci --no-audit --no-fund --loglevel=error) &&
        echo "$lock_sum" > "$stamp"
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(python1 ts)
# One install at a time: `make test` and pytest sessions started side by side in one tree both run this.
if command -v flock >/dev/null; then
    exec 9>".install-mcp-clients.lock"
    flock 9
fi
pids=()
for part in "${parts[@]}"; do
    case $part in python1|ts) ;; *) echo "usage: $0 [python1|ts]..." >&2; exit 2 ;; esac
    install_"$part" &  # the two installs download in parallel
    pids+=($!)
done
status=0
for i in "${!parts[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "install-mcp-clients: installing the ${parts[$i]} client failed (its tests will be skipped)" >&2
        status=1
    fi
done
exit $status
