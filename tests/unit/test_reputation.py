"""IP reputation (pure): weights, decay, threshold, never-block, bounded memory, BlockSet."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.config import settings_from_mapping
from bastion.protocol.refusals import Reason
from bastion.security.audit import from_block, from_unblock
from bastion.security.reputation import (
    DEFAULT_POINTS,
    ZERO_POINTS,
    Block,
    BlockSet,
    Reputation,
    canonical_ip,
    parse_duration,
)

T0 = 1_700_000_000.0


def reputation(**kwargs: object) -> Reputation:
    params: dict[str, object] = {
        "threshold": 100.0,
        "half_life_seconds": 300.0,
        "block_seconds": 900.0,
        **kwargs,
    }
    return Reputation(**params)  # type: ignore[arg-type]


def test_ten_bad_signatures_block_for_block_seconds() -> None:
    rep = reputation()
    for _ in range(9):
        assert rep.add("203.0.113.7", "auth_signature", T0) is None
    block = rep.add("203.0.113.7", "auth_signature", T0)
    assert block is not None
    assert (block.ip, block.until, block.source, block.created) == (
        "203.0.113.7",
        T0 + 900,
        "auto",
        T0,
    )
    assert block.score == 100.0
    assert "auth_signature" in block.reason
    # The score is forgotten once it has produced a block.
    assert rep.score("203.0.113.7", T0) == 0.0
    assert len(rep) == 0


def test_ten_bad_signatures_within_half_a_second_block_despite_decay() -> None:
    rep = reputation()
    blocks = [rep.add("203.0.113.7", "auth_signature", T0 + i * 0.05) for i in range(10)]
    assert blocks[:9] == [None] * 9
    assert blocks[9] is not None and blocks[9].score == pytest.approx(100, rel=1e-3)


def test_default_weights_by_kind() -> None:
    rep = reputation()
    assert rep.weight("auth_signature") == 10
    assert rep.weight("subscribe_auth_invalid") == 10
    assert rep.weight("replayed_request") == 20
    assert rep.weight("auth_failure_limit") == 20
    assert rep.weight("origin_refused") == 10
    assert rep.weight("connection_rate") == 5
    assert rep.weight("malformed_json") == 5
    # Not hostile: never scored.
    for slug in ("pong_timeout", "slow_consumer", "terminated", "over_capacity", "ip_blocked"):
        assert rep.weight(slug) == 0
        assert rep.add("203.0.113.7", slug, T0) is None
    assert len(rep) == 0


@pytest.mark.parametrize("slug", sorted({reason.value.slug for reason in Reason}))
def test_every_refusal_is_weighed_or_zero_for_a_stated_reason(slug: str) -> None:
    # A refusal a remote peer causes must cost it something, unless the zero table
    # says why not; a new Reason fails here until it is placed in one of the two.
    weighed, zero = slug in DEFAULT_POINTS, slug in ZERO_POINTS
    assert weighed != zero, f"{slug}: weighed={weighed}, zero={zero}"
    if weighed:
        assert DEFAULT_POINTS[slug] > 0
        assert reputation().weight(slug) == DEFAULT_POINTS[slug]
    else:
        why = ZERO_POINTS[slug]
        assert isinstance(why, str) and len(why.split()) >= 4, f"{slug}: say why it weighs 0"
        assert reputation().weight(slug) == 0


def test_the_weight_tables_name_only_real_refusals() -> None:
    slugs = {reason.value.slug for reason in Reason}
    assert set(DEFAULT_POINTS) <= slugs
    assert set(ZERO_POINTS) <= slugs


def test_a_flood_of_misused_messages_now_scores() -> None:
    # Issue #11: `{"event":"x"}` in a loop used to weigh nothing.
    rep = reputation()
    assert rep.weight("client_event_name") > 0 and rep.weight("message_rate") > 0
    blocks = [rep.add("203.0.113.7", "client_event_name", T0) for _ in range(100)]
    assert blocks[-1] is not None


def test_points_override_and_zero_ignores() -> None:
    rep = reputation(points={"auth_signature": 0, "pong_timeout": 50})
    assert rep.add("203.0.113.7", "auth_signature", T0) is None
    assert rep.score("203.0.113.7", T0) == 0
    assert rep.add("203.0.113.7", "pong_timeout", T0) is None
    assert rep.add("203.0.113.7", "pong_timeout", T0) is not None
    assert rep.weight("malformed_json") == DEFAULT_POINTS["malformed_json"]


def test_score_halves_every_half_life() -> None:
    rep = reputation()
    rep.add("198.51.100.1", "replayed_request", T0)
    assert rep.score("198.51.100.1", T0) == 20
    assert rep.score("198.51.100.1", T0 + 300) == pytest.approx(10)
    assert rep.score("198.51.100.1", T0 + 600) == pytest.approx(5)
    # A clock that steps back does not inflate or deflate the score.
    assert rep.score("198.51.100.1", T0 - 1000) == 20


def test_occasional_mistakes_never_add_up() -> None:
    rep = reputation()
    # One bad signature every 5 minutes forever converges to 2 x 10 = 20 < 100.
    for i in range(200):
        assert rep.add("198.51.100.1", "auth_signature", T0 + 300 * i) is None
    assert rep.score("198.51.100.1", T0 + 300 * 199) < 21


def test_never_block_networks_and_mapped_addresses() -> None:
    rep = reputation(never_block=["10.0.0.0/8", "::1/128"], threshold=1)
    assert rep.add("10.1.2.3", "auth_signature", T0) is None
    assert rep.add("::ffff:10.1.2.3", "auth_signature", T0) is None
    assert rep.add("::1", "auth_signature", T0) is None
    assert len(rep) == 0
    assert rep.exempt("10.9.9.9") and not rep.exempt("11.0.0.1")
    block = rep.add("::ffff:11.0.0.1", "auth_signature", T0)
    assert block is not None and block.ip == "11.0.0.1"  # one spelling per address


def test_garbage_addresses_are_not_scored() -> None:
    rep = reputation(threshold=1)
    assert rep.add("not-an-ip", "auth_signature", T0) is None
    assert rep.add("", "auth_signature", T0) is None
    assert len(rep) == 0


def test_memory_is_bounded_and_keeps_high_scores() -> None:
    rep = reputation(max_tracked=8)
    rep.add("192.0.2.200", "replayed_request", T0)  # the one worth remembering
    for i in range(100):
        rep.add(f"192.0.2.{i}", "malformed_json", T0 + i)
        assert len(rep) <= 8
    assert rep.score("192.0.2.200", T0 + 100) > 15


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        reputation(threshold=0)
    with pytest.raises(ValueError):
        reputation(points={"x": -1})
    with pytest.raises(ValueError):
        reputation(never_block=["nope"])
    with pytest.raises(ValueError):
        reputation(max_tracked=1)


def test_from_settings() -> None:
    settings = settings_from_mapping(
        {"security": {"reputation": {"threshold": 7, "points": {"pong_timeout": 7}}}}, environ={}
    )
    rep = Reputation.from_settings(settings.security.reputation)
    assert rep.threshold == 7
    assert rep.add("127.0.0.1", "pong_timeout", T0) is None  # loopback: never_block default
    assert rep.add("192.0.2.1", "pong_timeout", T0) is not None


def test_block_set_expiry_and_supersede() -> None:
    blocks = BlockSet()
    manual = Block("192.0.2.1", T0 + 3600, "operator", "manual", T0)
    assert blocks.add(manual, T0)
    # An automatic block never shortens one in force ...
    assert not blocks.add(Block("192.0.2.1", T0 + 60, "auto", "auto", T0), T0)
    assert blocks.get("192.0.2.1", T0) == manual
    # ... but extends it; and an operator's block always replaces.
    longer = Block("192.0.2.1", T0 + 7200, "auto", "auto", T0)
    assert blocks.add(longer, T0)
    shorter = Block("192.0.2.1", T0 + 10, "operator", "manual", T0)
    assert blocks.add(shorter, T0)
    assert blocks.get("192.0.2.1", T0 + 9.9) == shorter
    assert blocks.get("192.0.2.1", T0 + 10) is None  # until is exclusive
    assert len(blocks) == 0
    blocks.put(Block("192.0.2.2", T0 + 1, "x", "manual", T0))
    blocks.put(Block("192.0.2.3", T0 + 5, "x", "manual", T0))
    assert [b.ip for b in blocks.active(T0)] == ["192.0.2.2", "192.0.2.3"]
    assert [b.ip for b in blocks.prune(T0 + 2)] == ["192.0.2.2"]
    assert blocks.remove("192.0.2.3") is not None and blocks.remove("192.0.2.3") is None


def test_parse_duration_and_canonical_ip() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h") == 3600
    assert parse_duration(" 2d ") == 172_800
    assert parse_duration("1.5h") == 5400
    for bad in ("0", "0h", "h", "-1h", "1y", "", "1 h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert canonical_ip("::FFFF:192.0.2.1") == "192.0.2.1"
    assert canonical_ip("2001:DB8::1") == "2001:db8::1"
    assert canonical_ip("nope") is None


def test_block_audit_events() -> None:
    auto = Block("192.0.2.1", T0 + 900, "reputation score 100", "auto", T0, score=100.0)
    event = from_block(auto, id="a" * 32, time=T0)
    assert (event.type, event.severity, event.ip) == ("ip_blocked_auto", "warning", "192.0.2.1")
    assert event.metadata["until"] == T0 + 900 and event.metadata["score"] == 100.0
    manual = from_block(Block("192.0.2.1", T0 + 60, "abuse", "manual", T0), id="b", time=T0)
    assert manual.type == "ip_blocked_manual" and "score" not in manual.metadata
    assert manual.message == "abuse"
    lifted = from_unblock("192.0.2.1", id="c", time=T0, previous=auto)
    assert (lifted.type, lifted.ip, lifted.metadata["source"]) == (
        "ip_unblocked",
        "192.0.2.1",
        "auto",
    )


# --- properties --------------------------------------------------------------------

SLUGS = st.sampled_from([*sorted(DEFAULT_POINTS), "pong_timeout", "slow_consumer"])
ADDRESSES = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "10.0.0.1", "::1"])
STEPS = st.lists(st.tuples(ADDRESSES, SLUGS, st.floats(min_value=0, max_value=1000)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(STEPS, st.floats(min_value=1, max_value=10_000))
def test_scores_never_negative_and_decay_monotonically(
    steps: list[tuple[str, str, float]], later: float
) -> None:
    rep = reputation(never_block=["10.0.0.0/8", "::1/128"])
    now = T0
    for ip, slug, gap in steps:
        now += gap
        block = rep.add(ip, slug, now)
        for address in ("192.0.2.1", "192.0.2.2", "2001:db8::1"):
            score = rep.score(address, now)
            assert 0 <= score < rep.threshold
            assert rep.score(address, now + later) <= score
        if block is not None:
            assert block.until == now + rep.block_seconds
            assert rep.score(block.ip, now) == 0


@settings(max_examples=200, deadline=None)
@given(STEPS)
def test_never_block_is_never_blocked(steps: list[tuple[str, str, float]]) -> None:
    rep = reputation(never_block=["10.0.0.0/8", "::1/128"], threshold=1)
    now = T0
    for ip, slug, gap in steps:
        now += gap
        block = rep.add(ip, slug, now)
        if ip in ("10.0.0.1", "::1"):
            assert block is None
            assert rep.score(ip, now) == 0


# Weights and thresholds in quarters: exact in binary, so the expected count is exact.
QUARTERS = st.integers(min_value=1, max_value=800).map(lambda n: n / 4)


@settings(max_examples=300, deadline=None)
@given(QUARTERS, QUARTERS)
def test_a_flood_blocks_after_exactly_ceil_threshold_over_weight(
    threshold: float, weight: float
) -> None:
    rep = reputation(threshold=threshold, points={"flood": weight}, half_life_seconds=1e9)
    expected = math.ceil(Fraction(threshold) / Fraction(weight))
    hits = 0
    block = None
    while block is None:
        hits += 1
        # Close in time: a microsecond apart, against a very long half-life.
        block = rep.add("192.0.2.9", "flood", T0 + hits * 1e-6)
        assert hits <= expected
    assert hits == expected
