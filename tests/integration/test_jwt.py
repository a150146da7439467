"""JWT mode on a real node: sign-in with tokens, channel grants, tickets, expiry,
renewal, the URL token, and no token in any log record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.clients import (
    APP_KEY,
    APP_SECRET,
    DEFAULT_QUERY,
    PusherClient,
    data_of,
    hmac_hex,
    open_ws,
)
from support.timeouts import within
from websockets.exceptions import InvalidStatus

from bastion.server.runtime import Node

from .conftest import Connect, LogCheck, MakeNode

JWT_SECRET = "integration-jwt-secret-of-40-characters!"
#: Ticks of the node's heartbeat every 0.25 s (deadlines are checked on that tick).
FAST_TICK = {"pong_timeout": 1}


def token(
    sub: str = "alice", ttl: float = 600, key: Any = JWT_SECRET, alg: str = "HS256", **claims: Any
) -> str:
    headers = {"kid": claims.pop("kid")} if "kid" in claims else None
    payload = {"sub": sub, "exp": time.time() + ttl, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def hs_app(**jwt_fields: Any) -> dict[str, Any]:
    return {"jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET, **jwt_fields}}


async def signin(client: PusherClient, auth: str, user: dict[str, Any] | None = None) -> None:
    user_data = json.dumps(user if user is not None else {"id": "alice"})
    await client.send({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})


async def signed_in(client: PusherClient, auth: str, user: dict[str, Any] | None = None) -> None:
    await signin(client, auth, user)
    reply = await client.expect("pusher:signin_success")
    assert json.loads(reply["data"]["user_data"])["id"] == (user or {"id": "alice"})["id"]


def assert_no_token_logged(caplog: pytest.LogCaptureFixture, *tokens: str) -> None:
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.__dict__)
        for value in tokens:
            assert value not in text, (record.name, record.getMessage())
            signature = value.rsplit(".", 1)[-1]
            if signature:  # not even the signature part alone
                assert signature not in text, (record.name, record.getMessage())


def _pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- sign-in ---------------------------------------------------------------------------------


async def test_hs256_signin(make_node: MakeNode, connect: Connect, logs: LogCheck) -> None:
    node = await make_node(app=hs_app())
    client = await connect(node)
    value = token(user_info={"name": "Alice"})
    await signed_in(client, value)
    await client.subscribed("#server-to-user-alice")
    assert_no_token_logged(logs.caplog, value)


async def test_es256_signin_with_a_pem_file(
    make_node: MakeNode, connect: Connect, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    pem = tmp_path / "es256.pem"
    pem.write_text(_pem(ec_key))
    node = await make_node(app={"jwt": {"algorithms": ["ES256"], "public_key_file": str(pem)}})
    client = await connect(node)
    await signed_in(client, token(key=ec_key, alg="ES256"))


async def test_rs256_signin_with_a_jwks_file(
    make_node: MakeNode, connect: Connect, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "2026-11"}]}))
    node = await make_node(app={"jwt": {"algorithms": ["RS256"], "jwks_file": str(jwks)}})
    client = await connect(node)
    await signed_in(client, token(key=rsa_key, alg="RS256", kid="2026-11"))
    other = await connect(node)
    await signin(other, token(key=rsa_key, alg="RS256", kid="2025-01"))
    closed = await other.closed()
    assert closed.code == 4009
    assert "unknown_kid" in closed.frames[-1]["data"]["message"]


@pytest.mark.parametrize(
    ("mint", "check"),
    [
        (lambda: token(ttl=-120, aud="bastion-tests"), "expired"),
        (lambda: token(aud="another-service"), "audience"),
        (lambda: jwt.encode({"sub": "alice", "exp": time.time() + 60}, None, "none"), "algorithm"),
        (lambda: token(key="x" * 40, aud="bastion-tests"), "signature"),
        (lambda: token(sub="mallory", aud="bastion-tests"), "sub does not match user_data.id"),
    ],
)
async def test_bad_signin_tokens_close_4009(
    make_node: MakeNode, connect: Connect, logs: LogCheck, mint: Any, check: str
) -> None:
    node = await make_node(app=hs_app(audience="bastion-tests"))
    client = await connect(node)
    value = mint()
    await signin(client, value)
    closed = await client.closed()
    assert closed.code == 4009
    error = closed.frames[-1]
    assert error["event"] == "pusher:error"
    assert check in error["data"]["message"]
    logs.assert_refusal_logged("signin_token_invalid")
    assert_no_token_logged(logs.caplog, value)


async def test_app_without_jwt_refuses_a_token_as_a_bad_signature(
    node: Node, connect: Connect
) -> None:
    client = await connect(node)
    await signin(client, token())
    closed = await client.closed()
    assert closed.code == 4009
    assert closed.frames[-1]["data"]["message"] == "Invalid user authentication signature"


# --- grants and tickets -----------------------------------------------------------------------


async def test_signin_grants_subscribe_without_hmac(make_node: MakeNode, connect: Connect) -> None:
    node = await make_node(app=hs_app())
    client = await connect(node)
    grants = ["private-orders-42", "presence-room-*"]
    await signed_in(client, token(channels=grants, user_info={"name": "Alice"}))
    await client.subscribed("private-orders-42", auth="")
    reply = await client.subscribed("presence-room-7")
    presence = data_of(reply)["presence"]
    assert presence["hash"] == {"alice": {"name": "Alice"}}
    refused = await client.subscribe("private-orders-43", auth="")
    assert refused["event"] == "pusher:subscription_error"
    assert refused["data"]["type"] == "AuthError"
    assert refused["data"]["status"] == 401
    # The connection stays usable.
    await client.barrier()


async def test_ticket_with_socket_id_binding(
    make_node: MakeNode, connect: Connect, logs: LogCheck
) -> None:
    node = await make_node(app=hs_app())
    client = await connect(node)
    bound = token(sub="bob", channels=["presence-lobby"], socket_id=client.socket_id)
    channel_data = json.dumps({"user_id": "bob"})
    reply = await client.subscribed("presence-lobby", auth=bound, channel_data=channel_data)
    assert data_of(reply)["presence"]["ids"] == ["bob"]
    # The same ticket on another connection is refused.
    thief = await connect(node)
    refused = await thief.subscribe("presence-lobby", auth=bound, channel_data=channel_data)
    assert refused["event"] == "pusher:subscription_error"
    assert "socket_id" in refused["data"]["error"]
    not_granted = await client.subscribe("private-other", auth=token(channels=["private-a*"]))
    assert not_granted["event"] == "pusher:subscription_error"
    logs.assert_refusal_logged("subscribe_auth_invalid")
    assert_no_token_logged(logs.caplog, bound)


async def test_hmac_channel_auth_still_works_in_jwt_mode(
    make_node: MakeNode, connect: Connect
) -> None:
    node = await make_node(app=hs_app())
    client = await connect(node)
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}:private-x')}"
    await client.subscribed("private-x", auth=auth)


# --- expiry and renewal --------------------------------------------------------------------------


async def test_expiry_warning_then_close(
    make_node: MakeNode, connect: Connect, logs: LogCheck
) -> None:
    node = await make_node(
        server=FAST_TICK,
        app=hs_app(leeway_seconds=0, expiry_warning_seconds=60, expiry_grace_seconds=0.3),
    )
    client = await connect(node)
    await signed_in(client, token(ttl=0.8))
    warning = await client.expect("bastion:token_expiring")
    assert 0 <= data_of(warning)["expires_in"] <= 1
    closed = await client.closed()
    assert closed.code == 4009
    assert closed.frames[-1]["data"]["message"] == "Sign-in token expired and was not renewed"
    assert [f["event"] for f in closed.frames] == ["pusher:error"]  # warned once only
    logs.assert_refusal_logged("token_expired")


async def test_renewal_keeps_the_connection(make_node: MakeNode, connect: Connect) -> None:
    node = await make_node(
        server=FAST_TICK,
        app=hs_app(leeway_seconds=0, expiry_warning_seconds=1.0, expiry_grace_seconds=0.3),
    )
    client = await connect(node)
    await signed_in(client, token(ttl=1.0))  # would be closed about 1.3 s from now
    await client.expect("bastion:token_expiring")
    await signed_in(client, token(ttl=2.5))
    # The renewed token's warning comes about 1.5 s after renewal: past the first
    # token's close, which therefore did not happen.
    warning = await client.expect("bastion:token_expiring")
    assert 0 <= data_of(warning)["expires_in"] <= 1
    await client.barrier()


# --- the URL token -------------------------------------------------------------------------------


async def test_query_token_accepted_when_the_app_opts_in(
    make_node: MakeNode, logs: LogCheck
) -> None:
    node = await make_node(app=hs_app(allow_query_token=True))
    value = token(user_info={"plan": "pro"})
    ws = await open_ws(node.port, query=f"{DEFAULT_QUERY}&token={value}")
    try:
        first = json.loads(await within(ws.recv()))
        assert first["event"] == "pusher:connection_established"
        second = json.loads(await within(ws.recv()))
        assert second["event"] == "pusher:signin_success"
        assert json.loads(second["data"]["user_data"]) == {
            "id": "alice",
            "user_info": {"plan": "pro"},
        }
    finally:
        await within(ws.close())
    assert_no_token_logged(logs.caplog, value)


async def test_bad_query_token_closes_4009(make_node: MakeNode, logs: LogCheck) -> None:
    node = await make_node(app=hs_app(allow_query_token=True))
    value = token(ttl=-3600)
    ws = await open_ws(node.port, query=f"{DEFAULT_QUERY}&token={value}")
    client = PusherClient(ws, json.loads(await within(ws.recv())))
    closed = await client.closed()
    assert closed.code == 4009
    assert "expired" in closed.frames[-1]["data"]["message"]
    assert_no_token_logged(logs.caplog, value)


async def test_query_token_refused_unless_the_app_opts_in(
    make_node: MakeNode, logs: LogCheck
) -> None:
    node = await make_node(app=hs_app())
    value = token()
    with pytest.raises(InvalidStatus) as info:
        await open_ws(node.port, query=f"{DEFAULT_QUERY}&token={value}")
    assert info.value.response.status_code == 400
    assert_no_token_logged(logs.caplog, value)
