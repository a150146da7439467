"""Webhooks end to end on an in-process node: produced from the hub, queued, delivered.

Each test starts its own node with ``[webhooks]`` and its queue, audit log and blocks
file in ``tmp_path``, and points the app's endpoints at loopback
:class:`~support.webhook_receiver.WebhookReceiver` s. Every body is checked with the
official PyPI SDK's ``validate_webhook``. Waits go through the receiver's condition
(on a thread: the node runs on this loop), bounded by a scaled time-out; to show that
something did *not* arrive, a test waits for a later event that must come after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pusher
import pytest
from support.clients import APP_ID, APP_KEY, APP_SECRET, PusherClient, make_sdk, open_client
from support.timeouts import scaled
from support.webhook_receiver import Received, WebhookReceiver

from bastion.config import settings_from_mapping
from bastion.server.runtime import Node
from bastion.store.audit import query as query_audit

from .conftest import TEST_SECURITY, RunNode

StartNode = Callable[..., Awaitable[Node]]

#: ``[webhooks]`` for tests: short windows, quick retries, one request at a time per
#: endpoint (so one endpoint's requests arrive in the order they were queued).
FAST_DELIVERY: Mapping[str, Any] = {
    "batch_max_ms": 50,
    "vacated_delay_seconds": 0.1,
    "timeout_seconds": 5.0,
    "concurrency_per_endpoint": 1,
    "retry_initial_seconds": 0.05,
    "retry_max_seconds": 0.2,
}

#: The official SDK, to verify signatures exactly as an app's receiver would.
VERIFIER = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET)


def webhook_settings(
    state_dir: Path,
    hooks: list[Mapping[str, Any]],
    delivery: Mapping[str, Any] | None = None,
    app: Mapping[str, Any] | None = None,
) -> Any:
    """Settings for a node whose main app sends webhooks to ``hooks``."""
    document: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "activity_timeout": 120},
        "security": {
            **TEST_SECURITY,
            "reputation": {"store_path": str(state_dir / "blocks.sqlite3")},
        },
        "audit": {"path": str(state_dir / "audit.sqlite3")},
        "webhooks": {
            "queue_path": str(state_dir / "webhooks.sqlite3"),
            **FAST_DELIVERY,
            **(delivery or {}),
        },
        "apps": [
            {
                "id": APP_ID,
                "key": APP_KEY,
                "secret": APP_SECRET,
                "enable_client_messages": True,
                "enable_subscription_count": True,  # subscription_count webhooks need it
                "webhooks": list(hooks),
                **(app or {}),
            }
        ],
    }
    return settings_from_mapping(document, environ={})


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def second_receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
async def start_node(
    tmp_path: Path,
    receiver: WebhookReceiver,
    second_receiver: WebhookReceiver,
    run_node: RunNode,
) -> AsyncIterator[StartNode]:
    """Factory: ``await start_node(hooks, delivery=..., state=...)``; stopped at teardown.

    Depends on the receivers so the nodes stop before the receivers close.
    """

    async def factory(
        hooks: list[Mapping[str, Any]],
        *,
        delivery: Mapping[str, Any] | None = None,
        app: Mapping[str, Any] | None = None,
        state: Path | None = None,
    ) -> Node:
        settings = webhook_settings(state or tmp_path, hooks, delivery, app)
        return await run_node(settings)

    yield factory


@pytest.fixture
async def clients() -> AsyncIterator[list[PusherClient]]:
    opened: list[PusherClient] = []
    yield opened
    for client in opened:
        with contextlib.suppress(OSError, TimeoutError):
            await client.close()


# --- helpers --------------------------------------------------------------------------


def verified(request: Received) -> dict[str, Any]:
    """The request's body as the official SDK validates it (signature, key, time)."""
    assert request.header("Content-Type") == "application/json"
    assert request.header("X-Pusher-Key") == APP_KEY
    signature = request.header("X-Pusher-Signature")
    assert signature is not None
    body = VERIFIER.validate_webhook(APP_KEY, signature, request.body)
    assert body is not None, f"signature or body refused by the SDK: {request!r}"
    assert isinstance(body["time_ms"], int)
    assert isinstance(body["events"], list) and body["events"]
    return dict(body)


def events(received: list[Received]) -> list[dict[str, Any]]:
    """Every event of every 2xx request, in arrival order."""
    return [
        event
        for request in received
        if 200 <= request.status < 300
        for event in request.json()["events"]
    ]


def has(*wanted: Mapping[str, Any]) -> Callable[[list[Received]], bool]:
    """A receiver condition: every ``wanted`` event (a subset of its keys) has arrived."""

    def check(received: list[Received]) -> bool:
        got = events(received)
        return all(any(all(e.get(k) == v for k, v in w.items()) for e in got) for w in wanted)

    return check


async def wait_for(
    receiver: WebhookReceiver, predicate: Callable[[list[Received]], bool], seconds: float = 10
) -> list[Received]:
    """Wait on the receiver's condition on a thread (the node runs on this loop)."""
    return await asyncio.to_thread(receiver.wait_for, predicate, scaled(seconds))


async def connect(node: Node, opened: list[PusherClient]) -> PusherClient:
    client = await open_client(node.port)
    opened.append(client)
    return client


async def skip_to(client: PusherClient, event: str, channel: str | None = None) -> dict[str, Any]:
    """The next frame with ``event`` (on ``channel``), skipping the others.

    The app counts subscriptions (for the subscription_count webhooks), so frames such
    as ``pusher_internal:subscription_count`` interleave with what a test waits for.
    """
    while True:
        message = await client.recv()
        assert message.get("event") not in ("pusher:subscription_error", "pusher:error"), message
        if message.get("event") == event and channel in (None, message.get("channel")):
            return message


async def join(
    client: PusherClient, channel: str, auth: str | None = None, channel_data: str | None = None
) -> None:
    """Subscribe and wait for ``subscription_succeeded``."""
    data: dict[str, Any] = {"channel": channel}
    if auth is not None:
        data["auth"] = auth
    if channel_data is not None:
        data["channel_data"] = channel_data
    await client.send({"event": "pusher:subscribe", "data": data})
    await skip_to(client, "pusher_internal:subscription_succeeded", channel)


async def subscribe_signed(
    client: PusherClient, node: Node, channel: str, user: dict[str, Any] | None = None
) -> None:
    auth = make_sdk(node.port).authenticate(
        channel=channel, socket_id=client.socket_id, custom_data=user
    )
    await join(client, channel, auth["auth"], auth.get("channel_data"))


async def unsubscribe(client: PusherClient, channel: str) -> None:
    """Unsubscribe and wait until the server has handled it (its pong follows)."""
    await client.send({"event": "pusher:unsubscribe", "data": {"channel": channel}})
    await client.send({"event": "pusher:ping", "data": {}})
    await skip_to(client, "pusher:pong")


def names_on(received: list[Received], channel: str) -> list[str]:
    return [e["name"] for e in events(received) if e["channel"] == channel]


# --- every event type -----------------------------------------------------------------


async def test_every_event_type_arrives_signed(start_node, receiver, clients) -> None:
    node = await start_node([{"url": receiver.url}])
    alice, bob = await connect(node, clients), await connect(node, clients)

    await join(alice, "news")  # channel_occupied, subscription_count
    await join(alice, "cache-prices")  # + cache_miss
    await skip_to(alice, "pusher:cache_miss", "cache-prices")
    await subscribe_signed(alice, node, "presence-room", {"user_id": "alice"})  # member_added
    await subscribe_signed(bob, node, "presence-room", {"user_id": "bob"})
    await skip_to(alice, "pusher_internal:member_added", "presence-room")
    await subscribe_signed(alice, node, "private-chat")
    await subscribe_signed(bob, node, "private-chat")
    await alice.send({"event": "client-typing", "channel": "private-chat", "data": {"x": [1]}})
    await skip_to(bob, "client-typing", "private-chat")
    await alice.send({"event": "client-hi", "channel": "presence-room", "data": "plain"})
    await skip_to(bob, "client-hi", "presence-room")
    await unsubscribe(bob, "presence-room")  # member_removed (after the delay)
    await unsubscribe(alice, "news")  # channel_vacated (after the delay)

    received = await wait_for(
        receiver,
        has(
            {"name": "channel_occupied", "channel": "news"},
            {"name": "subscription_count", "channel": "news", "subscription_count": 1},
            {"name": "cache_miss", "channel": "cache-prices"},
            {"name": "member_added", "channel": "presence-room", "user_id": "alice"},
            {"name": "member_added", "channel": "presence-room", "user_id": "bob"},
            {"name": "client_event", "channel": "private-chat", "event": "client-typing"},
            {"name": "client_event", "channel": "presence-room", "event": "client-hi"},
            {"name": "member_removed", "channel": "presence-room", "user_id": "bob"},
            {"name": "channel_vacated", "channel": "news"},
        ),
    )
    for request in received:
        verified(request)
    keys = [r.header("Idempotency-Key") for r in received]
    assert all(keys) and len(set(keys)) == len(keys)
    got = events(received)
    typing = next(e for e in got if e.get("event") == "client-typing")
    assert typing == {
        "name": "client_event",
        "channel": "private-chat",
        "event": "client-typing",
        "data": '{"x":[1]}',
        "socket_id": alice.socket_id,
    }
    hi = next(e for e in got if e.get("event") == "client-hi")
    assert hi == {
        "name": "client_event",
        "channel": "presence-room",
        "event": "client-hi",
        "data": "plain",
        "socket_id": alice.socket_id,
        "user_id": "alice",
    }
    # Presence channels have no subscription_count (Pusher sends member events instead).
    assert not [
        e for e in got if e["name"] == "subscription_count" and e["channel"] == "presence-room"
    ]
    # Per channel the order is the order things happened.
    assert names_on(received, "news")[0] == "channel_occupied"
    assert names_on(received, "news")[-1] == "channel_vacated"


# --- filters --------------------------------------------------------------------------


async def test_endpoints_filter_by_event_type_and_channel_prefix(
    start_node, receiver, second_receiver, clients
) -> None:
    node = await start_node(
        [
            {"url": receiver.url, "event_types": ["channel_occupied"]},
            {"url": second_receiver.url, "channel_prefixes": ["private-", "presence-"]},
        ]
    )
    client = await connect(node, clients)
    await join(client, "news")
    await subscribe_signed(client, node, "private-x")

    only_occupied = await wait_for(
        receiver,
        has(
            {"name": "channel_occupied", "channel": "news"},
            {"name": "channel_occupied", "channel": "private-x"},
        ),
    )
    assert {e["name"] for e in events(only_occupied)} == {"channel_occupied"}

    # Requests to one endpoint arrive in order here (one at a time): anything about
    # "news" would have come before private-x's subscription_count.
    prefixed = await wait_for(
        second_receiver,
        has({"name": "subscription_count", "channel": "private-x", "subscription_count": 1}),
    )
    assert {e["channel"] for e in events(prefixed)} == {"private-x"}
    assert names_on(prefixed, "private-x") == ["channel_occupied", "subscription_count"]
    for request in only_occupied + prefixed:
        verified(request)


async def test_two_endpoints_each_get_their_own_copy(
    start_node, receiver, second_receiver, clients
) -> None:
    node = await start_node([{"url": receiver.url}, {"url": second_receiver.url}])
    client = await connect(node, clients)
    await join(client, "both")
    wanted = has(
        {"name": "channel_occupied", "channel": "both"},
        {"name": "subscription_count", "channel": "both"},
    )
    first = await wait_for(receiver, wanted)
    second = await wait_for(second_receiver, wanted)
    assert events(first) == events(second)
    keys = {r.header("Idempotency-Key") for r in first} | {
        r.header("Idempotency-Key") for r in second
    }
    assert len(keys) == len(first) + len(second)  # one delivery per endpoint per batch
    for request in first + second:
        verified(request)


async def test_one_url_listed_twice_gets_each_event_once(start_node, receiver, clients) -> None:
    node = await start_node(
        [
            {"url": receiver.url, "event_types": ["channel_occupied"]},
            {"url": receiver.url, "event_types": ["channel_occupied", "channel_vacated"]},
        ],
        delivery={"vacated_delay_seconds": 0},
    )
    client = await connect(node, clients)
    await join(client, "twice")
    await unsubscribe(client, "twice")
    received = await wait_for(receiver, has({"name": "channel_vacated", "channel": "twice"}))
    assert names_on(received, "twice") == ["channel_occupied", "channel_vacated"]


# --- smoothing ------------------------------------------------------------------------


async def test_leaving_and_returning_within_the_delay_sends_no_pair(
    start_node, receiver, clients
) -> None:
    node = await start_node(
        [
            {
                "url": receiver.url,
                "event_types": [
                    "channel_occupied",
                    "channel_vacated",
                    "member_added",
                    "member_removed",
                ],
            }
        ],
        delivery={"vacated_delay_seconds": scaled(0.5)},
    )
    client = await connect(node, clients)
    await join(client, "blip")
    await subscribe_signed(client, node, "presence-blip", {"user_id": "u1"})
    await unsubscribe(client, "blip")
    await unsubscribe(client, "presence-blip")
    # Back within the delay: nothing is sent for the blip, neither half of either pair.
    await join(client, "blip")
    await subscribe_signed(client, node, "presence-blip", {"user_id": "u1"})
    # Barrier: a channel vacated after the blip; its channel_vacated is held longer
    # than any vacated of the blip would have been.
    await join(client, "barrier")
    await unsubscribe(client, "barrier")
    received = await wait_for(receiver, has({"name": "channel_vacated", "channel": "barrier"}))
    assert names_on(received, "blip") == ["channel_occupied"]
    assert names_on(received, "presence-blip") == ["channel_occupied", "member_added"]

    # Leaving for longer than the delay: the vacated arrives, then a return is new.
    await unsubscribe(client, "blip")
    await wait_for(receiver, has({"name": "channel_vacated", "channel": "blip"}))
    await join(client, "blip")
    received = await wait_for(
        receiver, lambda r: names_on(r, "blip").count("channel_occupied") == 2
    )
    assert names_on(received, "blip") == ["channel_occupied", "channel_vacated", "channel_occupied"]
    for request in received:
        verified(request)


async def test_subscription_count_needs_the_app_to_opt_in(start_node, receiver, clients) -> None:
    node = await start_node(
        [{"url": receiver.url, "event_types": ["subscription_count", "channel_vacated"]}],
        app={"enable_subscription_count": False},
        delivery={"vacated_delay_seconds": 0},
    )
    client = await connect(node, clients)
    await join(client, "uncounted")
    await unsubscribe(client, "uncounted")
    received = await wait_for(receiver, has({"name": "channel_vacated", "channel": "uncounted"}))
    assert [e["name"] for e in events(received)] == ["channel_vacated"]


# --- batching -------------------------------------------------------------------------


async def test_events_close_together_share_a_request(start_node, receiver, clients) -> None:
    node = await start_node(
        [{"url": receiver.url, "event_types": ["channel_occupied"]}],
        delivery={"batch_max_ms": int(scaled(300)), "batch_max_events": 3},
    )
    client = await connect(node, clients)
    for n in range(7):
        await join(client, f"batched-{n}")
    received = await wait_for(receiver, lambda r: len(events(r)) == 7)
    sizes = [len(verified(request)["events"]) for request in received]
    assert max(sizes) > 1, sizes  # combined
    assert max(sizes) <= 3, sizes  # never more than batch_max_events
    assert [e["channel"] for e in events(received)] == [f"batched-{n}" for n in range(7)]


async def test_zero_window_sends_one_event_per_request(start_node, receiver, clients) -> None:
    node = await start_node(
        [{"url": receiver.url, "event_types": ["channel_occupied"]}],
        delivery={"batch_max_ms": 0},
    )
    client = await connect(node, clients)
    for n in range(3):
        await join(client, f"single-{n}")
    received = await wait_for(receiver, lambda r: len(events(r)) == 3)
    assert [len(verified(request)["events"]) for request in received] == [1, 1, 1]


# --- isolation, retries, shutdown -----------------------------------------------------


async def test_a_hanging_receiver_does_not_delay_the_others(
    start_node, receiver, second_receiver, clients
) -> None:
    receiver.hang = True
    node = await start_node(
        [{"url": receiver.url}, {"url": second_receiver.url}],
        delivery={"timeout_seconds": scaled(30)},
    )
    client = await connect(node, clients)
    for n in range(3):
        await join(client, f"isolated-{n}")
    received = await wait_for(
        second_receiver,
        has(*({"name": "channel_occupied", "channel": f"isolated-{n}"} for n in range(3))),
        seconds=5,
    )
    for request in received:
        verified(request)
    assert receiver.received == []  # still hanging
    receiver.close()  # release it now, so the node's stop does not wait for it


async def test_a_failing_receiver_gets_the_same_delivery_again(
    start_node, receiver, clients
) -> None:
    receiver.fail_next(2, status=503)
    node = await start_node([{"url": receiver.url, "event_types": ["channel_occupied"]}])
    client = await connect(node, clients)
    await join(client, "retried")
    received = await wait_for(receiver, lambda r: any(x.status == 200 for x in r))
    assert [r.status for r in received] == [503, 503, 200]
    assert len({r.body for r in received}) == 1  # the same bytes, the same signature
    assert len({r.header("Idempotency-Key") for r in received}) == 1
    verified(received[-1])


async def test_stop_sends_held_vacated_and_a_restart_delivers_them(
    start_node, receiver, clients, tmp_path: Path
) -> None:
    hooks = [{"url": receiver.url, "event_types": ["channel_occupied", "channel_vacated"]}]
    # A delay far longer than the test: only the stop can release the vacated.
    node = await start_node(hooks, delivery={"vacated_delay_seconds": 60})
    client = await connect(node, clients)
    await join(client, "leaving")
    await wait_for(receiver, has({"name": "channel_occupied", "channel": "leaving"}))
    receiver.fail_next(1000, status=503)  # nothing more is delivered before the stop
    await node.stop()  # drains the connection: "leaving" vacates, and is written

    receiver.clear_failures()  # answer 200 from now on
    await start_node(hooks, delivery={"vacated_delay_seconds": 60})  # same queue file
    received = await wait_for(receiver, has({"name": "channel_vacated", "channel": "leaving"}))
    assert names_on(received, "leaving")[-1] == "channel_vacated"
    verified(next(r for r in reversed(received) if r.status == 200))


async def test_a_full_queue_drops_counts_and_audits_once(
    start_node, receiver, clients, tmp_path: Path
) -> None:
    receiver.fail_next(1000, status=503)  # rows stay pending
    node = await start_node(
        [{"url": receiver.url, "event_types": ["channel_occupied"]}],
        delivery={"max_pending": 1, "batch_max_ms": 0, "retry_initial_seconds": 30},
    )
    client = await connect(node, clients)
    for n in range(4):
        await join(client, f"full-{n}")
    producer = node.webhook_producer
    assert producer is not None
    await asyncio.wait_for(producer.drained(), scaled(10))
    assert producer.stored == 1
    assert node.metrics.webhooks_dropped[APP_ID] == 3
    await node.stop()
    audited = query_audit(str(tmp_path / "audit.sqlite3"), type="webhook_dropped", limit=10)
    assert len(audited) == 1
    assert audited[0].severity == "warning"
    assert audited[0].app_id == APP_ID


async def test_a_broken_queue_never_breaks_the_hub(
    start_node, receiver, clients, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node([{"url": receiver.url}], delivery={"batch_max_ms": 0})
    assert node.webhook_queue is not None

    def broken(items: Any) -> int:
        raise OSError("disk on fire")

    node.webhook_queue.enqueue = broken  # type: ignore[method-assign]
    client = await connect(node, clients)
    await join(client, "still-works")
    await client.send({"event": "pusher:ping", "data": {}})
    await skip_to(client, "pusher:pong")
    producer = node.webhook_producer
    assert producer is not None
    await asyncio.wait_for(producer.drained(), scaled(10))
    assert producer.failures >= 1
    assert node.metrics.webhooks_dropped[APP_ID] >= 1
    assert all(
        record.levelname in ("INFO", "WARNING")
        for record in caplog.records
        if record.name.startswith("bastion.webhooks")
    )


async def test_no_queue_file_without_webhooks(tmp_path: Path) -> None:
    settings = webhook_settings(tmp_path, [])
    node = Node(settings, asyncio.get_running_loop())
    await node.start()
    try:
        assert node.webhook_queue is None
        assert not (tmp_path / "webhooks.sqlite3").exists()
    finally:
        await node.stop()


async def test_an_unusable_queue_path_fails_start_up(tmp_path: Path, receiver) -> None:
    from bastion.store.webhook_queue import WebhookQueueError

    # A directory where the file should be: SQLite cannot open it.
    settings = webhook_settings(tmp_path, [{"url": receiver.url}], {"queue_path": str(tmp_path)})
    node = Node(settings, asyncio.get_running_loop())
    with pytest.raises(WebhookQueueError):
        await node.start()
    assert node.audit is None  # nothing left open
