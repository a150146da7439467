"""``bastion webhooks failed`` / ``retry``: the CLI alone, then next to a running dispatcher.

Dead letters are made directly through the queue (the dispatcher's own calls); the
CLI runs under click's :class:`~click.testing.CliRunner` with a TOML config whose
``[webhooks] queue_path`` is under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from click.testing import CliRunner, Result
from support.timeouts import scaled, until
from support.webhook_receiver import WebhookReceiver

from bastion.cli import main
from bastion.config import AppSettings, WebhookDeliverySettings
from bastion.core.hub import AppState
from bastion.metrics import Metrics
from bastion.store.webhook_queue import NewDelivery, WebhookQueue
from bastion.webhooks.dispatcher import WebhookDispatcher

APP_ID = "4243"
APP_KEY = "cli-hook-key"
APP_SECRET = "cli-hook-secret-0123456789"


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"""
[audit]
enabled = false

[webhooks]
queue_path = "{tmp_path / "webhooks.sqlite3"}"
retry_initial_seconds = 0.01
retry_max_seconds = 0.05

[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"
""",
        encoding="utf-8",
    )
    return config


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def open_queue(tmp_path: Path) -> WebhookQueue:
    return WebhookQueue.open(str(tmp_path / "webhooks.sqlite3"), max_pending=1000, retention_days=7)


def dead_letters(tmp_path: Path, urls: list[str]) -> list[int]:
    with open_queue(tmp_path) as queue:
        queue.enqueue(
            [
                NewDelivery(
                    APP_ID, url, b'{"time_ms":1,"events":[]}', uuid.uuid4().hex, time.time()
                )
                for url in urls
            ]
        )
        ids = []
        for delivery in queue.claim_due(time.time(), limit=100):
            queue.mark_dead(delivery.id, now=time.time(), error="HTTP 410 (not retried)")
            ids.append(delivery.id)
    return ids


def test_failed_lists_dead_letters_without_query_strings(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    empty = cli("webhooks", "failed", "--config", str(config))
    assert empty.exit_code == 0 and empty.output == ""
    assert not (tmp_path / "webhooks.sqlite3").exists()  # listing creates nothing
    first, second = dead_letters(
        tmp_path, ["https://a.example.com/hook?access=zzz", "https://b.example.com/x"]
    )
    listed = cli("webhooks", "failed", "--config", str(config))
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 2 and "access" not in listed.output and "zzz" not in listed.output
    assert {str(first), str(second)} == {line.split()[0] for line in lines}
    assert all("attempts=1" in line and "HTTP 410" in line for line in lines)
    as_json = cli("webhooks", "failed", "--json", "--limit", "1", "--config", str(config))
    (line,) = as_json.output.splitlines()
    row = json.loads(line)
    assert set(row) == {"id", "app_id", "url", "attempts", "last_error", "created", "died"}
    assert row["app_id"] == APP_ID and row["attempts"] == 1
    assert row["last_error"] == "HTTP 410 (not retried)"
    assert "?" not in row["url"] and row["died"].endswith("Z")


def test_retry_by_id_and_all(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    first, second, third = dead_letters(
        tmp_path, [f"https://h{n}.example.com/hook" for n in range(3)]
    )
    one = cli("webhooks", "retry", str(first), "--config", str(config))
    assert one.exit_code == 0 and one.output == "retrying 1 dead letter\n"
    unknown = CliRunner().invoke(
        main, ["webhooks", "retry", str(first), "999", "--config", str(config)]
    )
    assert unknown.exit_code == 1 and "999 is not a dead letter" in unknown.output
    rest = cli("webhooks", "retry", "--all", "--config", str(config))
    assert rest.exit_code == 0 and rest.output == "retrying 2 dead letters\n"
    assert cli("webhooks", "failed", "--config", str(config)).output == ""
    with open_queue(tmp_path) as queue:
        assert queue.counts().pending == 3
        due = queue.claim_due(time.time(), limit=10)
    assert {d.id for d in due} == {first, second, third}


def test_usage_and_config_errors_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    neither = CliRunner().invoke(main, ["webhooks", "retry", "--config", str(config)])
    assert neither.exit_code == 2
    both = CliRunner().invoke(main, ["webhooks", "retry", "1", "--all", "--config", str(config)])
    assert both.exit_code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[webhooks]\nmax_pending = 0\n", encoding="utf-8")
    for args in (["failed"], ["retry", "--all"]):
        result = CliRunner().invoke(main, ["webhooks", *args, "--config", str(bad)])
        assert result.exit_code == 2 and "config error" in result.output
    missing = CliRunner().invoke(main, ["webhooks", "retry", "--all", "--config", str(config)])
    assert missing.exit_code == 1 and "no webhook queue" in missing.output


def test_unreadable_queue_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "webhooks.sqlite3").write_bytes(b"this is not a database" * 100)
    for args in (["failed"], ["retry", "--all"]):
        result = CliRunner().invoke(main, ["webhooks", *args, "--config", str(config)])
        assert result.exit_code == 1 and "webhooks.sqlite3" in result.output


async def test_a_retried_dead_letter_is_delivered_by_a_running_dispatcher(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    settings = WebhookDeliverySettings.model_validate(
        {
            "queue_path": str(tmp_path / "webhooks.sqlite3"),
            "retry_initial_seconds": 0.01,
            "retry_max_seconds": 0.05,
        }
    )
    apps = {
        APP_ID: AppState(
            AppSettings.model_validate({"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET})
        )
    }
    with WebhookReceiver() as receiver, open_queue(tmp_path) as queue:
        receiver.fail_next(1, status=400)
        dispatcher = WebhookDispatcher(settings, queue, apps, Metrics())
        await dispatcher.start()
        try:
            queue.enqueue(
                [
                    NewDelivery(
                        APP_ID, receiver.url, b'{"time_ms":1,"events":[]}', "k-1", time.time()
                    )
                ]
            )
            dispatcher.wake()
            await asyncio.to_thread(receiver.wait_for, lambda r: len(r) == 1, scaled(5))
            await until(queue.dead_letters)
            (letter,) = queue.dead_letters()
            letter_id = str(letter.id)
            # The operator retries from another process; the node sees it on its next poll.
            retried = await asyncio.to_thread(
                cli, "webhooks", "retry", letter_id, "--config", str(config)
            )
            assert retried.exit_code == 0, retried.output
            received = await asyncio.to_thread(
                receiver.wait_for, lambda r: any(x.status == 200 for x in r), scaled(5)
            )
        finally:
            await dispatcher.stop(scaled(2))
    assert [r.status for r in received] == [400, 200]
    assert {r.header("Idempotency-Key") for r in received} == {"k-1"}


def test_serve_exits_1_when_the_queue_cannot_be_opened(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0

[audit]
enabled = false

[security.reputation]
store_path = "{tmp_path / "blocks.sqlite3"}"

[webhooks]
queue_path = "{tmp_path / "no-such-dir" / "webhooks.sqlite3"}"

[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"

[[apps.webhooks]]
url = "http://127.0.0.1:9/hook"
""",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "no-such-dir" in result.output and "webhook queue" in result.output


def test_retry_is_audited(tmp_path: Path) -> None:
    from bastion.store.audit import query

    config = write_config(tmp_path)
    audit = tmp_path / "audit.sqlite3"
    text = config.read_text(encoding="utf-8").replace(
        "[audit]\nenabled = false", f'[audit]\npath = "{audit}"'
    )
    config.write_text(text, encoding="utf-8")
    first, second = dead_letters(tmp_path, ["https://a.example.com/h", "https://b.example.com/h"])
    assert cli("webhooks", "retry", str(second), str(first), "--config", str(config)).exit_code == 0
    (event,) = query(audit, type="webhook_retried")
    assert event.severity == "info"
    assert event.metadata["count"] == 2
    assert sorted(event.metadata["ids"].split(",")) == sorted([str(first), str(second)])
