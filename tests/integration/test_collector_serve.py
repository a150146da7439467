"""``bastion serve`` keeps the cycle collector's passes short and shows them on ``/metrics``.

The steward (:mod:`bastion.server.collector`) is process-wide, so only a real
``bastion serve`` process has it: start-up ends with a full pass and a freeze, and
every pass from then on is timed.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from support.clients import http_request, open_client
from support.server import config_toml, run_bastion


def _sample(body: bytes, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    match = re.search(rb"^" + pattern.encode() + rb" (\S+)$", body, re.M)
    assert match is not None, f"{name}{{{labels}}} not exported"
    return float(match.group(1))


def test_serve_freezes_its_start_up_and_times_every_pass(tmp_path: Path) -> None:
    config = config_toml(
        audit={"path": str(tmp_path / "audit.sqlite3")},
        security={"reputation": {"store_path": str(tmp_path / "blocks.sqlite3")}},
    )
    with run_bastion(config, tmp_path) as server:

        async def scrape() -> bytes:
            clients = [await open_client(server.port) for _ in range(20)]
            for client in clients:
                await client.subscribed("news")
                await client.close()
            answer = await http_request(server.port, "GET", "/metrics")
            assert answer.status == 200
            return answer.body

        body = asyncio.run(scrape())
    # Start-up's modules, configuration and hub are out of the collector's sight.
    assert _sample(body, "bastion_gc_frozen_objects") > 10_000
    # Its full pass, timed: one pass of generation 2 at least, in a bucket.
    assert _sample(body, "bastion_gc_collections_total", 'generation="2"') >= 1
    assert _sample(body, "bastion_gc_pause_seconds_count", 'generation="2"') >= 1
    assert _sample(body, "bastion_gc_pause_seconds_sum", 'generation="2"') > 0
    assert _sample(body, "bastion_gc_pause_seconds_bucket", 'generation="2",le="+Inf"') >= 1
