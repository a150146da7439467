"""A Redis outage is logged once per episode by the blocks sync (issue #11, item 5).

A node on the redis adapter whose Redis is not there (a private ``redis-server``
on a free port, started later) retries the blocks sync every ``sync_seconds`` but
logs the outage once, then one line when Redis answers again, with the number of
failures and the duration. Waits are on the node's own failure count, bounded.
"""

from __future__ import annotations

from pathlib import Path

from support.redis_server import RedisServer
from support.timeouts import until

from .conftest import LogCheck, RunNode
from .test_cluster_limits import start_cluster

SYNC_SECONDS = 0.05


def blocks_lines(logs: LogCheck, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in logs.caplog.records
        if record.name == "bastion.blocks" and text in record.getMessage()
    ]


async def test_a_redis_outage_is_logged_once_and_its_end_with_a_count(
    run_node: RunNode, tmp_path: Path, prefix: str, logs: LogCheck
) -> None:
    server = RedisServer()  # a free port, nothing listening yet
    try:
        (node,) = await start_cluster(
            run_node,
            tmp_path,
            1,
            prefix=prefix,
            url=server.url,
            app={},
            reputation={"sync_seconds": SYNC_SECONDS},
            reconnect_max_seconds=0.2,
        )
        blocklist = node.blocklist
        assert blocklist is not None
        # Forty rounds at 50 ms: two seconds of outage, one line.
        await until(lambda: blocklist.sync_failures.failures >= 40, 20)
        assert len(blocks_lines(logs, "blocks not loaded at start")) == 1
        assert blocks_lines(logs, "not synced") == []  # the start's line covers it

        server.start()
        await until(lambda: blocklist.sync_failures.failures == 0, 20)
        [recovered] = blocks_lines(logs, "synced again")
        failures = int(recovered.split("after ")[1].split(" failures")[0])
        assert failures >= 40
        assert blocks_lines(logs, "not synced") == []
        await node.stop()
    finally:
        server.stop()
    logs.assert_clean()
    assert not any("@" in line for line in blocks_lines(logs, ""))  # never a URL's password


async def test_an_outage_after_start_is_logged_once(
    run_node: RunNode, tmp_path: Path, prefix: str, logs: LogCheck
) -> None:
    with RedisServer() as server:
        (node,) = await start_cluster(
            run_node,
            tmp_path,
            1,
            prefix=prefix,
            url=server.url,
            app={},
            reputation={"sync_seconds": SYNC_SECONDS},
            reconnect_max_seconds=0.2,
        )
        blocklist = node.blocklist
        assert blocklist is not None
        server.stop()
        await until(lambda: blocklist.sync_failures.failures >= 40, 20)
        [first] = blocks_lines(logs, "blocks not synced")
        assert "ConnectionError" in first and "retrying every 0.05 s" in first
        assert blocks_lines(logs, "still not synced") == []  # reminders: every 10 minutes
        server.start()
        await until(lambda: blocklist.sync_failures.failures == 0, 20)
        assert len(blocks_lines(logs, "synced again after")) == 1
        await node.stop()
    logs.assert_clean()
