"""The real OPA Go engine in process, through opa_bindings.

Evaluation runs on threads of a small pool: the native call releases the GIL, the
event loop never blocks on it, and a deadline is enforced around it. The binding
cannot cancel an evaluation; an overrun is contained by spare threads instead
(see EmbeddedEngine). The threads share one compiled copy of the policy.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lane import Outcome, WorkerLane
from ..jsoncodec import dumps_sorted, loads
from .engine import Evaluation, PolicyError
from .loader import RUNTIME_DATA_PATH, PolicyBundle, PolicyLoadError, load_bundle, read_policy_dir

log = logging.getLogger("sidecar.policy")

# An evaluation still running after this long hands its slot to a spare engine, if one is free.
SPARE_AFTER_SECONDS = 0.05


@dataclass
class _Run:
    """One evaluation on one thread, from its slot to its end (which may come after its caller left)."""

    lane: WorkerLane
    timer: asyncio.TimerHandle | None = None
    handed_over: bool = False
    finished: bool = False


def opa_available() -> bool:
    try:
        import opa_bindings  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def new_engine(bundle: PolicyBundle) -> Any:
    """A fresh opa_bindings engine with the bundle's modules and data loaded."""
    import opa_bindings

    engine = opa_bindings.OpaEngine()
    engine.print_handler = lambda message, location: None
    try:
        load_bundle(engine, bundle)
    except BaseException:
        engine.close()  # a refused policy (a reload) must not leave a compiled engine behind
        raise
    return engine


class _LoadTimeDocuments:
    """The documents read at load (``data.sidecar.runtime``, the data check, ``derived``), read by one evaluation.

    Each query an engine evaluates is prepared on its own, with a compiled copy of the whole policy
    that the engine keeps until its data changes; three queries held three copies at once, and the
    Go heap that loading leaves behind (GOGC=400: five times the live heap of its last collection)
    grew with them: 98–111 MiB of process after loading the shipped library, 88–89 with one query.
    When that one evaluation fails (a document that raises), each document is evaluated on its own,
    so that the failure is reported for the document that failed, as before. A document with a guard
    is evaluated only where its guard holds (``derived``: once the data check passed).
    """

    def __init__(self, engine: Any, paths: tuple[str, ...], guards: Mapping[str, str] | None = None) -> None:
        """``guards``: path -> a Rego condition (over ``d0``, ``d1``... the documents before it) that must hold
        for that document to be evaluated here; where it does not, ``read`` evaluates it on its own."""
        import opa_bindings

        self._engine = engine
        guards = guards or {}
        parts = []
        for n, path in enumerate(paths):
            guard = guards.get(path)
            parts.append(f"d{n} := [x | {guard}; x := data.{path}]; g{n} := [1 | {guard}]" if guard
                         else f"d{n} := [x | x := data.{path}]; g{n} := [1]")
        self._found: dict[str, list[Any]] | None = None
        try:
            bindings = engine.eval_query("; ".join(parts))
        except opa_bindings.OpaError:
            return
        if bindings:
            self._found = {path: bindings[0][f"d{n}"] for n, path in enumerate(paths) if bindings[0][f"g{n}"]}

    def read(self, path: str) -> Any:
        """The document at ``data.<path>``, raising as ``eval_document`` does."""
        import opa_bindings

        if self._found is None or path not in self._found:
            return self._engine.eval_document(path)
        values = self._found[path]
        if not values:
            raise opa_bindings.OpaUndefinedError(f"data.{path}")
        return values[0]


def check_data_once(documents: _LoadTimeDocuments, bundle: PolicyBundle, decision_path: str) -> bool:
    """Run the policy's own data check (``config_errors`` beside the decision rule) once, at load.

    The data of an embedded engine cannot change after loading, so checking it on every call
    would repeat the same answer at about a sixth of each evaluation's cost. A failing check
    refuses the policy here, naming the knobs; a passing one returns True, and the caller sets
    ``data.sidecar.runtime.config_checked`` (rego/sidecar/authz/contract.rego), which the shipped library reads
    to skip its per-call check. An OPA server never gets that flag, so it keeps checking per call.
    """
    import opa_bindings

    package = _package(decision_path)
    try:
        errors = documents.read(f"{package}.config_errors")
    except opa_bindings.OpaUndefinedError:
        return False  # a policy without a data check
    except opa_bindings.OpaError as exc:
        raise PolicyLoadError(bundle.root, f"data.{package}.config_errors: {exc.message}") from None
    if errors:
        files = ", ".join(str(file) for _, _, file in bundle.data) or str(bundle.root)
        listed = "; ".join(sorted(str(e) for e in errors)) if isinstance(errors, list) else str(errors)
        raise PolicyLoadError(files, f"the policy's data check (data.{package}.config_errors) failed: {listed}")
    return True


def set_runtime_data(engine: Any, bundle: PolicyBundle, decision_path: str) -> None:
    """Set ``data.sidecar.runtime`` in an engine that holds ``bundle``: what data alone decides, worked out once.

    Every load of a policy into an embedded engine goes through here (EmbeddedEngine: the sidecar,
    a live reload, the policy tools), and so does bench.policy_cost.
    """
    import opa_bindings

    package = _package(decision_path)
    # derived only once the policy is not refused and its data check passed: no errors (an empty collection).
    # It may rely on the knobs' types, and a knob the check refuses may make it run for ever. Errors of
    # another type (count raises) make the query fail, and each document is then read on its own.
    passed = "d0 == []; count(d1) == 1; count(d1[0]) == 0"
    documents = _LoadTimeDocuments(engine, (RUNTIME_DATA_PATH, f"{package}.config_errors", f"{package}.derived"),
                                   {f"{package}.derived": passed})
    refuse_runtime_set_by_policy(documents, bundle)
    if not check_data_once(documents, bundle, decision_path):
        return
    runtime: dict[str, Any] = {"config_checked": True}
    derived = derive_once(documents, decision_path)
    if derived is not None:
        runtime["derived"] = derived
    try:  # one merge: each change of an engine's data costs a new compilation of its queries
        engine.add_data(runtime, RUNTIME_DATA_PATH)
    except opa_bindings.OpaError as exc:
        raise PolicyLoadError(bundle.root, f"data.{RUNTIME_DATA_PATH} could not be set: {exc.message}") from None


def refuse_runtime_set_by_policy(documents: _LoadTimeDocuments, bundle: PolicyBundle) -> None:
    """``data.sidecar.runtime`` is the sidecar's alone: a policy that defines anything under it (a module's
    package, data in any spelling the engine reads as that path) would have its rules trust values no
    check produced, e.g. a ``derived`` table that lets an agent onto every route. Refused at load."""
    import opa_bindings

    try:
        documents.read(RUNTIME_DATA_PATH)
    except opa_bindings.OpaUndefinedError:
        return
    except opa_bindings.OpaError as exc:
        raise PolicyLoadError(bundle.root, f"data.{RUNTIME_DATA_PATH}: {exc.message}") from None
    raise PolicyLoadError(bundle.root, f"data.{RUNTIME_DATA_PATH} is set by the sidecar, not by a policy "
                                       "(a module or data under it)")


def derive_once(documents: _LoadTimeDocuments, decision_path: str) -> dict[str, Any] | None:
    """The policy's ``derived`` document beside the decision rule, evaluated once at load; None without one.

    It holds what data alone decides (the shipped library's: approval requirements and TTL per risk,
    knob lists as lookup tables; rego/sidecar/authz/derived.rego). OPA caches nothing from one
    evaluation to the next, so a rule that reads only data is worked out again on every call; set as
    ``data.sidecar.runtime.derived``, it is one lookup. It is worked out only after
    the data check passed, as the library's rules may rely on the knobs' types. A policy whose
    ``derived`` fails to evaluate or is not an object gets none set: its rules then compute the
    same values per call, as they do in an OPA server, which never gets it.
    """
    import opa_bindings

    package = _package(decision_path)
    try:
        derived = documents.read(f"{package}.derived")
    except opa_bindings.OpaUndefinedError:
        return None
    except opa_bindings.OpaError as exc:
        log.warning("data.%s.derived could not be evaluated at load (%s); each call computes it", package,
                    exc.message)
        return None
    return derived if isinstance(derived, dict) else None


def _package(decision_path: str) -> str:
    """The package of the decision rule, dotted: ``sidecar/authz/decision`` -> ``sidecar.authz``."""
    return decision_path.rsplit("/", 1)[0].replace("/", ".")


def _prepare(engine: Any, bundle: PolicyBundle, decision_path: str) -> None:
    """Evaluate the decision once at load, so that the engine prepares its query now.

    The first evaluation of a query costs ~50 ms of preparation, 40 times a normal one; done by the
    first call it would delay that call and seed the evaluation-time average that shedding uses.
    A query that cannot be prepared refuses the policy: every call would fail (and prepare again,
    under the engine's lock). A policy can get there past every earlier check, e.g. a rule under
    ``data.sidecar.runtime`` that is undefined at load and conflicts with the data set there.
    """
    import opa_bindings

    try:
        engine.eval_document(decision_path.replace("/", "."), {})
    except opa_bindings.OpaError as exc:
        if exc.code == "prepare_error":
            raise PolicyLoadError(bundle.root, f"data.{decision_path.replace('/', '.')} cannot be prepared: "
                                               f"{exc.message}") from None
        # otherwise an empty input may well be an error for a policy; the query is prepared all the same


class EmbeddedEngine:
    """One compiled engine and a small pool of threads that evaluate on it (WorkerLanes: an evaluation is
    posted to one and reports back with one call_soon_threadsafe, without an executor's concurrent Future).

    The native call releases the GIL, and evaluations on one engine run at once (see _eval_json), so
    N threads evaluate N calls at once on N cores, all on one compiled copy of the policy: a second
    copy cost ~20 MiB of Go heap at GOGC=400 (docs/performance.md).

    ``workers`` evaluations run at once. The binding cannot cancel an evaluation, so one
    that overruns its caller's deadline keeps its thread busy until it finishes; then one of
    ``spare_engines`` standby threads takes its place (its slot is handed on), so that a
    runaway evaluation stays one call's problem. The overrunning thread returns to the pool
    when it finishes. With every spare covering an overrun, a further overrun keeps its slot:
    capacity shrinks and callers are refused at their own deadlines, never forwarded.
    """

    name = "embedded"

    def __init__(self, rego_dir: Path | PolicyBundle, *, workers: int = 1, spare_engines: int = 0,
                 decision_path: str = "sidecar/authz/decision", queue_deadline_seconds: float | None = None,
                 provenance: Mapping[str, str] | None = None) -> None:
        """``rego_dir``: a policy directory, or a policy already read (a bundle, sidecar.policy.bundle).
        ``provenance``: the bundle name and revision every evaluation of this pool reports."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if spare_engines < 0:
            raise ValueError("spare_engines must not be negative")
        self._workers = workers
        self._spare_engines = spare_engines
        # Shedding (see _refuse_if_behind): None waits in the queue whatever its length.
        self._queue_deadline = queue_deadline_seconds
        self._pending = 0  # calls submitted and not yet answered; read and written on the event loop only
        self._mean_seconds: float | None = None  # recent evaluation time (overruns excluded), a moving average
        self.overruns = 0  # evaluations that outlived their caller's deadline
        self.spares_in_use = 0  # spare engines standing in for an overrunning one now
        self.provenance: Mapping[str, str] = dict(provenance or {})
        self._closed = False
        self._bundle = rego_dir if isinstance(rego_dir, PolicyBundle) else read_policy_dir(rego_dir)
        self._engine = new_engine(self._bundle)
        try:
            set_runtime_data(self._engine, self._bundle, decision_path)
            _prepare(self._engine, self._bundle, decision_path)
        except BaseException:
            self._engine.close()
            raise
        self._lanes = [WorkerLane(f"opa-eval-{n}") for n in range(workers + spare_engines)]
        self._idle = list(self._lanes)  # threads not evaluating; the event loop's only
        self._slots: asyncio.Semaphore | None = None  # made on the loop that evaluates

    @property
    def module_count(self) -> int:
        return len(self._bundle.modules)

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def spare_engines(self) -> int:
        return self._spare_engines

    def evaluate_sync(self, path: str, input_document: dict[str, Any]) -> Any:
        """Evaluate on the calling thread (tools and benchmarks)."""
        return _evaluate_on(self._engine, path, input_document)[0]

    async def evaluate(self, path: str, input_document: dict[str, Any]) -> Any:
        self._refuse_if_behind()
        self._pending += 1
        try:
            return await self._evaluate_on_an_idle_engine(path, input_document)
        finally:
            self._pending -= 1

    async def evaluate_with_provenance(self, path: str, input_document: dict[str, Any]) -> Evaluation:
        return Evaluation(await self.evaluate(path, input_document), self.provenance)

    async def _evaluate_on_an_idle_engine(self, path: str, input_document: dict[str, Any]) -> Any:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        run = _Run(self._idle.pop())  # a held slot guarantees an idle thread: see _hand_slot_to_spare
        run.timer = loop.call_later(SPARE_AFTER_SECONDS, self._hand_slot_to_spare, run)
        answered: asyncio.Future[tuple[Any, float]] = loop.create_future()
        engine = self._engine
        run.lane.report(lambda: _evaluate_on(engine, path, input_document),
                        functools.partial(self._finished, run, answered))
        try:
            result, elapsed = await answered
        except asyncio.CancelledError:
            self._overran(run)
            raise
        mean = self._mean_seconds
        self._mean_seconds = elapsed if mean is None else mean + (elapsed - mean) / 8
        return result

    def _hand_slot_to_spare(self, run: _Run) -> None:
        """A long evaluation lets a spare thread take its slot, so the calls behind it are decided meanwhile.

        Busy threads never outnumber the slots held plus the spares in use, so a caller that holds a
        slot always finds an idle thread.
        """
        if run.handed_over or run.finished or self.spares_in_use >= self._spare_engines:
            return
        assert self._slots is not None
        run.handed_over = True
        self.spares_in_use += 1
        self._slots.release()

    def _overran(self, run: _Run) -> None:
        """The caller gave up (its deadline passed) while the engine goes on evaluating."""
        if run.finished:  # it ended in the same loop turn as the deadline: no thread is still busy
            return
        self.overruns += 1
        self._hand_slot_to_spare(run)
        log.warning("policy evaluation overran its deadline; %s", "a spare thread stands in until it ends"
                    if run.handed_over else "no spare engine left: one evaluation slot fewer until it ends")

    def _finished(self, run: _Run, answered: asyncio.Future[tuple[Any, float]], outcome: Outcome) -> None:
        try:
            assert self._slots is not None and run.timer is not None
            run.timer.cancel()
            run.finished = True
            if self._closed:  # a retired pool (sidecar.policy.live): an overrun outlived it
                return
            self._idle.append(run.lane)
            if run.handed_over:
                self.spares_in_use -= 1
            else:
                self._slots.release()
        finally:  # the bookkeeping first: settling the caller's future can raise
            if not answered.done():  # after an overrun nobody waits for this outcome
                ok, value = outcome
                if ok:
                    answered.set_result(value)
                else:
                    answered.set_exception(_as_policy_error(value))

    def _refuse_if_behind(self) -> None:
        """Refuse at once a call that would wait in the queue past the deadline, by recent evaluation times.

        Without this a flood queues every call, and each one past the engine's capacity is refused
        only when its deadline runs out: it holds its memory for that long and is reported as a
        policy timeout although the engine is healthy. The estimate counts the calls ahead only, so a
        policy that is slow on its own still times out as before rather than being called overloaded.
        Overrunning evaluations count neither as calls ahead (their callers have gone) nor in the
        mean (a spare engine evaluates in their place).
        """
        mean = self._mean_seconds
        if self._queue_deadline is None or mean is None:
            return
        wait = self._pending * mean / self.workers
        if wait >= self._queue_deadline:
            raise PolicyError("overloaded", f"{self._pending} evaluations ahead, about {wait * 1000:.0f} ms")

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Close from any context (a retired pool is closed by its last caller, see sidecar.policy.live).

        An evaluation still running (an overrun) ends on its own: the engine's Go side keeps what it
        evaluates on until then, and its thread ends after it."""
        self._closed = True
        for lane in self._lanes:
            lane.stop()
        self._engine.close()
        self._idle.clear()


def _as_policy_error(exc: BaseException) -> PolicyError:
    """What an evaluation raised, as its caller may receive it: never a BaseException raised into the request task."""
    if isinstance(exc, PolicyError):
        return exc
    error = PolicyError("error", f"the evaluation raised {type(exc).__name__}")
    error.__cause__ = exc
    return error


def _evaluate_on(engine: Any, path: str, input_document: dict[str, Any]) -> tuple[Any, float]:
    """The decision at ``path`` and the seconds it took; runs on an evaluation thread."""
    import opa_bindings

    document = path.replace("/", ".")
    started = time.perf_counter()
    try:
        input_json = dumps_sorted(input_document)
    except TypeError as exc:  # not JSON (a lone surrogate, an integer beyond 64 bits): never evaluated as something else
        raise PolicyError("error", f"the input is not JSON: {exc}") from None
    try:
        return _eval_json(engine, document, input_json), time.perf_counter() - started
    except opa_bindings.OpaUndefinedError:
        raise PolicyError("undefined", f"data.{document} is undefined") from None
    except opa_bindings.OpaError as exc:
        raise PolicyError("error", f"{exc.code}: {exc.message}") from None


def _eval_json(engine: Any, document: str, input_json: bytes) -> Any:
    """``engine.eval_document(document, input)`` with the input already serialised and the answer parsed by orjson.

    The binding's own ``eval_document`` serialises the input with the standard library's encoder,
    which cost ~10x orjson on the ~4 KB input of every call, and parses the engine's answer (a JSON
    envelope: the result, or an error) with the standard library's decoder; the policy input is
    serialised once (sidecar.jsoncodec.JsonDocument) and those bytes are what the engine reads, and
    the answer is parsed with orjson (_parse_envelope). This does what the binding's ``_call`` does
    (its internals: opa-golib-python-bindings 0.4.4, pinned in the Makefile) and raises the same
    errors; a binding without them gets the input through its public API instead
    (tests/test_jsoncodec.py checks both agree).

    Evaluations on one engine run at once. The bridge's Go side holds its engine lock only to look up
    the prepared query and evaluates outside it (OPA's prepared queries are safe for concurrent use).
    The binding's Python lock serialises evaluations for what the sidecar does not use: its
    ``last_prints``/``last_coverage`` attributes and the buffers of Python builtins. An engine with
    Python builtins registered (sidecar.policy.testing) still evaluates under that lock.
    """
    import opa_bindings

    native, lock = (getattr(engine, name, None) for name in ("_lib", "_eval_lock"))
    if native is None or lock is None or not hasattr(engine, "_handle"):
        return engine.eval_document(document, loads(input_json))
    if getattr(engine, "_functions", True):
        with lock:
            envelope = _eval_native(native, engine, document, input_json)
    else:
        envelope = _eval_native(native, engine, document, input_json)
    error = envelope.get("error")
    if error is not None:
        raise opa_bindings.OpaError(error.get("code", "unknown"), error.get("message", ""))
    results = envelope.get("result")
    if not results or not results[0].get("expressions"):
        raise opa_bindings.OpaUndefinedError(f"data.{document}")
    return results[0]["expressions"][0]["value"]


def _eval_native(native: Any, engine: Any, document: str, input_json: bytes) -> Any:
    """The bridge's answer envelope for one evaluation."""
    import opa_bindings

    handle = engine._handle  # read once: another thread may close the engine (the Go side rejects a stale one)
    if handle is None:
        raise opa_bindings.OpaError("closed", "engine has been closed")
    answer = native.OpaEvalDocument(handle, document.encode(), input_json, 0, 0)
    if not answer:
        raise opa_bindings.OpaError("internal", "native call returned NULL")
    try:
        raw = ctypes.string_at(answer)
    finally:
        native.OpaFreeString(answer)
    return _parse_envelope(raw)


# Digits as b"0", everything else as b" ": a run of 19 digits in an answer is found by one search.
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGITS = b"0" * 19


def _parse_envelope(raw: bytes) -> Any:
    """The engine's answer, as the standard library's ``json.loads`` reads it, at a third of its cost.

    orjson reads every JSON value as the standard library does but three: integers beyond 64 bits
    (a float instead), numbers beyond a double (an error instead of infinity) and lone surrogates
    (an error). An answer that may hold one of those (a run of 19 digits, or one orjson refuses) is
    read by the standard library. (A regular expression looking for the run would cost as much as
    the standard library's parse; ``bytes.translate`` and a substring search cost an eighth of it.)
    """
    if _LONG_DIGITS not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return loads(raw)
        except ValueError:
            pass
    return json.loads(raw)
