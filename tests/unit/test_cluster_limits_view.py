"""SharedLimiter: a node's view of a cluster-wide bucket, and the pre-filter deciding
which keys cost a Redis call (issue #5, cluster-wide rate limits).

The last tests simulate several nodes against a model of the Redis script (the
same arithmetic), on a fake clock, to check the long-run bound of the design.
"""

from __future__ import annotations

import math

import pytest

from bastion.security.limits import (
    LIMITER_NAMES,
    LimiterFactory,
    MemoryRateLimiter,
    RateLimiter,
    memory_limiters,
)
from bastion.security.shared_limits import HOT_MIN_SECONDS, SharedLimiter


def clock() -> float:
    raise AssertionError("the pure limiter never reads its clock")


def shared(rate: float = 1.0, burst: float = 10.0, max_keys: int = 100) -> SharedLimiter:
    return SharedLimiter("client_events_app", rate, burst, max_keys, clock)


def test_the_default_factory_builds_a_memory_limiter() -> None:
    factory: LimiterFactory = memory_limiters
    limiter = factory("rest_ip", 2, 3, 7, clock)
    assert isinstance(limiter, MemoryRateLimiter)
    assert (limiter.rate, limiter.burst, limiter.max_keys) == (2, 3, 7)
    assert set(LIMITER_NAMES) == {
        "new_conn_ip",
        "rest_ip",
        "auth_fail_ip",
        "rest_app",
        "client_events_app",
        "client_event_user",
        "rest_event_app",
        "user_errors",
    }


def test_a_shared_limiter_is_a_rate_limiter() -> None:
    limiter: RateLimiter = shared(rate=1, burst=2)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.peek("a", 0.0) == pytest.approx(1.0)
    assert limiter.take("a", 0.0) == pytest.approx(1.0)  # refused: nothing taken
    assert limiter.available("a", 0.5) == pytest.approx(0.5)
    assert limiter.take("a", 1.0) == 0.0
    assert limiter.available("never-seen", 0.0) == 2


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        SharedLimiter("x", 0, 1, 1, clock)
    with pytest.raises(ValueError):
        SharedLimiter("x", 1, 0.5, 1, clock)
    with pytest.raises(ValueError):
        SharedLimiter("x", 1, 1, 0, clock)


def test_a_new_key_is_synced_at_once_then_only_near_the_limit() -> None:
    limiter = shared(rate=1, burst=100)
    assert limiter.take("k", 0.0) == 0.0
    assert limiter.due() == [("k", 1.0)]  # never synced here: learn the cluster's state
    limiter.settle("k", 99.0, 0.0)
    assert limiter.synced("k")
    for _ in range(9):  # 90 left: far from the limit, under a report's worth
        assert limiter.take("k", 0.0) == 0.0
    assert not limiter.has_due and limiter.due() == []
    assert limiter.take("k", 0.0) == 0.0  # 10 unsent: a tenth of the burst
    assert limiter.due() == [("k", 10.0)]
    limiter.settle("k", 52.0, 0.0)  # others spent some: 52 left
    limiter.take("k", 0.0)
    limiter.take("k", 0.0)
    assert not limiter.has_due  # 50: not yet below half the burst
    limiter.take("k", 0.0)
    assert limiter.due() == [("k", 3.0)]


def test_near_the_limit_every_grant_is_sent() -> None:
    limiter = shared(rate=1, burst=10)
    limiter.take("k", 0.0)
    limiter.due()
    limiter.settle("k", 5.0, 0.0)  # the cluster has only 5: near the limit
    assert limiter.available("k", 0.0) == 5.0
    assert limiter.take("k", 0.0) == 0.0
    assert limiter.due() == [("k", 1.0)]


def test_the_cluster_remainder_caps_the_view_less_what_was_granted_meanwhile() -> None:
    limiter = shared(rate=2, burst=10)
    for _ in range(6):
        limiter.take("k", 0.0)
    assert limiter.due() == [("k", 6.0)]
    limiter.take("k", 0.0)  # granted while the round trip was in flight
    limiter.settle("k", 1.0, 0.0)  # other nodes spent the rest
    assert limiter.available("k", 0.0) == 0.0  # 1 left, 1 granted unsent
    assert limiter.take("k", 0.0) == pytest.approx(0.5)
    assert limiter.take("k", 0.5) == 0.0  # it refills at the rate meanwhile
    assert limiter.due() == [("k", 2.0)]


def test_a_debt_is_paid_back_before_granting_again() -> None:
    limiter = shared(rate=1, burst=4)
    limiter.take("k", 0.0)
    limiter.due()
    limiter.settle("k", -3.0, 0.0)  # nodes granted 3 more than the cluster had
    assert limiter.available("k", 0.0) == -3.0
    assert limiter.take("k", 0.0) == pytest.approx(4.0)
    limiter.settle("k", -100.0, 0.0)  # never below minus the burst
    assert limiter.available("k", 0.0) == -4.0
    limiter.settle("k", 100.0, 0.0)  # nor above the burst
    assert limiter.available("k", 0.0) == 4.0


def test_a_remainder_near_empty_makes_the_key_hot() -> None:
    limiter = shared(rate=1, burst=10)
    limiter.take("k", 0.0)
    limiter.due()
    limiter.settle("k", 2.0, 0.0)
    assert limiter.hot("k", 0.0)
    # Hot until the cluster could be back above half the burst (3 s), at least 1 s.
    assert limiter.hot("k", 2.9) and not limiter.hot("k", 3.0)
    limiter.settle("k", 10.0, 5.0)  # a full bucket does not cool it early, nor heat it
    assert not limiter.hot("k", 5.0)


def test_a_notice_caps_only_keys_held_and_makes_them_hot() -> None:
    limiter = shared(rate=1, burst=10)
    assert not limiter.notice("unknown", 0.0, 0.0)
    assert len(limiter) == 0  # a notice never grows memory
    limiter.take("k", 0.0)
    limiter.due()
    limiter.settle("k", 9.0, 0.0)
    limiter.take("k", 1.0)  # 9 left, 1 unsent
    assert limiter.notice("k", 0.5, 1.0)
    assert limiter.available("k", 1.0) == pytest.approx(-0.5)
    assert limiter.hot("k", 1.0)
    assert limiter.take("k", 1.5) == pytest.approx(1.0)
    assert limiter.take("k", 2.5) == 0.0
    assert [key for key, _ in limiter.due()] == ["k"]  # hot: every grant is sent
    # A notice never raises a view.
    assert limiter.notice("k", 10.0, 2.5)
    assert limiter.available("k", 2.5) == pytest.approx(0.0)


def test_a_failed_sync_drops_what_was_handed_over_and_keeps_limiting() -> None:
    limiter = shared(rate=1, burst=3)
    for _ in range(3):
        assert limiter.take("k", 0.0) == 0.0
    assert limiter.due() == [("k", 3.0)]
    limiter.failed()
    assert not limiter.synced("k")
    assert limiter.take("k", 0.0) > 0  # the local bucket alone still limits
    assert limiter.take("k", 1.0) == 0.0
    assert limiter.due() == [("k", 1.0)]  # never synced: sent again next time


def test_memory_is_bounded_and_idle_keys_go_first() -> None:
    limiter = shared(rate=1, burst=2, max_keys=2)
    limiter.take("idle", 0.0)
    limiter.take("busy", 0.0)
    limiter.take("busy", 0.0)
    limiter.due()
    limiter.settle("idle", 1.0, 0.0)
    limiter.settle("busy", 0.0, 0.0)
    # At t=1 "idle" is full again (nothing unsent, not hot): dropped first.
    limiter.take("new", 1.0)
    assert len(limiter) == 2
    assert limiter.synced("busy") and not limiter.synced("idle")
    # No idle key left: the least recently used goes, with its pending send.
    limiter.take("newer", 1.0)
    assert len(limiter) == 2
    assert not limiter.synced("busy")
    assert sorted(key for key, _ in limiter.due()) == ["new", "newer"]


# --- several nodes against a model of the Redis script ---------------------------------


class ScriptModel:
    """The arithmetic of ``TAKE_SCRIPT`` (adapters/cluster_limits.py), on a fake clock."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, tuple[float, float, float, int]] = {}
        self.notices: list[tuple[float, str, float]] = []

    def apply(self, key: str, granted: float, floor: float, near: float, now: float) -> float:
        state = self.buckets.get(key, (self.burst, now, -math.inf, 0))
        tokens, updated, announced, announced_level = state
        tokens = min(self.burst, tokens + max(0.0, now - updated) * self.rate)
        tokens = max(floor, tokens - granted)
        level = 2 if tokens < 1 else 1 if tokens < near else 0
        if level == 0:
            announced_level = 0
        elif granted > 0 and (level > announced_level or now - announced >= HOT_MIN_SECONDS):
            self.notices.append((now, key, tokens))
            announced, announced_level = now, level
        self.buckets[key] = (tokens, now, announced, announced_level)
        return tokens


def simulate(
    nodes: int, rate: float, burst: float, demand: float, seconds: float, interval: float
) -> tuple[int, int]:
    """Each node asks ``demand`` grants a second; returns (granted, round trips)."""
    model = ScriptModel(rate, burst)
    limiters = [SharedLimiter("x", rate, burst, 10, clock) for _ in range(nodes)]
    read = [0] * nodes
    owed = [0.0] * nodes
    granted = trips = 0
    step = 0.001
    for tick in range(round(seconds / step)):
        now = tick * step
        for n, limiter in enumerate(limiters):
            owed[n] += demand * step
            while owed[n] >= 1:
                owed[n] -= 1
                granted += limiter.take("k", now) == 0.0
        if tick % round(interval / step) == 0:
            for n, limiter in enumerate(limiters):
                for key, spent in limiter.due():
                    trips += 1
                    limiter.settle(
                        key, model.apply(key, spent, limiter.floor, limiter.near, now), now
                    )
                for written, key, left in model.notices[read[n] :]:
                    limiter.notice(key, min(burst, left + (now - written) * rate), now)
                read[n] = len(model.notices)
    return granted, trips


@pytest.mark.parametrize("nodes", [2, 3, 5, 10])
def test_saturated_nodes_share_one_rate_in_the_long_run(nodes: int) -> None:
    rate, burst, interval = 100.0, 100.0, 0.05
    first, _ = simulate(nodes, rate, burst, demand=1000, seconds=4, interval=interval)
    total, _ = simulate(nodes, rate, burst, demand=1000, seconds=8, interval=interval)
    steady = (total - first) / 4
    assert steady == pytest.approx(rate, rel=0.05)
    # The start: before the first sync each node may grant its whole view.
    assert first <= burst + rate * 4 + nodes * burst


def test_keys_far_from_the_limit_cost_few_round_trips() -> None:
    # Two nodes at a tenth of the rate each: the pre-filter sends a report per
    # tenth of the burst, not a call per grant nor per interval.
    granted, trips = simulate(2, rate=100, burst=100, demand=10, seconds=10, interval=0.05)
    assert granted == 200
    assert trips <= 2 + granted / 10
