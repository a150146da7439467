"""The PyPI SDK's ``authenticate`` / ``authenticate_user`` output, used verbatim over a raw
WebSocket, is accepted by Bastion — and tampered variants are refused.

This is what a Django/Flask auth endpoint returns to its browser clients; here the
"client" is a raw ``websockets`` connection so every frame is visible.
"""

from __future__ import annotations

import asyncio
import base64
import json

import nacl.secret
import pusher.errors
import pytest
from support.clients import PusherClient, data_of
from support.server import DEFAULT_APP, app_spec

KEY = DEFAULT_APP["key"]


@pytest.fixture
async def ws(bastion):
    client = await PusherClient.connect(bastion.ws_url(KEY))
    try:
        yield client
    finally:
        await client.close()


async def test_handshake_frame(ws: PusherClient) -> None:
    established = ws.received("pusher:connection_established")[0]
    assert isinstance(established["data"], str), "data is a JSON-encoded string"
    assert data_of(established)["activity_timeout"] == 120
    assert ws.socket_id and ws.socket_id.count(".") == 1


async def test_private_channel_auth_is_accepted(ws: PusherClient, py_pusher) -> None:
    auth = py_pusher.authenticate("private-orders", ws.socket_id)

    frame = await ws.subscribe("private-orders", auth["auth"], interleaved=True)

    assert frame["event"] == "pusher_internal:subscription_succeeded", frame
    assert frame["channel"] == "private-orders"


async def test_presence_channel_auth_is_accepted(ws: PusherClient, py_pusher) -> None:
    member = {"user_id": "u-1", "user_info": {"name": "Ada", "role": "admin"}}
    auth = py_pusher.authenticate("presence-board", ws.socket_id, member)

    frame = await ws.subscribe(
        "presence-board", auth["auth"], auth["channel_data"], interleaved=True
    )

    assert frame["event"] == "pusher_internal:subscription_succeeded", frame
    assert isinstance(frame["data"], str)
    presence = data_of(frame)["presence"]
    assert presence["ids"] == ["u-1"]
    assert presence["hash"] == {"u-1": {"name": "Ada", "role": "admin"}}
    assert presence["count"] == 1


async def test_encrypted_channel_auth_and_python_decrypt(ws: PusherClient, py_pusher) -> None:
    channel = "private-encrypted-ledger"
    auth = py_pusher.authenticate(channel, ws.socket_id)
    shared_secret = base64.b64decode(auth["shared_secret"])
    assert len(shared_secret) == 32

    # Like pusher-js: the shared secret never goes to the server.
    frame = await ws.subscribe(channel, auth["auth"], interleaved=True)
    assert frame["event"] == "pusher_internal:subscription_succeeded", frame

    await asyncio.to_thread(py_pusher.trigger, channel, "entry", {"amount": 42})

    event = await ws.wait_for("entry", channel)
    assert isinstance(event["data"], str)
    envelope = data_of(event)
    assert set(envelope) == {"nonce", "ciphertext"}
    box = nacl.secret.SecretBox(shared_secret)
    plaintext = box.decrypt(
        base64.b64decode(envelope["ciphertext"]), base64.b64decode(envelope["nonce"])
    )
    assert json.loads(plaintext) == {"amount": 42}


async def test_user_authentication_is_accepted(ws: PusherClient, py_pusher) -> None:
    user = {"id": "alice", "user_info": {"name": "Alice"}, "watchlist": ["bob"]}
    auth = py_pusher.authenticate_user(ws.socket_id, user)

    await ws.signin(auth["auth"], auth["user_data"])

    success = await ws.wait_for("pusher:signin_success")
    data = data_of(success)
    data = data if isinstance(data, dict) else json.loads(data)
    assert json.loads(data["user_data"]) == user
    # Signed in as alice: her server-to-user channel is allowed.
    frame = await ws.subscribe("#server-to-user-alice", interleaved=True)
    assert frame["event"] == "pusher_internal:subscription_succeeded", frame


async def test_private_auth_for_another_socket_is_refused(bastion, py_pusher) -> None:
    async with (
        await PusherClient.connect(bastion.ws_url(KEY)) as victim,
        await PusherClient.connect(bastion.ws_url(KEY)) as thief,
    ):
        stolen = py_pusher.authenticate("private-orders", victim.socket_id)

        frame = await thief.subscribe("private-orders", stolen["auth"], interleaved=True)

        assert frame["event"] == "pusher:subscription_error", frame
        assert data_of(frame)["type"] == "AuthError"
        assert data_of(frame)["status"] == 401
        await thief.ping()  # the socket stays open
        assert thief.is_open


async def test_presence_channel_data_tampering_is_refused(ws: PusherClient, py_pusher) -> None:
    auth = py_pusher.authenticate("presence-board", ws.socket_id, {"user_id": "u-1"})
    forged = auth["channel_data"].replace("u-1", "admin")

    frame = await ws.subscribe("presence-board", auth["auth"], forged, interleaved=True)

    assert frame["event"] == "pusher:subscription_error", frame
    assert data_of(frame)["status"] == 401


async def test_server_to_user_channel_of_someone_else_is_refused(
    ws: PusherClient, py_pusher
) -> None:
    auth = py_pusher.authenticate_user(ws.socket_id, {"id": "alice"})
    await ws.signin(auth["auth"], auth["user_data"])
    await ws.wait_for("pusher:signin_success")

    frame = await ws.subscribe("#server-to-user-bob", interleaved=True)

    assert frame["event"] == "pusher:subscription_error", frame
    await asyncio.to_thread(py_pusher.send_to_user, "bob", "secret", {"for": "bob"})
    await asyncio.to_thread(py_pusher.send_to_user, "alice", "barrier", {})
    await ws.wait_for("barrier")
    assert not ws.received("secret")


async def test_user_authentication_with_wrong_secret_closes_4009(bastion) -> None:
    from .conftest import make_py_pusher

    impostor = make_py_pusher(bastion, secret="not-the-app-secret")
    async with await PusherClient.connect(bastion.ws_url(KEY)) as ws:
        auth = impostor.authenticate_user(ws.socket_id, {"id": "alice"})

        await ws.signin(auth["auth"], auth["user_data"])

        assert (await ws.closed()).code == 4009
        assert not ws.received("pusher:signin_success")


async def test_watchlist_over_the_limit_is_truncated_with_4302(make_bastion) -> None:
    from .conftest import make_py_pusher

    server = make_bastion(apps=[app_spec(max_watchlist_size=2)])
    sdk = make_py_pusher(server)
    async with await PusherClient.connect(server.ws_url(KEY)) as ws:
        auth = sdk.authenticate_user(ws.socket_id, {"id": "w", "watchlist": ["a", "b", "c"]})

        await ws.signin(auth["auth"], auth["user_data"])

        await ws.wait_for("pusher:signin_success")
        error = await ws.wait_for("pusher:error")
        assert data_of(error)["code"] == 4302
        await ws.ping()
        assert ws.is_open


async def test_no_secret_or_signature_reaches_the_server_logs(make_bastion) -> None:
    from .conftest import make_py_pusher

    # Debug logging: the most talkative the server gets.
    server = make_bastion(extra_args=("--log-level", "debug"))
    sdk = make_py_pusher(server, encryption_master_key_base64=base64.b64encode(b"k" * 32).decode())
    signatures = []
    async with await PusherClient.connect(server.ws_url(KEY)) as ws:
        for channel in ("private-a", "private-encrypted-b"):
            auth = sdk.authenticate(channel, ws.socket_id)
            signatures.append(auth["auth"].split(":", 1)[1])
            await ws.subscribe(channel, auth["auth"], interleaved=True)
        bad = make_py_pusher(server, secret="wrong-secret").authenticate("private-c", ws.socket_id)
        signatures.append(bad["auth"].split(":", 1)[1])
        await ws.subscribe("private-c", bad["auth"], interleaved=True)
        user = sdk.authenticate_user(ws.socket_id, {"id": "alice"})
        signatures.append(user["auth"].split(":", 1)[1])
        await ws.signin(user["auth"], user["user_data"])
        await ws.wait_for("pusher:signin_success")
    await asyncio.to_thread(sdk.trigger, "private-a", "e", {})
    with pytest.raises(pusher.errors.PusherBadAuth):
        await asyncio.to_thread(make_py_pusher(server, secret="wrong-secret").trigger, "x", "e", {})

    server.stop()

    output = server.output
    assert DEFAULT_APP["secret"] not in output
    for signature in signatures:
        assert signature not in output
    assert "auth_signature=" not in output
