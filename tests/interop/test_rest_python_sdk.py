"""Every REST endpoint through the PyPI ``pusher`` SDK against a real Bastion.

Subscribers are raw WebSocket clients (``support.clients.PusherClient``), authorised with the same
SDK's ``authenticate`` / ``authenticate_user``, so these tests need no Node. The SDK is
synchronous (requests); it runs in a thread so the event loop keeps reading frames.
"""

from __future__ import annotations

import asyncio
import json
import time

import pusher
import pusher.errors
import pytest
import requests
from pusher.http import POST, Request
from support.clients import PusherClient, data_of
from support.server import DEFAULT_APP, BastionProcess
from support.signing import signed_rest_request
from support.timeouts import scaled

from .conftest import make_py_pusher

APP_ID = DEFAULT_APP["id"]
KEY = DEFAULT_APP["key"]
SECRET = DEFAULT_APP["secret"]


async def _client(server: BastionProcess) -> PusherClient:
    return await PusherClient.connect(server.ws_url(KEY))


async def _subscribe(client: PusherClient, sdk: pusher.Pusher, channel: str, **presence) -> None:
    auth: dict = {}
    if channel.startswith(("private-", "presence-")):
        auth = sdk.authenticate(channel, client.socket_id, presence or None)
    frame = await client.subscribe(
        channel, auth.get("auth"), auth.get("channel_data"), interleaved=True
    )
    assert frame["event"] == "pusher_internal:subscription_succeeded", frame


def _sdk_send(sdk: pusher.Pusher, method: str, path: str, params: dict) -> dict:
    """Send a request built and signed by the SDK's own Request class."""
    client = sdk._pusher_client
    return client.http.send_request(Request(client, method, path, params))


async def test_trigger_delivers_the_data_string_unchanged(bastion, py_pusher) -> None:
    async with await _client(bastion) as sub:
        await _subscribe(sub, py_pusher, "news")

        result = await asyncio.to_thread(py_pusher.trigger, "news", "headline", {"title": "x"})

        assert result == {}
        frame = await sub.wait_for("headline", "news")
        assert frame["data"] == json.dumps({"title": "x"}), "data is relayed as the SDK's string"
        assert data_of(frame) == {"title": "x"}


async def test_trigger_to_several_channels(bastion, py_pusher) -> None:
    async with await _client(bastion) as sub:
        await _subscribe(sub, py_pusher, "one")
        await _subscribe(sub, py_pusher, "private-two")

        await asyncio.to_thread(py_pusher.trigger, ["one", "private-two"], "multi", "plain text")

        assert (await sub.wait_for("multi", "one"))["data"] == "plain text"
        assert (await sub.wait_for("multi", "private-two"))["data"] == "plain text"


async def test_trigger_with_socket_id_excludes_that_connection(bastion, py_pusher) -> None:
    async with await _client(bastion) as origin, await _client(bastion) as other:
        await _subscribe(origin, py_pusher, "room")
        await _subscribe(other, py_pusher, "room")

        await asyncio.to_thread(py_pusher.trigger, "room", "echo", {"n": 1}, origin.socket_id)
        await other.wait_for("echo", "room")
        await asyncio.to_thread(py_pusher.trigger, "room", "barrier", {})

        await origin.wait_for("barrier", "room")
        assert not origin.received("echo"), "the excluded socket must not get the event"


async def test_trigger_with_info_user_count_and_subscription_count(bastion, py_pusher) -> None:
    # PyPI pusher's trigger() has no `info` argument; the same SDK's Request signs it.
    async with await _client(bastion) as a, await _client(bastion) as b:
        await _subscribe(a, py_pusher, "presence-hall", user_id="u1")
        await _subscribe(b, py_pusher, "presence-hall", user_id="u2")
        await _subscribe(a, py_pusher, "plain")
        await _subscribe(b, py_pusher, "plain")

        body = {
            "name": "ev",
            "channels": ["presence-hall", "plain"],
            "data": "{}",
            "info": "user_count,subscription_count",
        }
        result = await asyncio.to_thread(_sdk_send, py_pusher, POST, f"/apps/{APP_ID}/events", body)

        assert result["channels"]["presence-hall"]["user_count"] == 2
        assert result["channels"]["plain"]["subscription_count"] == 2
        assert "user_count" not in result["channels"]["plain"]


async def test_trigger_batch(bastion, py_pusher) -> None:
    async with await _client(bastion) as sub:
        await _subscribe(sub, py_pusher, "b-one")
        await _subscribe(sub, py_pusher, "private-b-two")
        batch = [
            {"channel": "b-one", "name": "first", "data": {"i": 1}},
            {"channel": "private-b-two", "name": "second", "data": "raw"},
        ]

        result = await asyncio.to_thread(py_pusher.trigger_batch, batch)

        assert result == {}
        assert data_of(await sub.wait_for("first", "b-one")) == {"i": 1}
        assert (await sub.wait_for("second", "private-b-two"))["data"] == "raw"


async def test_trigger_batch_with_info(bastion, py_pusher) -> None:
    async with await _client(bastion) as sub:
        await _subscribe(sub, py_pusher, "counted")
        batch = [
            {"channel": "counted", "name": "a", "data": "1", "info": "subscription_count"},
            {"channel": "empty-one", "name": "b", "data": "2"},
        ]

        result = await asyncio.to_thread(py_pusher.trigger_batch, batch)

        assert result["batch"][0] == {"subscription_count": 1}
        assert result["batch"][1] == {}


async def test_channels_info(bastion, py_pusher) -> None:
    async with await _client(bastion) as a, await _client(bastion) as b:
        await _subscribe(a, py_pusher, "presence-lobby", user_id="u1")
        await _subscribe(b, py_pusher, "presence-lobby", user_id="u2")
        await _subscribe(a, py_pusher, "news")
        await _subscribe(b, py_pusher, "private-desk")

        everything = await asyncio.to_thread(py_pusher.channels_info)
        presence = await asyncio.to_thread(py_pusher.channels_info, "presence-", ["user_count"])

        assert set(everything["channels"]) == {"presence-lobby", "news", "private-desk"}
        assert presence == {"channels": {"presence-lobby": {"user_count": 2}}}

        # Occupied channels only: after leaving, "news" is gone.
        await a.send({"event": "pusher:unsubscribe", "data": {"channel": "news"}})
        await a.ping()
        after = await asyncio.to_thread(py_pusher.channels_info)
        assert "news" not in after["channels"]


async def test_channel_info(bastion, py_pusher) -> None:
    async with await _client(bastion) as a, await _client(bastion) as b:
        await _subscribe(a, py_pusher, "news")
        await _subscribe(b, py_pusher, "news")
        await _subscribe(a, py_pusher, "presence-x", user_id="u1")

        news = await asyncio.to_thread(py_pusher.channel_info, "news", ["subscription_count"])
        plain = await asyncio.to_thread(py_pusher.channel_info, "news")
        presence = await asyncio.to_thread(py_pusher.channel_info, "presence-x", ["user_count"])
        empty = await asyncio.to_thread(py_pusher.channel_info, "nobody-here")

        assert news == {"occupied": True, "subscription_count": 2}
        assert plain["occupied"] is True
        assert presence["occupied"] is True and presence["user_count"] == 1
        assert empty == {"occupied": False}


async def test_channel_info_cache(bastion, py_pusher) -> None:
    await asyncio.to_thread(py_pusher.trigger, "cache-weather", "forecast", {"sky": "blue"})

    info = await asyncio.to_thread(py_pusher.channel_info, "cache-weather", ["cache"])

    assert info["occupied"] is False
    assert json.loads(info["cache"]["data"]) == {"sky": "blue"}
    assert isinstance(info["cache"]["ttl"], int) and info["cache"]["ttl"] > 0


async def test_users_info(bastion, py_pusher) -> None:
    async with await _client(bastion) as a, await _client(bastion) as b:
        await _subscribe(a, py_pusher, "presence-team", user_id="u1", user_info={"n": 1})
        await _subscribe(b, py_pusher, "presence-team", user_id="u2")

        users = await asyncio.to_thread(py_pusher.users_info, "presence-team")

        assert sorted(u["id"] for u in users["users"]) == ["u1", "u2"]


async def test_users_info_on_a_non_presence_channel_is_400(bastion, py_pusher) -> None:
    with pytest.raises(pusher.errors.PusherBadRequest):
        await asyncio.to_thread(py_pusher.users_info, "news")


async def test_send_to_user(bastion, py_pusher) -> None:
    async with await _client(bastion) as sub:
        auth = py_pusher.authenticate_user(sub.socket_id, {"id": "alice"})
        await sub.signin(auth["auth"], auth["user_data"])
        await sub.wait_for("pusher:signin_success")
        await _subscribe(sub, py_pusher, "#server-to-user-alice")

        await asyncio.to_thread(py_pusher.send_to_user, "alice", "note", {"x": 1})

        frame = await sub.wait_for("note", "#server-to-user-alice")
        assert data_of(frame) == {"x": 1}


async def test_terminate_user_connections(bastion, py_pusher) -> None:
    async with await _client(bastion) as sub:
        auth = py_pusher.authenticate_user(sub.socket_id, {"id": "alice"})
        await sub.signin(auth["auth"], auth["user_data"])
        await sub.wait_for("pusher:signin_success")

        # The SDK uses /users/{id}/terminate_connections (no /apps/{app_id} prefix).
        result = await asyncio.to_thread(py_pusher.terminate_user_connections, "alice")

        assert result == {}
        assert (await sub.closed()).code == 4009


def test_wrong_secret_is_rejected_with_401(bastion: BastionProcess) -> None:
    impostor = make_py_pusher(bastion, secret="not-the-app-secret")

    with pytest.raises(pusher.errors.PusherBadAuth):
        impostor.trigger("news", "x", {})
    with pytest.raises(pusher.errors.PusherBadAuth):
        impostor.channels_info()


def test_key_of_another_app_is_rejected_with_401(make_bastion) -> None:
    other = {"id": "777", "key": "other-key", "secret": "other-secret"}
    server = make_bastion(apps=[dict(DEFAULT_APP), other])
    # Valid credentials of app 777 used against app 12345's route.
    cross = make_py_pusher(server, app={**other, "id": APP_ID})

    with pytest.raises(pusher.errors.PusherBadAuth):
        cross.trigger("news", "x", {})
    # ... while both apps work on their own routes.
    assert make_py_pusher(server, app=other).trigger("news", "x", {}) == {}
    assert make_py_pusher(server).trigger("news", "x", {}) == {}


def _post(server: BastionProcess, path_and_query: str, body: bytes) -> requests.Response:
    return requests.post(
        server.http_url + path_and_query,
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=scaled(10),
    )


def test_expired_timestamp_is_rejected_with_401(bastion: BastionProcess) -> None:
    body = {"name": "ev", "channels": ["news"], "data": "{}"}
    path = f"/apps/{APP_ID}/events"

    fresh = _post(
        bastion, *signed_rest_request(method="POST", path=path, key=KEY, secret=SECRET, body=body)
    )
    stale = _post(
        bastion,
        *signed_rest_request(
            method="POST",
            path=path,
            key=KEY,
            secret=SECRET,
            body=body,
            timestamp=int(time.time()) - 700,
        ),
    )

    assert fresh.status_code == 200, fresh.text  # the hand-made signature itself is right
    assert stale.status_code == 401, stale.text


def test_timestamp_in_the_future_is_rejected_with_401(bastion: BastionProcess) -> None:
    body = {"name": "ev", "channels": ["news"], "data": "{}"}
    path_q, raw = signed_rest_request(
        method="POST",
        path=f"/apps/{APP_ID}/events",
        key=KEY,
        secret=SECRET,
        body=body,
        timestamp=int(time.time()) + 700,
    )

    assert _post(bastion, path_q, raw).status_code == 401


def test_tampered_body_is_rejected_with_401(bastion: BastionProcess) -> None:
    path_q, raw = signed_rest_request(
        method="POST",
        path=f"/apps/{APP_ID}/events",
        key=KEY,
        secret=SECRET,
        body={"name": "ev", "channels": ["news"], "data": "{}"},
    )
    tampered = raw.replace(b"news", b"hack")

    assert _post(bastion, path_q, tampered).status_code == 401
