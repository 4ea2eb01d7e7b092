"""Issue 19, policy.shadow: a candidate evaluated beside the live policy on real traffic, never enforced."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from approvals_support import audit_events, eventually
from harness import FIXTURE_POLICY, EchoTool, sidecar_config, start_sidecar
from sidecar.policy.live import LivePolicy


def strict_candidate(tmp: Path) -> Path:
    """The fixture policy, except that reads of /crm/customers/7 are denied."""
    directory = tmp / "candidate"
    module = directory / "sidecar" / "authz" / "fixture.rego"
    module.parent.mkdir(parents=True)
    source = (FIXTURE_POLICY / "sidecar" / "authz" / "fixture.rego").read_text()
    module.write_text(source.replace("special if contains(path, \"/fault/\")",
                                     "special if contains(path, \"/fault/\")\n\nspecial if endswith(path, \"/customers/7\")"))
    return directory


async def test_the_shadow_policy_is_audited_and_counted_never_enforced(tmp_path: Path, echo_tool: EchoTool) -> None:
    config = sidecar_config(tmp_path, echo_tool.base)
    config["policy"]["shadow"] = str(strict_candidate(tmp_path))
    sc = await start_sidecar(tmp_path, config)
    try:
        async with httpx.AsyncClient() as agent:
            for n in (1, 7, 2, 7):
                assert (await agent.get(f"{sc.proxy}/crm/customers/{n}")).status_code == 200  # the live policy rules
        assert len(echo_tool.seen) == 4
        shadow = sc.sidecar.path.decider.shadow
        assert shadow is not None
        await shadow.drain()  # type: ignore[attr-defined]

        async def differences() -> list[dict[str, Any]] | None:
            found = [e for e in audit_events(sc.audit_path) if e.get("type") == "policy.shadow"]
            return found if len(found) == 2 else None

        events = await eventually(differences, what="two policy.shadow events")
        decisions = {e["decision_id"]: e for e in audit_events(sc.audit_path) if e.get("type") == "decision"}
        engine = sc.sidecar.path.decider.engine
        assert isinstance(engine, LivePolicy)
        for event in events:
            assert (event["live"], event["shadow"]) == ("allow", "deny")
            assert event["shadow_reasons"] == ["fixture: nothing matched"]
            assert event["bundles"] == {"authz": {"revision": engine.revision}}
            assert event["shadow_bundle"]["shadow"]["revision"].startswith("sha256:")
            live = decisions[event["decision_id"]]
            assert live["input"]["request"]["path"].endswith("/customers/7") and live["outcome"] == "allow"
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{sc.metrics}/metrics")).text
        counts = dict(re.findall(r'^agent_sidecar_policy_shadow_total\{result="(\w+)"\} (\S+)$', text, re.M))
        assert counts == {"same": "2.0", "differs": "2.0", "error": "0.0", "dropped": "0.0"}
    finally:
        await sc.sidecar.stop()
