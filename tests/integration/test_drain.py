"""Graceful drain on SIGTERM, within ``[server] drain_seconds``, losing no webhook.

A real ``bastion serve`` process, a WebSocket client and a webhook receiver that
hangs: the drain closes the client with 4200, writes the held ``channel_vacated``
to the durable queue, gives up the hanging attempt at the deadline (its row stays
pending), and exits on time; the next start delivers both webhooks.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support.clients import http_request, open_client
from support.server import config_toml, run_bastion
from support.timeouts import scaled, until
from support.webhook_receiver import Received, WebhookReceiver

from bastion.config import settings_from_mapping
from bastion.errors import ConfigError
from bastion.server.runtime import DRAIN_SECONDS

DRAIN = 1.0
#: Interpreter start-up is not part of the drain, but its teardown is measured with it.
EXIT_MARGIN = 3.0


def drain_config(tmp_path: Path, receiver: WebhookReceiver) -> str:
    app: dict[str, Any] = {
        "id": "12345",
        "key": "app-key",
        "secret": "app-secret",
        "webhooks": [{"url": receiver.url, "event_types": ["channel_occupied", "channel_vacated"]}],
    }
    return config_toml(
        server={"drain_seconds": DRAIN},
        apps=[app],
        audit={"path": str(tmp_path / "audit.sqlite3")},
        webhooks={"queue_path": str(tmp_path / "webhooks.sqlite3"), "batch_max_ms": 0},
        security={"reputation": {"store_path": str(tmp_path / "blocks.sqlite3")}},
    )


async def in_flight(port: int) -> bool:
    answer = await http_request(port, "GET", "/metrics")
    match = re.search(rb"^bastion_webhooks_in_flight (\S+)$", answer.body, re.M)
    return match is not None and float(match.group(1)) >= 1


def names(received: list[Received]) -> list[tuple[str, str]]:
    return [
        (event["name"], event["channel"])
        for request in received
        if request.status == 200
        for event in json.loads(request.body)["events"]
    ]


def test_sigterm_drains_on_time_and_loses_no_queued_webhook(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver:
        receiver.hang = True
        config = drain_config(tmp_path, receiver)
        first = run_bastion(config, tmp_path)
        try:

            async def until_sigterm() -> float:
                client = await open_client(first.port)
                await client.subscribed("news")  # channel_occupied: its attempt hangs
                await until(lambda: in_flight(first.port), 10)
                started = time.monotonic()
                os.kill(first.pid, signal.SIGTERM)
                closed = await client.closed()
                assert closed.code == 4200
                assert closed.frames[-1]["data"]["code"] == 4200
                return started

            started = asyncio.run(until_sigterm())
            returncode = first.process.wait(scaled(DRAIN + EXIT_MARGIN))
            elapsed = time.monotonic() - started
        finally:
            first.stop()
        assert returncode == 0, first.stderr_text
        assert elapsed < DRAIN + scaled(EXIT_MARGIN), elapsed
        assert names(receiver.received) == []  # nothing was answered before the stop

        # The next start delivers what the drain left queued: the attempt it gave up
        # and the channel_vacated it wrote while draining.
        receiver.hang = False
        with run_bastion(config, tmp_path):
            delivered = receiver.wait_for(
                lambda got: (
                    {("channel_occupied", "news"), ("channel_vacated", "news")} <= set(names(got))
                ),
                scaled(15),
            )
        assert names(delivered).count(("channel_vacated", "news")) == 1


def test_drain_seconds_default_and_bounds() -> None:
    assert settings_from_mapping({}, environ={}).server.drain_seconds == DRAIN_SECONDS
    for bad in (0, -1, 601):
        with pytest.raises(ConfigError, match=r"server\.drain_seconds"):
            settings_from_mapping({"server": {"drain_seconds": bad}}, environ={})
