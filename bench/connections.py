"""Idle-connection memory: RSS per subscribed WebSocket connection.

Starts a real Bastion process (``python -m bastion serve`` on a temp config), reads
its VmRSS from /proc/PID/status, opens M WebSocket connections that each complete
the Pusher handshake and subscribe to a public channel, waits until every one got
``pusher_internal:subscription_succeeded``, lets the server settle, reads VmRSS
again and prints ONE JSON line. Unless ``--no-floor``, does the same against the bare
floor server from fanout.py (same flow, minimal state) for comparison.

Everything is on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    Counter,
    ServerProcess,
    bastion_server,
    close_all,
    connect_subscribers,
    environment,
    floor_server,
    raise_nofile,
    vm_rss_kib,
)

GOAL_KIB_PER_CONNECTION = 16.0


async def measure(
    server: ServerProcess, port: int, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    await asyncio.sleep(args.settle)
    before = vm_rss_kib(server.pid)
    t0 = time.perf_counter()
    subs = await connect_subscribers(
        port,
        args.connections,
        Counter(),
        concurrency=args.concurrency,
        time_limit=max(5.0, deadline - time.perf_counter()),
        channels=args.channels,
    )
    connect_s = time.perf_counter() - t0
    try:
        await asyncio.sleep(args.settle)
        after = vm_rss_kib(server.pid)
        alive = sum(1 for s in subs if not s.transport.is_closing())
    finally:
        close_all(subs)
        await asyncio.sleep(0.2)
    return {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": round((after - before) / args.connections, 2),
        "connected": alive,
        "connect_s": round(connect_s, 2),
    }


@contextlib.contextmanager
def _server(kind: str) -> Iterator[tuple[ServerProcess, int]]:
    cm = bastion_server(None) if kind == "bastion" else floor_server(None)
    with cm as pair:
        yield pair


async def run(args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + args.max_seconds
    out: dict[str, Any] = {"connections": args.connections, "channels": args.channels}
    try:
        with _server("bastion") as (proc, port):
            try:
                out.update(await measure(proc, port, args, deadline))
            except Exception as exc:
                out["error"] = f"bastion: {type(exc).__name__}: {exc}"
                out["bastion_stderr_tail"] = proc.stderr_tail(1500)
    except Exception as exc:  # the server did not start
        out["error"] = f"bastion: {type(exc).__name__}: {exc}"
    if args.floor:
        with _server("floor") as (proc, port):
            floor = await measure(proc, port, args, deadline)
        out.update({f"floor_{k}": v for k, v in floor.items() if k != "connect_s"})
    if "kib_per_connection" in out:
        out["goal_kib_per_connection"] = GOAL_KIB_PER_CONNECTION
        out["goal_met"] = out["kib_per_connection"] <= GOAL_KIB_PER_CONNECTION
    out.update(environment(sys.argv))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--channels", type=int, default=1, help="distinct channels (round robin)")
    ap.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before each RSS read")
    ap.add_argument("--no-floor", dest="floor", action="store_false")
    ap.add_argument("--max-seconds", type=float, default=150.0)
    args = ap.parse_args()
    limit = raise_nofile()
    if args.connections + 100 > limit:
        sys.exit(f"fd hard limit {limit} is too low for {args.connections} connections")
    result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
