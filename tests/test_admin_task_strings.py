"""The admin API's task creation read its body with plain json.loads, so an intent, a label or an
allowed tool could hold what JSON cannot carry (a lone surrogate escape, an integer beyond 64 bits, NaN).
It now reads it as strictly as the proxy's door (sidecar/strictjson.py). Before:

The door of the proxy refuses such bodies (dde44d0), but the task's intent, labels and allowed_tools reach
the policy input of every later call of the task, the task.opened audit event and the task store:

- every call on the task is answered 503 policy_unavailable (orjson cannot write the input): not a 4xx;
- the task.opened event and each decision event are written as audit.unencodable stand-ins (the intent the
  chain opens with is lost);
- the task is stored by json.dumps's fallback (codec._dumps) as text orjson.loads cannot read: on Redis
  every call of the task is a 500 internal_error and GET /v1/tasks/{id} a bare 500.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from harness import EchoTool, SidecarFactory, RunningSidecar, start_sidecar
from task_concurrency_support import GateTool, deployment_config, tuned_policy

BODIES = [
    b'{"intent": "look up customer 42 \\ud800", "ttl_seconds": 600}',
    b'{"intent": "look up customer 42", "ttl_seconds": 600, "labels": {"ticket": "\\udc00"}}',
    b'{"intent": "look up customer 42", "ttl_seconds": 600, "allowed_tools": ["crm\\ud800"]}',
    b'{"intent": "look up customer 42", "ttl_seconds": 600, "labels": {"ticket": 123456789012345678901234567890}}',
    b'{"intent": "look up customer 42", "ttl_seconds": 600, "labels": {"budget": NaN}}',
    b'{"intent": "look up customer 42", "ttl_seconds": 600, "labels": {"deep": ' + b"[" * 300 + b"]" * 300 + b"}}",
    b'{"intent": "look up customer 42", "ttl_seconds": 600, "labels": {"deep": ' + b"[" * 20000 + b"]" * 20000 + b"}}",
]
IDS = ["intent-surrogate", "label-surrogate", "allowed-tool-surrogate", "label-int-beyond-64-bits", "label-nan", "label-nested-300",
       "label-nested-20000"]


async def _exercise(running: RunningSidecar, body: bytes, path: str, host: str | None) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        created = await client.post(f"{running.admin}/v1/tasks", content=body,
                                    headers={"Content-Type": "application/json"})
        if created.status_code != 201:
            # Refused at the admin door: a 4xx problem, nothing stored.
            assert 400 <= created.status_code < 500, created.text
            assert created.headers["content-type"].startswith("application/problem+json")
            return
        task = json.loads(created.content)["id"]
        headers = {"X-Agent-Task": task, **({"Host": host} if host else {})}
        call = await client.get(f"{running.proxy}{path}", headers=headers)
        assert call.status_code < 500, call.text  # a task the sidecar accepted never makes its calls 5xx
        shown = await client.get(f"{running.admin}/v1/tasks/{task}")
        assert shown.status_code == 200, shown.text
        orjson.loads(created.content)  # the admin API answers JSON (a lone surrogate, NaN are not)
        orjson.loads(shown.content)
    events: list[dict[str, Any]] = [json.loads(line) for line in running.audit_path.read_text().splitlines()]
    assert not [e for e in events if e.get("type") == "audit.unencodable"], events


@pytest.mark.parametrize("body", BODIES, ids=IDS)
async def test_a_task_the_admin_api_accepts_is_one_json_can_carry(
        make_sidecar: SidecarFactory, echo_tool: EchoTool, body: bytes) -> None:
    running = await make_sidecar()
    await _exercise(running, body, "/crm/customers", "crm.example.com")


async def test_a_task_with_a_lone_surrogate_in_its_intent_is_not_a_500_on_redis(
        tmp_path: Path, gate_tool: GateTool, redis_server: Any) -> None:
    config = deployment_config(tmp_path / "sidecar", gate_tool.base, tuned_policy(tmp_path), redis_server.url)
    running = await start_sidecar(tmp_path / "sidecar", config)
    try:
        await _exercise(running, BODIES[0], "/crm/customers", None)
    finally:
        await running.sidecar.stop()
