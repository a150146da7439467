"""New apps' credentials and secrets (pure: the random bytes are given)."""

from __future__ import annotations

import re
import secrets
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.config import settings_from_mapping
from bastion.security.doctor import examine
from bastion.security.keys import MIN_SECRET_BYTES, app_toml, new_app, new_secret


def test_a_secret_is_the_random_bytes_in_hex() -> None:
    assert new_secret(lambda n: b"\xab" * n, 16) == "ab" * 16
    assert len(new_secret(secrets.token_bytes)) == 64
    with pytest.raises(ValueError):
        new_secret(secrets.token_bytes, MIN_SECRET_BYTES - 1)


@given(st.binary(min_size=64, max_size=64))
def test_an_app_has_sdk_friendly_shapes(randomness: bytes) -> None:
    stream = iter(randomness * 4)
    app = new_app(lambda n: bytes(next(stream) for _ in range(n)))
    assert re.fullmatch(r"[1-9][0-9]{6}", app.id)
    assert re.fullmatch(r"[0-9a-f]{20}", app.key)
    assert re.fullmatch(r"[0-9a-f]{64}", app.secret)


def test_taken_ids_and_keys_are_never_reused() -> None:
    first = new_app(lambda n: b"\x00" * n)
    chunks = iter([b"\x00" * 8, b"\x01" * 8, b"\x00" * 10, b"\x02" * 10, b"\x03" * 32])
    again = new_app(lambda n: next(chunks), taken_ids={first.id}, taken_keys={first.key})
    assert again.id != first.id and again.key != first.key
    assert again.secret == "03" * 32


def test_the_toml_loads_and_the_doctor_finds_the_secret_strong() -> None:
    app = new_app(secrets.token_bytes, app_id="4242")
    document = tomllib.loads(app_toml(app))
    settings = settings_from_mapping(document, environ={})
    (loaded,) = settings.apps
    assert (loaded.id, loaded.key, loaded.secret.get_secret_value()) == (
        app.id,
        app.key,
        app.secret,
    )
    secret_findings = [f for f in examine(settings) if "secret" in f.check and "4242" in f.check]
    assert secret_findings and all(f.level == "pass" for f in secret_findings)
