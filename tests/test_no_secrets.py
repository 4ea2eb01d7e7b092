"""No minted token and no static key in anything the sidecar writes: audit, logs, errors, metrics, state.

Real calls run through a sidecar with a JWT route and a static-key route; the tokens are captured where
they really go (the upstream tool), then every byte the sidecar wrote or answered is searched for them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from approvals_support import audit_events, eventually
from harness import SidecarFactory
from harness import EchoTool, RunningSidecar
from sidecar.audit import chain_files
from sidecar.cli import main

STATIC_KEY = "sk_live_STATIC_0123456789abcdefDEADBEEF"


def routes(upstream: str, key_file: Path) -> list[dict[str, object]]:
    return [
        {"name": "crm", "match": {"path_prefix": "/crm", "host": "crm.example.com"}, "upstream": f"{upstream}/crm",
         "credential": {"strip_headers": ["X-Api-Key"]}},
        {"name": "legacy", "match": {"path_prefix": "/legacy"}, "upstream": f"{upstream}/legacy",
         "credential": {"mode": "static", "static_key_file": str(key_file), "header": "X-Api-Key"}},
    ]


async def exercise(sc: RunningSidecar, echo_tool: EchoTool) -> tuple[list[str], list[bytes]]:
    """Allowed, denied, held, faulty and replayed calls; returns the minted tokens and every answer body."""
    bodies: list[bytes] = []
    async with httpx.AsyncClient() as agent:
        task = (await agent.post(f"{sc.admin}/v1/tasks", json={"intent": "secrets test", "ttl_seconds": 60})).json()["id"]
        for n in range(3):
            response = await agent.get(f"{sc.proxy}/crm/customers/{n}", headers={"X-Agent-Task": task})
            assert response.status_code == 200
            bodies.append(response.content)
        legacy = await agent.get(f"{sc.proxy}/legacy/report", headers={"X-Agent-Task": task})
        assert legacy.status_code == 200
        bodies.append(legacy.content)
        tokens = [s.headers["authorization"][0].removeprefix("Bearer ") for s in echo_tool.seen if "authorization" in s.headers]
        assert len(tokens) == 3 and all(t.count(".") == 2 for t in tokens)
        assert [s.headers["x-api-key"] for s in echo_tool.seen if s.path.startswith("/legacy")] == [[STATIC_KEY]]

        # The agent replays a minted token and the static key it should never have: refused or stripped, never echoed.
        stolen = {"Authorization": f"Bearer {tokens[0]}", "X-Api-Key": STATIC_KEY}
        refusals = [
            await agent.post(f"{sc.proxy}/crm/customers", json={"token": "x"}, headers=stolen),  # denied
            await agent.delete(f"{sc.proxy}/crm/customers/1", headers={**stolen, "X-Agent-Task": task}),  # held
            await agent.get(f"{sc.proxy}/crm/fault/malformed", headers=stolen),  # policy_unavailable
            await agent.get(f"{sc.proxy}/nowhere", headers=stolen),  # no_route
            await agent.get(f"{sc.proxy}/crm/x", headers={**stolen, "X-Agent-Task": "t-nope"}),  # unknown_task
            await agent.get(f"{sc.proxy}/crm/x", headers={**stolen, "X-Agent-Approval": "ap-nope"}),  # approval_invalid
            await agent.get(f"{sc.proxy}/legacy/report", headers=stolen),  # allowed: the agent's copy is stripped
        ]
        assert [r.status_code for r in refusals[:-1]] and all(r.status_code >= 400 for r in refusals[:-1])
        bodies += [r.content for r in refusals]
        bodies.append(b"".join(f"{k}: {v}".encode() for r in refusals for k, v in r.headers.items()))
        for url in (f"{sc.metrics}/metrics", f"{sc.metrics}/readyz", f"{sc.admin}/v1/tasks/{task}",
                    f"{sc.admin}/v1/approvals"):
            bodies.append((await agent.get(url)).content)
    return tokens, bodies


async def test_no_token_or_static_key_in_anything_written(make_sidecar: SidecarFactory, echo_tool: EchoTool,
                                                          tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "legacy.key"
    key_file.write_text(STATIC_KEY + "\n")
    sc = await make_sidecar(routes=routes(echo_tool.base, key_file))
    tokens, bodies = await exercise(sc, echo_tool)
    await eventually(lambda: _settled(sc, 13), what="every call's audit events")
    jtis = [e["jti"] for e in audit_events(sc.audit_path) if e.get("jti")]
    assert len(jtis) == 3  # the jti may appear, and does: it is how an investigator follows a credential

    task = next(e["task_id"] for e in audit_events(sc.audit_path) if e.get("task_id"))
    assert main(["audit", "show", "--task", task, str(sc.audit_path)]) == 0
    assert main(["audit", "verify", str(sc.audit_path)]) == 0

    written: dict[str, bytes] = {str(p): p.read_bytes() for p in chain_files(sc.audit_path)}
    for path in (tmp_path / "state").rglob("*"):  # stores, keys, anything else the sidecar wrote
        if path.is_file():
            written[str(path)] = path.read_bytes()
    written["caplog"] = caplog.text.encode()
    written["log records"] = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text}" for r in caplog.records).encode()
    captured = capsys.readouterr()
    written["stdout+stderr"] = (captured.out + captured.err).encode()
    for index, body in enumerate(bodies):
        written[f"answer {index}"] = body
    assert len(written["caplog"]) > 0 and any("audit" in name for name in written)

    secrets = {STATIC_KEY: "the static key"}
    for token in tokens:
        secrets[token] = "a minted token"
        secrets[token.rsplit(".", 1)[1]] = "a minted token's signature"
    for where, data in written.items():
        for secret, what in secrets.items():
            assert secret.encode() not in data, f"{what} found in {where}"


async def _settled(sc: RunningSidecar, count: int) -> bool:
    return len(audit_events(sc.audit_path)) >= count
