"""What one call contributes to its task's history: route-configured measures and where it writes.

A route's ``measures:`` maps a measure name to JSON paths, for example::

    measures:
      amount: ["$.amount", "$.refund.amount"]
      records: ["$.ids#count", "$.items[*].quantity"]

Path syntax (parsed once at start-up, never evaluated as code):

- ``$`` is the call's payload: the ``arguments`` of an MCP ``tools/call``, otherwise the JSON body;
- ``.key`` steps into an object (letters, digits, ``_`` and ``-``);
- ``[n]`` takes element n of an array, ``[*]`` every element (their values are summed);
- a final ``#count`` (or ``.length()``) counts the elements of the array found there.

A path yields the sum of the numbers it reaches (a JSON number, or a decimal number
written as a string; absolute values, so a negative amount cannot lower a total) or
nothing. A measure's value is the first of its paths that yields something; a measure
with no matching path has no value for that call.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..documents import McpCall

MEASURE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_MEASURES_PER_ROUTE = 8
MAX_PATHS_PER_MEASURE = 8
MAX_PATH_CHARS = 200
MAX_STEPS = 16

_STEP = re.compile(r"\.(?P<key>[A-Za-z0-9_\-]+)|\[(?P<index>[0-9]{1,6})\]|\[(?P<all>\*)\]")
_COUNT_SUFFIXES = ("#count", ".length()")
# The same bound as the Rego library's number_text: to_number can never fail on it.
_NUMBER_TEXT = re.compile(r"^-?[0-9]{1,15}(\.[0-9]{1,15})?$")

Step = str | int | None  # a key, an index, or None for [*]


class MeasurePathError(ValueError):
    """A measure path that does not follow the documented syntax."""


@dataclass(frozen=True)
class MeasurePath:
    text: str
    steps: tuple[Step, ...]
    count: bool = False


@dataclass(frozen=True)
class Measure:
    name: str
    paths: tuple[MeasurePath, ...]


def parse_path(text: str) -> MeasurePath:
    """Compile one path; raise MeasurePathError saying what is wrong."""
    if not text.startswith("$"):
        raise MeasurePathError("must start with $ (the JSON body, or the MCP tools/call arguments)")
    if len(text) > MAX_PATH_CHARS:
        raise MeasurePathError(f"longer than {MAX_PATH_CHARS} characters")
    rest, count = text[1:], False
    for suffix in _COUNT_SUFFIXES:
        if rest.endswith(suffix):
            rest, count = rest[: -len(suffix)], True
            break
    steps: list[Step] = []
    position = 0
    while position < len(rest):
        match = _STEP.match(rest, position)
        if match is None:
            raise MeasurePathError(f"unexpected {rest[position:position + 12]!r} at character {position + 2}; "
                                   "use .key, [n], [*] and a final #count")
        steps.append(match["key"] if match["key"] is not None else int(match["index"]) if match["index"] else None)
        position = match.end()
    if len(steps) > MAX_STEPS:
        raise MeasurePathError(f"more than {MAX_STEPS} steps")
    return MeasurePath(text=text, steps=tuple(steps), count=count)


DEFAULT_MEASURES: tuple[Measure, ...] = (
    Measure("amount", (parse_path("$.amount"),)),
    Measure("records", (parse_path("$.records"), parse_path("$.records#count"))),
)


def effective_measures(configured: Sequence[Measure]) -> tuple[Measure, ...]:
    """The route's measures, plus the defaults (amount, records) it does not redefine."""
    names = {m.name for m in configured}
    return (*configured, *(m for m in DEFAULT_MEASURES if m.name not in names))


def payload(body: Any, mcp_call: McpCall | None) -> Any:
    """What ``$`` stands for: the MCP tools/call arguments, or the JSON body of a plain call."""
    if mcp_call is None:
        return body
    return mcp_call.arguments if mcp_call.method == "tools/call" else None


def call_measures(measures: Iterable[Measure], document: Any) -> dict[str, float]:
    """The value of each measure that one of its paths finds in ``document``."""
    values: dict[str, float] = {}
    if document is None:
        return values  # no path finds a number in nothing (the body of most reads)
    for measure in measures:
        for path in measure.paths:
            found = path_value(path, document)
            if found is not None:
                values[measure.name] = found
                break
    return values


def summed_measures(measures: Sequence[Measure], documents: Iterable[Any]) -> dict[str, float]:
    """One call's measures over several payloads (the requests of an MCP batch)."""
    return summed_measures_of(call_measures(measures, document) for document in documents)


def summed_measures_of(values: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Measures by name, summed (saturating) over several sets of them."""
    total: dict[str, float] = {}
    for each in values:
        for name, value in each.items():
            total[name] = saturated_sum((total.get(name, 0.0), value))
    return total


def path_value(path: MeasurePath, document: Any) -> float | None:
    numbers = [n for n in (_leaf_number(leaf, path.count) for leaf in _walk(document, path.steps)) if n is not None]
    return saturated_sum(numbers) if numbers else None


def saturated_sum(numbers: Iterable[float]) -> float:
    """A sum that overflows is the largest float (over every cap), never infinity, which JSON cannot carry."""
    total = float(sum(numbers))
    return total if math.isfinite(total) else math.copysign(sys.float_info.max, total)


def _walk(node: Any, steps: tuple[Step, ...]) -> Iterator[Any]:
    if not steps:
        yield node
        return
    step, rest = steps[0], steps[1:]
    if isinstance(step, str):
        if isinstance(node, dict):
            found = _member(node, step)
            if found is not _MISSING:
                yield from _walk(found, rest)
    elif isinstance(node, list):
        if step is None:
            for element in node:
                yield from _walk(element, rest)
        elif step < len(node):
            yield from _walk(node[step], rest)


_MISSING = object()


def _member(node: dict[str, Any], key: str) -> Any:
    """``node[key]``, matching the key ignoring case as many upstreams do (the interceptor refuses
    a body with two keys equal ignoring case, so at most one matches)."""
    if key in node:
        return node[key]
    folded = key.casefold()
    return next((value for name, value in node.items() if name.casefold() == folded), _MISSING)


def _leaf_number(leaf: Any, count: bool) -> float | None:
    if count:
        return float(len(leaf)) if isinstance(leaf, list) else None
    if isinstance(leaf, bool):
        return None
    if isinstance(leaf, (int, float)):
        try:
            number = abs(float(leaf))
        except OverflowError:  # an integer beyond a double (the door refuses those beyond 64 bits)
            return sys.float_info.max
    elif isinstance(leaf, str) and _NUMBER_TEXT.match(leaf):
        number = abs(float(leaf))
    else:
        return None
    return number if math.isfinite(number) else sys.float_info.max


# -- where a call writes ---------------------------------------------------------

# The Rego library's defaults (rego/data.json internal_host_suffixes, internal_cidrs).
INTERNAL_HOST_SUFFIXES = ("localhost", "svc", "cluster.local", "internal", "local")
INTERNAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in
                          ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128"))


@functools.lru_cache(maxsize=1024)  # hosts come from route upstreams: few, and parsing an address is not free
def host_internal(host: str) -> bool:
    host = host.lower().strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return any(host == s or host.endswith("." + s) for s in INTERNAL_HOST_SUFFIXES)
    return any(address in network for network in INTERNAL_NETWORKS)


def destination_external(labels: Mapping[str, Any], host: str) -> bool:
    """The route label ``external`` wins (true or false); without it, a host outside the cluster is external."""
    label = labels.get("external")
    if isinstance(label, str):
        label = {"true": True, "false": False}.get(label.strip().lower())
    if isinstance(label, bool):
        return label
    return not host_internal(host)
