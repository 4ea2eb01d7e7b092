"""What the pending-approval tests share: a held write, two replicas on one store, a gate that makes a race certain."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import APPROVAL_POLICY, ApproverIdP
from harness import RunningSidecar, SidecarFactory

CAP = 3  # approvals.max_pending_per_task in these tests


async def post_note(agent: httpx.AsyncClient, proxy: str, task: str | None, text: str,
                    **headers: str) -> httpx.Response:
    """A write the approvals policy holds; the body is what the agent varies."""
    task_header = {"X-Agent-Task": task} if task else {}
    return await agent.post(f"{proxy}/crm/notes", json={"text": text}, headers={**task_header, **headers})


def codes(answers: list[httpx.Response]) -> list[str]:
    return [a.json()["code"] for a in answers]


async def replicas(backend: str, make_sidecar: SidecarFactory, tmp_path: Path, idp: ApproverIdP,
                   request: pytest.FixtureRequest) -> list[RunningSidecar]:
    """One sidecar on SQLite, or two sidecars sharing one redis-server."""
    store: dict[str, Any] = {"backend": "sqlite"}
    if backend == "redis":
        store = {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url}
    return [await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config(max_pending_per_task=CAP),
                               store=store, state_dir=str(tmp_path / f"replica-{n}"))
            for n in range(2 if backend == "redis" else 1)]


class LookupsAtAGate:
    """An approval store whose first ``count`` binding lookups, once answered, all wait until the last of them
    is, so that that many identical held calls each find no pending approval and each try to file one: the race,
    made certain by a barrier rather than by timing."""

    def __init__(self, store: Any, arrived: list[int], everyone: asyncio.Event, count: int) -> None:
        self._store, self._arrived, self._everyone, self._count = store, arrived, everyone, count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def for_binding(self, binding: Any) -> Any:
        found = await self._store.for_binding(binding)
        if len(self._arrived) < self._count:
            self._arrived.append(1)
            if len(self._arrived) == self._count:
                self._everyone.set()
            await self._everyone.wait()
        return found
