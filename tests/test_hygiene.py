"""No secret or credential in anything the whole test session logged or audited.

Collected last (see ``conftest.py``): by then every other test has run its nodes
and server processes, made its good and bad signatures, minted and refused its
tokens, and stopped its nodes (which flushes their audit logs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import hygiene


def _audit_databases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # In-process nodes without an [audit] section write to the working directory;
    # everything else (server processes, tests' own audit paths) lives under basetemp.
    found = sorted(tmp_path_factory.getbasetemp().rglob("*.sqlite3"))
    local = Path("bastion-audit.sqlite3")
    if local.exists():
        found.append(local.resolve())
    return found


def test_no_secret_or_credential_in_any_log_line_or_audit_row(
    tmp_path_factory: pytest.TempPathFactory, _hygiene_taps: hygiene.LogTap
) -> None:
    databases = _audit_databases(tmp_path_factory)
    problems, searched, secrets = hygiene.findings(databases)
    assert not problems, "\n".join(problems[:50])
    # The grep must have had something to look at, or it proves nothing.
    assert secrets > 0 and searched > 0, (secrets, searched)


def test_the_grep_finds_what_it_looks_for() -> None:
    hygiene.remember_secret("a-secret-for-the-self-test")
    origin = "self-test"
    before = len(hygiene.findings([])[0])
    hygiene.remember_text(origin, "oops a-secret-for-the-self-test leaked")
    hygiene.remember_text(origin, "auth_signature=" + "ab" * 32)
    hygiene.remember_text(origin, "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl here")
    try:
        found = hygiene.findings([])[0][before:]
        assert any("configured secret" in item for item in found)
        assert any("hex HMAC-SHA256" in item for item in found)
        assert any("JSON Web Token" in item for item in found)
        assert any("credential parameter" in item for item in found)
    finally:
        hygiene._TEXTS[:] = [t for t in hygiene._TEXTS if t[0] != origin]
        hygiene._SECRETS.discard("a-secret-for-the-self-test")
