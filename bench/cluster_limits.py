"""Cluster-wide rate limits: what the cluster grants, and what it costs Redis.

Runs N :class:`~bastion.adapters.cluster_limits.ClusterLimits` in one process (one
per simulated node, each with its own Redis connection and sync task), against a
real Redis, under a fresh key prefix that is deleted afterwards. Each node's load
is a timer that, every millisecond, asks for the grants its demand rate owes.

Scenarios (each ``--seconds`` long):

* ``hot``: one key (an app) that every node asks ``--demand`` grants a second
  of, far above the limit: the granted rate should stay near the limit;
* ``spread``: ``--keys`` keys (addresses) asked evenly, each far below its limit:
  the local pre-filter should keep Redis calls far below one per grant;
* ``take_us``: the cost of one ``take`` on a shared limiter and on the per-node
  memory limiter (no Redis involved);
* ``user_cap``: what ``max_connections_per_user`` costs per connect: a connection's
  first sign-in runs one Redis script (count the user's connections, add this one)
  and its close one more (on the syncer); measured one at a time (the latency a
  sign-in waits) and ``--concurrency`` at once (the throughput of one node), and
  against the in-memory count of a single node.

Prints one JSON object. Usage::

    python bench/cluster_limits.py [--url redis://127.0.0.1:6379/0] [--nodes 3]
        [--seconds 5] [--sync-ms 50] [--rate 100] [--burst 100] [--demand 1000]
        [--keys 2000] [--spread-rate 20000] [--connects 5000] [--users 1000]
        [--user-cap 3] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from bastion.adapters.cluster_limits import ClusterLimits
from bastion.adapters.memory import MemoryCluster
from bastion.adapters.redis.scripts import StateScripts, connection_tag
from bastion.config import AdapterSettings
from bastion.security.limits import MemoryRateLimiter, RateLimiter


async def drive(
    limiter: RateLimiter, keys: list[str], demand: float, seconds: float
) -> tuple[int, int]:
    """Ask ``demand`` grants a second, round-robin over ``keys``; (asked, granted)."""
    loop = asyncio.get_running_loop()
    start = last = loop.time()
    owed = 0.0
    asked = granted = 0
    index = 0
    while True:
        await asyncio.sleep(0.001)
        now = loop.time()
        if now - start >= seconds:
            return asked, granted
        owed += (now - last) * demand
        last = now
        while owed >= 1:
            owed -= 1
            asked += 1
            granted += limiter.take(keys[index % len(keys)], now) == 0.0
            index += 1


async def scenario(
    args: argparse.Namespace, name: str, keys: list[str], demand: float
) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex}"
    settings = AdapterSettings(
        driver="redis", url=args.url, prefix=prefix, limits_sync_ms=args.sync_ms
    )
    nodes = [ClusterLimits(settings) for _ in range(args.nodes)]
    loop = asyncio.get_running_loop()
    try:
        for node in nodes:
            await node.start()
        limiters = [
            node("client_events_app", args.rate, args.burst, 100_000, loop.time) for node in nodes
        ]
        before = [(node.commands, node.syncs) for node in nodes]
        results = await asyncio.gather(
            *(drive(limiter, keys, demand, args.seconds) for limiter in limiters)
        )
        commands = sum(node.commands - b[0] for node, b in zip(nodes, before, strict=True))
        trips = sum(node.syncs - b[1] for node, b in zip(nodes, before, strict=True))
        asked = sum(a for a, _ in results)
        granted = sum(g for _, g in results)
        return {
            "scenario": name,
            "nodes": args.nodes,
            "keys": len(keys),
            "asked_per_s": round(asked / args.seconds, 1),
            "granted_per_s": round(granted / args.seconds, 1),
            "limit_per_s_per_key": args.rate,
            "cluster_limit_per_s": round(
                args.rate * len(keys) + args.burst * len(keys) / args.seconds, 1
            ),
            "redis_commands_per_s": round(commands / args.seconds, 1),
            "redis_round_trips_per_s": round(trips / args.seconds, 1),
            "commands_per_grant": round(commands / max(1, granted), 4),
            "failures": sum(node.failures for node in nodes),
        }
    finally:
        for node in nodes:
            await node.stop()
        client = aioredis.from_url(args.url)
        try:
            async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                await client.delete(key)
        finally:
            await client.aclose()


def take_cost(count: int = 200_000) -> dict[str, float]:
    settings = AdapterSettings(driver="redis", url="redis://127.0.0.1:6379/0")
    shared = ClusterLimits(settings)("rest_ip", 1e9, 1e9, 100_000, time.monotonic)
    memory = MemoryRateLimiter(1e9, 1e9, 100_000)
    keys = [f"10.0.{i // 256}.{i % 256}" for i in range(1000)]
    out: dict[str, float] = {}
    # Twice each, interleaved; the second round is kept (the first one warms up).
    for _ in range(2):
        for label, limiter in (("shared", shared), ("memory", memory)):
            start = time.perf_counter()
            for i in range(count):
                limiter.take(keys[i % 1000], 1000.0 + i * 1e-6)
            out[f"take_us_{label}"] = round((time.perf_counter() - start) / count * 1e6, 3)
    return out


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def user_cap_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Per connect: one claim at sign-in, one release at close (Redis and memory)."""
    prefix = f"bench-{uuid.uuid4().hex}"
    client = aioredis.from_url(args.url)
    scripts = StateScripts(client, prefix, "bench-node", 60_000, b"k" * 32)
    tags = [
        connection_tag("12345", f"user-{i % args.users}", f"{i}.{i}") for i in range(args.connects)
    ]
    out: dict[str, Any] = {"connects": args.connects, "users": args.users, "cap": args.user_cap}
    try:
        await scripts.claim_connection("warm\nup\n1.1", 1, close_oldest=False)
        claims: list[float] = []
        admitted = 0
        for tag in tags:  # one at a time: what a sign-in waits for
            start = time.perf_counter()
            admitted += (
                await scripts.claim_connection(tag, args.user_cap, close_oldest=False) is not None
            )
            claims.append(time.perf_counter() - start)
        releases: list[float] = []
        for tag in tags:
            start = time.perf_counter()
            await scripts.release_connection(tag)
            releases.append(time.perf_counter() - start)
        out["claim_us_p50"] = round(_percentile(claims, 0.5) * 1e6, 1)
        out["claim_us_p99"] = round(_percentile(claims, 0.99) * 1e6, 1)
        out["release_us_p50"] = round(_percentile(releases, 0.5) * 1e6, 1)
        out["admitted"] = admitted
        # Many sign-ins in flight at once (one node's connection pool).
        queue = list(tags)

        async def worker() -> None:
            while queue:
                tag = queue.pop()
                await scripts.claim_connection(tag, args.user_cap, close_oldest=True)
                await scripts.release_connection(tag)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        out["connects_per_s_concurrent"] = round(args.connects / elapsed, 1)
        out["redis_scripts_per_connect"] = 2
    finally:
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.delete(key)
        await client.aclose()
    # One node alone: the in-memory count (what the local driver runs).
    state = MemoryCluster().join("local").state
    start = time.perf_counter()
    for tag in tags:
        app_id, user_id, socket_id = tag.split("\n")
        claim = state.claim_connection(app_id, user_id, socket_id, args.user_cap, close_oldest=True)
        with contextlib.suppress(StopIteration):  # answered without suspending
            claim.send(None)
        state.release_connection(app_id, user_id, socket_id)
    out["memory_connect_us"] = round((time.perf_counter() - start) / len(tags) * 1e6, 3)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sync-ms", type=int, default=50)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--burst", type=float, default=100.0)
    parser.add_argument("--demand", type=float, default=1000.0, help="hot: grants/s per node")
    parser.add_argument("--keys", type=int, default=2000, help="spread: distinct keys")
    parser.add_argument(
        "--spread-rate", type=float, default=20000.0, help="spread: grants/s per node"
    )
    parser.add_argument("--connects", type=int, default=5000, help="user_cap: connections")
    parser.add_argument("--users", type=int, default=1000, help="user_cap: distinct users")
    parser.add_argument("--user-cap", type=int, default=3, help="user_cap: the cap")
    parser.add_argument("--concurrency", type=int, default=50, help="user_cap: in flight")
    parser.add_argument(
        "--only", choices=["hot", "spread", "user_cap"], help="run one scenario (and take_us)"
    )
    args = parser.parse_args()
    report: dict[str, Any] = {"sync_ms": args.sync_ms, **take_cost()}
    if args.only in (None, "hot"):
        report["hot"] = await scenario(args, "hot", ["app-1"], args.demand)
    if args.only in (None, "spread"):
        keys = [f"10.1.{i // 256}.{i % 256}" for i in range(args.keys)]
        report["spread"] = await scenario(args, "spread", keys, args.spread_rate)
    if args.only in (None, "user_cap"):
        report["user_cap"] = await user_cap_cost(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
