"""The hub's auth lifecycle: JWT sign-in, channel grants and tickets, token expiry,
the sign-in deadline, the unsigned-connection cap and the subscribe bucket.

No sockets: fake sessions (from test_hub), a fake monotonic clock and a fake wall
clock that move together.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import jwt
import pytest

from bastion.adapters.local import local_cluster
from bastion.config import RECONNECT_MARGIN, settings_from_mapping
from bastion.core.hub import AppState, Hub
from bastion.core.session import SessionPhase
from bastion.errors import ConfigError, Refused
from bastion.protocol import messages as msg
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import channel_auth_string, sign, signin_auth_string
from bastion.server.apps import app_states

from .test_hub import Client, Clock, CountingFrame

KEY = "app-key"
SECRET = "app-secret"
APP_ID = "12345"
JWT_SECRET = "j" * 40
WALL = 1_800_000_000.0


class AuthWorld:
    """A hub with one app in JWT mode (HS256) and clocks the test moves."""

    def __init__(self, jwt_fields: dict[str, Any] | None = None, **app_fields: Any) -> None:
        self.clock = Clock(1_000.0)
        self.wall = Clock(WALL)
        app: dict[str, Any] = {"id": APP_ID, "key": KEY, "secret": SECRET, **app_fields}
        if jwt_fields is not None:
            app["jwt"] = {"algorithms": ["HS256"], "secret": JWT_SECRET, **jwt_fields}
        settings = settings_from_mapping({"apps": [app]}, environ={})
        self.hub = Hub(
            settings,
            CountingFrame(),
            self.clock,
            local_cluster(self.clock),
            app_states(settings),
            wall_clock=self.wall,
        )
        self.app: AppState = self.hub.apps_by_key[KEY]
        self._ids = itertools.count(1)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)

    def client(self) -> Client:
        client = Client(f"{next(self._ids)}.{next(self._ids)}")
        assert self.hub.admit(self.app) is None
        return client

    def token(self, sub: str = "alice", ttl: float = 600, **claims: Any) -> str:
        return jwt.encode(
            {"sub": sub, "exp": self.wall.now + ttl, **claims}, JWT_SECRET, algorithm="HS256"
        )

    def signin(self, client: Client, token: str, user: dict[str, Any] | None = None) -> None:
        user_data = json.dumps(user if user is not None else {"id": "alice"})
        self.hub.signin(self.app, client.session, msg.Signin(auth=token, user_data=user_data))

    def refused_signin(self, client: Client, token: str, **kw: Any) -> Refused:
        with pytest.raises(Refused) as info:
            self.signin(client, token, **kw)
        return info.value

    def subscribe(
        self, client: Client, channel: str, auth: str | None = None, channel_data: str | None = None
    ) -> None:
        request = msg.Subscribe(channel=channel, auth=auth, channel_data=channel_data)
        self.hub.subscribe(self.app, client.session, request)

    def refused_subscribe(self, client: Client, channel: str, **kw: Any) -> Refused:
        with pytest.raises(Refused) as info:
            self.subscribe(client, channel, **kw)
        assert channel not in client.session.channels
        return info.value

    def hmac(self, message: str) -> str:
        return f"{KEY}:{sign(SECRET.encode(), message)}"

    def check(self, client: Client) -> None:
        self.hub.check_session(self.app, client.session, self.clock.now)


@pytest.fixture
def w() -> AuthWorld:
    return AuthWorld({})


def presence_ids(frame: dict[str, Any]) -> dict[str, Any]:
    assert frame["event"] == "pusher_internal:subscription_succeeded"
    hash_: dict[str, Any] = json.loads(frame["data"])["presence"]["hash"]
    return hash_


# --- sign-in with a token -----------------------------------------------------------------


def test_jwt_signin_succeeds_like_hmac(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(user_info={"name": "Alice"}))
    frames = client.take()
    assert frames[-1]["event"] == "pusher:signin_success"
    assert json.loads(frames[-1]["data"]["user_data"]) == {"id": "alice"}
    assert client.session.user_id == "alice"
    assert client.session.user_info == {"name": "Alice"}
    assert client.session.token_expires_at == pytest.approx(w.clock.now + 600)
    assert "alice" in w.app.users


def test_jwt_signin_takes_user_info_and_watchlist_from_the_token_only(w: AuthWorld) -> None:
    watcher = w.client()
    user = {"id": "alice", "user_info": {"role": "admin"}, "watchlist": ["carol"]}
    w.signin(watcher, w.token(watchlist=["bob"]), user)
    assert watcher.session.user_info is None
    assert watcher.session.watchlist == ("bob",)


@pytest.mark.parametrize(
    ("mint", "check"),
    [
        (lambda w: w.token(ttl=-120), "expired"),
        (lambda w: jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256"), "missing_exp"),
        (lambda w: jwt.encode({"sub": "alice", "exp": WALL + 60}, "k" * 40), "signature"),
        (lambda w: jwt.encode({"sub": "alice", "exp": WALL + 60}, None, "none"), "algorithm"),
    ],
)
def test_bad_signin_tokens_are_refused_naming_the_check(
    w: AuthWorld, mint: Any, check: str
) -> None:
    client = w.client()
    token = mint(w)
    refused = w.refused_signin(client, token)
    assert refused.reason is Reason.SIGNIN_TOKEN_INVALID
    assert check in refused.detail
    assert token not in refused.detail
    assert client.session.user_id is None


def test_sub_must_match_user_data_id(w: AuthWorld) -> None:
    refused = w.refused_signin(w.client(), w.token(sub="mallory"))
    assert refused.reason is Reason.SIGNIN_TOKEN_INVALID
    assert refused.detail == "sub does not match user_data.id"


def test_user_data_must_still_parse(w: AuthWorld) -> None:
    client = w.client()
    with pytest.raises(Refused) as info:
        w.hub.signin(w.app, client.session, msg.Signin(auth=w.token(), user_data="not json"))
    assert info.value.reason is Reason.SIGNIN_DATA_INVALID


def test_socket_id_binding_on_signin(w: AuthWorld) -> None:
    client = w.client()
    refused = w.refused_signin(client, w.token(socket_id="9.9"))
    assert refused.reason is Reason.SIGNIN_TOKEN_INVALID
    w.signin(client, w.token(socket_id=client.socket_id))
    assert client.session.user_id == "alice"


def test_audience_and_issuer_from_settings() -> None:
    w = AuthWorld({"audience": "bastion", "issuer": "id.example"})
    client = w.client()
    assert "audience" in w.refused_signin(client, w.token(aud="other", iss="id.example")).detail
    assert "issuer" in w.refused_signin(client, w.token(aud="bastion", iss="x")).detail
    w.signin(client, w.token(aud="bastion", iss="id.example"))


def test_an_app_without_jwt_treats_a_token_as_a_bad_signature() -> None:
    w = AuthWorld(None)
    client = w.client()
    assert w.refused_signin(client, w.token()).reason is Reason.SIGNIN_INVALID


def test_hmac_signin_still_works_in_jwt_mode(w: AuthWorld) -> None:
    client = w.client()
    user_data = json.dumps({"id": "alice"})
    auth = w.hmac(signin_auth_string(client.socket_id, user_data))
    w.hub.signin(w.app, client.session, msg.Signin(auth=auth, user_data=user_data))
    assert client.session.user_id == "alice"
    assert client.session.token_expires_at is None


def test_renewal_extends_expiry_and_rearms_the_warning(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(ttl=100))
    w.advance(50)
    w.check(client)
    assert client.session.phase is SessionPhase.TOKEN_EXPIRING
    w.signin(client, w.token(ttl=300))
    assert client.session.token_expires_at == pytest.approx(w.clock.now + 300)
    assert client.session.phase is SessionPhase.SIGNED_IN


def test_renewal_as_another_user_is_a_conflict(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token())
    refused = w.refused_signin(client, w.token(sub="bob"), user={"id": "bob"})
    assert refused.reason is Reason.SIGNIN_CONFLICT


def test_signin_token_builds_user_data_from_claims(w: AuthWorld) -> None:
    client = w.client()
    w.hub.signin_token(w.app, client.session, w.token(user_info={"n": 1}))
    frame = client.take()[-1]
    assert frame["event"] == "pusher:signin_success"
    assert json.loads(frame["data"]["user_data"]) == {"id": "alice", "user_info": {"n": 1}}
    with pytest.raises(Refused) as info:
        w.hub.signin_token(w.app, w.client().session, "eyJ.bad.token")
    assert info.value.reason is Reason.SIGNIN_TOKEN_INVALID


def test_a_bad_key_file_fails_at_start(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="jwt"):
        AuthWorld({"algorithms": ["RS256"], "public_key_file": str(tmp_path / "missing.pem")})


# --- grants from the sign-in token --------------------------------------------------------


def test_signin_grants_authorize_private_and_presence_without_hmac(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(channels=["private-a", "presence-room-*"], user_info={"n": "A"}))
    client.take()
    w.subscribe(client, "private-a", auth="")
    w.subscribe(client, "presence-room-1")
    frames = client.take()
    assert [f["event"] for f in frames] == ["pusher_internal:subscription_succeeded"] * 2
    assert presence_ids(frames[1]) == {"alice": {"n": "A"}}


def test_signin_grants_do_not_cover_other_channels(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(channels=["private-a"]))
    assert w.refused_subscribe(client, "private-b").reason is Reason.SUBSCRIBE_AUTH_MISSING
    refused = w.refused_subscribe(client, "private-encrypted-a", auth="")
    assert refused.reason is Reason.SUBSCRIBE_AUTH_MISSING


def test_encrypted_channels_always_need_hmac(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(channels=["*"]))
    refused = w.refused_subscribe(client, "private-encrypted-x")
    assert refused.reason is Reason.SUBSCRIBE_AUTH_MISSING
    ticket = w.token(channels=["*"])
    refused = w.refused_subscribe(client, "private-encrypted-x", auth=ticket)
    assert refused.reason is Reason.SUBSCRIBE_AUTH_INVALID  # a token is no HMAC


def test_signin_grants_end_when_the_token_expires(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(ttl=10, channels=["private-*"]))
    w.advance(11)
    assert w.refused_subscribe(client, "private-a").reason is Reason.SUBSCRIBE_AUTH_MISSING


def test_hmac_still_works_for_non_granted_channels(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(channels=["private-a"]))
    auth = w.hmac(channel_auth_string(client.socket_id, "private-b", None))
    w.subscribe(client, "private-b", auth=auth)
    assert "private-b" in client.session.channels


def test_presence_grant_with_mismatched_channel_data_is_refused(w: AuthWorld) -> None:
    client = w.client()
    w.signin(client, w.token(channels=["presence-*"]))
    data = json.dumps({"user_id": "mallory"})
    refused = w.refused_subscribe(client, "presence-r", auth="", channel_data=data)
    assert refused.reason is Reason.SUBSCRIBE_AUTH_INVALID


# --- tickets ------------------------------------------------------------------------------


def test_ticket_authorizes_a_private_channel(w: AuthWorld) -> None:
    client = w.client()  # not signed in
    w.subscribe(client, "private-a", auth=w.token(channels=["private-a"]))
    assert "private-a" in client.session.channels


def test_ticket_presence_member_is_sub_and_user_info(w: AuthWorld) -> None:
    client = w.client()
    ticket = w.token(sub="bob", channels=["presence-*"], user_info={"n": "B"})
    w.subscribe(client, "presence-r", auth=ticket, channel_data=json.dumps({"user_id": "bob"}))
    assert presence_ids(client.take()[-1]) == {"bob": {"n": "B"}}


@pytest.mark.parametrize(
    ("claims", "needle"),
    [
        ({"channels": ["private-b"]}, "does not grant"),
        ({"channels": ["private-a"], "socket_id": "7.7"}, "another socket_id"),
        ({"channels": ["private-a"], "ttl": -100}, "expired"),
    ],
)
def test_bad_tickets(w: AuthWorld, claims: dict[str, Any], needle: str) -> None:
    client = w.client()
    token = w.token(**claims)
    refused = w.refused_subscribe(client, "private-a", auth=token)
    assert refused.reason is Reason.SUBSCRIBE_AUTH_INVALID
    assert needle in refused.detail
    assert refused.channel == "private-a"
    assert token not in refused.detail


def test_ticket_bound_to_this_socket(w: AuthWorld) -> None:
    client = w.client()
    w.subscribe(
        client, "private-a", auth=w.token(channels=["private-a"], socket_id=client.socket_id)
    )
    assert "private-a" in client.session.channels


def test_ticket_with_wrong_channel_data_user(w: AuthWorld) -> None:
    client = w.client()
    ticket = w.token(sub="bob", channels=["presence-*"])
    data = json.dumps({"user_id": "alice"})
    refused = w.refused_subscribe(client, "presence-r", auth=ticket, channel_data=data)
    assert refused.reason is Reason.SUBSCRIBE_AUTH_INVALID


# --- expiry -------------------------------------------------------------------------------


def test_expiry_warning_once_then_close_after_grace() -> None:
    w = AuthWorld({"expiry_warning_seconds": 60, "expiry_grace_seconds": 30})
    client = w.client()
    w.signin(client, w.token(ttl=100))
    client.take()
    w.advance(39)
    w.check(client)
    assert client.take() == []
    w.advance(1)
    w.check(client)
    assert client.take() == [{"event": "bastion:token_expiring", "data": '{"expires_in":60}'}]
    w.advance(10)
    w.check(client)
    assert client.take() == []  # warned once per token
    w.advance(79)  # 129 s after sign-in: exp + 29
    w.check(client)
    assert client.refusals == []
    w.advance(1)
    w.check(client)
    assert [r.reason for r in client.refusals] == [Reason.TOKEN_EXPIRED]


def test_no_expiry_for_hmac_sessions() -> None:
    w = AuthWorld({})
    client = w.client()
    user_data = json.dumps({"id": "alice"})
    auth = w.hmac(signin_auth_string(client.socket_id, user_data))
    w.hub.signin(w.app, client.session, msg.Signin(auth=auth, user_data=user_data))
    w.advance(10**6)
    w.check(client)
    assert client.refusals == []


# --- sign-in deadline ---------------------------------------------------------------------


def test_signin_deadline_closes_unsigned_connections_only() -> None:
    w = AuthWorld({}, signin_deadline_seconds=5)
    lazy, prompt = w.client(), w.client()
    lazy.session.opened_at = prompt.session.opened_at = w.clock.now
    w.signin(prompt, w.token())
    w.advance(4.9)
    for client in (lazy, prompt):
        w.check(client)
    assert lazy.refusals == []
    w.advance(0.1)
    for client in (lazy, prompt):
        w.check(client)
    assert [r.reason for r in lazy.refusals] == [Reason.SIGNIN_DEADLINE]
    assert prompt.refusals == []


def test_signin_deadline_starts_at_first_check_when_unknown() -> None:
    w = AuthWorld(None, signin_deadline_seconds=1)
    client = w.client()
    w.check(client)
    w.advance(0.5)
    w.check(client)
    assert client.refusals == []
    w.advance(0.5)
    w.check(client)
    assert [r.reason for r in client.refusals] == [Reason.SIGNIN_DEADLINE]


# --- unsigned connections cap -------------------------------------------------------------


def test_unsigned_cap_counts_only_connections_not_signed_in() -> None:
    w = AuthWorld({}, max_unsigned_connections=2)
    a, b = w.client(), w.client()
    assert w.hub.admit(w.app) is Reason.UNSIGNED_OVER_QUOTA
    assert w.app.connections == 2
    w.signin(a, w.token())
    assert w.app.unsigned == 1
    c = w.client()  # a's slot is free again
    assert w.hub.admit(w.app) is Reason.UNSIGNED_OVER_QUOTA
    w.hub.disconnect(w.app, b.session)
    assert w.app.unsigned == 1
    w.hub.disconnect(w.app, a.session)
    w.hub.disconnect(w.app, c.session)
    assert (w.app.unsigned, w.app.connections) == (0, 0)


# --- subscribe attempts -------------------------------------------------------------------


def test_subscribe_bucket() -> None:
    w = AuthWorld(None, subscribe_attempts={"rate": 1, "burst": 20}, max_channels_per_connection=1)
    client = w.client()
    for n in range(20):
        w.subscribe(client, f"public-{n}")
        w.hub.unsubscribe(w.app, client.session, f"public-{n}")
    refused = w.refused_subscribe(client, "public-x")
    assert refused.reason is Reason.SUBSCRIBE_RATE
    assert refused.channel == "public-x"
    w.advance(1)
    w.subscribe(client, "public-x")
    assert "public-x" in client.session.channels


def test_the_subscribe_burst_always_fits_a_reconnect_to_every_channel() -> None:
    """pusher-js resubscribes to all its channels at once after a reconnect."""
    w = AuthWorld(None, subscribe_attempts={"rate": 1, "burst": 3}, max_channels_per_connection=8)
    assert w.app.settings.subscribe_burst == 8 + RECONNECT_MARGIN
    client = w.client()
    for n in range(8):
        w.subscribe(client, f"public-{n}")  # far past the configured burst of 3
    for n in range(RECONNECT_MARGIN):
        w.hub.unsubscribe(w.app, client.session, f"public-{n}")
        w.subscribe(client, f"public-{n}")  # the margin: frames besides the subscribes
    assert w.refused_subscribe(client, "public-x").reason is Reason.SUBSCRIBE_RATE
