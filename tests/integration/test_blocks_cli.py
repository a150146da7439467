"""``bastion block`` / ``unblock`` / ``blocks``: the CLI alone, then against a running node.

The CLI tests use click's :class:`~click.testing.CliRunner` with a TOML config whose
blocks file and audit log are under ``tmp_path``. The node tests start a real node
in-process from the same config (``sync_seconds = 0.1``) and poll the observable
effect (a new TCP connection dropped, or served again) with a bounded, scaled
deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from support.clients import APP_ID, APP_KEY, APP_SECRET, open_client, served
from support.timeouts import until

from bastion.cli import main
from bastion.config import load_settings
from bastion.server.runtime import Node
from bastion.store.audit import query
from bastion.store.blocks import list_active

from .conftest import RunNode


def write_config(
    tmp_path: Path, *, never_block: str = "[]", enabled: str = "true", audit: str = "true"
) -> Path:
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0

[audit]
enabled = {audit}
path = "{tmp_path / "audit.sqlite3"}"

[security.reputation]
enabled = {enabled}
never_block = {never_block}
store_path = "{tmp_path / "blocks.sqlite3"}"
sync_seconds = 0.1

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


async def acli(*args: str) -> Result:
    """The CLI off the loop, as an operator's shell would run it next to the node."""
    return await asyncio.to_thread(cli, *args)


# --- the CLI alone -------------------------------------------------------------------


def test_block_list_unblock_and_audit(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    blocked = cli(
        "block", "192.0.2.1", "--ttl", "2h", "--reason", "abuse #7", "--config", str(config)
    )
    assert blocked.exit_code == 0, blocked.output
    assert blocked.output.startswith("blocked 192.0.2.1 until ")
    assert cli("block", "::ffff:192.0.2.2", "--config", str(config)).exit_code == 0

    listing = cli("blocks", "--config", str(config), "--json")
    assert listing.exit_code == 0
    rows = [json.loads(line) for line in listing.output.splitlines()]
    assert [(r["ip"], r["source"], r["reason"]) for r in rows] == [
        ("192.0.2.2", "manual", "blocked by an operator"),  # default ttl 1h ends first
        ("192.0.2.1", "manual", "abuse #7"),
    ]
    assert rows[1]["until"].endswith("Z")
    text = cli("blocks", "--config", str(config))
    assert "192.0.2.1" in text.output and "abuse #7" in text.output

    [block] = [
        b for b in list_active(tmp_path / "blocks.sqlite3", now=time.time()) if b.ip == "192.0.2.1"
    ]
    assert 7100 < block.until - time.time() <= 7200

    lifted = cli("unblock", "192.0.2.1", "--config", str(config))
    assert (lifted.exit_code, lifted.output) == (0, "unblocked 192.0.2.1\n")
    again = cli("unblock", "192.0.2.1", "--config", str(config))
    assert (again.exit_code, again.output) == (0, "192.0.2.1 was not blocked\n")
    assert [r.ip for r in list_active(tmp_path / "blocks.sqlite3", now=time.time())] == [
        "192.0.2.2"
    ]

    audit = tmp_path / "audit.sqlite3"
    manual = query(audit, type="ip_blocked_manual")
    assert sorted(e.ip or "" for e in manual) == ["192.0.2.1", "192.0.2.2"]
    assert {e.severity for e in manual} == {"warning"}
    [unblocked] = query(audit, type="ip_unblocked")  # the no-op unblock is not audited
    assert unblocked.ip == "192.0.2.1" and unblocked.metadata["reason"] == "abuse #7"


def test_refusals_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, never_block='["10.0.0.0/8", "127.0.0.1/32"]')
    for ip in ("10.1.2.3", "127.0.0.1", "::ffff:10.9.9.9"):
        result = cli("block", ip, "--config", str(config))
        assert result.exit_code == 2
        assert "never_block" in result.output
    for bad in ("not-an-ip", "192.0.2.1:80", "10.0.0.0/8", ""):
        assert cli("block", bad, "--config", str(config)).exit_code == 2
        assert cli("unblock", bad, "--config", str(config)).exit_code == 2
    for ttl in ("0", "forever", "-1h"):
        assert cli("block", "192.0.2.1", "--ttl", ttl, "--config", str(config)).exit_code == 2
    broken = tmp_path / "broken.toml"
    broken.write_text("[security.reputation]\nthreshold = -1\n", encoding="utf-8")
    for command in (["block", "192.0.2.1"], ["unblock", "192.0.2.1"], ["blocks"]):
        result = cli(*command, "--config", str(broken))
        assert result.exit_code == 2 and "config error" in result.output
    assert not (tmp_path / "blocks.sqlite3").exists()  # nothing was written
    assert not (tmp_path / "audit.sqlite3").exists()


def test_unwritable_store_exits_1_and_audit_off_writes_no_audit(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[security.reputation]\nstore_path = "{tmp_path / "missing" / "b.sqlite3"}"\n',
        encoding="utf-8",
    )
    result = cli("block", "192.0.2.1", "--config", str(config))
    assert result.exit_code == 1 and "missing" in result.output
    assert cli("blocks", "--config", str(config)).output == ""  # no file: no blocks

    config = write_config(tmp_path, audit="false")
    assert cli("block", "192.0.2.1", "--config", str(config)).exit_code == 0
    assert not (tmp_path / "audit.sqlite3").exists()


# --- against a running node ------------------------------------------------------------

StartNode = Callable[[Path], Awaitable[Node]]


@pytest.fixture
async def start_node(run_node: RunNode) -> AsyncIterator[StartNode]:

    async def factory(config: Path) -> Node:
        return await run_node(load_settings(config, environ={}))

    yield factory


async def dropped(port: int) -> bool:
    return not await served(port)


async def test_cli_block_reaches_a_running_node(tmp_path: Path, start_node: StartNode) -> None:
    config = write_config(tmp_path)
    node = await start_node(config)
    client = await open_client(node.port)
    assert await served(node.port)

    result = await acli("block", "127.0.0.1", "--ttl", "10m", "--config", str(config))
    assert result.exit_code == 0, result.output
    await until(lambda: dropped(node.port))  # within sync_seconds (0.1 s)
    closed = await client.closed()  # the open connection is closed too
    assert closed.code == 4100

    result = await acli("unblock", "127.0.0.1", "--config", str(config))
    assert result.exit_code == 0, result.output
    await until(lambda: served(node.port))
    client = await open_client(node.port)
    await client.close()

    await node.stop()
    types = [event.type for event in query(tmp_path / "audit.sqlite3", ip="127.0.0.1")]
    assert "ip_blocked_manual" in types and "ip_unblocked" in types and "ip_blocked" in types


async def test_manual_blocks_apply_with_reputation_disabled(
    tmp_path: Path, start_node: StartNode
) -> None:
    config = write_config(tmp_path, enabled="false")
    node = await start_node(config)
    assert node.blocklist is not None
    assert node.blocklist.on_refusal not in node.refusals.listeners
    result = await acli("block", "127.0.0.1", "--config", str(config))
    assert result.exit_code == 0, result.output
    await until(lambda: dropped(node.port))


async def test_a_block_made_before_start_applies_at_once(
    tmp_path: Path, start_node: StartNode
) -> None:
    config = write_config(tmp_path)
    assert (await acli("block", "127.0.0.1", "--config", str(config))).exit_code == 0
    node = await start_node(config)
    assert not await served(node.port)


def test_with_the_redis_adapter_the_cli_blocks_in_redis_not_in_the_file(tmp_path: Path) -> None:
    import uuid

    import redis

    prefix = f"test-cli-{uuid.uuid4().hex}"
    config = write_config(tmp_path)
    text = config.read_text(encoding="utf-8")
    url = "redis://127.0.0.1:6379/0"
    adapter = f'[adapter]\ndriver = "redis"\nurl = "{url}"\nprefix = "{prefix}"\n'
    config.write_text(adapter + text, encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["block", "203.0.113.9", "--ttl", "1h", "--config", str(config)])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(main, ["blocks", "--json", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["ip"] for line in listed.output.splitlines()] == ["203.0.113.9"]
    assert not (tmp_path / "blocks.sqlite3").exists()  # every node reads Redis instead
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        assert client.exists(f"{prefix}:blocks") == 1
        lifted = runner.invoke(main, ["unblock", "203.0.113.9", "--config", str(config)])
        assert lifted.exit_code == 0 and "unblocked 203.0.113.9" in lifted.output
        listed = runner.invoke(main, ["blocks", "--config", str(config)])
        assert listed.output == ""
    finally:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()
