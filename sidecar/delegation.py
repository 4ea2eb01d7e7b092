"""X-Agent-Delegation: a parent agent's sidecar-minted credential, passed on by a child agent.

The credential is verified against the trusted JWKS of the parent sidecars
(signature, iss, aud, exp). Its ``act`` chain and its ``sub`` become the
delegation chain the policy sees (oldest actor first, the direct parent last)
and the child's minted credential nests it in its own ``act`` claim. A header
that cannot be verified refuses the call: it is never silently ignored.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .credentials.jwks import KeySource, verify_with_source
from .credentials.verify import SIDECAR_ALGORITHMS, TokenError
from .problems import Refusal

LINK_CLAIMS = ("iss", "jti", "task_id", "decision_id", "aud", "scope")


class DelegationVerifier:
    def __init__(self, keys: KeySource | None, *, issuers: Collection[str] = (), audiences: Collection[str] = (),
                 max_depth: int = 8, leeway_seconds: float = 5.0) -> None:
        self.keys = keys
        self.issuers = tuple(issuers)
        self.audiences = tuple(audiences)
        self.max_depth = max_depth
        self.leeway_seconds = leeway_seconds

    async def chain(self, header: str | None) -> list[dict[str, Any]]:
        """The verified chain for this call; [] without the header; Refusal when it cannot be trusted."""
        if header is None:
            return []
        if self.keys is None:
            raise Refusal("delegation_invalid", "X-Agent-Delegation was sent but this sidecar trusts no delegation issuer")
        token = header[7:].strip() if header[:7].lower() == "bearer " else header.strip()
        try:
            claims = await verify_with_source(token, self.keys, issuer=self.issuers, audience=self.audiences,
                                              algorithms=SIDECAR_ALGORITHMS, leeway=self.leeway_seconds)
        except TokenError as error:
            raise Refusal("delegation_invalid", f"delegation credential refused ({error.reason}: {error.detail})") from None
        return self._links(claims)

    def _links(self, claims: dict[str, Any]) -> list[dict[str, Any]]:
        earlier: list[dict[str, Any]] = []
        act = claims.get("act")
        while act is not None:
            if not isinstance(act, dict) or not isinstance(act.get("sub"), str):
                raise Refusal("delegation_invalid", "delegation credential has a malformed act claim")
            earlier.append({"sub": act["sub"]})
            if len(earlier) >= self.max_depth:
                raise Refusal("delegation_invalid", f"delegation chain deeper than {self.max_depth}")
            act = act.get("act")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Refusal("delegation_invalid", "delegation credential has no sub claim")
        parent = {"sub": subject, **{name: claims[name] for name in LINK_CLAIMS if name in claims}}
        return [*reversed(earlier), parent]
