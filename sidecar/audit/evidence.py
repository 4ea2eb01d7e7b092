"""Evidence before effect: an action that must leave an audit event takes effect only once it is written.

Ending a task, recording an approver's verdict and a policy's revocation all follow the same order:
write the event and wait for it (``write_first``); act; and if the action then could not be applied,
say so in a second event that nobody waits for (``write_after``).
"""

from __future__ import annotations

import logging
from typing import Any

from ..problems import Refusal
from .chain import AuditError, AuditSink

log = logging.getLogger("sidecar.audit")


def _subject(event: dict[str, Any]) -> str:
    return str(event.get("task_id") or event.get("approval_id") or event.get("decision_id") or "")


async def write_first(audit: AuditSink | None, event: dict[str, Any], refusal: Refusal, *, required: bool = True) -> None:
    """Wait until ``event`` is written; when it cannot be and ``required``, raise ``refusal`` (nothing changed yet)."""
    if audit is None:
        return
    try:
        await audit.record(event)
    except AuditError:
        if required:
            log.error("audit log cannot be written: %s for %s refused", event["type"], _subject(event))
            raise refusal from None
        log.error("audit log cannot be written: %s for %s goes ahead unrecorded (audit.fail_closed is off)",
                  event["type"], _subject(event))


def write_after(audit: AuditSink | None, event: dict[str, Any]) -> None:
    """Queue an event about what already happened; a failure is logged (and counted by the sink), never raised."""
    if audit is None:
        return
    try:
        audit.append(event, receipt=False)
    except AuditError:
        log.error("audit log cannot be written: %s for %s not recorded", event["type"], _subject(event))
