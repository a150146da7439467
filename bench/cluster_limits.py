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
  memory limiter (no Redis involved).

Prints one JSON object. Usage::

    python bench/cluster_limits.py [--url redis://127.0.0.1:6379/0] [--nodes 3]
        [--seconds 5] [--sync-ms 50] [--rate 100] [--burst 100] [--demand 1000]
        [--keys 2000] [--spread-rate 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from bastion.adapters.cluster_limits import ClusterLimits
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
    args = parser.parse_args()
    report: dict[str, Any] = {"sync_ms": args.sync_ms, **take_cost()}
    report["hot"] = await scenario(args, "hot", ["app-1"], args.demand)
    keys = [f"10.1.{i // 256}.{i % 256}" for i in range(args.keys)]
    report["spread"] = await scenario(args, "spread", keys, args.spread_rate)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
