"""Channel authorization, sign-in and the client-event gate as pure policy (no hub, no I/O).

Byte-exact against the Pusher documentation's vectors where they exist, and
properties: no altered signature, socket, channel or channel_data is ever granted;
a refusal always names the channel; a token grants only what its claim says.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.config import settings_from_mapping
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.codec import encoded_size
from bastion.protocol.names import classify_channel
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import channel_auth_string, sign, signin_auth_string
from bastion.security.channel_auth import Grant, SignedInUser, authorize_subscribe
from bastion.security.client_event_gate import check_client_event
from bastion.security.limits import memory_limiters
from bastion.security.payload import ClientEventPolicy
from bastion.security.signin import verify_signin, verify_signin_token
from bastion.security.tokens import JwtVerifier

# The Pusher documentation's example app (tests/unit/test_signing.py holds the vectors).
KEY = "278d425bdf160c739803"
SECRET = b"7ad3773142a6692b25b8"
SOCKET = "1234.1234"
PRIVATE_SIG = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
JWT_SECRET = "j" * 40
NOW = 1_800_000_000.0
VERIFIER = JwtVerifier(["HS256"], secret=JWT_SECRET.encode())


def authorize(
    channel: str,
    auth: str | None,
    channel_data: str | None = None,
    *,
    socket_id: str = SOCKET,
    signed_in: SignedInUser | None = None,
    verifier: JwtVerifier | None = None,
) -> Grant:
    request = msg.Subscribe(channel=channel, auth=auth, channel_data=channel_data)
    return authorize_subscribe(
        request,
        classify_channel(channel),
        socket_id=socket_id,
        signed_in=signed_in,
        app_key=KEY,
        secrets=(SECRET,),
        verifier=verifier,
        now=NOW,
    )


def hmac_auth(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    return f"{KEY}:{sign(SECRET, channel_auth_string(socket_id, channel, channel_data))}"


def token(**claims: Any) -> str:
    body = {"sub": "alice", "exp": NOW + 600, **claims}
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


# --- HMAC ---------------------------------------------------------------------------------


def test_the_documented_private_channel_auth_is_granted() -> None:
    assert authorize("private-foobar", f"{KEY}:{PRIVATE_SIG}") == Grant()


def test_a_presence_grant_names_the_signed_member() -> None:
    data = '{"user_id":10,"user_info":{"name":"Mr. Channels"}}'
    grant = authorize("presence-room", hmac_auth(SOCKET, "presence-room", data), data)
    assert grant == Grant("10", {"name": "Mr. Channels"})


def test_a_signed_in_connection_joins_presence_as_itself_without_channel_data() -> None:
    me = SignedInUser("alice", {"n": 1})
    grant = authorize("presence-room", hmac_auth(SOCKET, "presence-room"), signed_in=me)
    assert grant == Grant("alice", {"n": 1})
    with pytest.raises(Refused) as refused:
        authorize("presence-room", hmac_auth(SOCKET, "presence-room"))
    assert refused.value.reason is Reason.SUBSCRIBE_CHANNEL_DATA


@pytest.mark.parametrize(
    ("auth", "reason"),
    [
        (None, Reason.SUBSCRIBE_AUTH_MISSING),
        ("", Reason.SUBSCRIBE_AUTH_MISSING),
        (f"{KEY}:{'0' * 64}", Reason.SUBSCRIBE_AUTH_INVALID),
        (f"other-key:{PRIVATE_SIG}", Reason.SUBSCRIBE_AUTH_INVALID),
        (PRIVATE_SIG, Reason.SUBSCRIBE_AUTH_INVALID),
    ],
)
def test_hmac_refusals_name_the_channel(auth: str | None, reason: Reason) -> None:
    with pytest.raises(Refused) as refused:
        authorize("private-foobar", auth)
    assert refused.value.reason is reason and refused.value.channel == "private-foobar"


@given(
    st.sampled_from(["socket", "channel", "data"]),
    st.text(alphabet="0123456789.", min_size=3, max_size=12),
)
def test_a_signature_for_anything_else_is_never_granted(what: str, other: str) -> None:
    data = json.dumps({"user_id": "u1"})
    auth = hmac_auth(SOCKET, "presence-room", data)
    socket, channel, channel_data = SOCKET, "presence-room", data
    if what == "socket":
        socket = other if other != SOCKET else other + "1"
    elif what == "channel":
        channel = "presence-" + other
    else:
        channel_data = json.dumps({"user_id": "u1", "x": other})
    with pytest.raises(Refused) as refused:
        authorize(channel, auth, channel_data, socket_id=socket)
    assert refused.value.reason is Reason.SUBSCRIBE_AUTH_INVALID


@pytest.mark.parametrize(
    "data", ["not json", "[]", '{"user_id":true}', '{"user_id":null}', '{"user_id":""}']
)
def test_signed_but_unusable_channel_data_is_refused(data: str) -> None:
    with pytest.raises(Refused) as refused:
        authorize("presence-room", hmac_auth(SOCKET, "presence-room", data), data)
    assert refused.value.reason is Reason.SUBSCRIBE_CHANNEL_DATA


# --- JWT grants ------------------------------------------------------------------------------


def test_a_ticket_grants_what_its_claim_names_and_nothing_else() -> None:
    ticket = token(channels=["private-orders"])
    assert authorize("private-orders", ticket, verifier=VERIFIER) == Grant()
    with pytest.raises(Refused) as refused:
        authorize("private-other", ticket, verifier=VERIFIER)
    assert refused.value.reason is Reason.SUBSCRIBE_AUTH_INVALID
    assert "does not grant" in refused.value.detail


def test_a_ticket_bound_to_another_socket_is_refused() -> None:
    ticket = token(channels=["private-orders"], socket_id="9.9")
    with pytest.raises(Refused):
        authorize("private-orders", ticket, verifier=VERIFIER)


def test_a_presence_ticket_makes_its_sub_the_member() -> None:
    ticket = token(channels=["presence-room"], user_info={"n": "A"})
    assert authorize("presence-room", ticket, verifier=VERIFIER) == Grant("alice", {"n": "A"})
    stated = json.dumps({"user_id": "mallory"})
    with pytest.raises(Refused):
        authorize("presence-room", ticket, stated, verifier=VERIFIER)


def test_the_sign_in_token_grants_while_it_is_valid() -> None:
    me = SignedInUser("alice", None, ("private-orders",), token_valid=True)
    assert authorize("private-orders", None, signed_in=me, verifier=VERIFIER) == Grant()
    expired = SignedInUser("alice", None, ("private-orders",), token_valid=False)
    with pytest.raises(Refused) as refused:
        authorize("private-orders", None, signed_in=expired, verifier=VERIFIER)
    assert refused.value.reason is Reason.SUBSCRIBE_AUTH_MISSING


def test_encrypted_channels_are_left_to_hmac() -> None:
    ticket = token(channels=["private-encrypted-x"])
    with pytest.raises(Refused) as refused:
        authorize("private-encrypted-x", ticket, verifier=VERIFIER)
    assert refused.value.reason is Reason.SUBSCRIBE_AUTH_INVALID
    signed = hmac_auth(SOCKET, "private-encrypted-x")
    assert authorize("private-encrypted-x", signed, verifier=VERIFIER) == Grant()


def test_an_expired_or_forged_ticket_names_the_check_never_the_token() -> None:
    for bad in (token(channels=["private-a"], exp=NOW - 100), token()[:-4] + "AAAA"):
        with pytest.raises(Refused) as refused:
            authorize("private-a", bad, verifier=VERIFIER)
        assert refused.value.detail.startswith("Channel token refused:")
        assert bad not in refused.value.detail


# --- sign-in ----------------------------------------------------------------------------------


def signin(user_data: str, auth: str | None = None, current: str | None = None) -> Any:
    auth = auth or f"{KEY}:{sign(SECRET, signin_auth_string(SOCKET, user_data))}"
    request = msg.Signin(auth=auth, user_data=user_data)
    return verify_signin(
        request,
        socket_id=SOCKET,
        current_user=current,
        app_key=KEY,
        secrets=(SECRET,),
        verifier=VERIFIER,
        now=NOW,
    )


def test_an_hmac_sign_in_trusts_the_signed_user_data() -> None:
    data = json.dumps({"id": "alice", "user_info": {"n": 1}, "watchlist": ["bob"]})
    signed = signin(data)
    assert (signed.user_id, signed.user_info, signed.watchlist) == ("alice", {"n": 1}, ("bob",))
    assert signed.user_data == data and signed.claims is None


def test_a_token_sign_in_trusts_only_the_claims() -> None:
    data = json.dumps({"id": "alice", "user_info": {"admin": True}, "watchlist": ["x"]})
    signed = signin(data, token(user_info={"n": 2}, watchlist=["bob"]))
    assert (signed.user_info, signed.watchlist) == ({"n": 2}, ("bob",))
    with pytest.raises(Refused) as refused:
        signin(json.dumps({"id": "mallory"}), token())
    assert refused.value.reason is Reason.SIGNIN_TOKEN_INVALID


@pytest.mark.parametrize(
    ("user_data", "reason"),
    [
        ("not json", Reason.SIGNIN_DATA_INVALID),
        ('{"id":""}', Reason.SIGNIN_DATA_INVALID),
        ('{"id":"alice","watchlist":"bob"}', Reason.SIGNIN_DATA_INVALID),
        ('{"id":"alice","watchlist":["has space"]}', Reason.SIGNIN_DATA_INVALID),
    ],
)
def test_unusable_user_data_is_refused(user_data: str, reason: Reason) -> None:
    with pytest.raises(Refused) as refused:
        signin(user_data)
    assert refused.value.reason is reason


def test_a_connection_cannot_sign_in_as_someone_else() -> None:
    assert signin('{"id":"alice"}', current="alice").user_id == "alice"
    with pytest.raises(Refused) as refused:
        signin('{"id":"bob"}', current="alice")
    assert refused.value.reason is Reason.SIGNIN_CONFLICT


def test_a_url_token_makes_its_own_user_data() -> None:
    signed = verify_signin_token(
        token(user_info={"n": 3}), socket_id=SOCKET, current_user=None, verifier=VERIFIER, now=NOW
    )
    assert json.loads(signed.user_data) == {"id": "alice", "user_info": {"n": 3}}
    with pytest.raises(Refused):
        verify_signin_token(token(), socket_id=SOCKET, current_user=None, verifier=None, now=NOW)


# --- the client-event gate --------------------------------------------------------------------


def gate(event: msg.ClientEvent, subscribed: bool = True, **app: Any) -> None:
    settings = settings_from_mapping(
        {"apps": [{"id": "1", "key": "k", "secret": "s", "enable_client_messages": True, **app}]},
        environ={},
    ).apps[0]
    app_rate = settings.client_events_per_app
    app_bucket = (
        memory_limiters("c", app_rate.rate, app_rate.burst, 1, lambda: 0.0)
        if app_rate is not None
        else None
    )
    check_client_event(
        event,
        settings,
        subscribed=subscribed,
        data_size=encoded_size(event.data),
        take_token=lambda: True,
        app_bucket=app_bucket,
        policy=ClientEventPolicy(settings.client_event_allowlist, settings.client_event_schemas),
        now=0.0,
    )


def refused_by_gate(event: msg.ClientEvent, subscribed: bool = True, **app: Any) -> Reason:
    with pytest.raises(Refused) as refused:
        gate(event, subscribed, **app)
    return refused.value.reason


def test_the_gate_lets_a_good_event_through_and_names_the_first_rule_broken() -> None:
    good = msg.ClientEvent("client-typing", "private-chat", {"t": 1})
    gate(good)
    assert refused_by_gate(good, enable_client_messages=False) is Reason.CLIENT_EVENTS_DISABLED
    encrypted = msg.ClientEvent("client-x", "private-encrypted-chat", {})
    assert refused_by_gate(encrypted) is Reason.CLIENT_EVENT_ENCRYPTED
    public = msg.ClientEvent("client-x", "chat", {})
    assert refused_by_gate(public) is Reason.CLIENT_EVENT_CHANNEL
    assert refused_by_gate(good, subscribed=False) is Reason.CLIENT_EVENT_NOT_SUBSCRIBED
    big = msg.ClientEvent("client-x", "private-chat", "x" * 11_000)
    assert refused_by_gate(big) is Reason.CLIENT_EVENT_TOO_LARGE
    assert (
        refused_by_gate(good, client_event_allowlist=["client-message"])
        is Reason.CLIENT_EVENT_NOT_ALLOWED
    )
    empty_app = {"client_events_per_app": {"rate": 1, "burst": 1}}
    gate(good, **empty_app)  # the app's bucket holds one token


def test_a_spent_bucket_refuses_before_size_and_schema_are_looked_at() -> None:
    settings = settings_from_mapping(
        {"apps": [{"id": "1", "key": "k", "secret": "s", "enable_client_messages": True}]},
        environ={},
    ).apps[0]
    tokens = [1]

    def take_token() -> bool:  # a bucket holding one token
        if not tokens:
            return False
        tokens.pop()
        return True

    event = msg.ClientEvent("client-x", "private-chat", "x" * 11_000)
    policy = ClientEventPolicy(None, {})
    kwargs: dict[str, Any] = {
        "subscribed": True,
        "data_size": encoded_size(event.data),
        "app_bucket": None,
        "policy": policy,
        "now": 0.0,
    }
    with pytest.raises(Refused) as first:
        check_client_event(event, settings, take_token=take_token, **kwargs)
    assert first.value.reason is Reason.CLIENT_EVENT_TOO_LARGE  # a token was spent
    with pytest.raises(Refused) as second:
        check_client_event(event, settings, take_token=take_token, **kwargs)
    assert second.value.reason is Reason.CLIENT_EVENT_RATE


def test_the_policies_are_pure() -> None:
    import bastion.security.channel_auth as channel_auth
    import bastion.security.client_event_gate as client_event_gate
    import bastion.security.signin as signin_module

    for module in (channel_auth, signin_module, client_event_gate):
        source = module.__file__
        assert source is not None
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
        for forbidden in (
            "import asyncio",
            "import time",
            "import random",
            "open(",
            "import socket",
        ):
            assert forbidden not in text, (module.__name__, forbidden)
