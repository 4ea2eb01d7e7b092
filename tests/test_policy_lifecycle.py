"""Issue 19, live reload: a running sidecar follows its policy directory without dropping a call, every
decision names the revision that made it, and a change that fails a check is refused while the last good
policy keeps deciding (logged, audited, counted, shown on /readyz as a non-fatal check)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import ApproverIdP, audit_events, eventually
from harness import FIXTURE_POLICY, EchoTool, RunningSidecar, sidecar_config, start_sidecar
from sidecar.policy.loader import content_revision, read_policy_files
from sidecar.policy.wiring import reload_on_sighup

FIXTURE_MODULE = Path("sidecar") / "authz" / "fixture.rego"
READ_REASON = "fixture: reads are allowed"


def revision_of(directory: Path) -> str:
    return content_revision(read_policy_files(directory))


def write_version(directory: Path, tag: str) -> None:
    """The fixture policy with its read reason tagged, so each decision shows which policy made it."""
    if not directory.exists():
        shutil.copytree(FIXTURE_POLICY, directory)
    source = (FIXTURE_POLICY / FIXTURE_MODULE).read_text()
    replace_file(directory / FIXTURE_MODULE, source.replace(f'"{READ_REASON}"', f'"{READ_REASON} ({tag})"'))


def replace_file(path: Path, text: str) -> None:
    """Atomically, as git checkouts and editors do: a watcher never reads half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume: every visible entry is a symlink
    through ``..data``, itself a symlink to a timestamped directory; an update swaps ``..data`` atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.versions = 0

    def publish(self, tag: str) -> str:
        self.versions += 1
        target = self.root / f"..2026_11_27_{self.versions:02d}"
        write_version(target, tag)
        staging = self.root / "..data_tmp"
        staging.symlink_to(target.name)
        os.replace(staging, self.root / "..data")  # the atomic swap
        for entry in os.listdir(target):
            link = self.root / entry
            if not link.is_symlink():
                link.symlink_to(Path("..data") / entry)
        return revision_of(self.root)


async def policy_state(sc: RunningSidecar) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.admin}/v1/policy")
    assert response.status_code == 200
    state: dict[str, Any] = response.json()
    return state


async def readiness(sc: RunningSidecar) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.metrics}/readyz")
    return response.status_code, response.json()


async def metric(sc: RunningSidecar, series: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{sc.metrics}/metrics")).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def decisions(sc: RunningSidecar) -> list[dict[str, Any]]:
    return [e for e in audit_events(sc.audit_path) if e.get("type") == "decision"]


def revision_in(event: dict[str, Any]) -> str:
    bundles = event["bundles"]
    assert list(bundles) == ["authz"], bundles
    revision: str = bundles["authz"]["revision"]
    return revision


class Sidecars:
    def __init__(self, tmp_path: Path, upstream: str) -> None:
        self.tmp_path = tmp_path
        self.upstream = upstream
        self.running: list[RunningSidecar] = []

    async def __call__(self, policy_dir: Path, **policy: Any) -> RunningSidecar:
        config = sidecar_config(self.tmp_path, self.upstream, policy_dir=policy_dir)
        config["policy"].update({"reload_seconds": 0.1, **policy})
        sc = await start_sidecar(self.tmp_path, config)
        self.running.append(sc)
        return sc

    async def stop(self, sc: RunningSidecar) -> None:
        """Stop (which flushes the audit log) before reading the chain."""
        self.running.remove(sc)
        await sc.sidecar.stop()


@pytest.fixture
async def running(tmp_path: Path, echo_tool: EchoTool) -> AsyncIterator[Sidecars]:
    sidecars = Sidecars(tmp_path, echo_tool.base)
    yield sidecars
    for sc in list(sidecars.running):
        await sidecars.stop(sc)


async def test_a_configmap_swap_under_steady_load_loses_no_call_and_each_decision_names_its_revision(
        tmp_path: Path, running: Sidecars, echo_tool: EchoTool) -> None:
    volume = ConfigMapVolume(tmp_path / "policies")
    first = volume.publish("v1")
    sc = await running(volume.root)
    assert (await policy_state(sc))["revision"] == first

    statuses: list[int] = []
    swapped = asyncio.Event()
    after_swap = 0

    async def agent(client: httpx.AsyncClient, n: int) -> None:
        nonlocal after_swap
        i = 0
        while not swapped.is_set() or after_swap < 40:
            response = await client.get(f"{sc.proxy}/crm/customers/{n}-{i}")
            statuses.append(response.status_code)
            if swapped.is_set():
                after_swap += 1
            i += 1

    async with httpx.AsyncClient(timeout=30) as client:
        agents = [asyncio.create_task(agent(client, n)) for n in range(8)]
        await eventually(lambda: _at_least(statuses, 40), what="calls before the change")
        second = volume.publish("v2")
        assert second != first

        async def live_revision() -> bool:
            return bool((await policy_state(sc))["revision"] == second)

        await eventually(live_revision, what="the new revision deciding")
        swapped.set()
        await asyncio.gather(*agents)

    await running.stop(sc)
    assert statuses and set(statuses) == {200}, {s for s in statuses if s != 200}
    assert len(echo_tool.seen) == len(statuses)  # every call reached the tool: none lost, none refused
    events = decisions(sc)
    assert len(events) == len(statuses)
    by_revision: dict[str, set[str]] = {}
    for event in events:
        by_revision.setdefault(revision_in(event), set()).update(event["reasons"])
    # Each decision names exactly the policy that made it: v1's reason only under v1's revision, and so on.
    assert by_revision == {first: {f"{READ_REASON} (v1)"}, second: {f"{READ_REASON} (v2)"}}
    reloads = [e for e in audit_events(sc.audit_path) if e.get("type") == "policy.reload"]
    assert [(e["result"], e["previous_revision"], e["revision"]) for e in reloads] == [("loaded", first, second)]


async def _at_least(items: list[int], count: int) -> bool:
    return len(items) >= count


async def test_a_broken_policy_file_is_refused_and_the_last_good_policy_keeps_deciding(
        tmp_path: Path, running: Sidecars, caplog: pytest.LogCaptureFixture) -> None:
    policy = tmp_path / "rego"
    write_version(policy, "good")
    good = revision_of(policy)
    sc = await running(policy)

    module = policy / FIXTURE_MODULE
    replace_file(module, module.read_text() + "\ndecision := {\n")  # a syntax error
    broken = revision_of(policy)

    async def refused() -> dict[str, Any] | None:
        state = await policy_state(sc)
        return state if state["last_reload"]["result"] == "refused" else None

    state = await eventually(refused, what="the broken change refused")
    assert state["revision"] == good and state["last_reload"]["revision"] == broken
    assert "fixture.rego" in state["last_reload"]["error"]

    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sc.proxy}/crm/customers/1")
    assert response.status_code == 200

    status, report = await readiness(sc)
    assert status == 200 and report["ready"] is True  # non-fatal: still ready, the good policy decides
    assert report["warnings"] == ["policy_reload"] and "policy_reload" not in report["failing"]
    check = report["checks"]["policy_reload"]
    assert check["ok"] is False and check["fatal"] is False and good in check["detail"] and broken in check["detail"]
    assert await metric(sc, 'agent_sidecar_policy_reload_total{result="refused"}') == 1
    assert await metric(sc, f'agent_sidecar_policy_info{{bundle="authz",revision="{good}"}}') == 1

    # Polling on: the same broken content is tried once, logged once, whatever the number of polls.
    polls_later = await policy_state(sc)
    assert polls_later["last_reload"]["revision"] == broken
    assert sum("policy change refused" in r.getMessage() for r in caplog.records) == 1

    write_version(policy, "fixed")  # the fix
    fixed = revision_of(policy)

    async def loaded() -> bool:
        return bool((await policy_state(sc))["revision"] == fixed)

    await eventually(loaded, what="the fixed policy loaded")
    status, report = await readiness(sc)
    assert status == 200 and "warnings" not in report and report["checks"]["policy_reload"]["ok"] is True

    await running.stop(sc)
    events = audit_events(sc.audit_path)
    reloads = [(e["result"], e["revision"], e["active_revision"]) for e in events if e.get("type") == "policy.reload"]
    assert reloads == [("refused", broken, good), ("loaded", fixed, fixed)]
    assert revision_in(decisions(sc)[0]) == good


async def test_a_change_whose_own_rego_tests_fail_is_refused(tmp_path: Path, running: Sidecars) -> None:
    policy = tmp_path / "rego"
    write_version(policy, "good")
    (policy / "sidecar" / "authz" / "fixture_test.rego").write_text(
        "package sidecar.authz\n\nimport rego.v1\n\n"
        "test_reads_allowed if decision.allow with input as {\"request\": {\"method\": \"GET\", \"path\": \"/x\"}, "
        "\"tool\": {\"route\": \"crm\"}}\n")
    good = revision_of(policy)
    sc = await running(policy)
    assert (await policy_state(sc))["revision"] == good

    module = policy / FIXTURE_MODULE
    replace_file(module, module.read_text().replace('"allow": true, "require_approval": false',
                                                    '"allow": false, "require_approval": false'))

    async def refused() -> dict[str, Any] | None:
        state = await policy_state(sc)
        return state if state["last_reload"]["result"] == "refused" else None

    state = await eventually(refused, what="the change with a failing test refused")
    assert state["revision"] == good
    assert "Rego tests fail" in state["last_reload"]["error"] and "test_reads_allowed" in state["last_reload"]["error"]


async def test_post_reload_needs_an_approver_and_sighup_forces_a_reload(tmp_path: Path, echo_tool: EchoTool) -> None:
    idp = ApproverIdP(tmp_path)
    policy = tmp_path / "rego"
    write_version(policy, "v1")
    config = sidecar_config(tmp_path, echo_tool.base, policy_dir=policy, approvals=idp.config())
    config["policy"]["reload_seconds"] = 0  # no polling: only a forced reload picks a change up
    sc = await start_sidecar(tmp_path, config)
    try:
        write_version(policy, "v2")
        second = revision_of(policy)
        async with httpx.AsyncClient() as client:
            anonymous = await client.post(f"{sc.admin}/v1/policy/reload")
            assert anonymous.status_code == 401
            assert anonymous.headers["content-type"].startswith("application/problem+json")
            assert (await policy_state(sc))["revision"] != second
            token = idp.token("alice@example.com", ["security"])
            forced = await client.post(f"{sc.admin}/v1/policy/reload", headers={"Authorization": f"Bearer {token}"})
        assert forced.status_code == 200, forced.text
        assert forced.json()["result"] == "loaded" and forced.json()["active_revision"] == second

        write_version(policy, "v3")
        third = revision_of(policy)
        loop = asyncio.get_running_loop()
        assert reload_on_sighup(loop, sc.sidecar.path.decider.engine)  # what serve() installs
        try:
            os.kill(os.getpid(), signal.SIGHUP)

            async def loaded() -> bool:
                return bool((await policy_state(sc))["revision"] == third)

            await eventually(loaded, what="the signalled reload")
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
    finally:
        await sc.sidecar.stop()
    reloads = [e for e in audit_events(sc.audit_path) if e.get("type") == "policy.reload"]
    assert [(e["cause"], e.get("by")) for e in reloads] == [("api", "alice@example.com"), ("signal", None)]


async def test_a_call_in_flight_finishes_on_the_pool_it_started_on_which_closes_once_drained(tmp_path: Path) -> None:
    from harness import ROOT
    from sidecar.policy.live import LivePolicy
    from sidecar.policy.source import DirectorySource

    policy = tmp_path / "slow"
    shutil.copytree(ROOT / "tests" / "policies" / "slow", policy)
    module = policy / "sidecar" / "authz" / "slow.rego"
    module.write_text(module.read_text().replace("1050000", "400000"))  # a runaway of a second or two, not more
    first = revision_of(policy)
    live = LivePolicy(DirectorySource(policy), workers=1, spare_engines=0)
    old_pool = live._current.engine
    runaway = asyncio.create_task(live.evaluate_with_provenance(
        "sidecar/authz/decision", {"request": {"method": "GET", "path": "/runaway"}}))

    async def started() -> bool:
        return live._current.in_flight == 1

    await eventually(started, what="the runaway evaluation under way")
    replace_file(module, module.read_text().replace("slow fixture: reads are allowed", "slow fixture: reads are allowed (v2)"))
    result = await live.reload(force=True, cause="test")
    assert result.result == "loaded" and result.revision != first
    fresh = await live.evaluate_with_provenance("sidecar/authz/decision", {"request": {"method": "GET", "path": "/x"}})
    assert fresh.bundles == {"authz": result.revision} and fresh.result["reasons"] == ["slow fixture: reads are allowed (v2)"]
    assert not runaway.done() and live._draining and old_pool._idle == []  # the old pool is still evaluating

    finished = await runaway
    assert finished.bundles == {"authz": first}
    assert finished.result["reasons"] == ["slow fixture: finished the runaway evaluation"]
    assert live._draining == [] and old_pool._closed  # closed by its last caller
    await live.close()


def test_audit_show_prints_the_revision_that_decided(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.audit import HashChainLog
    from sidecar.cli import main

    log = HashChainLog(tmp_path / "audit.jsonl")
    log.append({"type": "decision", "task_id": "t-1", "decision_id": "d-1", "outcome": "allow", "route": "crm",
                "reasons": ["ok"], "bundles": {"authz": {"revision": "git-4f2a9c1"}},
                "input": {"request": {"method": "GET", "scheme": "http", "host": "crm", "port": 80, "path": "/x"}}})
    log.close()
    assert main(["audit", "show", "--task", "t-1", str(tmp_path / "audit.jsonl")]) == 0
    assert "policy authz git-4f2a9c1" in capsys.readouterr().out


async def test_a_directory_change_is_taken_once_two_polls_read_the_same_content(tmp_path: Path) -> None:
    from sidecar.policy.live import LivePolicy
    from sidecar.policy.source import DirectorySource

    policy = tmp_path / "rego"
    write_version(policy, "v1")
    live = LivePolicy(DirectorySource(policy))
    try:
        first = live.revision
        write_version(policy, "v2")  # a change written in two steps: first the module...
        assert (await live.reload(force=False, cause="watch")).result == "unchanged"  # read once: settling
        replace_file(policy / "sidecar" / "authz" / "extra.rego", "package sidecar.extra\n\nx := 1\n")  # ...then a new file
        assert (await live.reload(force=False, cause="watch")).result == "unchanged"  # a new content again
        assert live.revision == first
        loaded = await live.reload(force=False, cause="watch")  # the same content twice in a row: taken
        assert loaded.result == "loaded" and live.revision == revision_of(policy) != first
    finally:
        await live.close()


async def test_a_source_put_back_to_the_deciding_revision_clears_the_refusal(tmp_path: Path) -> None:
    from sidecar.policy.live import LivePolicy
    from sidecar.policy.source import DirectorySource

    policy = tmp_path / "rego"
    write_version(policy, "v1")
    live = LivePolicy(DirectorySource(policy))
    try:
        good_source = (policy / FIXTURE_MODULE).read_text()
        replace_file(policy / FIXTURE_MODULE, good_source + "\ndecision := {\n")
        assert (await live.reload(force=True, cause="signal")).result == "refused"
        assert (await live.readiness())[0] is False
        replace_file(policy / FIXTURE_MODULE, good_source)  # the broken commit reverted
        back = await live.reload(force=True, cause="signal")
        assert back.result == "unchanged" and back.active_revision == live.revision
        assert (await live.readiness())[0] is True
    finally:
        await live.close()
