"""What the whole test session logged and audited, and the rule that no secret is in it.

Tests register nothing by hand. The root ``conftest.py`` wires three taps:

* every :class:`bastion.server.runtime.Node` built in-process reports its settings,
  so each app secret, retiring secret and JWT key of the session is known;
* every record of the ``bastion`` loggers is formatted (message and any traceback)
  and kept, from INFO up, as a production node would write it;
* every ``bastion serve`` child process started by :mod:`support.server` reports
  the secrets of its config file and its stderr (where its log goes).

At the end, ``tests/test_hygiene.py`` (always run last) greps all of that, plus every
SQLite audit database the session produced, for those secrets and for anything
shaped like a credential: a JSON Web Token, an HMAC-SHA256 hex signature, an
``auth_signature=`` / ``auth=`` / ``token=`` value.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LogTap",
    "findings",
    "remember_config_file",
    "remember_secret",
    "remember_settings",
    "remember_text",
]

#: Secrets shorter than this are too likely to occur by chance to grep for.
MIN_SECRET_LENGTH = 8

_SECRETS: set[str] = set()
_TEXTS: list[tuple[str, str]] = []

#: Shapes of credentials that must never be written, whatever their value.
CREDENTIAL_SHAPES = {
    "a JSON Web Token": re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+"),
    "a hex HMAC-SHA256 signature": re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])"),
    "a credential parameter": re.compile(
        r"(?i)(?<![A-Za-z0-9_])(auth_signature|auth|token)=(?!\[redacted\])[^&\s\"',;]+"
    ),
}


def remember_secret(value: str | None) -> None:
    """Add one secret value to the set grepped for at the end."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _SECRETS.add(value)


def remember_settings(settings: Any) -> None:
    """Remember every secret of a loaded :class:`bastion.config.Settings`."""
    for app in settings.apps:
        remember_secret(app.secret.get_secret_value())
        for retiring in app.previous_secrets:
            remember_secret(retiring.secret.get_secret_value())
        jwt = getattr(app, "jwt", None)
        if jwt is not None and jwt.secret is not None:
            remember_secret(jwt.secret.get_secret_value())


def _secret_values(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secret" and isinstance(value, str):
                yield value
            else:
                yield from _secret_values(value)
    elif isinstance(node, list):
        for item in node:
            yield from _secret_values(item)


def remember_config_file(path: Path) -> None:
    """Remember every ``secret = "..."`` of a TOML config file (unreadable files: none)."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return
    for value in _secret_values(document):
        remember_secret(value)


def remember_text(origin: str, text: str) -> None:
    """Keep a piece of output (a log line, a child's stderr) for the final grep."""
    if text:
        _TEXTS.append((origin, text))


class LogTap(logging.Handler):
    """Keeps every ``bastion`` log record, formatted as the server would write it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken record is the test's problem, not the tap's
            return
        self.count += 1
        remember_text(f"log {record.name}", text)


def _audit_rows(path: Path) -> Iterator[str]:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return
    try:
        tables = [
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        for table in tables:
            for row in connection.execute(f'SELECT * FROM "{table}"'):
                yield " ".join(str(value) for value in row if value is not None)
    except sqlite3.Error:
        return
    finally:
        connection.close()


def findings(databases: Iterable[Path]) -> tuple[list[str], int, int]:
    """Every secret or credential found in the session's logs and audit rows.

    Returns:
        (the findings, how many texts were searched, how many secrets were known).
    """
    texts = list(_TEXTS)
    for path in databases:
        texts.extend((f"database {path}", row) for row in _audit_rows(path))
    found = []
    for origin, text in texts:
        for secret in _SECRETS:
            if secret in text:
                found.append(f"{origin}: a configured secret ({len(secret)} chars) appears")
        for shape, pattern in CREDENTIAL_SHAPES.items():
            if pattern.search(text):
                found.append(f"{origin}: {shape} appears: {pattern.sub('<here>', text)[:300]}")
    return found, len(texts), len(_SECRETS)
