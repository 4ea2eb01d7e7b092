"""Which state store backs tasks, revocations and approvals: SQLite (one pod) or Redis (shared)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .config import Config, ConfigError

T = TypeVar("T")


def open_store(config: Config, *, redis: Callable[[str], T], sqlite: Callable[[Path], T]) -> T:
    """Build the configured backend; a SQLite file that cannot be opened is a config error naming the key."""
    if config.store.backend == "redis":
        assert config.store.redis_url is not None
        return redis(config.store.redis_url)
    try:
        return sqlite(config.sqlite_path)
    except OSError as exc:
        raise ConfigError(f"{config.source.name}: store.sqlite_path: {exc}") from None
