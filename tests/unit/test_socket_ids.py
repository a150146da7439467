"""Socket ids: unpredictable, unique on the node, from random bytes read in chunks."""

from __future__ import annotations

import os

import pytest

from bastion.server import websocket
from bastion.server.websocket import _Entropy, new_socket_id


def test_socket_ids_are_two_groups_of_digits_and_never_taken() -> None:
    taken: set[str] = set()
    for _ in range(2000):
        socket_id = new_socket_id(taken)
        high, dot, low = socket_id.partition(".")
        assert dot and high.isdigit() and low.isdigit()
        assert int(high) < 10**10 and int(low) < 10**10
        assert socket_id not in taken
        taken.add(socket_id)


def test_random_bytes_are_read_a_chunk_at_a_time_and_used_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []

    def urandom(size: int) -> bytes:
        reads.append(size)
        return bytes((len(reads) + index) % 251 for index in range(size))

    monkeypatch.setattr(websocket.os, "urandom", urandom)
    entropy = _Entropy()
    values = [entropy.below(10**20, 9) for _ in range(_Entropy.CHUNK // 9)]
    assert reads == [_Entropy.CHUNK]  # one read for all of them
    entropy.below(10**20, 9)
    assert reads == [_Entropy.CHUNK, _Entropy.CHUNK]  # the rest of a chunk is not reused
    assert all(0 <= value < 10**20 for value in values)


def test_a_value_past_the_last_whole_multiple_is_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 0xFF.. as a 1-byte draw below 100: 255 >= 200 (the last whole multiple) is
    # rejected, else 255 % 100 would make 0-55 likelier than 56-99.
    chunks = iter([b"\xff" + bytes([42]) + b"\x00" * (_Entropy.CHUNK - 2)])
    monkeypatch.setattr(websocket.os, "urandom", lambda size: next(chunks))
    assert _Entropy().below(100, 1) == 42


def test_a_reset_drops_what_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = os.urandom

    def urandom(size: int) -> bytes:
        reads.append(size)
        return real(size)

    monkeypatch.setattr(websocket.os, "urandom", urandom)
    entropy = _Entropy()
    entropy.below(10**20, 9)
    entropy.reset()  # what a forked child does first
    entropy.below(10**20, 9)
    assert len(reads) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_hands_out_its_parents_bytes() -> None:
    websocket._ENTROPY.below(10**20, 9)  # the parent holds a chunk now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, new_socket_id(set()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent = new_socket_id(set())
    assert child and child != parent
