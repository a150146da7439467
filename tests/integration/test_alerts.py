"""Security alerts end to end: a real ``bastion serve``, a real receiver, the official SDK.

A burst of bad REST signatures crosses ``[alerts.auth_failures]``: exactly one
``security_alert`` audit row, one ``bastion_alerts_total`` increment and one signed
POST to the operator's receiver, which the official ``pusher`` SDK verifies. The
dispatcher's side (alerts signed and aimed by ``[alerts]`` only, never an app's
secret or URL) is tested on the test's own loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pusher
from prometheus_client.parser import text_string_to_metric_families
from support.clients import APP_SECRET, http_request, rest
from support.server import DEFAULT_APP, BastionProcess
from support.timeouts import scaled, until
from support.webhook_receiver import WebhookReceiver

from bastion.config import AlertSettings, AppSettings, WebhookDeliverySettings
from bastion.core.hub import AppState
from bastion.metrics import Metrics
from bastion.security.alerts import ALERTS_KEY, ALERTS_SENDER
from bastion.store.webhook_queue import NewDelivery, WebhookQueue
from bastion.webhooks.dispatcher import WebhookDispatcher

ALERT_SECRET = "alert-secret-0123456789abcdefghijklmnop"
ADMIN_TOKEN = "alerts-admin-token-0123456789abcdefghij"


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def admin(server: BastionProcess, route: str) -> Any:
    result = await http_request(
        server.port,
        "GET",
        f"/api/security/{route}",
        headers=(f"Authorization: Bearer {ADMIN_TOKEN}",),
    )
    assert result.status == 200, result.body
    return result.json()


async def test_a_burst_of_bad_signatures_raises_exactly_one_alert(
    make_bastion: Callable[..., BastionProcess], tmp_path: Path
) -> None:
    with WebhookReceiver() as receiver:
        server = make_bastion(
            apps=[DEFAULT_APP],
            admin={"token": ADMIN_TOKEN},
            audit={"path": str(tmp_path / "audit.sqlite3")},
            webhooks={"queue_path": str(tmp_path / "webhooks.sqlite3")},
            security={
                # Loopback is in never_block: the budget and reputation leave it alone.
                "reputation": {"store_path": str(tmp_path / "blocks.sqlite3")},
            },
            alerts={
                "url": receiver.url,
                "secret": ALERT_SECRET,
                "auth_failures": {"threshold": 5, "window_seconds": 600},
            },
        )
        event = {"name": "e", "channel": "c", "data": "{}"}
        for _ in range(20):  # four times the threshold, well inside one window
            refused = await rest(server.port, "POST", "/apps/12345/events", event, secret="nope")
            assert refused.status == 401
        (got,) = await asyncio.to_thread(receiver.wait_for, lambda r: len(r) >= 1, scaled(10))

        # One signed delivery, in a Pusher-shaped body the official SDK verifies.
        assert got.header("X-Pusher-Key") == ALERTS_KEY
        sdk = pusher.Pusher(app_id="1", key=ALERTS_KEY, secret=ALERT_SECRET)
        decoded = sdk.validate_webhook(ALERTS_KEY, got.header("X-Pusher-Signature"), got.body)
        assert decoded is not None
        (alert,) = decoded["events"]
        assert (alert["name"], alert["alert"], alert["severity"]) == (
            "security_alert",
            "auth_failures",
            "warning",
        )
        assert alert["count"] == 5 and alert["threshold"] == 5
        assert alert["top_addresses"] == [{"ip": "127.0.0.1", "count": 5}]
        assert alert["top_reasons"] == [{"reason": "auth_signature", "count": 5}]
        for secret in (ALERT_SECRET, APP_SECRET, ADMIN_TOKEN):
            assert secret.encode() not in got.body

        # One audit row, one metric increment, one log line; the dashboard shows it open.
        rows = await until_found(server, "audit-logs?type=security_alert")
        assert len(rows) == 1
        assert rows[0]["ip"] == "127.0.0.1" and rows[0]["metadata"]["alert"] == "auth_failures"
        scraped = (await http_request(server.port, "GET", "/metrics")).body.decode()
        assert metric(scraped, "bastion_alerts_total", alert="auth_failures") == 1
        assert metric(scraped, "bastion_alerts_open", alert="auth_failures") == 1
        assert metric(scraped, "bastion_alerts_total", alert="new_blocks") == 0
        dashboard = await admin(server, "dashboard")
        assert [open_["alert"] for open_ in dashboard["alerts"]] == ["auth_failures"]
        await until(lambda: "security alert auth_failures" in server.output)
        assert server.output.count("security alert auth_failures") == 1
        assert ALERT_SECRET not in server.output
        await until(
            lambda: (
                metric(
                    _sync_scrape(server),
                    "bastion_alert_deliveries_total",
                    result="delivered",
                )
                == 1
            )
        )
        assert len(receiver.received) == 1


def _sync_scrape(server: BastionProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=scaled(5)) as answer:
        return str(answer.read().decode())


async def until_found(server: BastionProcess, route: str) -> list[dict[str, Any]]:
    """The audit rows of ``route`` once there is one (the writer is a thread)."""
    found: list[dict[str, Any]] = []

    async def some() -> bool:
        found[:] = (await admin(server, route))["events"]
        return bool(found)

    await until(some, 10)
    return found


# --- the dispatcher: alerts signed and aimed by [alerts] only ------------------------------

APP_ID = "4242"
APP_KEY = "hook-app-key"
HOOK_SECRET = "hook-app-secret-0123456789"
FAST = {"retry_initial_seconds": 0.01, "retry_max_seconds": 0.05, "timeout_seconds": 5.0}


def _row(url: str, *, app_id: str) -> NewDelivery:
    body = json.dumps({"time_ms": int(time.time() * 1000), "events": [{"name": "x"}]}).encode()
    return NewDelivery(app_id, url, body, uuid.uuid4().hex, time.time())


async def _dispatch(
    tmp_path: Path,
    alerts: Callable[[str], AlertSettings | None],
    rows: Callable[[str], list[NewDelivery]],
) -> tuple[WebhookReceiver, Metrics]:
    """Run a dispatcher until ``rows(receiver_url)`` are sent or dead; ``alerts(url)``."""
    settings = WebhookDeliverySettings.model_validate(
        {**FAST, "queue_path": str(tmp_path / "queue.sqlite3")}
    )
    queue = WebhookQueue.open(settings.queue_path, max_pending=100, retention_days=7)
    app = AppSettings.model_validate({"id": APP_ID, "key": APP_KEY, "secret": HOOK_SECRET})
    metrics = Metrics()
    with WebhookReceiver() as receiver:
        dispatcher = WebhookDispatcher(
            settings, queue, {APP_ID: AppState(app)}, metrics, alerts=alerts(receiver.url)
        )
        await dispatcher.start()
        try:
            queue.enqueue(rows(receiver.url))
            dispatcher.wake()
            await until(lambda: queue.counts().pending == 0)
        finally:
            await dispatcher.stop(scaled(2))
            queue.close()
    return receiver, metrics


def _alerts_to(url: str) -> AlertSettings:
    return AlertSettings.model_validate({"url": url, "secret": ALERT_SECRET})


async def test_alert_rows_are_signed_with_the_alerts_secret_and_app_rows_with_the_apps(
    tmp_path: Path,
) -> None:
    receiver, metrics = await _dispatch(
        tmp_path,
        _alerts_to,
        lambda url: [_row(url, app_id=ALERTS_SENDER), _row(url, app_id=APP_ID)],
    )
    by_key = {got.header("X-Pusher-Key"): got for got in receiver.received}
    assert set(by_key) == {ALERTS_KEY, APP_KEY}
    alert, hook = by_key[ALERTS_KEY], by_key[APP_KEY]
    alert_sdk = pusher.Pusher(app_id="1", key=ALERTS_KEY, secret=ALERT_SECRET)
    app_sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=HOOK_SECRET)
    assert alert_sdk.validate_webhook(ALERTS_KEY, alert.header("X-Pusher-Signature"), alert.body)
    assert app_sdk.validate_webhook(APP_KEY, hook.header("X-Pusher-Signature"), hook.body)
    # Never crossed: the alerts secret signs no app row, and no app secret an alert.
    cross = pusher.Pusher(app_id="1", key=APP_KEY, secret=ALERT_SECRET)
    assert cross.validate_webhook(APP_KEY, hook.header("X-Pusher-Signature"), hook.body) is None
    assert metrics.webhooks_delivered == {ALERTS_SENDER: 1, APP_ID: 1}
    assert sum(metrics.webhook_attempts.by_key[APP_ID][:-1]) == 1
    assert sum(metrics.webhook_seconds.by_key[APP_ID][:-1]) == 1


async def test_an_alert_row_for_another_url_or_without_alerts_is_a_dead_letter(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for directory, alerts in (
        (tmp_path / "a", lambda url: _alerts_to("http://127.0.0.1:9/elsewhere")),
        (tmp_path / "b", lambda url: None),
    ):
        receiver, metrics = await _dispatch(
            directory, alerts, lambda url: [_row(url, app_id=ALERTS_SENDER)]
        )
        assert receiver.received == []
        assert metrics.webhooks_dead == {ALERTS_SENDER: 1}
