"""The webhook dispatcher against real loopback receivers, on the test's own event loop.

Each test opens a queue under ``tmp_path``, builds a small ``apps`` mapping from real
:class:`~bastion.core.hub.AppState` objects, runs a :class:`WebhookDispatcher` and
watches a :class:`~support.webhook_receiver.WebhookReceiver` (a threaded server, so
its blocking waits go through :func:`asyncio.to_thread`). Retry delays are a few
milliseconds; every wait is bounded and scaled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pusher
import pytest
from support.timeouts import scaled, until, within
from support.webhook_receiver import Received, WebhookReceiver

from bastion.config import AppSettings, WebhookDeliverySettings
from bastion.core.hub import AppState
from bastion.metrics import Metrics
from bastion.security.audit import AuditEvent
from bastion.store.webhook_queue import NewDelivery, WebhookQueue
from bastion.webhooks.dispatcher import WebhookDispatcher, is_refused_address, safe_url

APP_ID = "4242"
APP_KEY = "hook-app-key"
APP_SECRET = "hook-app-secret-0123456789"

FAST = {
    "retry_initial_seconds": 0.01,
    "retry_max_seconds": 0.05,
    "timeout_seconds": 5.0,
    "concurrency_per_endpoint": 4,
}


def app_state(**overrides: Any) -> AppState:
    data: dict[str, Any] = {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET}
    data.update(overrides)
    return AppState(AppSettings.model_validate(data))


def body(channel: str = "orders") -> bytes:
    event = {"name": "channel_occupied", "channel": channel}
    return json.dumps(
        {"time_ms": int(time.time() * 1000), "events": [event]}, separators=(",", ":")
    ).encode()


def delivery(url: str, *, channel: str = "orders", app_id: str = APP_ID) -> NewDelivery:
    return NewDelivery(
        app_id=app_id,
        url=url,
        body=body(channel),
        idempotency_key=uuid.uuid4().hex,
        created_at=time.time(),
    )


async def wait_for(
    receiver: WebhookReceiver, predicate: Callable[[list[Received]], bool], seconds: float = 5
) -> list[Received]:
    return await asyncio.to_thread(receiver.wait_for, predicate, scaled(seconds))


class Harness:
    """A queue, an apps mapping, metrics, audit events and a running dispatcher."""

    def __init__(self, queue: WebhookQueue, dispatcher: WebhookDispatcher) -> None:
        self.queue = queue
        self.dispatcher = dispatcher
        self.metrics = dispatcher.metrics
        self.audited: list[AuditEvent] = []

    def enqueue(self, *items: NewDelivery) -> int:
        stored = self.queue.enqueue(items)
        self.dispatcher.wake()
        return stored


@asynccontextmanager
async def running(
    tmp_path: Path,
    apps: dict[str, AppState] | None = None,
    *,
    name: str = "queue.sqlite3",
    max_pending: int = 1000,
    stop_timeout: float = 2.0,
    **settings: Any,
) -> AsyncIterator[Harness]:
    options = {**FAST, "queue_path": str(tmp_path / name), **settings}
    delivery_settings = WebhookDeliverySettings.model_validate(options)
    queue = WebhookQueue.open(
        delivery_settings.queue_path, max_pending=max_pending, retention_days=7
    )
    audited: list[AuditEvent] = []
    dispatcher = WebhookDispatcher(
        delivery_settings,
        queue,
        apps if apps is not None else {APP_ID: app_state()},
        Metrics(),
        audited.append,
    )
    harness = Harness(queue, dispatcher)
    harness.audited = audited
    await dispatcher.start()
    try:
        yield harness
    finally:
        await dispatcher.stop(scaled(stop_timeout))
        queue.close()


async def test_delivery_carries_headers_the_official_sdk_verifies(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        async with running(tmp_path) as h:
            sent = delivery(receiver.url)
            assert h.enqueue(sent) == 1
            (got,) = await wait_for(receiver, lambda r: len(r) >= 1)
            await until(lambda: h.metrics.webhooks_delivered[APP_ID] == 1)
            assert h.queue.counts().done == 1
    assert got.body == sent.body and got.path == "/hook"
    assert got.header("Content-Type") == "application/json"
    assert got.header("X-Pusher-Key") == APP_KEY
    assert got.header("Idempotency-Key") == sent.idempotency_key
    sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET)
    decoded = sdk.validate_webhook(
        key=got.header("X-Pusher-Key"), signature=got.header("X-Pusher-Signature"), body=got.body
    )
    assert decoded is not None
    assert decoded["events"] == [{"name": "channel_occupied", "channel": "orders"}]


async def test_signs_with_the_newest_secret_at_send_time(tmp_path: Path) -> None:
    apps = {APP_ID: app_state()}
    with WebhookReceiver() as receiver:
        async with running(tmp_path, apps) as h:
            # Rotated between enqueue and send: the queue holds no signature.
            h.queue.enqueue([delivery(receiver.url)])
            apps[APP_ID] = app_state(secret="rotated-secret-9876543210")
            h.dispatcher.wake()
            (got,) = await wait_for(receiver, lambda r: len(r) >= 1)
    sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret="rotated-secret-9876543210")
    assert sdk.validate_webhook(APP_KEY, got.header("X-Pusher-Signature"), got.body) is not None


async def test_failing_receiver_gets_it_after_retries_with_one_idempotency_key(
    tmp_path: Path,
) -> None:
    with WebhookReceiver() as receiver:
        receiver.fail_next(3, status=503)
        async with running(tmp_path) as h:
            sent = delivery(receiver.url)
            h.enqueue(sent)
            received = await wait_for(receiver, lambda r: any(x.status == 200 for x in r))
            await until(lambda: h.metrics.webhooks_delivered[APP_ID] == 1)
            assert h.metrics.webhook_attempts_failed[APP_ID] == 3
            assert h.queue.counts().done == 1
    assert [r.status for r in received] == [503, 503, 503, 200]
    assert {r.header("Idempotency-Key") for r in received} == {sent.idempotency_key}
    assert len(receiver.delivered()) == 1  # exactly one 2xx per key


async def test_network_errors_are_retried(tmp_path: Path) -> None:
    # A port nobody listens on: connection refused, retried with back-off, still pending.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running(tmp_path) as h:
        h.enqueue(delivery(f"http://127.0.0.1:{port}/hook"))
        await until(lambda: h.metrics.webhook_attempts_failed[APP_ID] >= 3)
        counts = h.queue.counts()
    assert (counts.pending, counts.dead) == (1, 0)
    with WebhookQueue.open(
        str(tmp_path / "queue.sqlite3"), max_pending=10, retention_days=7
    ) as queue:
        (again,) = queue.claim_due(time.time() + 60, limit=1)
    assert again.attempts >= 3


async def test_a_timed_out_attempt_is_retried(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        receiver.hang = True
        async with running(tmp_path, timeout_seconds=0.2, stop_timeout=1) as h:
            h.enqueue(delivery(receiver.url))
            await until(lambda: h.metrics.webhook_attempts_failed[APP_ID] >= 2)
            assert h.queue.counts().pending == 1 and h.queue.counts().dead == 0


async def test_a_400_is_a_dead_letter_without_retries(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        receiver.fail_next(1, status=400)
        async with running(tmp_path) as h:
            h.enqueue(delivery(receiver.url.replace("/hook", "/hook?access=abc123")))
            await until(lambda: h.queue.counts().dead == 1)
            (letter,) = h.queue.dead_letters()
            # Never retried: a dead letter is not pending, and only pending rows are
            # ever claimed; nothing is due even an hour from now.
            assert h.queue.counts().pending == 0
            assert h.queue.next_due_at(time.time() + 3600) is None
            assert len(receiver.received) == 1
            await until(lambda: h.metrics.webhooks_dead[APP_ID] == 1)
    assert letter.attempts == 1 and letter.last_error == "HTTP 400 (not retried)"
    (event,) = h.audited
    assert (event.type, event.severity, event.app_id) == ("webhook_dead", "warning", APP_ID)
    assert event.metadata["host"] == "127.0.0.1"
    assert "abc123" not in repr(event)


async def test_give_up_age_moves_it_to_the_dead_letters(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        receiver.fail_next(10_000, status=500)
        async with running(tmp_path, give_up_after_seconds=0.2) as h:
            h.enqueue(delivery(receiver.url))
            await until(lambda: h.queue.counts().dead == 1)
            (letter,) = h.queue.dead_letters()
    assert letter.attempts >= 2
    assert letter.last_error is not None and "gave up" in letter.last_error
    assert [e.type for e in h.audited] == ["webhook_dead"]


async def test_a_hanging_endpoint_does_not_delay_another(tmp_path: Path) -> None:
    with WebhookReceiver() as slow, WebhookReceiver() as fast:
        slow.hang = True
        async with running(
            tmp_path, concurrency_per_endpoint=2, timeout_seconds=30, stop_timeout=1
        ) as h:
            h.enqueue(*[delivery(slow.url, channel=f"s{n}") for n in range(10)])
            # Both of the slow endpoint's slots are taken by attempts that hang ...
            await until(lambda: h.metrics.webhooks_in_flight == 2)
            h.enqueue(delivery(fast.url))
            # ... and the other endpoint is served meanwhile (long before the slow
            # attempts' 30 s timeout): none of them has been answered yet.
            await wait_for(fast, lambda r: len(r) == 1)
            assert slow.received == []
            # Only the slow endpoint's slots stay taken.
            await until(lambda: h.metrics.webhooks_in_flight == 2)
            assert h.queue.counts().pending == 10


async def test_stop_is_bounded_and_a_restart_resumes(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        receiver.hang = True
        sent = delivery(receiver.url)
        async with running(tmp_path, timeout_seconds=30, stop_timeout=0.5) as h:
            h.enqueue(sent)
            await until(lambda: h.metrics.webhooks_in_flight == 1)
            # stop() gives the hanging attempt up at its 0.5 s deadline instead of
            # waiting for the attempt's own 30 s timeout: it returns (bounded wait),
            # the attempt was cancelled, not ended (no failure recorded, nothing
            # answered), and its row is still pending.
            await within(h.dispatcher.stop(scaled(0.5)))
            assert h.metrics.webhook_attempts_failed[APP_ID] == 0
            assert receiver.received == []
            assert h.queue.counts().pending == 1
        receiver.hang = False
        async with running(tmp_path) as again:
            await until(lambda: again.queue.counts().done == 1)
    delivered = receiver.delivered()
    assert delivered and {r.header("Idempotency-Key") for r in delivered} == {sent.idempotency_key}


async def test_two_dispatchers_on_one_queue_file_send_each_row_once(tmp_path: Path) -> None:
    # As `bastion serve --workers 2`: two queue objects (owners) on one file.
    with WebhookReceiver() as receiver:
        sent = [delivery(receiver.url, channel=f"c{n}") for n in range(40)]
        async with running(tmp_path) as one, running(tmp_path) as two:
            assert one.queue.owner != two.queue.owner
            assert one.enqueue(*sent) == 40
            two.dispatcher.wake()
            await until(
                lambda: (
                    one.metrics.webhooks_delivered[APP_ID] + two.metrics.webhooks_delivered[APP_ID]
                    == 40
                ),
                seconds=10,
            )
            assert one.queue.counts().done == 40
    keys = [r.header("Idempotency-Key") for r in receiver.received]
    assert sorted(keys) == sorted(d.idempotency_key for d in sent)  # none twice


async def test_rows_of_a_dead_or_stopped_worker_go_to_another(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        held, crashed = delivery(receiver.url, channel="a"), delivery(receiver.url, channel="b")
        # Another worker's queue object holds both rows, as if mid-attempt: one with a
        # lease far beyond the test, one that runs out almost at once (a dead worker).
        path = tmp_path / "queue.sqlite3"
        with WebhookQueue.open(str(path), max_pending=10, retention_days=7) as worker:
            worker.enqueue([held, crashed])
            worker.claim_due(time.time(), limit=1, lease_seconds=3600)
            worker.claim_due(time.time(), limit=1, lease_seconds=0.2)
            async with running(tmp_path) as live:
                await wait_for(receiver, lambda r: len(r) >= 1)
                await until(lambda: live.queue.counts().done == 1)
                keys = {r.header("Idempotency-Key") for r in receiver.received}
                assert keys == {crashed.idempotency_key}  # the live lease is respected
                # The other worker stops cleanly: its row is sent at once, not in an hour.
                worker.release_all()
                live.dispatcher.wake()
                await until(lambda: live.queue.counts().done == 2)
    keys = {r.header("Idempotency-Key") for r in receiver.delivered()}
    assert len(receiver.received) == 2
    assert keys == {held.idempotency_key, crashed.idempotency_key}


async def test_refuse_private_dead_letters_a_loopback_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    apps = {APP_ID: app_state(webhooks_refuse_private=True)}
    with WebhookReceiver() as receiver:
        async with running(tmp_path, apps) as h:
            with caplog.at_level(logging.WARNING, logger="bastion.webhooks"):
                h.enqueue(delivery(receiver.url))
                await until(lambda: h.queue.counts().dead == 1)
            (letter,) = h.queue.dead_letters()
        assert receiver.received == []
    assert letter.attempts == 0 and (letter.last_error or "").startswith("refused: ")
    (event,) = h.audited
    assert (event.type, event.severity) == ("webhook_refused_private", "warning")
    assert event.metadata["host"] == "127.0.0.1"
    assert any("refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        # 100.100.100.200 (a cloud metadata service, in carrier-grade NAT space),
        # written as one decimal number: the resolver turns it into the address.
        ("http://1684301000/latest/meta-data", "100.100.100.200"),
        ("http://[::ffff:100.100.100.200]/hook", "::ffff:100.100.100.200"),
        # 6to4 wrapping 127.0.0.1 and 10.0.0.1
        ("http://[2002:7f00:1::1]:9000/hook", "2002:7f00:1::1"),
        ("https://[2002:a00:1::1]/hook", "2002:a00:1::1"),
        ("http://[64:ff9b::a9fe:a9fe]/hook", "64:ff9b::a9fe:a9fe"),
    ],
)
async def test_refuse_private_dead_letters_wrapped_and_shared_addresses(
    tmp_path: Path, url: str, address: str
) -> None:
    # Numeric hosts only: the real resolver answers without DNS, and nothing is sent.
    apps = {APP_ID: app_state(webhooks_refuse_private=True)}
    async with running(tmp_path, apps) as h:
        h.enqueue(delivery(url))
        await until(lambda: h.queue.counts().dead == 1)
        (letter,) = h.queue.dead_letters()
    assert letter.attempts == 0
    assert (letter.last_error or "").startswith("refused: ")
    assert (letter.last_error or "").endswith(f"resolves to a refused address ({address})")
    (event,) = h.audited
    assert event.type == "webhook_refused_private"
    assert h.metrics.webhooks_delivered[APP_ID] == 0


async def test_refuse_private_pins_the_checked_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No traffic leaves the machine: the resolver is replaced and nothing is sent.
    answers: list[str] = []

    async def fake_getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    async with running(tmp_path) as h:
        answers[:] = ["93.184.216.34"]
        url, host, extensions = await h.dispatcher._pinned("https://hooks.example.com/p?t=1")
        assert url == "https://93.184.216.34/p?t=1"
        assert host == "hooks.example.com" and extensions == {"sni_hostname": "hooks.example.com"}
        url, host, extensions = await h.dispatcher._pinned("http://hooks.example.com:8080/p")
        assert (url, host, extensions) == (
            "http://93.184.216.34:8080/p",
            "hooks.example.com:8080",
            {},
        )
        # One internal answer among public ones is enough to refuse (DNS rebinding).
        answers[:] = ["93.184.216.34", "10.0.0.7"]
        with pytest.raises(Exception, match="refused address"):
            await h.dispatcher._pinned("https://hooks.example.com/p")


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("224.0.0.1", True),
        ("0.0.0.0", True),
        ("::", True),
        ("240.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("not-an-ip", True),
        ("93.184.216.34", False),
        ("2606:2800:220:1:248:1893:25c8:1946", False),
    ],
)
def test_refused_addresses(address: str, refused: bool) -> None:
    assert is_refused_address(address) is refused


def test_safe_url_drops_query_and_credentials() -> None:
    assert (
        safe_url("https://u:p@h.example.com:8443/a/b?token=x#f") == "https://h.example.com:8443/a/b"
    )
    assert safe_url("http://[::1]:8080/p?x=1") == "http://[::1]:8080/p"


async def test_an_app_removed_from_config_is_a_dead_letter(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        async with running(tmp_path) as h:
            h.enqueue(delivery(receiver.url, app_id="gone"))
            await until(lambda: h.queue.counts().dead == 1)
            (letter,) = h.queue.dead_letters()
        assert receiver.received == []
    assert letter.last_error == "app is no longer configured" and letter.attempts == 0


async def test_max_pending_drops_and_counts(tmp_path: Path) -> None:
    receiver = WebhookReceiver()  # never started: nothing is delivered meanwhile
    async with running(tmp_path, max_pending=3, timeout_seconds=0.2) as h:
        stored = h.enqueue(*[delivery(receiver.url, channel=f"c{n}") for n in range(5)])
        assert stored == 3
        assert h.queue.counts().pending == 3


async def test_logs_never_carry_the_query_body_or_signature(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with WebhookReceiver() as receiver:
        receiver.fail_next(2, status=502)
        receiver.fail_next(1, status=404)
        url = receiver.url + "?token=s3cr3t-query-value"
        with caplog.at_level(logging.INFO, logger="bastion.webhooks"):
            # Not *.sqlite3: the session's credential grep reads those, and this URL
            # (stored as configured) deliberately carries a token.
            async with running(tmp_path, name="queue-with-token-url.db") as h:
                h.enqueue(delivery(url, channel="private-body-marker"))
                await until(lambda: h.queue.counts().dead == 1)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "retrying" in text and "dead letters" in text
    assert "s3cr3t-query-value" not in text and "token=" not in text
    assert "private-body-marker" not in text
    signatures = {r.header("X-Pusher-Signature") for r in receiver.received}
    assert all(s and s not in text for s in signatures)
