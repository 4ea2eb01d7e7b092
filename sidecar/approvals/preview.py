"""What an approver sees of a held call's body: a bounded, masked, pretty-printed preview.

The preview is built once, when the call is held, from the body exactly as the policy read it
(``InterceptedCall.body_json``: parsed JSON, or a form as an object) and is stored with the
approval. It carries:

- the size and SHA-256 of the whole body, always (the approval is bound to that hash);
- for a JSON or form body, the body pretty-printed with every field whose name is in the
  mask list replaced by ``[masked]`` (its whole value, object or array included), cut at
  ``body_preview_bytes`` bytes of UTF-8; nothing else is ever shown of a body (a body that is
  neither JSON nor a form is shown as its size and hash only: a key-name mask cannot find a
  password in free text, so its text is not shown at all);
- the values an approver must not miss, set apart: the call's measures (amount, records and
  the route's configured measures, read exactly as the task history reads them), the fields
  named in ``highlight_fields`` (payee, recipient, ...) and the fields the policy's reasons
  name, wherever they are in the body.

Names match by key at any depth, ignoring case and ``-``/``_`` (``API-Key``, ``api_key`` and
``apiKey`` are one name); a mask name also matches a key that ends with it (``db_password``,
``stripe_secret``, ``x_access_token``): masking too much is harmless, too little is not.

Control and formatting characters in agent-sent text (terminal escapes, bidirectional
overrides that would show ``EMCA`` as ``ACME``) are shown as ``\\uXXXX`` escapes.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from ..tasks.measures import effective_measures, payload, summed_measures

if TYPE_CHECKING:
    from ..documents import InterceptedCall

MASKED = "[masked]"
TOO_DEEP = "[nested too deeply to show]"
MAX_DEPTH = 64
MAX_LISTED = 50  # masked paths and highlighted fields kept per approval
MAX_VALUE_CHARS = 200
MAX_PATH_CHARS = 200
MAX_CACHED_KEYS = 10_000

DEFAULT_MASK_FIELDS: tuple[str, ...] = (
    "password", "passwd", "passphrase", "secret", "token", "api_key", "apikey", "access_key", "secret_key",
    "private_key", "authorization", "auth", "cookie", "set_cookie", "credential", "credentials", "session_id",
    "otp", "cvv", "cvc", "card_number", "ssn", "signature", "sig", "jwt",
)
DEFAULT_HIGHLIGHT_FIELDS: tuple[str, ...] = (
    "payee", "recipient", "beneficiary", "to", "iban", "account", "account_number", "destination",
)
DEFAULT_PREVIEW_BYTES = 4096
MAX_PREVIEW_BYTES = 65536

# Words of a reason that are too common to point at a body field.
_REASON_STOPWORDS = frozenset({"on", "is", "in", "of", "and", "the", "a", "an", "by", "for", "at", "with", "data",
                               "task", "call", "calls", "route", "class", "risk", "write", "writes", "read", "over", "per"})
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{1,63}")


def normalized(name: str) -> str:
    """``API-Key``, ``api_key`` and ``apiKey`` are all ``apikey``."""
    return "".join(c for c in name.casefold() if c.isalnum())


@dataclass(frozen=True)
class PreviewSettings:
    """``approvals.body_preview_bytes``, ``approvals.mask_fields`` and ``approvals.highlight_fields``."""

    max_bytes: int = DEFAULT_PREVIEW_BYTES  # 0: size and hash only
    mask_fields: tuple[str, ...] = DEFAULT_MASK_FIELDS
    highlight_fields: tuple[str, ...] = DEFAULT_HIGHLIGHT_FIELDS

    @functools.cached_property
    def _mask(self) -> tuple[str, ...]:
        return tuple(sorted({n for n in (normalized(f) for f in self.mask_fields) if n}))

    @functools.cached_property
    def _verdicts(self) -> dict[str, bool]:
        return {}  # key -> masked: bodies repeat their keys (arrays of objects), and this runs on every audited call

    def masks(self, key: str) -> bool:
        verdict = self._verdicts.get(key)
        if verdict is None:
            name = normalized(key).rstrip("0123456789")  # an index is no disguise: api_key[0], token2
            verdict = bool(name) and name.endswith(self._mask)
            if len(self._verdicts) < MAX_CACHED_KEYS:
                self._verdicts[key] = verdict
        return verdict

    def mask(self, value: Any) -> Any:
        """``value`` with every masked field's value replaced, sharing what needs no change (the audited policy input)."""
        return _masked_only(value, self, 0)

    def mask_query(self, query: str) -> str:
        """A raw query string with the value of every masked parameter replaced (``?api_key=[masked]``), names
        and everything else as sent; ``query`` itself when nothing is masked. Names are matched decoded."""
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, equals, _ = part.partition("=")
            if equals and self.masks(unquote_plus(name)):
                parts[i] = f"{name}={MASKED}"
                changed = True
        return "&".join(parts) if changed else query

    def mask_query_mapping(self, query: Any) -> Any:
        """The input's ``request.query`` (name -> list of values) with every masked parameter's values replaced,
        still a list of strings each; ``query`` itself when nothing is masked."""
        if not isinstance(query, dict) or not any(self.masks(str(name)) for name in query):
            return query
        return {name: _masked_values(values) if self.masks(str(name)) else values for name, values in query.items()}

    def mask_target(self, target: str) -> str:
        """A request target (URL or origin form) with its query masked as ``mask_query`` does."""
        before, question, query = target.partition("?")
        return f"{before}?{self.mask_query(query)}" if question else target

    def build(self, call: InterceptedCall, reasons: Sequence[str]) -> BodyPreview:
        return build_preview(call, reasons, self)


@dataclass
class BodyPreview:
    size: int
    sha256: str
    content_type: str = ""
    kind: str = "empty"  # empty | json | form | opaque (neither: size and hash only)
    text: str | None = None  # pretty-printed and masked, at most the configured bytes of UTF-8
    truncated: bool = False
    masked: list[str] = field(default_factory=list)  # paths of the masked fields ("$.card.cvv")
    measures: dict[str, float] = field(default_factory=dict)  # amount, records, the route's measures
    highlights: list[dict[str, str]] = field(default_factory=list)  # [{"path", "value", "why": field|reason}]

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> BodyPreview:
        known = {name: doc[name] for name in cls.__dataclass_fields__ if name in doc}
        return cls(**known)


def build_preview(call: InterceptedCall, reasons: Sequence[str], settings: PreviewSettings) -> BodyPreview:
    from ..proxy.body import media_type

    preview = BodyPreview(size=len(call.body), sha256=call.body_sha256, content_type=_display(call.content_type)[:200])
    if not call.body:
        return preview
    if not call.body_readable:
        preview.kind = "opaque"
        return preview
    preview.kind = "form" if media_type(call.content_type) == "application/x-www-form-urlencoded" else "json"
    masked_paths: list[str] = []
    shown = _masked(call.body_json, settings, masked_paths, "$", 0)
    preview.masked = masked_paths[:MAX_LISTED]
    if settings.max_bytes > 0:
        text = _display(json.dumps(shown, indent=2, ensure_ascii=False, sort_keys=False))
        encoded = text.encode("utf-8")
        if len(encoded) > settings.max_bytes:
            text = encoded[:settings.max_bytes].decode("utf-8", "ignore")
            preview.truncated = True
        preview.text = text
    payloads = [payload(call.body_json, c) for c in call.mcp_calls] if call.mcp_calls else [call.body_json]
    preview.measures = summed_measures(effective_measures(call.route.measures), payloads)
    preview.highlights = _highlights(shown, settings, reasons, set(preview.measures))
    return preview


def _masked_values(values: Any) -> Any:
    return [MASKED] * len(values) if isinstance(values, list) else MASKED


def _masked(value: Any, settings: PreviewSettings, paths: list[str], path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        result: dict[str, Any] = {}
        for key, item in value.items():
            where = f"{path}.{_display(str(key))}"[:MAX_PATH_CHARS]
            if settings.masks(str(key)):
                result[key] = MASKED
                paths.append(where)
            else:
                result[key] = _masked(item, settings, paths, where, depth + 1)
        return result
    if isinstance(value, list):
        return [_masked(item, settings, paths, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    return value


def _masked_only(value: Any, settings: PreviewSettings, depth: int) -> Any:
    """As :func:`_masked` without the paths, and returning ``value`` itself when nothing in it is masked."""
    if depth > MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        changed: dict[str, Any] | None = None
        for key, item in value.items():
            new = MASKED if settings.masks(str(key)) else _masked_only(item, settings, depth + 1)
            if new is not item:
                if changed is None:
                    changed = dict(value)
                changed[key] = new
        return value if changed is None else changed
    if isinstance(value, list):
        items = [_masked_only(item, settings, depth + 1) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def _leaves(value: Any, path: str, depth: int = 0) -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every member of every object, outermost first."""
    if depth > MAX_DEPTH:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{_display(str(key))}"[:MAX_PATH_CHARS]
            yield where, str(key), item
            yield from _leaves(item, where, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]", depth + 1)


def _reason_words(reasons: Iterable[str]) -> set[str]:
    """The words of the reasons, and the parts of each (``amount_over_call_limit`` names ``amount``)."""
    words: set[str] = set()
    for reason in reasons:
        for word in _WORD.findall(reason):
            words.add(normalized(word))
            words.update(normalized(part) for part in re.split(r"[_\-]", word))
    return {w for w in words if len(w) >= 2 and w not in _REASON_STOPWORDS}


def _highlights(shown: Any, settings: PreviewSettings, reasons: Sequence[str], measured: set[str]) -> list[dict[str, str]]:
    wanted = {normalized(f) for f in settings.highlight_fields}
    named = _reason_words(reasons) - {normalized(m) for m in measured}  # already set apart as a measure
    found: list[dict[str, str]] = []
    for where, key, value in _leaves(shown, "$"):
        name = normalized(key)
        why = "field" if name in wanted else "reason" if name in named else None
        if why is None or value == MASKED:
            continue
        found.append({"path": where, "value": _value_text(value), "why": why})
        if len(found) >= MAX_LISTED:
            break
    return found


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = _display(text)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 1] + "…"


def _display(text: str) -> str:
    """Control and invisible formatting characters (Cc, Cf, line/paragraph separators) as \\uXXXX, newlines kept."""
    if text.isprintable():
        return text
    return "".join(c if c == "\n" or c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # a JSON escape: the UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def number_text(value: float) -> str:
    """5000.0 as ``5000``, 12.5 as ``12.5``."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def key_values(body: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The values set apart, as (label, value): the measures first, then the highlighted fields."""
    if not body:
        return []
    pairs = [(str(name), number_text(value)) for name, value in (body.get("measures") or {}).items()
             if isinstance(value, (int, float))]
    pairs += [(str(h.get("path", "")), str(h.get("value", ""))) for h in body.get("highlights") or []]
    return pairs


def describe(body: dict[str, Any] | None) -> list[str]:
    """The preview as lines of text (``approvals show``): size and hash, the values set apart, the body."""
    if body is None:
        return ["body: not recorded (held before this sidecar version kept body previews)"]
    size, kind = int(body.get("size", 0)), str(body.get("kind", ""))
    head = f"body: {size} bytes, sha256 {body.get('sha256', '')}"
    if body.get("content_type"):
        head += f", {body['content_type']}"
    lines = [head]
    values = key_values(body)
    if values:
        lines.append("values:")
        width = min(max(len(label) for label, _ in values), 40)
        lines += [f"  {label:<{width}}  {value}" for label, value in values]
    if body.get("masked"):
        lines.append(f"masked: {', '.join(body['masked'])}")
    if kind == "opaque":
        lines.append("(neither JSON nor a form: only its size and hash are shown)")
    elif body.get("text") is not None:
        cut = " (cut at the preview size)" if body.get("truncated") else ""
        lines.append(f"{kind} body{cut}:")
        lines += ["  " + line for line in str(body["text"]).splitlines()]
        if body.get("truncated"):
            lines.append("  ...")
    elif size and kind != "empty":
        lines.append("(body previews are off: approvals.body_preview_bytes is 0)")
    return lines
