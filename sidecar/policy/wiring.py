"""Wiring of the policy lifecycle into the sidecar (kept here so that sidecar/app.py changes little).

- the embedded engine as a LivePolicy on its source (a directory, a bundle file or a bundle URL);
- its watcher as a background task; SIGHUP asks it for a forced reload (sidecar.app.serve);
- ``POST /v1/policy/reload`` on the admin listener: forces a reload and answers with its result.
  The caller must present an approver's verified bearer token (the same identity provider as
  approvals, ``approvals.approvers``): the agent shares the pod's loopback and holds no such token.
  A reload can only re-read the configured source, never name another one; who asked is audited.
- ``GET /v1/policy``: the revision deciding now and the latest reload's result (no secret in it);
- /readyz: ``policy_reload``, a non-fatal check (red while the latest change is refused);
- metrics: ``agent_sidecar_policy_reload_total{result}``, ``agent_sidecar_policy_info{bundle,revision}``;
- ``policy.shadow``: a candidate evaluated beside the live policy, never enforced (sidecar.policy.shadow).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

from ..config import Config, ConfigError, PolicyConfig
from .live import LivePolicy
from .loader import PolicyLoadError
from .shadow import ShadowPolicy
from .source import BundleFileSource, BundleUrlSource, DirectorySource, PolicySource


def make_source(policy: PolicyConfig) -> PolicySource:
    if policy.bundle is None:
        return DirectorySource(policy.rego_dir, name=policy.bundle_name)
    public_key = policy.bundle_public_key.read_bytes() if policy.bundle_public_key is not None else None
    if policy.bundle.startswith(("http://", "https://")):
        return BundleUrlSource(policy.bundle, name=policy.bundle_name, public_key=public_key, key_id=policy.bundle_key_id)
    return BundleFileSource(Path(policy.bundle), name=policy.bundle_name, public_key=public_key,
                            key_id=policy.bundle_key_id)


def build_live_policy(config: Config) -> LivePolicy:
    policy = config.policy
    key = "policy.bundle" if policy.bundle is not None else "policy.rego_dir"
    try:
        return LivePolicy(make_source(policy), workers=policy.embedded_workers, spare_engines=policy.embedded_spare_engines,
                          decision_path=policy.decision_path, queue_deadline_seconds=policy.timeout_ms / 1000,
                          reload_seconds=policy.reload_seconds)
    except PolicyLoadError as exc:
        raise ConfigError(f"{config.source.name}: {key}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{config.source.name}: policy.bundle_public_key: cannot read: {exc.strerror}") from None


def wire_policy(config: Config, engine: Any, decider: Any, *, audit: Any, metrics: Any, admin_app: web.Application,
                metrics_app: web.Application, identify: Any) -> list[Any]:
    """Attach audit and metrics, add the admin routes and the readiness check; return the background tasks.

    ``identify``: ``async (authorization header) -> approver`` (ApprovalDesk.identify), raising an
    ``unauthorized`` Refusal. Nothing to wire for the REST engine: OPA follows its own bundles.
    """
    background: list[Any] = []
    if isinstance(engine, LivePolicy):
        background += _wire_live_policy(engine, audit=audit, registry=metrics.registry, admin_app=admin_app,
                                        metrics_app=metrics_app, identify=identify)
    if config.policy.shadow is not None:
        shadow = build_shadow(config)
        shadow.attach(audit=audit, registry=metrics.registry)
        decider.shadow = shadow
        background.append(shadow.run)
    return background


def build_shadow(config: Config) -> ShadowPolicy:
    policy = config.policy
    assert policy.shadow is not None
    try:
        key = policy.bundle_public_key.read_bytes() if policy.bundle_public_key is not None else None
        return ShadowPolicy(Path(policy.shadow), decision_path=policy.decision_path,
                            timeout_seconds=policy.timeout_ms / 1000, public_key=key)
    except PolicyLoadError as exc:
        raise ConfigError(f"{config.source.name}: policy.shadow: {exc}") from None


def _wire_live_policy(live: LivePolicy, *, audit: Any, registry: Any, admin_app: web.Application,
                      metrics_app: web.Application, identify: Any) -> list[Any]:
    from ..observability.health import READINESS

    live.attach(audit=audit, registry=registry)
    metrics_app[READINESS].register("policy_reload", live.readiness, fatal=False)

    async def reload(request: web.Request) -> web.Response:
        approver = await identify(request.headers.get("Authorization"))
        result = await live.reload(force=True, cause="api", by=str(getattr(approver, "subject", approver)))
        status = 200 if result.result != "refused" else 422
        return web.json_response({**result.public(), "bundle": live.policy.name}, status=status)

    async def show(request: web.Request) -> web.Response:
        return web.json_response({"bundle": live.policy.name, "revision": live.revision,
                                  "source": live.policy.origin, "last_reload": live.last.public()})

    admin_app.router.add_post("/v1/policy/reload", reload)
    admin_app.router.add_get("/v1/policy", show)
    return [live.watch]



def reload_on_sighup(loop: asyncio.AbstractEventLoop, engine: Any) -> bool:
    """SIGHUP forces a policy reload (sidecar.app.serve installs this); False for an engine that cannot reload."""
    if not isinstance(engine, LivePolicy):
        return False
    loop.add_signal_handler(signal.SIGHUP, engine.request_reload)
    return True
