"""Every credential the agent sends is stripped by default: the fixed three and the conventional list.

Real calls through a running sidecar to a recording upstream; a route passes a conventional
credential header through only when its config says so (``credential.pass_headers``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from harness import SidecarFactory
from harness import EchoTool, sidecar_config, start_sidecar
from sidecar.config import (CONVENTIONAL_CREDENTIAL_HEADERS, DEFAULT_CREDENTIAL_HEADERS, ConfigError,
                            load_config)

# One value per header name, each recognisable in the upstream's record and in the audit log.
SENT = {name: f"agent-secret-{index:02d}" for index, name in enumerate(DEFAULT_CREDENTIAL_HEADERS)
        if name != "proxy-authorization"}  # hop-by-hop: httpx would not send it as a plain header anyway


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        # No strip_headers: the conventional list alone must keep every credential away from the tool.
        {"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": f"{upstream}/crm"},
        {"name": "maps", "match": {"path_prefix": "/maps"}, "upstream": f"{upstream}/maps",
         "credential": {"pass_headers": ["X-Goog-Api-Key", "x-api-key"]}},
    ]


def _headers_sent(names: dict[str, str]) -> dict[str, str]:
    return {name.title(): value for name, value in names.items()}


def _decision_headers(audit_path: Path) -> list[dict[str, str]]:
    events = [json.loads(line) for line in audit_path.read_text().splitlines()]
    return [e["input"]["request"]["headers"] for e in events if e.get("type") == "decision"]


async def test_conventional_credential_headers_never_reach_the_upstream(tmp_path: Path, echo_tool: EchoTool) -> None:
    running = await start_sidecar(tmp_path, sidecar_config(tmp_path, echo_tool.base, routes=routes(echo_tool.base)))
    try:
        async with httpx.AsyncClient() as agent:
            response = await agent.get(f"{running.proxy}/crm/customers/1",
                                       headers={**_headers_sent(SENT), "X-Keep-Me": "yes"})
    finally:
        await running.sidecar.stop()  # flushes the audit log
    assert response.status_code == 200, response.text
    [seen] = echo_tool.seen
    leaked = [name for name in seen.headers if name in SENT and SENT[name] in seen.headers[name]]
    assert leaked == []
    assert not any(value.startswith("agent-secret") for values in seen.headers.values() for value in values)
    assert seen.headers["authorization"][0].startswith("Bearer ey")  # the minted credential, not the agent's
    assert seen.headers["x-keep-me"] == ["yes"]
    [policy_saw] = _decision_headers(running.audit_path)
    assert not set(SENT) & set(policy_saw)  # the policy input carries no credential either


async def test_a_route_passes_through_only_what_it_names(make_sidecar: SidecarFactory, echo_tool: EchoTool) -> None:
    running = await make_sidecar(routes=routes(echo_tool.base))
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{running.proxy}/maps/geocode?q=paris", headers=_headers_sent(SENT))
    assert response.status_code == 200, response.text
    [seen] = echo_tool.seen
    assert seen.headers["x-goog-api-key"] == [SENT["x-goog-api-key"]]
    assert seen.headers["x-api-key"] == [SENT["x-api-key"]]
    others = set(SENT) - {"x-goog-api-key", "x-api-key"}
    assert not others & set(seen.headers) - {"authorization"}
    assert seen.headers["authorization"][0].startswith("Bearer ey")


async def test_a_conventional_credential_sent_twice_is_refused(make_sidecar: SidecarFactory,
                                                               echo_tool: EchoTool) -> None:
    running = await make_sidecar(routes=routes(echo_tool.base))
    async with httpx.AsyncClient() as agent:
        response = await agent.get(f"{running.proxy}/crm/customers/1",
                                   headers=[("X-Auth-Token", "a"), ("X-Auth-Token", "b")])
    assert response.status_code == 400
    assert response.json()["code"] == "credential_header"
    assert echo_tool.seen == []


def test_the_list_covers_the_usual_suspects() -> None:
    for name in ("x-api-key", "api-key", "x-auth-token", "x-access-token", "x-amz-security-token",
                 "x-goog-api-key", "ocp-apim-subscription-key"):
        assert name in CONVENTIONAL_CREDENTIAL_HEADERS
    assert {"authorization", "proxy-authorization", "cookie"} <= set(DEFAULT_CREDENTIAL_HEADERS)


@pytest.mark.parametrize("credential, error", [
    ({"pass_headers": ["Authorization"]}, "Authorization is not one of the conventional credential headers"),
    ({"pass_headers": ["X-Custom"]}, "X-Custom is not one of the conventional credential headers"),
    ({"pass_headers": "X-Api-Key"}, "must be a list of header names"),
    ({"header": "X-Api-Key", "pass_headers": ["X-Api-Key"]}, "X-Api-Key is also the route's credential header"),
    ({"strip_headers": ["X-Api-Key"], "pass_headers": ["x-api-key"]}, "x-api-key is also the route's credential header"),
])
def test_pass_headers_errors_name_the_key(tmp_path: Path, credential: dict[str, Any], error: str) -> None:
    config = sidecar_config(tmp_path, "http://127.0.0.1:9")
    config["routes"][1]["credential"] = credential
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"sidecar.yaml: routes[1].credential.pass_headers: {error}")
