"""Webhooks from a real ``bastion serve`` process, checked by the official SDKs.

* Every webhook the server sends is accepted by the npm ``pusher`` SDK
  (``pusher.webhook({headers, rawBody}).isValid()`` / ``getEvents()``, through the
  driver's ``webhook`` command) and by the PyPI SDK (``validate_webhook``).
* Durability: deliveries the receiver refuses (503) stay pending in the SQLite queue;
  the server is SIGKILLed, restarted on the same queue file with a healthy receiver,
  and every delivery that was pending arrives, each ``Idempotency-Key`` answered 2xx
  exactly once.

Waits are on the receiver's condition (bounded, scaled); nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pusher
import pytest
from support.clients import PusherClient
from support.server import DEFAULT_APP, BastionProcess, app_spec, config_toml, run_bastion_cli
from support.timeouts import scaled
from support.webhook_receiver import Received, WebhookReceiver

from .node_driver import NodeDriver

APP_ID = str(DEFAULT_APP["id"])
KEY = str(DEFAULT_APP["key"])
SECRET = str(DEFAULT_APP["secret"])

#: The official PyPI SDK, as an app's receiver would use it.
PY_SDK = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


def delivery(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """``[webhooks]`` for a test server: the queue in ``tmp_path``, short windows."""
    return {
        "queue_path": str(tmp_path / "webhooks.sqlite3"),
        "batch_max_ms": 50,
        "vacated_delay_seconds": 0.1,
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "timeout_seconds": 5.0,
        **overrides,
    }


def events(received: list[Received]) -> list[dict[str, Any]]:
    """Every event of every 2xx request, in arrival order."""
    return [
        event
        for request in received
        if 200 <= request.status < 300
        for event in request.json()["events"]
    ]


def has(*wanted: dict[str, Any]) -> Callable[[list[Received]], bool]:
    """A receiver condition: each ``wanted`` event (a subset of its keys) has arrived."""

    def check(received: list[Received]) -> bool:
        got = events(received)
        return all(any(all(e.get(k) == v for k, v in w.items()) for e in got) for w in wanted)

    return check


def py_valid(request: Received) -> dict[str, Any] | None:
    signature = request.header("X-Pusher-Signature") or ""
    return PY_SDK.validate_webhook(request.header("X-Pusher-Key") or "", signature, request.body)


def test_webhooks_are_valid_for_the_node_and_python_sdks(
    receiver: WebhookReceiver,
    make_bastion: Callable[..., BastionProcess],
    make_driver: Callable[..., NodeDriver],
    tmp_path: Path,
) -> None:
    server = make_bastion(
        apps=[app_spec(webhooks=[{"url": receiver.url}])], webhooks=delivery(tmp_path)
    )
    driver = make_driver(server)
    driver.connect("a", presenceData={"user_id": "alice", "user_info": {"name": "Alice"}})
    driver.connect("b", presenceData={"user_id": "bob", "user_info": {"name": "Bob"}})
    driver.subscribe("a", "news")
    driver.subscribe("a", "presence-room")
    driver.subscribe("b", "presence-room")
    driver.subscribe("a", "private-chat")
    driver.subscribe("b", "private-chat")
    driver.request(
        "trigger", client="a", channel="private-chat", event="client-note", data={"n": 1}
    )
    driver.channel_event("b", "private-chat", "client-note")
    driver.request("unsubscribe", client="b", channel="presence-room")
    driver.request("unsubscribe", client="a", channel="news")

    received = receiver.wait_for(
        has(
            {"name": "channel_occupied", "channel": "news"},
            {"name": "subscription_count", "channel": "news", "subscription_count": 1},
            {"name": "member_added", "channel": "presence-room", "user_id": "bob"},
            {"name": "client_event", "channel": "private-chat", "event": "client-note"},
            {"name": "member_removed", "channel": "presence-room", "user_id": "bob"},
            {"name": "channel_vacated", "channel": "news"},
        ),
        timeout=scaled(15),
    )
    for request in received:
        checked = driver.request(
            "webhook", headers=request.headers, rawBody=request.body.decode("utf-8")
        )
        assert checked["isValid"] is True, request
        assert checked["events"] == request.json()["events"]
        assert checked["timeMs"] == request.json()["time_ms"]
        decoded = py_valid(request)
        assert decoded is not None, request
        assert decoded["events"] == checked["events"]

    # A body changed by one byte, or signed by another secret, is refused by both.
    first = received[0]
    tampered = first.body.replace(b'"events"', b'"events" ')
    checked = driver.request("webhook", headers=first.headers, rawBody=tampered.decode("utf-8"))
    assert checked["isValid"] is False
    assert PY_SDK.validate_webhook(KEY, first.header("X-Pusher-Signature") or "", tampered) is None
    other = pusher.Pusher(app_id=APP_ID, key=KEY, secret="not-the-secret")
    assert other.validate_webhook(KEY, first.header("X-Pusher-Signature") or "", first.body) is None

    note = next(e for e in events(received) if e["name"] == "client_event")
    assert note["data"] == '{"n":1}'
    assert "user_id" not in note  # a private channel


async def _subscribe_many(server: BastionProcess, channels: list[str]) -> None:
    async with await PusherClient.connect(server.ws_url(KEY)) as client:
        for channel in channels:
            frame = await client.subscribe(channel, interleaved=True)
            assert frame["event"] == "pusher_internal:subscription_succeeded", frame


def test_pending_webhooks_survive_sigkill_and_are_delivered_after_restart(
    receiver: WebhookReceiver,
    make_bastion: Callable[..., BastionProcess],
    tmp_path: Path,
) -> None:
    receiver.fail_next(1_000_000, status=503)  # every delivery stays pending
    config = {
        "apps": [app_spec(webhooks=[{"url": receiver.url, "event_types": ["channel_occupied"]}])],
        "webhooks": delivery(tmp_path, batch_max_ms=0),
    }
    first = make_bastion(**config)
    channels = [f"durable-{n}" for n in range(5)]
    asyncio.run(_subscribe_many(first, channels))

    def keys(received: list[Received]) -> set[str]:
        return {r.header("Idempotency-Key") or "" for r in received}

    # A delivery attempted is a delivery stored: every occupied has been tried (503).
    received = receiver.wait_for(
        lambda r: {e["channel"] for x in r for e in x.json()["events"]} >= set(channels),
        timeout=scaled(15),
    )
    pending = keys(received)
    assert len(pending) == len(channels)
    assert not receiver.delivered()

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(scaled(10))
    assert first.process.returncode == -signal.SIGKILL
    first.stop()

    attempts_before_restart = len(receiver.received)
    receiver.clear_failures()  # answer 200 from now on
    second = make_bastion(**config)  # the same queue file

    delivered = receiver.wait_for(
        lambda r: keys([x for x in r if x.status == 200]) >= pending, timeout=scaled(15)
    )
    assert len(delivered) > attempts_before_restart
    assert second.stop() == 0  # a clean stop: nothing in flight is left to repeat

    ok = collections.Counter(r.header("Idempotency-Key") for r in receiver.delivered())
    assert set(ok) == pending
    assert all(count == 1 for count in ok.values()), ok
    channels_delivered = sorted(e["channel"] for e in events(receiver.delivered()))
    assert channels_delivered == channels
    for request in receiver.delivered():
        assert py_valid(request) is not None


def test_an_unusable_queue_path_exits_1_with_a_message(tmp_path: Path) -> None:
    text = config_toml(
        apps=[app_spec(webhooks=[{"url": "http://127.0.0.1:9/hook"}])],
        webhooks={"queue_path": str(tmp_path)},  # a directory: SQLite cannot open it
    )
    result = run_bastion_cli(["serve", "--config", "{config}"], cwd=tmp_path, config_toml_text=text)
    assert result.returncode == 1
    assert "webhook queue" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stdout
