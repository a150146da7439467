"""Channel history, pure: positions, the resume field, the bounds and the recovery verdict.

The property test at the end is the never-partial rule: whatever sequence of
publishes, evictions, expiries, restarts and resumes (genuine, stale or forged),
a resume answered ``recovered: true`` replays exactly the events recorded after
its position, in order, and one answered ``false`` replays nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.config import HistorySettings
from bastion.core.history import (
    AppHistory,
    ChannelHistory,
    Entry,
    HistoryLimits,
    HistoryPolicy,
    Unrecovered,
    complete,
    entry_size,
    verdict,
)
from bastion.protocol.positions import (
    MAX_OFFSET,
    Position,
    Resume,
    decode_resume,
    parse_position,
)


def limits(**overrides: float) -> HistoryLimits:
    fields: dict[str, float] = {
        "max_events": 100,
        "max_bytes": 65_536,
        "max_age": 300.0,
        "max_channels": 1000,
        "max_replay": 100,
        "position_ttl": 3600.0,
    }
    fields.update(overrides)
    return HistoryLimits(**fields)  # type: ignore[arg-type]


def epochs() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"e{next(counter)}"


# --- positions and the resume field -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc:0", Position("abc", 0)),
        ("Qh3x9T-_:42", Position("Qh3x9T-_", 42)),
        (f"e:{MAX_OFFSET}", Position("e", MAX_OFFSET)),
        ("a" * 16 + ":" + "9" * 15, Position("a" * 16, int("9" * 15))),
    ],
)
def test_positions_parse(text: str, expected: Position) -> None:
    assert parse_position(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        None,
        42,
        ["e:1"],
        "",
        "e",
        "e:",
        ":1",
        "e:01",
        "e:-1",
        "e:1.0",
        "e:1:2",
        "e 1",
        "é:1",
        "e:\u0661",  # an Arabic-Indic digit: \d would take it
        "a" * 17 + ":1",
        f"e:{MAX_OFFSET + 1}",
        "e:" + "1" * 17,
        "e:1\n",
    ],
)
def test_anything_else_is_not_a_position(text: object) -> None:
    assert parse_position(text) is None


@given(st.from_regex(r"[A-Za-z0-9_\-]{1,16}", fullmatch=True), st.integers(0, MAX_OFFSET))
def test_a_position_reads_back_as_itself(epoch: str, offset: int) -> None:
    position = Position(epoch, offset)
    assert parse_position(str(position)) == position


def test_resume_fields_decode() -> None:
    assert decode_resume({}) == Resume()
    assert decode_resume({"position": "e:3"}) == Resume(Position("e", 3))
    assert decode_resume({"position": "e:3", "socket_id": "1.2"}) == Resume(Position("e", 3), "1.2")
    assert decode_resume({"position": None}) == Resume()


@pytest.mark.parametrize(
    "value",
    [
        "e:3",
        ["e:3"],
        None,
        {"position": 3},
        {"position": "e:x"},
        {"position": "e:3", "socket_id": "abc"},
        {"position": "e:3", "socket_id": 12},
    ],
)
def test_a_malformed_resume_carries_its_problem_never_raises(value: object) -> None:
    resume = decode_resume(value)
    assert resume.problem is not None
    assert resume.position is None


# --- the policy ------------------------------------------------------------------------------


def test_the_policy_covers_its_prefixes_and_never_a_user_channel() -> None:
    policy = HistoryPolicy(HistorySettings(channel_prefixes=["chat-", "private-chat-"]))
    assert policy.covers("chat-1")
    assert policy.covers("private-chat-1")
    assert not policy.covers("news")
    assert not policy.covers("private-news")
    everything = HistoryPolicy(HistorySettings())
    assert everything.covers("anything")
    assert not everything.covers("#server-to-user-1")


# --- one channel's bounds ---------------------------------------------------------------------


def test_offsets_count_from_one_in_the_channels_epoch() -> None:
    history = ChannelHistory("e1", 0.0)
    assert [history.append("ev", "d", None, 0.0, limits()) for _ in range(3)] == [
        Position("e1", 1),
        Position("e1", 2),
        Position("e1", 3),
    ]


def test_the_count_bound_keeps_the_newest() -> None:
    history = ChannelHistory("e", 0.0)
    for _ in range(5):
        history.append("ev", "d", None, 0.0, limits(max_events=3))
    assert [entry.offset for entry in history.entries] == [3, 4, 5]
    assert history.oldest == 3


def test_the_byte_bound_counts_names_data_and_excluded_socket() -> None:
    assert entry_size("ev", "é", "1.2") == 2 + 2 + 3
    history = ChannelHistory("e", 0.0)
    for _ in range(4):
        history.append("ev", "x" * 8, None, 0.0, limits(max_bytes=25))
    assert [entry.offset for entry in history.entries] == [3, 4]
    assert history.bytes == 20


def test_an_event_larger_than_the_byte_bound_is_not_kept_but_counted() -> None:
    history = ChannelHistory("e", 0.0)
    position = history.append("ev", "x" * 100, None, 0.0, limits(max_bytes=10))
    assert position == Position("e", 1)
    assert not history.entries
    assert history.oldest == 2  # a client at 0 has missed offset 1: too old


def test_the_age_bound_drops_events_as_time_passes() -> None:
    history = ChannelHistory("e", 0.0)
    history.append("ev", "d", None, 0.0, limits(max_age=10))
    history.append("ev", "d", None, 5.0, limits(max_age=10))
    history.trim(10.0, limits(max_age=10))
    assert [entry.offset for entry in history.entries] == [2]
    recovery = history.since(Position("e", 0), None, 10.0, limits(max_age=10))
    assert recovery == verdict(Position("e", 0), "e", 2, 2, 100)
    assert recovery is not None and recovery.reason == Unrecovered.TOO_OLD


# --- the verdict ----------------------------------------------------------------------------


def test_a_client_without_a_position_is_told_where_the_channel_is() -> None:
    assert verdict(None, "e", 7, 3, 100) == (found := verdict(None, "e", 7, 3, 100))
    assert found is not None and found.recovered and found.position == Position("e", 7)
    assert not found.entries


@pytest.mark.parametrize(
    ("asked", "reason"),
    [
        (Position("other", 5), Unrecovered.EPOCH_CHANGED),
        (Position("e", 8), Unrecovered.FUTURE),
        (Position("e", 1), Unrecovered.TOO_OLD),  # offset 2 is gone, oldest is 3
        (Position("e", 2), None),  # 3 to 7 are kept: read them
    ],
)
def test_verdicts(asked: Position, reason: str | None) -> None:
    found = verdict(asked, "e", 7, 3, 100)
    if reason is None:
        assert found is None
    else:
        assert found is not None and not found.recovered and found.reason == reason
        assert found.position == Position("e", 7)
        assert not found.entries


def test_a_client_at_the_top_recovered_nothing_missing() -> None:
    found = verdict(Position("e", 7), "e", 7, 8, 100)
    assert found is not None and found.recovered and not found.entries


def test_more_missed_than_the_replay_cap_is_false_without_a_replay() -> None:
    found = verdict(Position("e", 2), "e", 7, 1, 4)
    assert found is not None and found.reason == Unrecovered.TOO_MANY and not found.entries
    assert verdict(Position("e", 3), "e", 7, 1, 4) is None  # exactly the cap: read


def entry(offset: int, exclude: str | None = None) -> Entry:
    return Entry(offset, 0.0, "ev", f"d{offset}", exclude, 4)


def test_complete_replays_exactly_the_missed_events() -> None:
    found = complete(Position("e", 2), None, "e", 4, [entry(3), entry(4)])
    assert found.recovered
    assert [e.offset for e in found.entries] == [3, 4]
    assert found.position == Position("e", 4)


@pytest.mark.parametrize(
    "missed",
    [
        [entry(3)],  # one lost
        [entry(4)],  # the first lost
        [entry(4), entry(3)],  # out of order
        [entry(3), entry(3)],  # twice
        [entry(3), entry(4), entry(5)],  # one too many
        [],
    ],
)
def test_anything_but_the_exact_run_is_unavailable_never_partial(missed: list[Entry]) -> None:
    found = complete(Position("e", 2), None, "e", 4, missed)
    assert not found.recovered
    assert found.reason == Unrecovered.UNAVAILABLE
    assert not found.entries


def test_events_excluding_the_resuming_socket_are_skipped_but_count_as_recovered() -> None:
    missed = [entry(3, "1.1"), entry(4, "2.2"), entry(5)]
    found = complete(Position("e", 2), "1.1", "e", 5, missed)
    assert found.recovered
    assert [e.offset for e in found.entries] == [4, 5]
    assert found.position == Position("e", 5)
    # Without the socket id nothing is skipped.
    assert len(complete(Position("e", 2), None, "e", 5, missed).entries) == 3


# --- an app's channels ------------------------------------------------------------------------


def test_the_least_recently_used_channel_is_forgotten_past_max_channels() -> None:
    history = AppHistory()
    new_epoch = epochs()
    bounds = limits(max_channels=2)
    a = history.append("a", "ev", "d", None, 0.0, bounds, new_epoch)
    history.append("b", "ev", "d", None, 0.0, bounds, new_epoch)
    history.since("a", None, None, 0.0, bounds, new_epoch)  # a used again
    history.append("c", "ev", "d", None, 0.0, bounds, new_epoch)
    assert list(history.channels) == ["a", "c"]
    # b starts again in a new epoch: its old positions are not compared.
    assert a.epoch == "e1"
    found = history.since("b", Position("e2", 1), None, 0.0, bounds, new_epoch)
    assert not found.recovered and found.reason == Unrecovered.EPOCH_CHANGED


def test_a_quiet_channel_keeps_its_position_for_position_ttl() -> None:
    history = AppHistory()
    new_epoch = epochs()
    bounds = limits(max_age=10, position_ttl=100)
    position = history.append("a", "ev", "d", None, 0.0, bounds, new_epoch)
    # The event expired, but a client that had it missed nothing.
    kept = history.since("a", position, None, 50.0, bounds, new_epoch)
    assert kept.recovered and not kept.entries
    gone = history.since("a", position, None, 101.0, bounds, new_epoch)
    assert not gone.recovered and gone.reason == Unrecovered.EPOCH_CHANGED


def test_a_channel_started_by_a_resume_is_forgotten_after_max_age() -> None:
    history = AppHistory()
    new_epoch = epochs()
    bounds = limits(max_age=10, position_ttl=100)
    start = history.since("a", None, None, 0.0, bounds, new_epoch)
    assert start.recovered and start.position == Position("e1", 0)
    assert history.sweep(5.0, bounds) == 0
    assert history.sweep(11.0, bounds) == 1
    assert not history.channels


def test_sweep_forgets_from_the_old_end_and_stops_at_the_first_kept() -> None:
    history = AppHistory()
    new_epoch = epochs()
    bounds = limits(max_age=10, position_ttl=10)
    history.append("old", "ev", "d", None, 0.0, bounds, new_epoch)
    history.append("new", "ev", "d", None, 8.0, bounds, new_epoch)
    assert history.sweep(15.0, bounds) == 1
    assert list(history.channels) == ["new"]


# --- never partial, whatever happens -------------------------------------------------------

_operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from("ab"), st.sampled_from([None, "1.1"])),
        st.tuples(st.just("wait"), st.floats(0, 40)),
        st.tuples(st.just("resume"), st.sampled_from("ab"), st.integers(0, 60)),
        st.tuples(st.just("forged"), st.sampled_from("ab"), st.integers(0, 60)),
        st.tuples(st.just("restart")),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    _operations,
    st.integers(1, 8),
    st.integers(8, 200),
    st.integers(1, 3),
    st.integers(1, 10),
)
def test_a_resume_never_yields_a_gap(
    operations: list[tuple[object, ...]],
    max_events: int,
    max_bytes: int,
    max_channels: int,
    max_replay: int,
) -> None:
    bounds = limits(
        max_events=max_events,
        max_bytes=max_bytes,
        max_age=60,
        max_channels=max_channels,
        max_replay=max_replay,
        position_ttl=90,
    )
    history = AppHistory()
    new_epoch = epochs()
    now = 0.0
    # The model: every event ever recorded, per (channel, epoch), in order.
    recorded: dict[tuple[str, str], list[tuple[int, str | None]]] = {}
    seen: list[tuple[str, Position]] = []
    for operation in operations:
        kind = operation[0]
        if kind == "publish":
            _, channel, exclude = operation
            assert isinstance(channel, str)
            assert exclude is None or isinstance(exclude, str)
            position = history.append(channel, "ev", "data", exclude, now, bounds, new_epoch)
            log = recorded.setdefault((channel, position.epoch), [])
            # Offsets of one epoch are consecutive from 1.
            assert position.offset == len(log) + 1
            log.append((position.offset, exclude))
            seen.append((channel, position))
        elif kind == "wait":
            assert isinstance(operation[1], float)
            now += operation[1]
            history.sweep(now, bounds)
        elif kind == "restart":
            history = AppHistory()
        else:
            _, channel, pick = operation
            assert isinstance(channel, str) and isinstance(pick, int)
            if kind == "resume" and seen:
                channel, asked = seen[pick % len(seen)]
            else:
                asked = Position(f"e{pick % 5 + 1}", pick)
            found = history.since(channel, asked, "1.1", now, bounds, new_epoch)
            if not found.recovered:
                assert not found.entries
                continue
            assert found.position is not None
            assert found.position.epoch == asked.epoch
            log = recorded.get((channel, asked.epoch), [])
            expected = [
                offset
                for offset, exclude in log
                if asked.offset < offset <= found.position.offset and exclude != "1.1"
            ]
            assert [e.offset for e in found.entries] == expected
            assert found.position.offset == len(log)  # up to the last one recorded
