"""SecretSet: the newest secret signs, retiring ones verify until they expire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.config import AppSettings
from bastion.security.secrets import SecretSet, unix_seconds


def test_newest_alone() -> None:
    secrets = SecretSet(b"new")
    assert secrets.signing == b"new"
    assert secrets.active(0.0) == (b"new",)


def test_newest_first_then_retiring_in_config_order() -> None:
    secrets = SecretSet(b"new", [(b"old", None), (b"older", 100.0)])
    assert secrets.active(50.0) == (b"new", b"old", b"older")
    assert secrets.signing == b"new"


def test_retiring_secret_is_accepted_up_to_and_including_its_expiry() -> None:
    secrets = SecretSet(b"new", [(b"old", 100.0)])
    assert secrets.active(100.0) == (b"new", b"old")
    assert secrets.active(100.000001) == (b"new",)


def test_no_expiry_means_until_removed() -> None:
    assert SecretSet(b"new", [(b"old", None)]).active(1e12) == (b"new", b"old")


def test_empty_secrets_are_refused() -> None:
    with pytest.raises(ValueError):
        SecretSet(b"")
    with pytest.raises(ValueError):
        SecretSet(b"new", [(b"", None)])


def test_repr_never_shows_a_secret() -> None:
    text = repr(SecretSet(b"topsecret", [(b"oldsecret", None)]))
    assert "topsecret" not in text
    assert "oldsecret" not in text


def test_from_settings() -> None:
    app = AppSettings.model_validate(
        {
            "id": "1",
            "key": "k",
            "secret": "new",
            "previous_secrets": [
                {"secret": "old", "expires_at": datetime(2030, 1, 1, tzinfo=UTC)},
                {"secret": "kept"},
            ],
        }
    )
    secrets = SecretSet.from_settings(app)
    expiry = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert secrets.signing == b"new"
    assert secrets.active(expiry) == (b"new", b"old", b"kept")
    assert secrets.active(expiry + 1) == (b"new", b"kept")


def test_naive_expiry_is_read_as_utc_and_offsets_are_honoured() -> None:
    aware = datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert unix_seconds(aware.replace(tzinfo=None)) == aware.timestamp()
    plus_two = datetime(2030, 1, 1, 14, tzinfo=timezone(timedelta(hours=2)))
    assert unix_seconds(plus_two) == aware.timestamp()


@given(
    retiring=st.lists(
        st.tuples(st.binary(min_size=1, max_size=8), st.none() | st.floats(-1e9, 1e9)),
        max_size=6,
    ),
    now=st.floats(-1e9, 1e9),
)
def test_active_is_the_newest_then_exactly_the_unexpired(
    retiring: list[tuple[bytes, float | None]], now: float
) -> None:
    active = SecretSet(b"newest", retiring).active(now)
    assert active[0] == b"newest"
    assert list(active[1:]) == [s for s, e in retiring if e is None or now <= e]
