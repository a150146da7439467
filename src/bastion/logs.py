"""Process logging: one redacting handler on the root logger, console or JSON lines.

:func:`configure` is called once by ``bastion serve`` (and by each worker of
``--workers N``). It installs one handler on the root logger that writes to
stderr, so every record of every logger (Bastion's own and third-party ones such
as ``websockets``, ``httpx``, ``redis``, ``asyncio``) passes through it.

Redaction is the handler's formatting step, not an optional filter: the fully
formatted line (console) or each field (JSON: message, exception text, string
extras) goes through :func:`bastion.security.audit.redact` before a byte is
written. Formatting never raises: a record whose ``%``-arguments do not fit its
message still yields one redacted line (its template and the error type, never
its arguments), because :meth:`logging.Handler.handleError` would otherwise print
the raw arguments to stderr.

Two formats:

* ``console``: ``%(asctime)s %(levelname)s %(name)s %(message)s``, with
  ``[worker I]`` before the logger name in a worker of ``--workers N``.
* ``json``: one object per line, keys ``time`` (ISO 8601 UTC with milliseconds,
  ``Z``), ``level``, ``logger``, ``message``, ``worker`` (workers only), ``exc``
  (the traceback, when there is one), plus the record's ``extra`` fields (strings
  redacted; a key that collides with one of those names is dropped).

Python warnings are routed through the same handler (:func:`logging.captureWarnings`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from bastion.security.audit import redact

__all__ = [
    "CONSOLE_FORMAT",
    "LEVELS",
    "LogFormat",
    "RedactingConsoleFormatter",
    "RedactingJsonFormatter",
    "configure",
    "parse_level_for",
]

LogFormat = Literal["console", "json"]

#: The level names accepted by ``--log-level`` and ``--log-level-for``.
LEVELS = ("debug", "info", "warning", "error", "critical")

#: The console line (unchanged since before this module, apart from redaction).
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

#: Keys of a JSON line that a record's ``extra`` may not replace.
_JSON_KEYS = frozenset({"time", "level", "logger", "message", "worker", "exc"})

#: Longest text kept from a non-scalar ``extra`` value.
_MAX_EXTRA_CHARS = 1000

#: Written when even the fallback line cannot be built.
_LAST_RESORT = "log record could not be formatted"


def _safe_message(record: logging.LogRecord) -> str:
    """The record's message, or its template and the error when its arguments do not fit."""
    try:
        return record.getMessage()
    except Exception as exc:  # a bad %-argument must not lose (or leak) the line
        return f"{record.msg!s} [log arguments could not be formatted: {type(exc).__name__}]"


def _iso_time(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class RedactingConsoleFormatter(logging.Formatter):
    """Today's console line, redacted as a whole (message, traceback, stack).

    Args:
        worker: the worker index, shown as ``[worker I]`` before the logger name.
    """

    def __init__(self, worker: int | None = None) -> None:
        fmt = CONSOLE_FORMAT
        if worker is not None:
            fmt = f"%(asctime)s %(levelname)s [worker {worker}] %(name)s %(message)s"
        super().__init__(fmt)
        self._prefix = "" if worker is None else f"[worker {worker}] "

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` and redact the whole result; never raises."""
        try:
            return redact(super().format(record))
        except Exception:
            return self._fallback(record)

    def _fallback(self, record: logging.LogRecord) -> str:
        try:
            line = (
                f"{self.formatTime(record)} {record.levelname} {self._prefix}{record.name}"
                f" {_safe_message(record)}"
            )
            if record.exc_info:
                line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            return redact(line)
        except Exception:
            return _LAST_RESORT


class RedactingJsonFormatter(logging.Formatter):
    """One JSON object per line; every string field is redacted before encoding.

    Fields are redacted one by one rather than the encoded line as a whole, so that
    a replacement can never break the JSON escaping.

    Args:
        worker: the worker index, written as ``"worker": I``.
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as one redacted JSON line; never raises."""
        try:
            return json.dumps(self._fields(record), ensure_ascii=False, default=str)
        except Exception:
            return self._fallback(record)

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        line: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(_safe_message(record)),
        }
        if self._worker is not None:
            line["worker"] = self._worker
        exc = self._exception_text(record)
        if exc:
            line["exc"] = redact(exc)
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRIBUTES or key in _JSON_KEYS or key.startswith("_"):
                continue
            line[key] = _extra_value(value)
        return line

    def _exception_text(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)

    def _fallback(self, record: logging.LogRecord) -> str:
        try:
            line: dict[str, Any] = {
                "time": _iso_time(record.created),
                "level": str(record.levelname),
                "logger": str(record.name),
                "message": redact(_safe_message(record)),
            }
            if self._worker is not None:
                line["worker"] = self._worker
            return json.dumps(line, ensure_ascii=False)
        except Exception:
            return json.dumps({"message": _LAST_RESORT})


def _extra_value(value: object) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return redact(value)
    return redact(repr(value)[:_MAX_EXTRA_CHARS])


class _RedactingHandler(logging.StreamHandler[TextIO]):
    """A stream handler whose error report never quotes the record."""

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's default prints the record's message and arguments to stderr,
        # unredacted; a write that failed (stderr closed, full pipe) is dropped.
        exc = sys.exc_info()[1]
        with contextlib.suppress(Exception):
            self.stream.write(f"{_LAST_RESORT} ({type(exc).__name__})\n")


def _level(name: str) -> int:
    if name.lower() not in LEVELS:
        raise ValueError(f"not a log level: {name!r} (use one of {', '.join(LEVELS)})")
    return logging.getLevelNamesMapping()[name.upper()]


def parse_level_for(text: str) -> tuple[str, str]:
    """Split a ``--log-level-for`` value ``NAME=LEVEL`` into ``(name, level)``.

    Raises:
        ValueError: no ``=``, an empty name, or an unknown level.
    """
    name, sep, level = text.partition("=")
    name, level = name.strip(), level.strip().lower()
    if not sep or not name:
        raise ValueError(f"expected LOGGER=LEVEL, got {text!r}")
    _level(level)
    return name, level


def configure(
    level: str,
    fmt: LogFormat,
    levels: Mapping[str, str] = {},
    worker: int | None = None,
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record of the process through one redacting handler.

    Replaces the handler an earlier call installed (handlers others added, such as
    a test runner's, are left alone) and sets the root level and each named
    logger's level.

    Args:
        level: the root level (``debug``, ``info``, ``warning``, ``error``).
        fmt: ``console`` (text lines) or ``json`` (one object per line).
        levels: logger name to level, e.g. ``{"websockets": "error"}``; a name
            covers its children (``bastion`` covers ``bastion.refusals``).
        worker: the worker index in a worker of ``--workers N``.
        stream: where to write (stderr by default; tests pass a buffer).

    Returns:
        The installed handler.

    Raises:
        ValueError: an unknown level or format.
    """
    if fmt not in ("console", "json"):
        raise ValueError(f"not a log format: {fmt!r} (use console or json)")
    root_level = _level(level)
    per_logger = {name: _level(value) for name, value in levels.items()}
    formatter: logging.Formatter = (
        RedactingJsonFormatter(worker) if fmt == "json" else RedactingConsoleFormatter(worker)
    )
    handler = _RedactingHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _RedactingHandler):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(root_level)
    for name, value in per_logger.items():
        logging.getLogger(name).setLevel(value)
    # A warning would otherwise go to stderr raw, in neither format.
    logging.captureWarnings(True)
    return handler
