"""Run Rego unit tests the way ``opa test`` does, on the embedded OPA engine.

There is no ``opa`` binary on these machines, so this module loads a policy
directory into a fresh ``opa_bindings`` engine, evaluates every ``test_*`` rule
and reports pass/fail and coverage in the shape of ``opa test``'s output.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .loader import OpaModuleSink, PolicyBundle, PolicyLoadError, load_bundle, read_policy_dir

__all__ = [
    "PolicyLoadError",
    "TestReport",
    "TestResult",
    "discover_tests",
    "format_report",
    "load_policy_dir",
    "run_bundle_tests",
    "run_tests",
]

_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
# A rule head at the start of a line; `todo_test_` rules are skipped, as by OPA.
_TEST_HEAD = re.compile(r"^(test_\w*)\s*(?:if\b|\{|:=|=)", re.MULTILINE)


class PolicyEngine(OpaModuleSink, Protocol):
    """The part of ``opa_bindings.OpaEngine`` the runner uses."""

    last_coverage: dict[str, Any] | None


@dataclass(frozen=True)
class TestResult:
    __test__: ClassVar[bool] = False  # not a pytest test class

    package: str
    name: str
    passed: bool
    error: str | None
    duration_ns: int

    @property
    def ref(self) -> str:
        return f"data.{self.package}.{self.name}"


@dataclass(frozen=True)
class TestReport:
    __test__: ClassVar[bool] = False

    results: list[TestResult]
    coverage: float | None  # percent of non-test lines covered, None when not measured

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results if r.passed)

    @property
    def failed(self) -> int:
        """Tests that did not pass, errors included."""
        return len(self.results) - self.passed

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if r.error is not None)


def _error_text(exc: Exception) -> str:
    return str(getattr(exc, "message", exc)).strip()


def load_policy_dir(engine: OpaModuleSink, directory: Path) -> list[str]:
    """Load a policy directory the way the sidecar does (sidecar/policy/loader.py); return module names."""
    return load_bundle(engine, read_policy_dir(Path(directory)))


def discover_tests(modules: dict[str, str]) -> list[tuple[str, str]]:
    """(package, rule) for every ``test_*`` rule, in module-name then source order."""
    found: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for name in sorted(modules):
        source = modules[name]
        package = _PACKAGE.search(source)
        if package is None:
            continue
        for match in _TEST_HEAD.finditer(source):
            key = (package.group(1), match.group(1))
            if key not in seen:  # a rule defined in several bodies is one test
                seen.add(key)
                found.append(key)
    return found


def _is_test_module(name: str, source: str) -> bool:
    return name.endswith("_test.rego") or _TEST_HEAD.search(source) is not None


def _covered_rows(ranges: Any) -> set[int]:
    rows: set[int] = set()
    for span in ranges or ():
        start, end = span["start"]["row"], span["end"]["row"]
        rows.update(range(int(start), int(end) + 1))
    return rows


class _Coverage:
    """Lines of the non-test modules covered by at least one evaluation."""

    def __init__(self, subjects: set[str]) -> None:
        self.covered: dict[str, set[int]] = {name: set() for name in subjects}
        self.not_covered: dict[str, set[int]] = {name: set() for name in subjects}

    def add(self, report: dict[str, Any] | None) -> None:
        for name, file_report in ((report or {}).get("files") or {}).items():
            if name in self.covered:
                self.covered[name] |= _covered_rows(file_report.get("covered"))
                self.not_covered[name] |= _covered_rows(file_report.get("not_covered"))

    def percent(self) -> float | None:
        hit = sum(len(rows) for rows in self.covered.values())
        missed = sum(len(self.not_covered[name] - rows) for name, rows in self.covered.items())
        return 100.0 * hit / (hit + missed) if hit + missed else None


# Every distinct query string costs a full compile in the engine, so one query
# per package depth serves every test: the rule's path comes from a builtin,
# which keeps `input` undefined inside tests, as under `opa test`.
_KEY_BUILTIN = "sidecar_policy_test_key"


def _test_query(depth: int) -> str:
    path = "".join(f"[{_KEY_BUILTIN}({i})]" for i in range(depth))
    return f"__test_result__ := data{path}"


def run_tests(directory: Path, *, coverage: bool = True) -> TestReport:
    """Load directory into a fresh engine and evaluate every test rule in it.

    A test passes when its rule is defined and true; an evaluation error is a
    failure with the error kept. Coverage is the share of lines of the non-test
    modules covered by at least one test.
    """
    return run_bundle_tests(Path(directory), coverage=coverage)


def run_bundle_tests(policy: Path | PolicyBundle, *, coverage: bool = True) -> TestReport:
    """run_tests on a policy directory or on a policy already read (a reload candidate, a bundle)."""
    try:
        import opa_bindings
    except (ImportError, OSError) as exc:
        raise RuntimeError(
            "the embedded OPA engine (opa_bindings) is not installed: "
            "pip install --ignore-requires-python --no-deps opa-golib-python-bindings==0.4.4"
        ) from exc

    engine = opa_bindings.OpaEngine()
    engine.print_handler = lambda message, location: None
    current: list[str] = []
    engine.register_function(_KEY_BUILTIN, lambda index: current[index], arity=1)
    try:
        bundle = policy if isinstance(policy, PolicyBundle) else read_policy_dir(Path(policy))
        load_bundle(engine, bundle)
        sources = bundle.modules
        tests = discover_tests(sources)
        results: list[TestResult] = []
        for package, rule in tests:
            current[:] = [*package.split("."), rule]
            started = time.perf_counter_ns()
            error: str | None = None
            try:
                rows = engine.eval_query(_test_query(len(current)))
                passed = bool(rows) and rows[0].get("__test_result__") is True
            except opa_bindings.OpaError as exc:
                passed, error = False, _error_text(exc)
            results.append(TestResult(package, rule, passed, error, time.perf_counter_ns() - started))
        percent: float | None = None
        if coverage:
            covered = _Coverage({n for n, text in sources.items() if not _is_test_module(n, text)})
            _measure(engine, covered, results, current, opa_bindings.OpaError)
            percent = covered.percent()
    finally:
        engine.close()
    return TestReport(results=results, coverage=percent)


def _measure(engine: Any, covered: _Coverage, results: list[TestResult], current: list[str],
             opa_error: type[Exception]) -> None:
    """Coverage with one traced evaluation per test package (tracing is slow); a
    package where a test errors is traced test by test, skipping the errors."""
    by_package: dict[str, list[TestResult]] = {}
    for result in results:
        by_package.setdefault(result.package, []).append(result)
    for package, members in by_package.items():
        if all(r.error is None for r in members):
            current[:] = package.split(".")
            engine.eval_query(_test_query(len(current)), coverage=True)
            covered.add(engine.last_coverage)
            continue
        for result in members:
            if result.error is None:
                current[:] = [*package.split("."), result.name]
                try:
                    engine.eval_query(_test_query(len(current)), coverage=True)
                except opa_error:
                    continue
                covered.add(engine.last_coverage)


def _ms(duration_ns: int) -> str:
    return f"{duration_ns / 1e6:.3g}ms" if duration_ns >= 1_000_000 else f"{duration_ns / 1e3:.3g}µs"


def format_report(report: TestReport, verbose: bool = False) -> str:
    """The report in ``opa test``'s shape: failures (every test when verbose), then totals."""
    lines: list[str] = []
    for result in report.results:
        if result.passed and not verbose:
            continue
        status = "PASS" if result.passed else ("ERROR" if result.error is not None else "FAIL")
        lines.append(f"{result.ref}: {status} ({_ms(result.duration_ns)})")
        if result.error is not None:
            lines.extend(f"  {line}" for line in result.error.splitlines())
    total = len(report.results)
    if lines:
        lines.append("-" * 80)
    lines.append(f"PASS: {report.passed}/{total}")
    failures = report.failed - report.errors
    if failures:
        lines.append(f"FAIL: {failures}/{total}")
    if report.errors:
        lines.append(f"ERROR: {report.errors}/{total}")
    if report.coverage is not None:
        lines.append(f"Coverage: {report.coverage:.2f}%")
    return "\n".join(lines)
