"""Cluster state benchmark: what answering from Redis costs, against one local node.

Needs the Redis on 127.0.0.1:6379 (``--redis-url``); every run uses its own key
prefix. Prints ONE JSON line. Two servers are measured in turn, each a real
``bastion serve`` process: the ``local`` adapter (the hub's own state) and the
``redis`` adapter (the same single node, but every query read from Redis).

1. **REST queries.** ``--subscribers`` clients spread over ``--channels`` public
   channels; then ``--queries`` sequential signed ``GET /channels?info=
   subscription_count`` and ``GET /channels/{name}?info=subscription_count`` on one
   keep-alive connection. Reports p50/p99 latency of each.
2. **Presence joins.** ``--members`` clients join one presence channel one after
   another; reports p50/p99 of subscribe sent -> ``subscription_succeeded``
   received (with the redis adapter: the SUBSCRIBE confirmation, the member script
   and the member list read from Redis).

Everything is on 127.0.0.1, bounded by the counts and ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
from _common import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    CONFIG_TOML,
    Counter,
    bastion_workers,
    close_all,
    cluster_config,
    connect_subscribers,
    environment,
    raise_nofile,
)
from websockets.asyncio.client import connect


def signed_path(path: str, params: dict[str, str]) -> str:
    """``path?query`` signed as the Pusher REST API requires (a GET: no body)."""
    query = {
        **params,
        "auth_key": APP_KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
    }
    ordered = "&".join(f"{key}={query[key]}" for key in sorted(query))
    to_sign = f"GET\n{path}\n{ordered}".encode()
    query["auth_signature"] = hmac.new(APP_SECRET.encode(), to_sign, hashlib.sha256).hexdigest()
    return f"{path}?{urlencode(query)}"


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "n": len(ordered)}


async def queries(port: int, count: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    found: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as client:
        for name, path in (
            ("channels", f"/apps/{APP_ID}/channels"),
            ("channel", f"/apps/{APP_ID}/channels/bench-0"),
        ):
            samples = []
            for _ in range(count):
                # A new second signs differently; the same second repeats are within
                # the replay guard's grace, so every query is answered.
                target = signed_path(path, {"info": "subscription_count"})
                started = time.perf_counter()
                response = await client.get(target)
                samples.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: HTTP {response.status_code} {response.text}")
            found[name] = percentiles(samples)
        body = (await client.get(signed_path(f"/apps/{APP_ID}/channels", {}))).json()
        found["channels_listed"] = len(body["channels"])
    return found


def presence_auth(socket_id: str, channel: str, data: str) -> str:
    message = f"{socket_id}:{channel}:{data}".encode()
    return f"{APP_KEY}:{hmac.new(APP_SECRET.encode(), message, hashlib.sha256).hexdigest()}"


async def presence_joins(port: int, members: int) -> dict[str, Any]:
    channel = "presence-bench"
    sockets = []
    samples = []
    try:
        for index in range(members):
            ws = await connect(f"ws://127.0.0.1:{port}/app/{APP_KEY}?protocol=7", proxy=None)
            sockets.append(ws)
            socket_id = json.loads(json.loads(await ws.recv())["data"])["socket_id"]
            data = json.dumps({"user_id": f"user-{index}", "user_info": {"n": index}})
            frame = {
                "event": "pusher:subscribe",
                "data": {
                    "channel": channel,
                    "auth": presence_auth(socket_id, channel, data),
                    "channel_data": data,
                },
            }
            started = time.perf_counter()
            await ws.send(json.dumps(frame))
            while True:
                message = json.loads(await ws.recv())
                if message["event"] == "pusher_internal:subscription_succeeded":
                    break
            samples.append(time.perf_counter() - started)
            count = json.loads(message["data"])["presence"]["count"]
            if count != index + 1:
                raise RuntimeError(f"member list of {count}, expected {index + 1}")
    finally:
        for ws in sockets:
            await ws.close()
    return percentiles(samples)


async def measure(config: str, args: argparse.Namespace) -> dict[str, Any]:
    with bastion_workers(1, config) as (_, port, _pids):
        subs = await connect_subscribers(
            port, args.subscribers, Counter(), channels=args.channels, time_limit=60
        )
        try:
            found = await asyncio.wait_for(queries(port, args.queries), args.max_seconds)
            found["presence_join"] = await asyncio.wait_for(
                presence_joins(port, args.members), args.max_seconds
            )
        finally:
            close_all(subs)
    return found


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    raise_nofile()
    prefix = f"bench-state-{uuid.uuid4().hex}"
    result: dict[str, Any] = {"benchmark": "cluster_state", **environment(sys.argv)}
    result["local"] = await measure(CONFIG_TOML, args)
    result["redis"] = await measure(cluster_config(args.redis_url, prefix), args)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
