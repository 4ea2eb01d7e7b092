"""`agent-sidecar audit show`: columns at any event number, the full target as forwarded, and the
task's opening (declared intent, who opened it) first."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import EchoTool, open_task, sidecar_config, start_sidecar
from sidecar.audit import HashChainLog
from sidecar.cli import main

HEAD = re.compile(r"^(?P<stamp>\S+  #\d+)(?P<gap> +)(?P<head>[A-Z][A-Z.]+)")


def _decision(task: str, n: int, **request: Any) -> dict[str, Any]:
    return {"type": "decision", "task_id": task, "decision_id": f"d-{n}", "outcome": "allow", "route": "crm",
            "reasons": ["ok"], "input": {"request": {"method": "GET", "scheme": "http", "host": "127.0.0.1",
                                                     "port": 18080, "path": f"/crm/customers/{n}", "raw_query": "",
                                                     **request}}}


def test_columns_stay_apart_across_event_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = HashChainLog(tmp_path / "audit.jsonl")
    log.append({"type": "task.opened", "task_id": "t-1", "agent": "spiffe://a", "intent": "count to a thousand"})
    for n in range(1, 1003):  # the task's events run from #1 past #999 into #1000 and beyond
        log.append(_decision("t-1" if n in (5, 99, 999, 1000, 1001) else "t-other", n))
    log.close()
    assert main(["audit", "show", "--task", "t-1", str(tmp_path / "audit.jsonl")]) == 0
    out = capsys.readouterr().out
    heads = [m for m in (HEAD.match(line) for line in out.splitlines()) if m]
    assert [m["stamp"].rsplit("#", 1)[1] for m in heads] == ["0", "5", "99", "999", "1000", "1001"]
    assert {m.start("head") for m in heads} == {heads[0].start("head")}  # one column for every head
    assert all(len(m["gap"]) >= 2 for m in heads)
    assert "#1000DECISION" not in out and "#1000  DECISION" in out
    detail_lines = [line for line in out.splitlines() if line.strip().startswith("decision d-")]
    assert {len(line) - len(line.lstrip()) for line in detail_lines} == {heads[0].start("head")}


def test_the_target_is_printed_in_full(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = HashChainLog(tmp_path / "audit.jsonl")
    log.append(_decision("t-1", 1, scheme="https", host="crm.internal", port=8443, path="/v2/customers",
                         raw_query="limit=500&cursor=abc"))
    log.append(_decision("t-1", 2, host="::1", port=80, path="/x", raw_query=""))
    log.close()
    assert main(["audit", "show", "--task", "t-1", str(tmp_path / "audit.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "GET https://crm.internal:8443/v2/customers?limit=500&cursor=abc" in out
    assert "GET http://[::1]:80/x\n" in out
    assert "(no task.opened event in these files)" in out


async def test_a_sidecar_records_who_opened_a_task_and_show_opens_with_it(
        tmp_path: Path, echo_tool: EchoTool, capsys: pytest.CaptureFixture[str]) -> None:
    sc = await start_sidecar(tmp_path, sidecar_config(tmp_path, echo_tool.base))
    try:
        task = await open_task(sc.admin, intent="look up customer 42 and their open invoices", ttl_seconds=600)
        async with httpx.AsyncClient() as agent:
            response = await agent.get(f"{sc.proxy}/crm/customers/42?fields=name,email&limit=5",
                                       headers={"X-Agent-Task": task})
        assert response.status_code == 200, response.text
    finally:
        await sc.sidecar.stop()  # flushes the audit log
    assert main(["audit", "show", "--task", task, str(sc.audit_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"Task {task}"
    assert lines[1] == '  intent    "look up customer 42 and their open invoices"'
    assert re.match(r"^  opened    \S+ by spiffe://test/ns/agents/sa/agent-under-test, ttl 600 s$", lines[2])
    first = next(line for line in lines[3:] if HEAD.match(line))
    assert first.endswith("TASK      OPENED")
    assert f"GET http://127.0.0.1:{echo_tool.port}/crm/customers/42?fields=name,email&limit=5" in out
