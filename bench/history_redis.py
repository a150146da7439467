"""Channel history in Redis: the cost of a recorded publish and of a resume, and the memory.

Starts a private ``redis-server`` (loopback, a free port, no persistence) and runs
the history's own scripts (:mod:`bastion.adapters.redis.history`) against it, as a
node would, pipelined. Prints ONE JSON line:

* ``append_redis_us`` — Redis CPU per recorded publish (``INFO commandstats``,
  ``evalsha`` ``usec_per_call``): record, number, trim, expire, publish;
* ``append_wall_us`` — wall time per publish from this client, pipelines of 200;
* ``resume_100_redis_us`` — Redis CPU of one read that returns 100 missed events;
* ``bytes_per_event`` and ``bytes_per_channel`` — ``MEMORY USAGE`` of a channel's
  stream and hash after ``--events`` events of ``--payload`` bytes (the stream keeps
  100; sealed: the stored value is the JSON of the event plus a 33-byte MAC), per
  kept event and in all.

Usage: ``python bench/history_redis.py [--channels 200] [--events 100] [--payload 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import redis.asyncio as aioredis

from bastion.adapters.redis.history import _APPEND, _SINCE
from bastion.adapters.redis.scripts import seal

KEY = b"k" * 32


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _keys(channel: str) -> list[str]:
    return [f"bench:hm:1:{channel}", f"bench:hs:1:{channel}", "bench:hg:1"]


async def _evalsha_stats(client: aioredis.Redis) -> tuple[int, int]:
    stats: dict[str, Any] = await client.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(entry["calls"]), int(entry["usec"])


async def measure(port: int, channels: int, events: int, payload: int) -> dict[str, Any]:
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
    append = await client.script_load(_APPEND)
    since = await client.script_load(_SINCE)
    filler = "x" * (payload - 12)
    signed = b"0" * 64 + b"." + b"{" + b"x" * (payload + 120) + b"}"  # a bus message's size
    calls0, usec0 = await _evalsha_stats(client)
    began = time.perf_counter()
    total = 0
    for round_ in range(events):
        async with client.pipeline(transaction=False) as pipe:
            for index in range(channels):
                data = f"{round_:06d}{index:06d}{filler}"
                value = seal(
                    KEY, ("1", f"c{index}", "history"), json.dumps(["message", data, None])
                )
                args = [f"e{index:07d}", value, 7 + len(data), 100, 65536, 300_000, 3_600_000]
                args += [f"bench:ch:1:c{index}", signed]
                pipe.evalsha(append, 3, *_keys(f"c{index}"), *args)
                total += 1
            await pipe.execute()
    wall = time.perf_counter() - began
    calls1, usec1 = await _evalsha_stats(client)
    stream = await client.memory_usage(_keys("c0")[1], samples=0) or 0
    meta = await client.memory_usage(_keys("c0")[0], samples=0) or 0
    # One resume that missed 100 events (the channel holds exactly ``events``).
    reads = 50
    calls2, usec2 = await _evalsha_stats(client)
    for _ in range(reads):
        found = await client.evalsha(
            since,
            3,
            *_keys("c0"),
            "fresh",
            "e0000000",
            max(0, events - 100),
            100,
            65536,
            300_000,
            100,
        )
        assert len(found) == 3 + 2 * min(100, events), len(found)
    calls3, usec3 = await _evalsha_stats(client)
    await client.aclose()
    return {
        "append_redis_us": round((usec1 - usec0) / (calls1 - calls0), 2),
        "append_wall_us": round(wall / total * 1e6, 2),
        "resume_100_redis_us": round((usec3 - usec2) / (calls3 - calls2), 1),
        "bytes_per_event": round(stream / min(events, 100), 1),
        "bytes_per_channel": stream + meta,
        "stream_bytes": stream,
        "meta_bytes": meta,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=200)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--payload", type=int, default=200)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        server = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            result: dict[str, Any] = {"bench": "history_redis", "python": sys.version.split()[0]}
            result.update(vars(args))
            result.update(asyncio.run(measure(port, args.channels, args.events, args.payload)))
            print(json.dumps(result))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
