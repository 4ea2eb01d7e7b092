"""Who is approving: an OIDC JWT checked against the approvers' JWKS (signature, iss, aud, exp).

The group claim is read from the verified claims only. Whether this approver may decide
on a given approval (group, never the requesting agent, distinct approvers) is decided in
:func:`sidecar.approvals.store.apply_verdict`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ..credentials.jwks import KeySource
from ..credentials.verify import TokenError, verify_with_source
from ..problems import Refusal
from ..secret import Secret

# OIDC providers sign ID and access tokens with RSA or EC keys; HMAC and none are refused by verify_jwt.
APPROVER_ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
MAX_GROUPS = 200


@dataclass(frozen=True)
class Approver:
    subject: str
    groups: tuple[str, ...]
    name: str | None = None


class ApproverVerifier:
    def __init__(self, keys: KeySource, *, issuer: str, audience: str, group_claim: str = "groups",
                 algorithms: Collection[str] = APPROVER_ALGORITHMS, leeway_seconds: float = 30.0) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.group_claim = group_claim
        self.algorithms = tuple(algorithms)
        self.leeway_seconds = leeway_seconds

    async def verify(self, token: Secret) -> Approver:
        try:
            claims = await verify_with_source(token.reveal(), self.keys, issuer=self.issuer, audience=self.audience,
                                              algorithms=self.algorithms, leeway=self.leeway_seconds)
        except TokenError as error:
            raise Refusal("unauthorized", f"approver token rejected: {error.reason}",
                          extra={"token_error": error.reason}) from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Refusal("unauthorized", "approver token rejected: no sub claim", extra={"token_error": "missing_claim"})
        name = claims.get("preferred_username") or claims.get("email")
        return Approver(subject=subject, groups=_groups(claims.get(self.group_claim)),
                        name=name if isinstance(name, str) else None)


def _groups(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(g for g in value[:MAX_GROUPS] if isinstance(g, str))
    return ()


def bearer_token(header: str | None) -> Secret:
    """The token of an ``Authorization: Bearer`` header, or an ``unauthorized`` refusal."""
    if not header:
        raise Refusal("unauthorized", "an approver bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Refusal("unauthorized", "the Authorization header must be 'Bearer <token>'",
                      headers={"WWW-Authenticate": "Bearer"})
    return Secret(value.strip())
