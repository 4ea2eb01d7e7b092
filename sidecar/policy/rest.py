"""An async client of OPA's REST Data API: ``POST /v1/data/<path>`` with ``{"input": ...}``."""

from __future__ import annotations

from typing import Any

import httpx

from ..jsoncodec import dumps_sorted
from .engine import Evaluation, PolicyError
from .transport import AiohttpTransport


class RestEngine:
    name = "rest"

    def __init__(self, base_url: str, *, timeout_seconds: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        # One pooled client: connections to the OPA container are reused across calls. The default
        # transport is aiohttp's client (transport.py: a quarter of httpcore's CPU per request).
        # trust_env=False: a proxy variable in the sidecar's environment must never reroute its
        # policy queries.
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds),
            transport=transport or AiohttpTransport(max_connections=64),
            headers={"content-type": "application/json"},
            trust_env=False,
        )

    async def evaluate(self, path: str, input_document: dict[str, Any]) -> Any:
        return (await self._query(path, input_document, provenance=False))["result"]

    async def evaluate_with_provenance(self, path: str, input_document: dict[str, Any]) -> Evaluation:
        """Asks with ``?provenance=true``: OPA answers with the revision of every bundle it has activated."""
        body = await self._query(path, input_document, provenance=True)
        return Evaluation(body["result"], _bundle_revisions(body.get("provenance")))

    async def _query(self, path: str, input_document: dict[str, Any], *, provenance: bool) -> dict[str, Any]:
        try:
            body = b'{"input":' + dumps_sorted(input_document) + b"}"
        except TypeError as exc:  # not JSON (a lone surrogate, an integer beyond 64 bits)
            raise PolicyError("error", f"the input is not JSON: {exc}") from None
        try:
            response = await self._client.post(f"/v1/data/{path}", content=body,
                                               params={"provenance": "true"} if provenance else None)
        except httpx.TimeoutException:
            raise PolicyError("timeout", "OPA did not answer in time") from None
        except httpx.HTTPError as exc:
            raise PolicyError("unreachable", f"OPA unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise PolicyError("error", f"OPA answered HTTP {response.status_code}: {_opa_error(response)}")
        try:
            body = response.json()
        except ValueError:
            raise PolicyError("malformed", "OPA answered with invalid JSON") from None
        if not isinstance(body, dict) or "result" not in body:
            raise PolicyError("undefined", f"data.{path.replace('/', '.')} is undefined")
        return body

    async def health(self) -> bool:
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        await self._client.aclose()


def _bundle_revisions(provenance: Any) -> dict[str, str]:
    """``provenance.bundles`` of OPA's answer: ``{name: {"revision": ...}}``; anything else names nothing."""
    bundles = provenance.get("bundles") if isinstance(provenance, dict) else None
    if not isinstance(bundles, dict):
        return {}
    return {str(name): str(entry.get("revision", "")) for name, entry in bundles.items() if isinstance(entry, dict)}


def _opa_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return "no error body"
    if isinstance(body, dict):
        return str(body.get("code", "")) + " " + str(body.get("message", ""))[:200]
    return "unexpected error body"
