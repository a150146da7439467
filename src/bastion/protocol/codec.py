"""JSON in and out: msgspec on the hot path, the standard library for the exact verdict.

Chosen on measurements (docs/decisions/0016-json-and-per-message-cost.md): msgspec
decodes Bastion's frames 4 to 8 times faster than the standard library and encodes
them 10 to 15 times faster, keeps integers of any size exact (orjson turns
2**64 into a float), and refuses NaN, Infinity and numbers that overflow, as
Bastion always has.

Where the two libraries' verdicts differ, the standard library's stands, so no
input is accepted or refused differently than before:

* **Decoding.** msgspec answers first. When it refuses (bad syntax, too deep for
  its recursion limit, a lone UTF-16 surrogate escape such as ``"\\ud800"``, which
  msgspec refuses and the standard library accepts), the standard library decides:
  it accepts what it always accepted, and refuses with the same reason
  (``MALFORMED_JSON`` or ``JSON_TOO_DEEP``) what it always refused.
* **Encoding.** Compact UTF-8, standard JSON. A value holding a lone surrogate (it
  can only come from the fallback above) cannot be UTF-8: it is encoded by the
  standard library with ``\\uXXXX`` escapes, so an outgoing frame is always valid
  UTF-8.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec

from bastion.errors import Refused
from bastion.protocol.refusals import Reason

__all__ = ["dumps", "encode", "encoded_size", "loads"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_json_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(value: Any) -> bytes:
    """``value`` as compact, standard UTF-8 JSON (a NaN or infinity becomes ``null``)."""
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError:
        # A lone surrogate: escaped, so the bytes stay valid UTF-8.
        return _json_encoder.encode(value).encode("ascii")


def dumps(value: Any) -> str:
    """``value`` as compact, standard JSON text (for ``data`` strings and REST bodies)."""
    return encode(value).decode("utf-8")


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as the compact UTF-8 JSON Bastion writes: what limits measure.

    Limits count what a user wrote, not ``\\uXXXX`` escapes, so non-Latin text is
    not penalised six-fold. A lone surrogate counts as the three bytes of its
    code point.
    """
    try:
        return len(_encoder.encode(value))
    except UnicodeEncodeError:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return len(text.encode("utf-8", "surrogatepass"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def loads(text: str | bytes) -> Any:
    """Parse strictly standard JSON from a peer.

    ``NaN``, ``Infinity`` and numbers that overflow to infinity are refused:
    relayed, they would make ``JSON.parse`` fail in every subscriber.

    Raises:
        Refused: ``MALFORMED_JSON`` or ``JSON_TOO_DEEP``.
    """
    try:
        return _decoder.decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
        # UnicodeEncodeError: text holding a lone surrogate (undecodable bytes
        # carried as surrogate escapes) cannot even reach msgspec.
        return _loads_exact(text)


def _loads_exact(text: str | bytes) -> Any:
    """The standard library's verdict, for what msgspec refused."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise Refused(Reason.JSON_TOO_DEEP) from None
    except ValueError:
        raise Refused(Reason.MALFORMED_JSON) from None
