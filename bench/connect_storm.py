"""Connection storms: server CPU per WebSocket connection, and a reconnect storm.

Default (issue #13's third row): ``--inflight`` connections in flight (default 200),
each doing TCP connect, the WebSocket upgrade, waiting for
``pusher:connection_established``, then the close handshake (the server closes the
TCP connection first), after which its slot opens the next one. Over the measured
window of ``--seconds`` (or until ``--connections`` were made): connections
established per second, the server's CPU time per connection, and the connect
latency (``connect()`` called -> ``connection_established`` received), p50/p99.

``--reconnect-storm``: ``--clients`` clients (default 5,000) connect and subscribe
to their channels (a public ``storm-<i % 100>`` and a ``private-storm-<i>``, the
latter signed here), then all drop at the same instant (the TCP connection
aborted, as when a network path or a load balancer fails) and reconnect at once,
``--storm-inflight`` at a time, each subscribing again to its channels. Reports the
time from the drop until the last client was subscribed again, the server's CPU
over that time (disconnect clean-up included), per client, and the per-client
reconnect latency (drop -> every channel resubscribed).

The clients live in ``--workers`` generator processes. ``--compare soketi`` runs
the same load against soketi 1.6.1 right after Bastion. Prints ONE JSON object.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    HOST,
    Fleet,
    PusherClient,
    ServerProcess,
    Target,
    Window,
    add_server_args,
    close_clients,
    fleet_window,
    generator_cpus,
    latency_ms,
    open_clients,
    per_unit_us,
    raise_nofile,
    recv_pipe,
    side_by_side,
    sleep_until,
    split,
    worker_count,
)

# --- connect storm ----------------------------------------------------------------------


class _Attempt:
    """One connection of a slot, abortable by a timer before or after it exists."""

    __slots__ = ("aborted", "client", "target")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.client: PusherClient | None = None
        self.aborted = 0

    def make(self) -> PusherClient:
        self.client = PusherClient(self.target)
        return self.client

    def abort(self) -> None:
        if self.client is not None and not self.client.closed.done():
            self.aborted = 1
            self.client.abort()


async def storm_generator(conn: Any, spec: dict[str, Any]) -> None:
    """``spec["inflight"]`` slots, each connecting, waiting for established, closing."""
    target: Target = spec["target"]
    quota: int | None = spec["quota"]
    loop = asyncio.get_running_loop()
    lat = array("q")
    st = {"started": 0, "established": 0, "in_window": 0, "errors": 0, "close_timeouts": 0}
    last_error: list[str] = []
    conn.send(("ready", {"slots": spec["inflight"]}))
    _go, t_go, t_start, t_end = await recv_pipe(conn, 600)
    start_us, end_us = int(t_start * 1e6), int(t_end * 1e6)
    last_done = [0.0]

    async def slot() -> None:
        while time.perf_counter() < t_end and (quota is None or st["started"] < quota):
            st["started"] += 1
            t0 = time.perf_counter_ns() // 1000
            attempt = _Attempt(target)
            # Watchdogs rather than wait_for: no extra task per connection, so the
            # generator stays cheap next to the server it measures.
            watchdog = loop.call_later(10, attempt.abort)
            try:
                await loop.create_connection(attempt.make, HOST, target.port)
                await attempt.client.established  # type: ignore[union-attr]
            except (OSError, ConnectionError) as exc:
                watchdog.cancel()
                st["errors"] += 1
                last_error[:] = [f"{type(exc).__name__}: {exc}"[:300]]
                attempt.abort()
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter_ns() // 1000
            st["established"] += 1
            if start_us <= t1 < end_us:
                lat.append(t1 - t0)
                st["in_window"] += 1
                last_done[0] = time.perf_counter()
            watchdog.cancel()
            closer = loop.call_later(5, attempt.abort)
            await attempt.client.close()  # type: ignore[union-attr]
            closer.cancel()
            st["close_timeouts"] += attempt.aborted

    await sleep_until(t_go)
    slots = [asyncio.ensure_future(slot()) for _ in range(spec["inflight"])]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*slots), t_end - time.perf_counter() + 15)
    for s in slots:
        s.cancel()
    conn.send(
        (
            "done",
            {
                "in_window": st["in_window"],
                "established": st["established"],
                "latencies_us": lat.tobytes(),
                "errors": st["errors"],
                "last_error": last_error[0] if last_error else None,
                "close_timeouts": st["close_timeouts"],
                "last_in_window": last_done[0],
                "t_start": t_start,
            },
        )
    )


def measure_storm(args: argparse.Namespace) -> Callable[..., dict[str, Any]]:
    def run(target: Target, proc: ServerProcess, server_cpu: int | None) -> dict[str, Any]:
        workers = min(worker_count(args), args.inflight)
        quotas: Sequence[int | None] = (
            [len(r) for r in split(args.connections, workers)]
            if args.connections
            else [None] * workers
        )
        specs = [
            {"target": target, "inflight": len(r), "quota": q}
            for r, q in zip(split(args.inflight, workers), quotas, strict=True)
        ]
        _ready, done, cpu = fleet_window(
            target, storm_generator, specs, server_cpu, warmup=args.warmup,
            seconds=args.seconds, setup_s=30,
        )  # fmt: skip
        lat = array("q")
        for d in done:
            lat.frombytes(d["latencies_us"])
        made = sum(d["in_window"] for d in done)
        # With a --connections cap the work may end before the window does.
        busy_s = cpu["window_s"]
        if args.connections:
            busy_s = min(busy_s, max(d["last_in_window"] - d["t_start"] for d in done))
        return {
            "server_cpu_us_per_connection": per_unit_us(cpu["server_cpu_s"], made),
            "connections_per_s": round(made / busy_s) if busy_s > 0 else 0,
            **{f"connect_{k}": v for k, v in latency_ms(lat).items()},
            "connections": made,
            "generator_cpu_us_per_connection": per_unit_us(cpu["generator_cpu_s"], made),
            "errors": sum(d["errors"] for d in done),
            "last_error": next((d["last_error"] for d in done if d["last_error"]), None),
            "close_timeouts": sum(d["close_timeouts"] for d in done),
            "generators": len(done),
            **cpu,
        }

    return run


# --- reconnect storm --------------------------------------------------------------------


def _channels(i: int) -> list[tuple[str, str | None]]:
    return [(f"storm-{i % 100}", None), (f"private-storm-{i}", None)]


async def reconnect_generator(conn: Any, spec: dict[str, Any]) -> None:
    """Connect this process's clients, drop them all at ``t_start``, reconnect them."""
    target: Target = spec["target"]
    ids: range = spec["clients"]
    clients = await open_clients(
        target, [(_channels(i), None) for i in ids], time_limit=spec["setup_s"]
    )
    conn.send(("ready", {"clients": len(clients)}))
    _go, _t_go, t_start, _t_end = await recv_pipe(conn, 600)
    await sleep_until(t_start)
    drop = time.perf_counter()
    for c in clients:
        c.abort()
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(spec["inflight"])
    lat = array("q")
    errors: list[str] = []
    again: list[PusherClient] = []

    async def reconnect(i: int) -> None:
        for _attempt in range(5):
            async with sem:
                try:
                    _t, c = await loop.create_connection(
                        lambda: PusherClient(target, _channels(i)), HOST, target.port
                    )
                    again.append(c)
                    await asyncio.wait_for(asyncio.shield(c.ready), 30)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
            lat.append(int((c.t_ready - drop) * 1e6))
            return

    await asyncio.wait_for(asyncio.gather(*(reconnect(i) for i in ids)), spec["setup_s"])
    finished = time.perf_counter()
    conn.send(
        (
            "done",
            {
                "drop": drop,
                "finished": finished,
                "reconnected": len(lat),
                "latencies_us": lat.tobytes(),
                "errors": len(errors),
                "last_error": errors[-1] if errors else None,
            },
        )
    )
    await recv_pipe(conn, 300)  # closing is not part of the storm: wait until measured
    await close_clients(again)


def measure_reconnect(args: argparse.Namespace) -> Callable[..., dict[str, Any]]:
    def run(target: Target, proc: ServerProcess, server_cpu: int | None) -> dict[str, Any]:
        workers = worker_count(args)
        specs = [
            {"target": target, "clients": ids, "inflight": len(slots), "setup_s": 180.0}
            for ids, slots in zip(
                split(args.clients, workers),
                split(max(workers, args.storm_inflight), workers),
                strict=True,
            )
        ]
        fleet = Fleet(reconnect_generator, specs, generator_cpus(server_cpu))
        try:
            ready = fleet.recv_all("ready", 240)
            time.sleep(args.settle)
            t_start = time.perf_counter() + 0.3
            fleet.send_all(("go", t_start, t_start, t_start))
            time.sleep(max(0.0, t_start - 0.05 - time.perf_counter()))
            window = Window(target.pid, fleet.pids)
            done = fleet.recv_all("done", 240)
            cpu = window.close()
            fleet.send_all(("close",))
        finally:
            fleet.close()
        lat = array("q")
        for d in done:
            lat.frombytes(d["latencies_us"])
        total_s = max(d["finished"] for d in done) - min(d["drop"] for d in done)
        n = sum(d["reconnected"] for d in done)
        return {
            "storm_total_s": round(total_s, 3),
            "server_cpu_s_storm": cpu["server_cpu_s"],
            "server_cpu_us_per_reconnect": per_unit_us(cpu["server_cpu_s"], n),
            "reconnects_per_s": round(n / total_s) if total_s > 0 else 0,
            **{f"reconnect_{k}": v for k, v in latency_ms(lat).items()},
            "clients": sum(r["clients"] for r in ready),
            "reconnected": n,
            "channels_per_client": 2,
            "errors": sum(d["errors"] for d in done),
            "last_error": next((d["last_error"] for d in done if d["last_error"]), None),
            "generators": len(done),
            **cpu,
        }

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inflight", type=int, default=200, help="connections in flight")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=2.0, help="storm before the window opens")
    ap.add_argument("--connections", type=int, default=0, help="stop after this many (0: none)")
    ap.add_argument("--reconnect-storm", action="store_true", help="drop and reconnect --clients")
    ap.add_argument("--clients", type=int, default=5000, help="clients of the reconnect storm")
    ap.add_argument("--storm-inflight", type=int, default=1000, help="reconnects in flight")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before the drop")
    add_server_args(ap)
    args = ap.parse_args()
    limit = raise_nofile()
    if args.reconnect_storm:
        if 2 * args.clients + 100 > limit:
            sys.exit(f"fd hard limit {limit} is too low for {args.clients} clients")
        name = "reconnect_storm"
        params: dict[str, Any] = {
            "clients": args.clients,
            "channels_per_client": ["storm-<i % 100>", "private-storm-<i>"],
            "storm_inflight": args.storm_inflight,
            "workers": worker_count(args),
        }
        run = measure_reconnect(args)
        keys = [
            "storm_total_s",
            "server_cpu_s_storm",
            "server_cpu_us_per_reconnect",
            "reconnect_p50_ms",
            "reconnect_p99_ms",
        ]
    else:
        name = "connect_storm"
        params = {
            "inflight": args.inflight,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "connections": args.connections or None,
            "workers": min(worker_count(args), args.inflight),
        }
        run = measure_storm(args)
        keys = [
            "server_cpu_us_per_connection",
            "connections_per_s",
            "connect_p50_ms",
            "connect_p99_ms",
        ]
    result = side_by_side(args, name, params, run, keys)
    print(json.dumps(result), flush=True)
    if any("error" in result.get(k, {}) for k in ("bastion", "soketi")):
        sys.exit(1)


if __name__ == "__main__":
    main()
