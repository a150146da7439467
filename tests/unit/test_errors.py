"""The exception tree: local misuse and a peer's fault are different branches."""

from __future__ import annotations

from bastion.errors import BastionError, ConfigError, PeerError, Refused


def test_tree() -> None:
    assert issubclass(ConfigError, BastionError)
    assert issubclass(PeerError, BastionError)
    assert issubclass(Refused, PeerError)
    assert not issubclass(ConfigError, PeerError)
    assert not issubclass(PeerError, ConfigError)
    assert issubclass(BastionError, Exception)
