"""``bastion serve --workers N``: N processes on one port, supervised by the parent.

Real processes on 127.0.0.1 and the Redis on 127.0.0.1:6379 (each test its own key
prefix). Which worker holds a connection is read from the kernel, not guessed: the
server side of a client's TCP connection is found in ``/proc/net/tcp`` by the
client's port, and its socket inode in one worker's ``/proc/PID/fd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.clients import PusherClient, data_of, rest
from support.server import DEFAULT_APP, BastionProcess, config_toml, run_bastion_cli
from support.timeouts import scaled, until

from bastion.config import load_settings, settings_from_mapping
from bastion.server import workers
from bastion.server.workers import (
    RESTART_BACKOFF_MAX_SECONDS,
    restart_delay,
    settings_payload,
)

MakeBastion = Callable[..., BastionProcess]

REDIS_URL = "redis://127.0.0.1:6379/0"
REPO = Path(__file__).resolve().parents[2]
WORKER_LISTENING = r"worker (?P<index>\d+) listening \(pid (?P<pid>\d+)\)"
#: Connections a test opens at most to find one on each worker (the kernel hashes
#: each connection's ports; all on one worker is a 2**-31 chance).
MAX_PROBES = 32


def _redis_reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 6379), 1.0):
        return True
    return False


needs_redis = pytest.mark.skipif(not _redis_reachable(), reason="no Redis on 127.0.0.1:6379")
needs_bus = pytest.mark.skipif(
    importlib.util.find_spec("bastion.adapters.redis") is None,
    reason="the Redis bus (bastion.adapters.redis) is not in yet",
)


def _redis_config(**sections: Any) -> str:
    adapter = {"driver": "redis", "url": REDIS_URL, "prefix": f"test-workers-{uuid.uuid4().hex}"}
    return config_toml(adapter=adapter, **sections)


def _alive(pid: int) -> bool:
    # /proc/PID would still exist for a zombie; the supervisor reaps its workers.
    return Path(f"/proc/{pid}").exists()


def _worker_pids(server: BastionProcess, count: int) -> dict[int, int]:
    """Index -> PID of each worker, from the supervisor's "listening" log lines."""
    pids: dict[int, int] = {}
    for index in range(count):
        match = server.wait_for_output(rf"worker {index} listening \(pid (\d+)\)")
        pids[index] = int(match.group(1))
    return pids


def _server_inode(server_port: int, client_port: int) -> str | None:
    """The socket inode of the server side of the loopback connection from ``client_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if (
            int(local.rsplit(":", 1)[1], 16) == server_port
            and int(remote.rsplit(":", 1)[1], 16) == client_port
        ):
            return inode
    return None


def _worker_of(client: PusherClient, server_port: int, pids: dict[int, int]) -> int:
    """The index of the worker holding ``client``'s connection."""
    client_port = client.ws.local_address[1]
    inode = _server_inode(server_port, client_port)
    assert inode is not None, f"no server socket for client port {client_port}"
    target = f"socket:[{inode}]"
    for index, pid in pids.items():
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(fd_dir / fd) == target:
                    return index
    raise AssertionError(f"no worker holds {target}")


async def _clients_on_every_worker(
    server: BastionProcess, pids: dict[int, int], channel: str | None = None
) -> tuple[list[PusherClient], dict[int, int]]:
    """Open clients (subscribed to ``channel``) until each worker holds at least one."""
    clients: list[PusherClient] = []
    per_worker = dict.fromkeys(pids, 0)
    try:
        while min(per_worker.values()) == 0:
            assert len(clients) < MAX_PROBES, f"the kernel never spread: {per_worker}"
            client = await PusherClient.connect(server.ws_url("app-key"))
            clients.append(client)
            if channel is not None:
                frame = await client.subscribe(channel, interleaved=True)
                assert frame["event"] == "pusher_internal:subscription_succeeded", frame
            per_worker[_worker_of(client, server.port, pids)] += 1
    except BaseException:
        await _close(clients)
        raise
    return clients, per_worker


async def _close(clients: list[PusherClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.fixture
def redis_workers(make_bastion: MakeBastion) -> Iterator[tuple[BastionProcess, dict[int, int]]]:
    """Two workers on the Redis bus: the supervisor and index -> worker PID."""
    server = make_bastion(_redis_config(), extra_args=("--workers", "2"))
    yield server, _worker_pids(server, 2)


# --- pure parts ---------------------------------------------------------------------


def test_restart_delay_doubles_and_is_capped() -> None:
    assert [restart_delay(n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(10) == RESTART_BACKOFF_MAX_SECONDS
    assert restart_delay(10_000) == RESTART_BACKOFF_MAX_SECONDS


def test_settings_payload_round_trips_every_secret() -> None:
    settings = load_settings(REPO / "bastion.example.toml", environ={})
    payload = json.loads(json.dumps(settings_payload(settings)))
    assert settings_from_mapping(payload, environ={}) == settings


# --- usage errors -------------------------------------------------------------------


def test_workers_without_redis_adapter_exit_2(tmp_path: Path) -> None:
    result = run_bastion_cli(
        ["serve", "--config", "{config}", "--workers", "2"],
        cwd=tmp_path,
        config_toml_text=config_toml(),
    )
    assert result.returncode == 2, result.stderr
    assert "adapter.driver" in result.stderr
    assert "--workers 2" in result.stderr
    assert "listening" not in result.stdout


def test_workers_must_be_positive(tmp_path: Path) -> None:
    result = run_bastion_cli(
        ["serve", "--config", "{config}", "--workers", "0"],
        cwd=tmp_path,
        config_toml_text=config_toml(),
    )
    assert result.returncode == 2, result.stderr
    assert "--workers" in result.stderr


# --- running ------------------------------------------------------------------------


@needs_redis
async def test_two_workers_share_one_port(
    redis_workers: tuple[BastionProcess, dict[int, int]],
) -> None:
    server, pids = redis_workers
    listening = [line for line in server.stdout_text.splitlines() if "listening on" in line]
    assert listening == [f"bastion listening on http://127.0.0.1:{server.port}"]
    assert len(set(pids.values())) == 2
    assert server.pid not in pids.values()
    assert all(_alive(pid) for pid in pids.values())
    # SO_REUSEPORT: the kernel hands connections to both workers, and each serves them.
    clients, per_worker = await _clients_on_every_worker(server, pids, channel="c")
    try:
        for client in clients:
            await client.ping()
        assert sum(per_worker.values()) == len(clients)
    finally:
        await _close(clients)
    # Each worker's log lines carry its index.
    assert re.search(r"\[worker 0\] bastion\.", server.stderr_text)
    assert re.search(r"\[worker 1\] bastion\.", server.stderr_text)


@needs_redis
async def test_sigterm_drains_every_worker_and_exits(
    redis_workers: tuple[BastionProcess, dict[int, int]],
) -> None:
    server, pids = redis_workers
    clients, _ = await _clients_on_every_worker(server, pids)
    try:
        os.kill(server.pid, signal.SIGTERM)
        # Every client, on either worker, is told to reconnect elsewhere (4200) ...
        for client in clients:
            assert (await client.closed(10)).code == 4200
        # ... and the supervisor exits 0 (in time: the wait fails after 20 s, scaled).
        returncode = await asyncio.to_thread(server.process.wait, scaled(20))
        assert returncode == 0, server.stderr_text
    finally:
        await _close(clients)
    assert not [pid for pid in pids.values() if _alive(pid)]
    assert "stopping 2 workers on SIGTERM" in server.stderr_text


@needs_redis
async def test_a_killed_worker_is_restarted(
    redis_workers: tuple[BastionProcess, dict[int, int]],
) -> None:
    server, pids = redis_workers
    old = pids[0]
    os.kill(old, signal.SIGKILL)
    match = await asyncio.to_thread(
        server.wait_for_output, rf"worker 0 listening \(pid (?!{old}\b)(\d+)\)", scaled(20)
    )
    new = int(match.group(1))
    assert new != old and _alive(new) and not _alive(old)
    assert server.is_running() and _alive(pids[1])
    assert re.search(rf"worker 0 \(pid {old}\) exited with -9; restarting in", server.stderr_text)
    # Still one listening line, and both workers serve again.
    assert server.stdout_text.count("listening on") == 1
    clients, _ = await _clients_on_every_worker(server, {0: new, 1: pids[1]})
    await _close(clients)


@needs_redis
def test_worker_that_cannot_start_stops_the_start(tmp_path: Path) -> None:
    # A busy port without SO_REUSEPORT: every worker fails to bind -> exit 1, no line.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_bastion_cli(
            ["serve", "--config", "{config}", "--workers", "2"],
            cwd=tmp_path,
            config_toml_text=_redis_config(server={"port": port}),
        )
    assert result.returncode == 1, result.stderr
    assert "cannot listen" in result.stderr
    assert "bastion listening" not in result.stdout


@needs_redis
@needs_bus
async def test_rest_trigger_reaches_subscribers_on_every_worker(
    redis_workers: tuple[BastionProcess, dict[int, int]],
) -> None:
    server, pids = redis_workers
    clients, _ = await _clients_on_every_worker(server, pids, channel="news")
    try:
        # The bus subscribes to a channel's topic shortly *after* the subscription
        # succeeded, so the first events may miss another worker: trigger until every
        # subscriber got one (each trigger is itself the wait), then demand all of them.
        waiting = list(clients)
        seq = itertools.count()

        async def every_worker_relays() -> bool:
            body = {"name": "warm-up", "channel": "news", "data": str(next(seq))}
            result = await rest(server.port, "POST", "/apps/12345/events", body)
            assert result.status == 200, result.body
            for client in list(waiting):
                with contextlib.suppress(TimeoutError):
                    await client.wait_for("warm-up", "news", seconds=0.2)
                    waiting.remove(client)
            return not waiting

        await until(every_worker_relays, 10, message="the bus never reached every worker")
        for n in range(4):  # new connections: the kernel puts the trigger on either worker
            body = {"name": "hello", "channel": "news", "data": json.dumps({"n": n})}
            result = await rest(server.port, "POST", "/apps/12345/events", body)
            assert result.status == 200, result.body
            for client in clients:
                frame = await client.wait_for("hello", "news")  # past leftover warm-ups
                assert data_of(frame) == {"n": n}
    finally:
        await _close(clients)


# --- the supervisor in-process ------------------------------------------------------


@needs_redis
async def test_supervisor_gives_up_on_a_crash_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No restart allowed: the first unexpected exit is one too many.
    monkeypatch.setattr(workers, "MAX_RESTARTS_PER_WINDOW", 0)
    settings = settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "adapter": {
                "driver": "redis",
                "url": REDIS_URL,
                "prefix": f"test-workers-{uuid.uuid4().hex}",
            },
            "audit": {"path": str(tmp_path / "audit.sqlite3")},
            "security": {"reputation": {"store_path": str(tmp_path / "blocks.sqlite3")}},
            "apps": [dict(DEFAULT_APP)],
        },
        environ={},
    )
    listening: list[tuple[str, int]] = []
    supervisor = workers.Supervisor(settings, 2, lambda host, port: listening.append((host, port)))
    task = asyncio.create_task(supervisor.run())
    try:
        first = await asyncio.wait_for(supervisor.wait_ready(0), scaled(20))
        second = await asyncio.wait_for(supervisor.wait_ready(1), scaled(20))
        os.kill(first, signal.SIGKILL)
        assert await asyncio.wait_for(task, scaled(40)) == 1
    finally:
        if not task.done():
            task.cancel()  # the supervisor then signals every worker it started
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # It had picked one concrete port for both, and leaves no worker behind.
    assert listening == [("127.0.0.1", supervisor.port)] and supervisor.port > 0
    assert not _alive(first) and not _alive(second)
