"""The one refusal table: every Reason has exactly one primary answer, consistently."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from bastion.errors import BastionError, PeerError, Refused
from bastion.protocol.refusals import Reason, Rule

REASONS = list(Reason)
IDS = [reason.name for reason in REASONS]

#: Close codes outside the Pusher range that a WebSocket server legitimately uses
#: (RFC 6455): protocol error, unsupported data, invalid payload, too big, internal error.
RFC6455_CLOSE_CODES = {1002, 1003, 1007, 1009, 1011}
#: Spec §4.2: the complete official list of Pusher close codes.
PUSHER_CLOSE_CODES = {
    4000,
    4001,
    4003,
    4004,
    4005,
    4006,
    4007,
    4008,
    4009,
    4100,
    4200,
    4201,
    4202,
    4301,
    4302,
}
SUBSCRIPTION_TYPES = {"AuthError", "LimitReached", "InvalidChannel", "InvalidChannelData"}
SLUG = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def primary_form(rule: Rule) -> str:
    forms = [
        name
        for name, value in (
            ("close", rule.close_code),
            ("error", rule.error_code),
            ("subscription", rule.subscription_type),
            ("recovery", rule.recovery),
        )
        if value is not None
    ]
    if not forms and rule.http_status is not None:
        forms = ["http"]
    assert len(forms) == 1, f"{rule.slug}: answer forms {forms}"
    return forms[0]


def test_the_table_has_no_aliases() -> None:
    # Two members with equal Rules would silently become one (Enum aliasing).
    assert len(Reason.__members__) == len(REASONS)
    assert all(isinstance(reason.value, Rule) for reason in REASONS)


@pytest.mark.parametrize("reason", REASONS, ids=IDS)
def test_exactly_one_primary_answer_form(reason: Reason) -> None:
    primary_form(reason.value)


@pytest.mark.parametrize("reason", REASONS, ids=IDS)
def test_answer_form_matches_the_group(reason: Reason) -> None:
    rule = reason.value
    form = primary_form(rule)
    if reason.name.startswith("HTTP_"):
        assert form == "http"
    elif reason.name.startswith("SUBSCRIBE_"):
        assert form == "subscription"
    elif reason.name.startswith(("CLIENT_EVENT", "WATCHLIST_")):
        assert form == "error"
    elif reason.name.startswith("RESUME_"):
        assert form == "recovery"
    if form == "close":
        # The only secondary form a close reason may have is a pre-upgrade status.
        assert rule.error_code is None
        assert rule.subscription_type is None
    if form == "error":
        assert rule.http_status is None
    if form == "subscription":
        assert rule.http_status is not None
        assert 400 <= rule.http_status < 500
    if form == "http":
        # REST reasons (HTTP_*) and pre-upgrade handshake ones (e.g. a WebSocket
        # version we do not speak) are answered with a status and nothing else.
        assert rule.close_code is None


@pytest.mark.parametrize("reason", REASONS, ids=IDS)
def test_codes_are_in_documented_ranges(reason: Reason) -> None:
    rule = reason.value
    if rule.close_code is not None:
        if rule.close_code < 4000:
            assert rule.close_code in RFC6455_CLOSE_CODES
        else:
            assert 4000 <= rule.close_code <= 4399
            assert rule.close_code in PUSHER_CLOSE_CODES
    if rule.error_code is not None:
        assert 4300 <= rule.error_code <= 4399
    if rule.http_status is not None:
        assert 400 <= rule.http_status <= 599
    if rule.subscription_type is not None:
        assert rule.subscription_type in SUBSCRIPTION_TYPES


@pytest.mark.parametrize("reason", REASONS, ids=IDS)
def test_slug_message_and_severity(reason: Reason) -> None:
    rule = reason.value
    assert SLUG.fullmatch(rule.slug), rule.slug
    assert rule.message.strip() == rule.message
    assert rule.message
    assert "{" not in rule.message
    assert "}" not in rule.message
    assert "%s" not in rule.message
    assert rule.severity in ("info", "warning")


def test_slugs_are_shared_only_by_the_websocket_and_http_twin_of_a_reason() -> None:
    by_slug: dict[str, list[str]] = defaultdict(list)
    for reason in REASONS:
        by_slug[reason.value.slug].append(reason.name)
    for slug, names in by_slug.items():
        if len(names) > 1:
            assert len(names) == 2, slug
            plain, http = sorted(names, key=lambda n: n.startswith("HTTP_"))
            assert http == "HTTP_" + plain, slug


@pytest.mark.parametrize(
    ("reason", "close_code"),
    [
        (Reason.UNKNOWN_APP, 4001),
        (Reason.APP_DISABLED, 4003),
        (Reason.APP_OVER_QUOTA, 4004),
        (Reason.PATH_NOT_FOUND, 4005),
        (Reason.UNSUPPORTED_PROTOCOL, 4007),
        (Reason.OVER_CAPACITY, 4100),
        (Reason.PONG_TIMEOUT, 4201),
        (Reason.SIGNIN_INVALID, 4009),
        (Reason.SIGNIN_CONFLICT, 4009),
        (Reason.TERMINATED, 4009),
        (Reason.BINARY_FRAME, 1003),
        (Reason.FRAME_TOO_LARGE, 1009),
        (Reason.INVALID_UTF8, 1007),
    ],
)
def test_spec_close_codes(reason: Reason, close_code: int) -> None:
    assert reason.value.close_code == close_code


def test_slow_consumers_reconnect_with_back_off() -> None:
    # ARCHITECTURE rule 5 and spec §4.2: 4100-4199 means "reconnect after back-off".
    assert Reason.SLOW_CONSUMER.value.close_code is not None
    assert 4100 <= Reason.SLOW_CONSUMER.value.close_code <= 4199


def test_spec_error_codes() -> None:
    assert Reason.CLIENT_EVENT_RATE.value.error_code == 4301
    assert Reason.WATCHLIST_TOO_LONG.value.error_code == 4302


def test_channel_level_limits_never_close_the_socket() -> None:
    # Spec §4.3: presence full is a subscription error on that channel.
    for reason in REASONS:
        if reason.name.startswith("SUBSCRIBE_"):
            assert reason.value.close_code is None


@pytest.mark.parametrize(
    "reason",
    [
        Reason.HTTP_AUTH_MISSING,
        Reason.HTTP_AUTH_VERSION,
        Reason.HTTP_AUTH_KEY,
        Reason.HTTP_TIMESTAMP,
        Reason.HTTP_BODY_MD5,
        Reason.HTTP_SIGNATURE,
    ],
)
def test_rest_authentication_failures_are_401(reason: Reason) -> None:
    assert reason.value.http_status == 401


def test_rest_statuses_from_the_spec() -> None:
    assert Reason.HTTP_PAYLOAD_TOO_LARGE.value.http_status == 413
    assert Reason.HTTP_APP_DISABLED.value.http_status == 403
    assert Reason.HTTP_UNKNOWN_APP.value.http_status == 404


# --- the exception that carries a Reason -----------------------------------------------


def test_refused_is_a_peer_error() -> None:
    error = Refused(Reason.MALFORMED_JSON)
    assert isinstance(error, PeerError)
    assert isinstance(error, BastionError)
    assert error.reason is Reason.MALFORMED_JSON
    assert error.detail == Reason.MALFORMED_JSON.value.message
    assert str(error) == error.detail
    assert error.channel is None


def test_refused_keeps_detail_and_channel() -> None:
    error = Refused(Reason.SUBSCRIBE_AUTH_INVALID, "custom detail", channel="private-a")
    assert error.detail == "custom detail"
    assert str(error) == "custom detail"
    assert error.channel == "private-a"
