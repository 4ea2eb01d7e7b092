"""One refused call with a body near limits.max_body_bytes leaves a last audit line longer than the
1 MiB that chain_tail reads back at start-up; the next start refuses the (intact) chain and the sidecar
cannot start again. The agent's bytes alone decide it: a denied call is the last event of the chain."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from approvals_support import audit_events, eventually
from harness import EchoTool, sidecar_config, start_sidecar
from sidecar.audit.chain import chain_files, verify_files


async def test_a_large_refused_body_does_not_stop_the_next_start(tmp_path: Path, echo_tool: EchoTool) -> None:
    sc = await start_sidecar(tmp_path, sidecar_config(tmp_path, echo_tool.base))
    limit = 1024 * 1024  # the harness's (and examples/sidecar.yaml's) limits.max_body_bytes
    body = json.dumps({"note": "x" * (limit - 64)}).encode()
    assert len(body) <= limit
    try:
        denied = await _send(sc.proxy, body)
        await eventually(lambda: _written(sc.audit_path), what="the deny decision in the audit log")
    finally:
        await sc.sidecar.stop()
    assert denied.status_code == 403 and denied.json()["code"] == "denied", denied.text

    result = verify_files(chain_files(sc.audit_path))
    assert result.ok, result  # the chain is intact
    last_line = sc.audit_path.read_bytes().splitlines()[-1]
    assert len(last_line) > 1 << 20  # what the agent made

    # The sidecar restarts (a pod restart, a rollout): it must extend the intact chain.
    again = await start_sidecar(tmp_path, sidecar_config(tmp_path, echo_tool.base))
    try:
        async with httpx.AsyncClient() as agent:
            response = await agent.get(f"{again.proxy}/crm/customers/42")
        assert response.status_code == 200, response.text
    finally:
        await again.sidecar.stop()


async def _send(proxy: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient() as agent:
        # A write without a task: denied by the policy; its decision event (with the body in its input) is the
        # last event written.
        return await agent.post(f"{proxy}/crm/customers", content=body, headers={"Content-Type": "application/json"})


async def _written(path: Path) -> bool:
    return any(e.get("type") == "decision" and e.get("outcome") == "deny" for e in audit_events(path))


@pytest.mark.parametrize("sizes", [(10, 5_000_000), (5_000_000, 10), (3, 70_000, 131_072, 3)])
def test_the_last_line_is_found_however_long_the_lines_are(tmp_path: Path, sizes: tuple[int, ...]) -> None:
    from sidecar.audit.chain import _last_event

    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(json.dumps({"n": n, "pad": "x" * size}).encode() + b"\n"
                              for n, size in enumerate(sizes)) + b"\n\n")
    last = _last_event(path)
    assert last is not None and last["n"] == len(sizes) - 1 and len(last["pad"]) == sizes[-1]
