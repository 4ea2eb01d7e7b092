"""The one place the sidecar verifies a JWT it did not just mint.

Used for workload identity tokens, delegation credentials, introspection,
approver tokens and by the tool-side verifier. The rules, in order:

- the header names an asymmetric algorithm from ``algorithms`` (``none`` and
  every HMAC algorithm are refused whatever the caller allows: an HS256 token
  "signed" with a public key must never verify);
- the header names a ``kid`` found in the key set (a set of exactly one key
  also accepts a token without a kid), and the key's type and ``alg`` fit the
  token's algorithm;
- the signature verifies, ``exp`` is present and in the future, ``nbf`` and
  ``iat`` are not in the future (``leeway`` seconds of clock skew), ``iss`` and
  ``aud`` match when the caller names them.

Every failure raises :class:`TokenError` with a short stable ``reason``; the
token itself never appears in any message.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any, Protocol

import jwt
from jwt.exceptions import InvalidTokenError, PyJWKError

ASYMMETRIC = frozenset({"ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
SIDECAR_ALGORITHMS = ("ES256", "EdDSA")
# Kubernetes service-account tokens are RS256; SPIFFE JWT-SVIDs are RS256, ES256 or PS256.
WORKLOAD_ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")

_KEY_TYPES = {"ES": "EC", "RS": "RSA", "PS": "RSA", "Ed": "OKP"}
MAX_TOKEN_BYTES = 16 * 1024


class TokenError(Exception):
    """A token that must not be trusted. ``reason`` is a stable code; ``detail`` never holds the token."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class JwksUnavailable(Exception):
    """A key set that could not be read or fetched; the message names the source, never a secret."""


class KeySource(Protocol):
    """Where a trusted JWK Set comes from (file, URL, memory): see sidecar.credentials.jwks."""

    async def keys(self, *, force: bool = False) -> dict[str, Any]: ...

    @property
    def name(self) -> str: ...


def unverified_header(token: str) -> dict[str, Any]:
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("malformed", f"token longer than {MAX_TOKEN_BYTES} bytes")
    try:
        header = jwt.get_unverified_header(token)
    except InvalidTokenError:
        raise TokenError("malformed", "not a compact JWS") from None
    return header


def _select_key(header: Mapping[str, Any], jwks: Mapping[str, Any]) -> Mapping[str, Any]:
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise TokenError("no_keys", "the key set has no keys member")
    candidates = [k for k in keys if isinstance(k, dict) and k.get("use", "sig") == "sig"]
    kid = header.get("kid")
    if kid is None:
        if len(candidates) != 1:
            raise TokenError("unknown_kid", "the token names no kid and the key set has more than one key")
        return candidates[0]
    for key in candidates:
        if key.get("kid") == kid:
            return key
    raise TokenError("unknown_kid", "no key in the trusted key set has this kid")


def _check_key_fits(algorithm: str, jwk: Mapping[str, Any]) -> None:
    expected_type = _KEY_TYPES[algorithm[:2]]
    if jwk.get("kty") != expected_type:
        raise TokenError("wrong_key_type", f"{algorithm} needs a {expected_type} key, the key is {jwk.get('kty')}")
    if "alg" in jwk and jwk["alg"] != algorithm:
        raise TokenError("algorithm_mismatch", f"the key is for {jwk['alg']}, the token says {algorithm}")


def verify_jwt(
    token: str,
    jwks: Mapping[str, Any],
    *,
    issuer: str | Collection[str] | None,
    audience: str | Collection[str] | None,
    algorithms: Collection[str] = SIDECAR_ALGORITHMS,
    leeway: float = 0,
) -> dict[str, Any]:
    """Verify ``token`` against the JWK Set ``jwks``; return its claims or raise TokenError.

    ``issuer`` / ``audience`` of None skip that check (callers say so on purpose);
    a collection accepts any of its members.
    """
    header = unverified_header(token)
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in ASYMMETRIC or algorithm not in algorithms:
        raise TokenError("algorithm_not_allowed", f"algorithm {str(algorithm)[:16]!r} is not accepted")
    if header.get("crit"):
        raise TokenError("malformed", "critical header parameters are not understood")
    jwk = _select_key(header, jwks)
    _check_key_fits(algorithm, jwk)
    try:
        key = jwt.PyJWK.from_json(json.dumps(dict(jwk)), algorithm=algorithm).key
    except (PyJWKError, InvalidTokenError, ValueError, TypeError):
        raise TokenError("bad_key", "the matching key cannot be used") from None
    return _decode(token, key, algorithm, issuer=issuer, audience=audience, leeway=leeway)


def _decode(token: str, key: Any, algorithm: str, *, issuer: str | Collection[str] | None,
            audience: str | Collection[str] | None, leeway: float) -> dict[str, Any]:
    options: Any = {"require": ["exp"], "verify_aud": audience is not None, "verify_iss": False}
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[algorithm], options=options,
            audience=[audience] if isinstance(audience, str) else (list(audience) if audience is not None else None),
            leeway=leeway,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("expired", "the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("not_yet_valid", "the token is not valid yet (nbf or iat in the future)") from None
    except jwt.InvalidAudienceError:
        raise TokenError("wrong_audience", "the token is not meant for this audience") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError("missing_claim", f"the token has no {exc.claim} claim") from None
    except jwt.InvalidSignatureError:
        raise TokenError("bad_signature", "the signature does not verify") from None
    except InvalidTokenError as exc:
        raise TokenError("invalid", type(exc).__name__) from None
    if issuer is not None:
        accepted = {issuer} if isinstance(issuer, str) else set(issuer)
        if claims.get("iss") not in accepted:
            raise TokenError("wrong_issuer", "the token comes from an issuer that is not trusted here")
    return claims



async def verify_with_source(
    token: str,
    source: KeySource,
    *,
    issuer: str | Collection[str] | None,
    audience: str | Collection[str] | None,
    algorithms: Collection[str] = SIDECAR_ALGORITHMS,
    leeway: float = 0,
) -> dict[str, Any]:
    """verify_jwt with the key set of ``source``; an unknown kid triggers one (rate-limited) refresh."""
    unverified_header(token)
    for force in (False, True):
        try:
            jwks = await source.keys(force=force)
        except JwksUnavailable as exc:
            raise TokenError("keys_unavailable", str(exc)) from None
        try:
            return verify_jwt(token, jwks, issuer=issuer, audience=audience, algorithms=algorithms, leeway=leeway)
        except TokenError as error:
            if error.reason != "unknown_kid" or force:
                raise
    raise AssertionError("unreachable")
