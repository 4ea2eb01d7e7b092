"""``agent-sidecar policy replay``: what a candidate policy would have decided on recorded traffic.

Every decision event of the audit chain carries the input document the policy saw (``input``) and its
result. Replay evaluates each recorded input against the candidate (a directory or a bundle) in an
embedded engine and compares outcomes (allow, hold, deny; ``invalid`` for a result that breaks the
decision contract, ``error`` for no result). Each change is grouped by its transition (allow -> deny)
and by the rules that explain it (rules the candidate fired that the recorded decision did not: ``+rule``,
and the other way round: ``-rule``), with counts and a few example decision ids (the ``X-Agent-Decision``
of the call). Exit status: 0 nothing would change, 1 something would, 2 nothing could be replayed.

The input carries the call's own time, so a time-dependent rule replays as it was decided.

Only inputs of the contract version this sidecar sends (``version: "v2"``) are replayed. An input recorded
under another version (v1, by a sidecar before input v2) is not evaluated: a v2 policy would deny it as
``malformed_input`` (or, without a version check, misread its history), which says nothing about the
candidate. Such decisions are counted apart, by version, and reported as not replayed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..context import INPUT_VERSION
from .decide import decision_errors
from .engine import PolicyError
from .loader import PolicyLoadError

OUTCOMES = ("allow", "hold", "deny", "invalid", "error")


@dataclass(frozen=True)
class Change:
    decision_id: str
    before: str
    after: str
    rules: str  # "+added -removed", or "(same rules)"
    route: str | None
    task_id: str | None


@dataclass
class ReplayReport:
    candidate: str
    revision: str
    replayed: int = 0
    files: int = 0
    recorded_revisions: Counter[str] = field(default_factory=Counter)
    changes: list[Change] = field(default_factory=list)
    # Recorded decisions whose input is of another contract version, by version: not replayed.
    other_versions: Counter[str] = field(default_factory=Counter)

    def groups(self) -> dict[tuple[str, str], dict[str, list[Change]]]:
        grouped: dict[tuple[str, str], dict[str, list[Change]]] = {}
        for change in self.changes:
            grouped.setdefault((change.before, change.after), {}).setdefault(change.rules, []).append(change)
        return dict(sorted(grouped.items(), key=lambda item: -sum(len(v) for v in item[1].values())))


def outcome_of(result: Any) -> str:
    if not isinstance(result, dict):
        return "error"
    if decision_errors(result):
        return "invalid"
    if result.get("require_approval") is True:
        return "hold"
    return "allow" if result.get("allow") is True else "deny"


def _rules(result: Any) -> set[str]:
    rules = result.get("rules") if isinstance(result, dict) else None
    return {str(r) for r in rules} if isinstance(rules, list) else set()


def rule_change(before: Any, after: Any) -> str:
    old, new = _rules(before), _rules(after)
    parts = [f"+{r}" for r in sorted(new - old)] + [f"-{r}" for r in sorted(old - new)]
    return " ".join(parts) or "(same rules)"


def recorded_decisions(files: list[Path]) -> tuple[list[dict[str, Any]], int]:
    """Decision events with an input, once per decision id, in chain order; and lines that were not JSON."""
    seen: set[str] = set()
    events: list[dict[str, Any]] = []
    unreadable = 0
    for path in files:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    unreadable += 1
                    continue
                if not isinstance(event, dict) or event.get("type") != "decision":
                    continue
                if not isinstance(event.get("input"), dict) or not event["input"]:
                    continue  # a refusal before any decision: nothing was evaluated
                decision_id = str(event.get("decision_id"))
                if decision_id in seen:
                    continue
                seen.add(decision_id)
                events.append(event)
    return events, unreadable


def replay(files: list[Path], candidate: Path, *, decision_path: str, public_key: bytes | None = None) -> ReplayReport:
    from .bundle import read_policy
    from .embedded import EmbeddedEngine

    policy, revision = read_policy(candidate, public_key=public_key, verify=public_key is not None)
    engine = EmbeddedEngine(policy, decision_path=decision_path)
    report = ReplayReport(candidate=str(candidate), revision=revision, files=len(files))
    try:
        events, _ = recorded_decisions(files)
        for event in events:
            version = event["input"].get("version")
            if version != INPUT_VERSION:
                report.other_versions[str(version)] += 1
                continue
            report.replayed += 1
            for name, entry in (event.get("bundles") or {}).items():
                if isinstance(entry, dict):
                    report.recorded_revisions[f"{name} {entry.get('revision')}"] += 1
            recorded = event.get("result")
            try:
                result = engine.evaluate_sync(decision_path, event["input"])
            except PolicyError:
                result = None
            before, after = outcome_of(recorded), outcome_of(result)
            if before != after:
                report.changes.append(Change(str(event.get("decision_id")), before, after, rule_change(recorded, result),
                                             event.get("route"), event.get("task_id")))
    finally:
        engine.close_now()
    return report


def render(report: ReplayReport, examples: int = 3) -> str:
    recorded = ", ".join(f"{name} ({count})" for name, count in report.recorded_revisions.most_common()) or "no revision recorded"
    lines = [f"replayed {report.replayed} recorded decisions from {report.files} file(s) against {report.candidate} "
             f"(revision {report.revision})",
             f"recorded by: {recorded}"]
    lines += [f"not replayed: {count} recorded decision(s) with an input {version} document (this sidecar sends "
              f"{INPUT_VERSION}; a {INPUT_VERSION} policy cannot judge them)"
              for version, count in sorted(report.other_versions.items())]
    if not report.changes:
        lines.append("no decision would change")
        return "\n".join(lines) + "\n"
    lines.append(f"{len(report.changes)} decision(s) would change:")
    for (before, after), by_rule in report.groups().items():
        lines.append(f"  {before} -> {after}: {sum(len(c) for c in by_rule.values())}")
        for rules, changes in sorted(by_rule.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(c.decision_id for c in changes[:examples])
            more = f" and {len(changes) - examples} more" if len(changes) > examples else ""
            lines.append(f"    {rules}: {len(changes)}  e.g. {shown}{more}")
    return "\n".join(lines) + "\n"


def as_json(report: ReplayReport, examples: int = 3) -> dict[str, Any]:
    return {
        "candidate": report.candidate, "revision": report.revision, "replayed": report.replayed,
        "changed": len(report.changes), "recorded_revisions": dict(report.recorded_revisions),
        "not_replayed_input_versions": dict(report.other_versions),
        "groups": [{"from": before, "to": after, "rules": rules, "count": len(changes),
                    "examples": [c.decision_id for c in changes[:examples]]}
                   for (before, after), by_rule in report.groups().items()
                   for rules, changes in sorted(by_rule.items(), key=lambda item: -len(item[1]))],
    }


def run_replay(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from ..audit import expand

    out = out or sys.stdout
    err = err or sys.stderr

    files = expand([Path(p) for p in args.audit])
    if not files:
        print("agent-sidecar: no audit files found", file=err)
        return 2
    try:
        public_key = Path(args.public_key).read_bytes() if args.public_key else None
        report = replay(files, Path(args.policy), decision_path=args.path, public_key=public_key)
    except (PolicyLoadError, OSError) as exc:
        print(f"agent-sidecar: {exc}", file=err)
        return 2
    if report.replayed == 0:
        skipped = ", ".join(f"{count} with input {version}" for version, count in sorted(report.other_versions.items()))
        print("agent-sidecar: no recorded decision with an input in these files"
              + (f" that this sidecar's policy can judge ({skipped}; it sends input {INPUT_VERSION})" if skipped else ""),
              file=err)
        return 2
    if args.json:
        out.write(json.dumps(as_json(report, args.examples), indent=2, sort_keys=True) + "\n")
    else:
        out.write(render(report, args.examples))
    return 1 if report.changes else 0
