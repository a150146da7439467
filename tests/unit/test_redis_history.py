"""The Redis history's reading side without Redis: what a read script's answer becomes.

A read is refused while the node wants the channel's topic and Redis has not
confirmed it; a script's answer becomes a replay only when every entry opens
under the cluster key and the run is exact (the pure verdict of core/history.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bastion.adapters.base import ClusterUnavailable
from bastion.adapters.messages import ChannelEvent
from bastion.adapters.redis.history import FORGED_HISTORY, RedisHistory
from bastion.adapters.redis.scripts import seal
from bastion.config import HistorySettings
from bastion.core.history import HistoryLimits, Unrecovered
from bastion.protocol.positions import Position

KEY = b"k" * 32
LIMITS = HistoryLimits.from_settings(HistorySettings())


class FakeSession:
    healthy = True
    where = "redis://test"

    def wake_writer(self) -> None:
        pass


class FakeBus:
    def __init__(self, confirmed: bool = True) -> None:
        self.is_confirmed = confirmed
        self.forgeries: list[str] = []

    def encode_recorded(self, message: ChannelEvent) -> tuple[str, bytes]:
        return "topic", b""

    def confirmed(self, app_id: str, channel: str) -> bool:
        return self.is_confirmed

    def forged(self, reason: str, size: int) -> None:
        self.forgeries.append(reason)

    def drop(self, reason: str) -> None:
        pass


def history(bus: FakeBus, answer: list[Any]) -> RedisHistory:
    found = RedisHistory(FakeSession(), bus, "p", KEY)  # type: ignore[arg-type]

    async def script(keys: list[str], args: list[Any]) -> list[Any]:
        return answer

    found._since = script
    return found


def sealed(event: str, data: str, channel: str = "chat") -> bytes:
    value = json.dumps([event, data, None], separators=(",", ":"))
    return seal(KEY, ("1", channel, "history"), value).encode()


async def test_a_read_waits_for_the_topic_to_be_confirmed() -> None:
    unconfirmed = history(FakeBus(confirmed=False), [b"e", 0, 1])
    with pytest.raises(ClusterUnavailable):
        await unconfirmed.since("1", "chat", None, None, LIMITS)


async def test_a_read_answer_becomes_the_exact_replay() -> None:
    answer = [b"e", 3, 1, b"2-0", sealed("m", "b"), b"3-0", sealed("m", "c")]
    found = await history(FakeBus(), answer).since("1", "chat", Position("e", 1), None, LIMITS)
    assert found.recovered
    assert [(entry.offset, entry.data) for entry in found.entries] == [(2, "b"), (3, "c")]
    assert found.position == Position("e", 3)


async def test_a_gap_in_the_answer_is_unavailable() -> None:
    answer = [b"e", 3, 1, b"3-0", sealed("m", "c")]
    found = await history(FakeBus(), answer).since("1", "chat", Position("e", 1), None, LIMITS)
    assert not found.recovered and found.reason == Unrecovered.UNAVAILABLE


@pytest.mark.parametrize(
    "entry",
    [
        b"0" * 32 + b'.["m","evil",null]',  # no MAC of ours
        sealed("m", "elsewhere", channel="other"),  # sealed for another channel
        seal(KEY, ("1", "chat", "history"), '{"not":"a list"}').encode(),
    ],
)
async def test_an_entry_that_does_not_open_is_forged_never_replayed(entry: bytes) -> None:
    bus = FakeBus()
    answer = [b"e", 3, 1, b"2-0", sealed("m", "b"), b"3-0", entry]
    found = await history(bus, answer).since("1", "chat", Position("e", 1), None, LIMITS)
    assert not found.recovered and not found.entries
    assert found.reason == Unrecovered.UNAVAILABLE
    assert bus.forgeries == [FORGED_HISTORY]
