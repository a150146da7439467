"""Client events relayed: private-channel pairs ping-ponging, server CPU per message.

The load of issue #13's first row: ``--pairs`` pairs of clients (default 500, so
1,000 clients), each pair alone on ``private-chat-<i>``, plus idle clients (each on
a public channel) up to ``--clients`` connections in all (default 5,000). Each
pair plays ping-pong with client events carrying a small object (``{"t":..,"x":..,
"y":..,"typing":true}``, the shape of typing/cursor updates): A sends, the server
relays to B, B answers at once, the server relays to A, and so on, so every pair
always has one event in flight. Private-channel auth is signed here with the app
secret, as an app's auth endpoint would. ``--rate R`` paces the pairs so that the
servers relay R events a second in all (each side waits for its pair's next slot
before answering): both servers then do the same work per second, which takes the
load level out of the per-message comparison.

The clients live in ``--workers`` generator processes (default: one per CPU the
server is not pinned to). After ``--warmup`` seconds of play the measured window of
``--seconds`` opens: the server's CPU time (``/proc/PID/stat``) over the window
divided by the events relayed inside it gives ``server_cpu_us_per_msg``; the relay
latency is timed from the sender's clock value in the data to the receiver
(CLOCK_MONOTONIC, one clock for all processes). ``--compare soketi`` runs the same
load against soketi 1.6.1 right after Bastion and prints both, with the ratios.

Prints ONE JSON object. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    PusherClient,
    ServerProcess,
    Target,
    add_server_args,
    client_frame,
    close_clients,
    fleet_window,
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

EVENT = "client-typing"


def _frame(pair: int, t_us: int) -> bytes:
    return client_frame(
        b'{"event":"%s","channel":"private-chat-%d","data":{"t":%d,"x":412,"y":187,"typing":true}}'
        % (EVENT.encode(), pair, t_us)
    )


async def generator(conn: Any, spec: dict[str, Any]) -> None:
    """One generator process: its pairs and idle clients, then the ping-pong."""
    target: Target = spec["target"]
    pairs: range = spec["pairs"]
    idle: range = spec["idle"]
    lat = array("q")
    last_seen = array("q", [0] * len(pairs))
    st = {"in_window": 0, "total": 0, "start": 1 << 62, "end": 1 << 62}
    # --rate: each pair sends at most every `interval` µs (0: answer at once).
    interval = int(1e6 * len(pairs) / spec["rate"]) if spec["rate"] else 0
    next_send = array("q", [0] * len(pairs))
    loop = asyncio.get_running_loop()

    def send(client: PusherClient, pair: int) -> None:
        now = time.perf_counter_ns() // 1000
        if now < st["end"]:
            client.send(_frame(pair, now))

    def on_message(client: PusherClient, payload: bytes) -> None:
        now = time.perf_counter_ns() // 1000
        i = payload.find(b'"t":')
        if i < 0:
            return
        sent = int(payload[i + 4 : payload.find(b",", i)])
        st["total"] += 1
        pair = client.tag >> 1
        k = pair - pairs.start
        if st["start"] <= now < st["end"]:
            lat.append(now - sent)
            st["in_window"] += 1
            last_seen[k] = now
        if now >= st["end"]:
            return
        if interval:
            due = next_send[k]
            next_send[k] = max(now, due) + interval
            if due > now:
                loop.call_later((due - now) / 1e6, send, client, pair)
                return
        client.send(_frame(pair, now))

    specs: list[tuple[Any, Any]] = []
    for p in pairs:
        channel = [(f"private-chat-{p}", None)]
        specs += [(channel, on_message), (channel, on_message)]
    clients = await open_clients(target, specs, time_limit=spec["setup_s"])
    for c, p in zip(clients, [p for p in pairs for _ in (0, 1)], strict=True):
        c.tag = 2 * p + (c.tag & 1)  # tag: pair number and side, across all generators
    idlers = await open_clients(
        target, [([(f"idle-{i % 1000}", None)], None) for i in idle], time_limit=spec["setup_s"]
    )
    conn.send(("ready", {"clients": len(clients) + len(idlers)}))
    _go, t_go, t_start, t_end = await recv_pipe(conn, 600)
    st["start"], st["end"] = int(t_start * 1e6), int(t_end * 1e6)
    await sleep_until(t_go)
    for c in clients[0::2]:  # side A of every pair serves first
        c.send(_frame(c.tag >> 1, time.perf_counter_ns() // 1000))
    await sleep_until(t_end + 0.5)  # let the last events in flight land
    everyone = clients + idlers
    errors = sum(c.errors for c in everyone)
    first_error = next((c.last_error for c in everyone if c.errors), None)
    alive = sum(1 for c in everyone if c.stage == 3)
    await close_clients(everyone)
    conn.send(
        (
            "done",
            {
                "messages": st["in_window"],
                "messages_total": st["total"],
                "latencies_us": lat.tobytes(),
                "stalled_pairs": sum(1 for t in last_seen if t < st["end"] - 1_000_000),
                "errors": errors,
                "first_error": first_error,
                "clients_open_at_end": alive,
            },
        )
    )


def measure(args: argparse.Namespace) -> Callable[..., dict[str, Any]]:
    def run(target: Target, proc: ServerProcess, server_cpu: int | None) -> dict[str, Any]:
        workers = worker_count(args)
        idle = max(0, args.clients - 2 * args.pairs)
        specs = [
            {
                "target": target,
                "pairs": p,
                "idle": i,
                "setup_s": args.setup_seconds,
                "rate": args.rate * len(p) / args.pairs if args.rate else 0,
            }
            for p, i in zip(split(args.pairs, workers), split(idle, workers), strict=True)
        ]
        ready, done, cpu = fleet_window(
            target,
            generator,
            specs,
            server_cpu,
            warmup=args.warmup,
            seconds=args.seconds,
            setup_s=args.setup_seconds,
        )
        lat = array("q")
        for d in done:
            lat.frombytes(d["latencies_us"])
        messages = sum(d["messages"] for d in done)
        seconds = cpu["window_s"]
        return {
            "server_cpu_us_per_msg": per_unit_us(cpu["server_cpu_s"], messages),
            "msgs_per_s": round(messages / seconds) if seconds else 0,
            **{f"relay_{k}": v for k, v in latency_ms(lat).items()},
            "messages": messages,
            "generator_cpu_us_per_msg": per_unit_us(cpu["generator_cpu_s"], messages),
            "clients": sum(r["clients"] for r in ready),
            "stalled_pairs": sum(d["stalled_pairs"] for d in done),
            "errors": sum(d["errors"] for d in done),
            "first_error": next((d["first_error"] for d in done if d["first_error"]), None),
            "generators": len(done),
            **cpu,
        }

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=500, help="ping-ponging private-channel pairs")
    ap.add_argument("--clients", type=int, default=5000, help="connections in all (rest idle)")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="relayed events a second in all, paced per pair (0: as fast as the server relays)",
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=3.0, help="play before the window opens")
    ap.add_argument("--setup-seconds", type=float, default=120.0, help="bound to connect all")
    add_server_args(ap)
    args = ap.parse_args()
    limit = raise_nofile()
    if max(args.clients, 2 * args.pairs) + 100 > limit:
        sys.exit(f"fd hard limit {limit} is too low for {args.clients} clients")
    params = {
        "pairs": args.pairs,
        "clients": max(args.clients, 2 * args.pairs),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "workers": worker_count(args),
        "event": EVENT,
        "rate": args.rate or None,
    }
    result = side_by_side(
        args,
        "client_events",
        params,
        measure(args),
        ["server_cpu_us_per_msg", "msgs_per_s", "relay_p50_ms", "relay_p99_ms"],
    )
    print(json.dumps(result), flush=True)
    if any("error" in result.get(k, {}) for k in ("bastion", "soketi")):
        sys.exit(1)


if __name__ == "__main__":
    main()
