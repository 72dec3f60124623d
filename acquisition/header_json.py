"""The JSON of a message header, read strictly (``docs/protocol.md`` sections 1 and 2).

Standard JSON only: UTF-8, an object at the top, no ``NaN``/``Infinity`` and no number beyond a double's
range (``1e400``), arrays and objects nested at most ``MAX_NESTING`` deep, at most ``MAX_HEADER_BYTES``.
Whatever breaks that is a :class:`~acquisition.errors.ProtocolError` (``bad_json`` or
``header_too_large``), never another exception: a ``RecursionError`` from 20,000 nested arrays included.
"""

from __future__ import annotations

import json
import math
from typing import Any

from acquisition.errors import ProtocolError
from acquisition.ids import is_acquisition_id
from acquisition.protocol import MAX_HEADER_BYTES, MAX_NESTING, Reason

__all__ = ["parse_header", "readable_id", "short", "too_deep"]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in headers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON has no infinity, and msgspec refuses it too
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# One decoder for every header: ``json.loads`` with keyword arguments builds a new one per call.
_HEADER_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def too_deep(raw: bytes, obj: Any, level: int = 1) -> bool:
    """Whether ``obj`` (parsed from ``raw``, at nesting ``level`` of it) goes deeper than ``MAX_NESTING``."""
    if raw.count(b"{") + raw.count(b"[") <= MAX_NESTING:  # cannot be deeper than its brackets
        return False
    stack: list[tuple[Any, int]] = [(obj, level)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return False


def parse_header(part: Any) -> dict[str, Any]:
    view = memoryview(part)
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(
            Reason.HEADER_TOO_LARGE, f"header is {view.nbytes} bytes; the limit is {MAX_HEADER_BYTES}"
        )
    raw = view.tobytes()
    try:
        obj = _HEADER_DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(Reason.BAD_JSON, f"header is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(
            Reason.BAD_JSON, f"header nests arrays or objects deeper than {MAX_NESTING} levels"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError(Reason.BAD_JSON, f"header must be a JSON object, got {type(obj).__name__}")
    if too_deep(raw, obj):
        raise ProtocolError(
            Reason.BAD_JSON,
            f"header nests arrays or objects deeper than {MAX_NESTING} levels",
            acquisition=readable_id(obj),
        )
    return obj


def short(value: Any) -> str:
    """``repr(value)``, cut to 40 characters (it comes from the sender)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def readable_id(obj: dict[str, Any]) -> str | None:
    """The header's acquisition id when it is a valid one (so a rejection can be published to it)."""
    value = obj.get("acquisition")
    return value if is_acquisition_id(value) else None
