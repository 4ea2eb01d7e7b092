"""Build the credential-side parts from the config: task store, identity, delegation, introspection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..delegation import DelegationVerifier
from ..identity import TokenFileIdentity
from ..lane import WorkerLane
from ..pipeline import IdentitySource, StaticIdentity
from ..stores import open_store
from ..tasks import TaskStore
from .introspection import IntrospectionCallers, Introspector
from .jwks import key_source
from .keys import KeyRing

Check = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class CredentialParts:
    tasks: TaskStore
    identity: IdentitySource
    delegation: DelegationVerifier
    introspector: Introspector
    callers: IntrospectionCallers
    checks: dict[str, Check] = field(default_factory=dict)
    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)


def build_task_store(config: Config, disk: WorkerLane | None = None) -> TaskStore:
    """``disk``: the lane a SQLite store commits on (shared with the audit writer)."""
    from ..tasks.sqlite import SqliteTaskStore

    def redis(url: str) -> TaskStore:
        from ..tasks.redis_store import RedisTaskStore  # only a Redis store imports the client (~5 MiB resident)

        return RedisTaskStore(url)

    def sqlite(path: Path) -> TaskStore:
        return SqliteTaskStore(path, disk)

    return open_store(config, redis=redis, sqlite=sqlite)


def build_credential_parts(config: Config, keys: KeyRing, disk: WorkerLane | None = None) -> CredentialParts:
    tasks = build_task_store(config, disk)
    parts = CredentialParts(
        tasks=tasks,
        identity=StaticIdentity(config.identity.static or ""),
        delegation=_delegation(config),
        introspector=Introspector(keys, tasks, issuer=config.credentials.issuer),
        callers=IntrospectionCallers(config.introspection.tokens, config.introspection.tokens_file),
    )
    if config.identity.token_file is not None:
        identity = _token_identity(config)
        parts.identity = identity
        parts.checks["identity"] = identity.ready
        parts.startup.append(identity.refresh)
        parts.background.append(identity.watch)
    parts.checks["signing_keys"] = keys.ready
    parts.background.append(lambda: keys.watch(config.credentials.reload_seconds))
    return parts


def _token_identity(config: Config) -> TokenFileIdentity:
    settings = config.identity
    assert settings.token_file is not None and settings.jwks is not None and settings.audience is not None
    return TokenFileIdentity(settings.token_file, key_source(settings.jwks, config.source.parent),
                             audience=settings.audience, issuer=settings.issuer)


def _delegation(config: Config) -> DelegationVerifier:
    settings = config.delegation
    if settings.jwks is None:
        return DelegationVerifier(None)
    return DelegationVerifier(key_source(settings.jwks, config.source.parent), issuers=settings.issuers,
                              audiences=settings.audiences, max_depth=settings.max_depth)
