"""The WebSocket upgrade's gates, in order: an upgrade request in, a refusal or ``None`` out.

Real parts: the apps are built as the node builds them (``server/apps.py``), the
budget and the admission over in-memory buckets. No socket: the listener's own
tests (tests/integration/test_admission.py, test_origins.py) drive the same
gates over the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bastion.api.http import HttpRequest, Refusal
from bastion.config import settings_from_mapping
from bastion.core.hub import AppState
from bastion.protocol.refusals import Reason
from bastion.security.admission import Admission, AuthFailureBudget
from bastion.security.limits import MemoryRateLimiter
from bastion.server.apps import app_state
from bastion.server.upgrade import AFTER_101, BEFORE_101, Slot, Upgrade

ORIGIN = "https://app.example.com"
JWT_SECRET = "upgrade-jwt-secret-0123456789abcdefghij"
CLIENT = "192.0.2.20"


def apps() -> dict[str, AppState]:
    settings = settings_from_mapping(
        {
            "apps": [
                {"id": "1", "key": "plain", "secret": "s1", "allowed_origins": [ORIGIN]},
                {
                    "id": "2",
                    "key": "tokens",
                    "secret": "s2",
                    "jwt": {
                        "algorithms": ["HS256"],
                        "secret": JWT_SECRET,
                        "allow_query_token": True,
                    },
                },
            ]
        },
        environ={},
    )
    return {app.key: app_state(app) for app in settings.apps}


APPS = apps()


@dataclass
class Limits:
    auth_budget: AuthFailureBudget = field(
        default_factory=lambda: AuthFailureBudget(MemoryRateLimiter(rate=0.5, burst=1))
    )
    admission: Admission = field(
        default_factory=lambda: Admission(
            max_connections_per_ip=1, new_connections=MemoryRateLimiter(rate=1.0, burst=5)
        )
    )


def upgrade(
    key: str | None = "plain",
    *headers: tuple[str, str],
    method: str = "GET",
    params: dict[str, str] | None = None,
) -> Upgrade:
    named = tuple((name.lower(), value) for name, value in headers)  # as the listener does
    request = HttpRequest(method, f"/app/{key}", "", named, b"", CLIENT, CLIENT, 100.0)
    app = APPS.get(key) if key is not None else None
    return Upgrade(request, key, app, params or {})


def first_refusal(candidate: Upgrade, limits: Limits) -> Refusal | None:
    for gate in BEFORE_101:
        refusal = gate(candidate, limits)
        if refusal is not None:
            return refusal
    return None


def test_the_gates_are_in_the_documented_order() -> None:
    assert [gate.__name__ for gate in BEFORE_101] == [
        "app_path",
        "opening_get",
        "websocket_version",
        "origin",
        "query_token",
        "token_budget",
        "admission",
    ]
    assert [gate.__name__ for gate in AFTER_101] == [
        "known_app",
        "protocol_version",
        "serving",
        "hub_admission",
    ]


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (upgrade(None), Refusal(Reason.PATH_NOT_FOUND)),
        # The path first: whatever else is wrong with the request.
        (upgrade(None, method="POST"), Refusal(Reason.PATH_NOT_FOUND)),
        (upgrade(method="POST"), Refusal(Reason.HTTP_METHOD)),
        (
            upgrade("plain", ("Sec-WebSocket-Version", "8"), method="POST"),
            Refusal(Reason.HTTP_METHOD),
        ),
        (
            upgrade("plain", ("Sec-WebSocket-Version", "8"), ("Origin", "https://evil.example")),
            Refusal(Reason.HTTP_WEBSOCKET_VERSION, headers=(("Sec-WebSocket-Version", "13"),)),
        ),
        (
            upgrade("plain", ("Origin", "https://evil.example"), params={"token": "t"}),
            Refusal(Reason.HTTP_ORIGIN_REFUSED, app_id="1"),
        ),
        (
            upgrade("plain", ("Origin", ORIGIN), params={"token": "t"}),
            Refusal(Reason.HTTP_QUERY_TOKEN, app_id="1"),
        ),
        (upgrade("plain", ("Sec-WebSocket-Version", " 13 "), ("Origin", ORIGIN)), None),
        (upgrade("tokens", params={"token": "t"}), None),
        # An unknown key passes every gate: it is closed with 4001 after the 101.
        (upgrade("nobody", ("Origin", "https://evil.example"), params={"token": "t"}), None),
    ],
)
def test_each_gate_refuses_with_its_answer(candidate: Upgrade, expected: Refusal | None) -> None:
    assert first_refusal(candidate, Limits()) == expected


def test_the_426_names_the_version_we_speak() -> None:
    refusal = first_refusal(upgrade("plain", ("Sec-WebSocket-Version", "8")), Limits())
    assert refusal is not None
    response = refusal.response()
    assert response.status == 426
    assert response.headers == (("Sec-WebSocket-Version", "13"),)


def test_a_spent_budget_refuses_token_upgrades_only() -> None:
    limits = Limits()
    limits.auth_budget.spend(CLIENT, 100.0)
    refusal = first_refusal(upgrade("tokens", params={"token": "t"}), limits)
    assert refusal == Refusal(Reason.AUTH_FAILURE_LIMIT, retry_after=pytest.approx(2.0), app_id="2")
    assert refusal.response().headers == (("Retry-After", "2"),)
    # A plain upgrade is not an authentication attempt.
    assert first_refusal(upgrade("tokens"), limits) is None


def test_admission_holds_a_slot_until_it_is_released() -> None:
    limits = Limits()
    assert first_refusal(upgrade("tokens"), limits) is None
    refusal = first_refusal(upgrade("tokens"), limits)
    assert refusal == Refusal(Reason.HTTP_IP_CONNECTIONS, retry_after=5.0, app_id="2")
    slot = Slot(limits.admission, CLIENT)
    slot.release()
    slot.release()  # once only
    assert limits.admission.connections.count(CLIENT) == 0
    assert first_refusal(upgrade("tokens"), limits) is None


def test_the_checks_after_the_101_in_order() -> None:
    @dataclass
    class Hub:
        refuse: Reason | None = None

        def admit(self, app: AppState) -> Reason | None:
            return self.refuse

    @dataclass
    class Context:
        hub: Hub = field(default_factory=Hub)
        draining: bool = False

    def first(candidate: Upgrade, ctx: Context) -> Reason | None:
        for check in AFTER_101:
            reason = check(candidate, ctx)  # type: ignore[arg-type]
            if reason is not None:
                return reason
        return None

    assert first(upgrade("nobody", params={"protocol": "4"}), Context()) is Reason.UNKNOWN_APP
    assert first(upgrade(params={"protocol": "4"}), Context()) is Reason.UNSUPPORTED_PROTOCOL
    assert first(upgrade(params={"protocol": "5"}), Context(draining=True)) is (
        Reason.OVER_CAPACITY
    )
    full = Context(Hub(Reason.APP_OVER_QUOTA))
    assert first(upgrade(), full) is Reason.APP_OVER_QUOTA
    assert first(upgrade(), Context()) is None
