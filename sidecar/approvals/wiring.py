"""Build the approval parts from the config: the store, the approver desk, the hold settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..audit import AuditSink
from ..config import Config
from ..credentials.jwks import key_source
from ..observability.metrics import Metrics
from ..stores import open_store
from .approvers import ApproverVerifier
from .desk import ApprovalDesk, HoldSettings
from .preview import PreviewSettings
from .store import ApprovalStore, PendingLimits
from .webhook import WebhookNotifier


@dataclass(frozen=True)
class ApprovalParts:
    store: ApprovalStore
    desk: ApprovalDesk
    hold: HoldSettings


def build_store(config: Config) -> ApprovalStore:
    from .sqlite_store import SqliteApprovalStore

    def redis(url: str) -> ApprovalStore:
        from .redis_store import RedisApprovalStore  # only a Redis store imports the client (~5 MiB resident)

        return RedisApprovalStore(url)

    sqlite: Callable[[Path], ApprovalStore] = SqliteApprovalStore
    return open_store(config, redis=redis, sqlite=sqlite)


def page_url(config: Config) -> str:
    if config.approvals.page_url:
        return config.approvals.page_url
    host = config.admin.host if config.admin.host not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.admin.port}/ui/"


def build_approvals(config: Config, metrics: Metrics, audit: AuditSink) -> ApprovalParts:
    settings = config.approvals
    verifier = None
    if settings.approvers is not None:
        verifier = ApproverVerifier(key_source(settings.approvers.jwks), issuer=settings.approvers.issuer,
                                    audience=settings.approvers.audience, group_claim=settings.approvers.group_claim)
    notifier = None
    if settings.webhook is not None:
        hook = settings.webhook
        notifier = WebhookNotifier(hook.url, page_url=page_url(config), max_attempts=hook.max_attempts,
                                   backoff_seconds=hook.backoff_seconds, timeout_seconds=hook.timeout_seconds,
                                   queue_size=hook.queue_size)
    store = build_store(config)
    desk = ApprovalDesk(store, verifier=verifier, audit=audit, metrics=metrics, notifier=notifier)
    preview = PreviewSettings(max_bytes=settings.body_preview_bytes, mask_fields=settings.mask_fields,
                              highlight_fields=settings.highlight_fields)
    hold = HoldSettings(max_wait_seconds=float(settings.max_wait_seconds),
                        default_expiry_seconds=settings.default_expiry_seconds,
                        pending_limits=PendingLimits(per_task=settings.max_pending_per_task,
                                                     per_agent=settings.max_pending_per_agent),
                        notifier=notifier, preview=preview)
    return ApprovalParts(store=store, desk=desk, hold=hold)
