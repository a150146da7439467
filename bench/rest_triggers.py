"""REST triggers: signed ``POST /apps/<id>/events`` to many channels, server CPU per trigger.

The load of issue #13's second row: ``--channels`` channels (default 1,000) with
``--subscribers`` subscribers each (default 1), plus idle clients up to ``--clients``
connections (default 5,000), and ``--inflight`` keep-alive HTTP connections (default
16) each sending its next trigger as soon as the previous answer arrives. Triggers go
round robin over the channels and are signed like the official server SDKs sign them (``auth_key``,
``auth_timestamp``, ``auth_version``, ``body_md5``, ``auth_signature``; body
``{"name":..,"channels":[..],"data":".."}``, the data a string of ``--data-bytes``
that starts with the send time).

Clients and trigger connections live in ``--workers`` generator processes. Over the
measured window: triggers answered ``200`` per second, the server's CPU time per
trigger and per delivery (a frame received by a subscriber), and the trigger-to-frame
latency measured at the subscribers. ``--channels 1 --subscribers 5000 --inflight 2`` is
broadcast fan-out (the load of ``fanout.py``), side by side with soketi. After the
window every generator waits for the frames still in flight; ``lost`` is triggers
answered times ``--subscribers`` minus frames received. ``--compare soketi`` runs the
same load against soketi right after Bastion.

Prints ONE JSON object. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    HOST,
    PusherClient,
    ServerProcess,
    Target,
    TriggerClient,
    add_server_args,
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


class Signer:
    """Builds signed trigger requests fast (the generator must outrun the server)."""

    def __init__(self, target: Target, pad: int, close: bool) -> None:
        self.close = close
        self.path = f"/apps/{target.app_id}/events"
        self.key = target.key
        self.secret = hmac.new(target.secret.encode(), digestmod=hashlib.sha256)
        self.pad = b"x" * pad
        self.head = f"POST {self.path}?".encode()
        self.tail = f" HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n".encode()
        if close:
            self.tail += b"Connection: close\r\n"

    def request(self, channel: int, t_us: int) -> bytes:
        body = b'{"name":"bench-event","channels":["rest-%d"],"data":"%016d%s"}' % (
            channel,
            t_us,
            self.pad,
        )
        query = (
            f"auth_key={self.key}&auth_timestamp={int(time.time())}&auth_version=1.0"
            f"&body_md5={hashlib.md5(body).hexdigest()}"
        )
        mac = self.secret.copy()
        mac.update(f"POST\n{self.path}\n{query}".encode())
        return b"%s%s&auth_signature=%s%sContent-Length: %d\r\n\r\n%s" % (
            self.head,
            query.encode(),
            mac.hexdigest().encode(),
            self.tail,
            len(body),
            body,
        )


async def generator(conn: Any, spec: dict[str, Any]) -> None:
    """Subscribers of this process's channels, idle clients and trigger lanes."""
    target: Target = spec["target"]
    subscriptions: range = spec["subscriptions"]  # global subscriber numbers
    n_channels: int = spec["n_channels"]
    lanes: range = spec["lanes"]  # global lane numbers
    total_lanes: int = spec["total_lanes"]
    signer = Signer(target, spec["pad"], spec["close"])
    lat = array("q")
    st = {"received": 0, "in_window": 0, "answered": 0, "answered_in_window": 0, "sent": 0}
    st.update(start=1 << 62, end=1 << 62, errors=0)

    def on_message(client: PusherClient, payload: bytes) -> None:
        now = time.perf_counter_ns() // 1000
        i = payload.find(b'"data":"')
        if i < 0:
            return
        st["received"] += 1
        if st["start"] <= now < st["end"]:
            lat.append(now - int(payload[i + 8 : i + 24]))
            st["in_window"] += 1

    subs = await open_clients(
        target,
        [([(f"rest-{s % n_channels}", None)], on_message) for s in subscriptions],
        time_limit=spec["setup_s"],
    )
    idlers = await open_clients(
        target,
        [([(f"idle-{i % 1000}", None)], None) for i in spec["idle"]],
        time_limit=spec["setup_s"],
    )
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    opened = [0]
    pending: set[asyncio.Task[None]] = set()

    class Lane:
        """One trigger in flight at a time, on a keep-alive connection while the server
        keeps it alive (soketi answers ``Connection: close``: then one per trigger)."""

        def __init__(self, lane: int) -> None:
            self.lane = lane
            self.seq = 0
            self.client: TriggerClient | None = None

        async def connect(self) -> None:
            _t, self.client = await loop.create_connection(
                lambda: TriggerClient(self.on_response), HOST, target.port
            )
            opened[0] += 1

        def send(self) -> None:
            now = time.perf_counter_ns() // 1000
            if now >= st["end"] or self.client is None:
                return
            channel = (self.seq * total_lanes + self.lane) % n_channels
            self.seq += 1
            self.client.transport.write(signer.request(channel, now))
            st["sent"] += 1

        async def reconnect_and_send(self) -> None:
            try:
                await self.connect()
            except OSError as exc:
                errors.append(f"connect: {exc}")
                return
            self.send()

        def on_response(self, client: TriggerClient) -> None:
            st["answered"] += 1
            now = time.perf_counter_ns() // 1000
            if st["start"] <= now < st["end"]:
                st["answered_in_window"] += 1
            if client.errors:
                errors.extend(client.errors)
                client.errors.clear()
            if signer.close or not client.parser.should_keep_alive():
                client.transport.close()
                self.client = None
                if now < st["end"]:
                    task = loop.create_task(self.reconnect_and_send())
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                return
            self.send()

    triggers = [Lane(lane) for lane in lanes]
    for lane in triggers:
        await lane.connect()
    conn.send(("ready", {"clients": len(subs) + len(idlers), "lanes": len(triggers)}))
    _go, t_go, t_start, t_end = await recv_pipe(conn, 600)
    st["start"], st["end"] = int(t_start * 1e6), int(t_end * 1e6)
    await sleep_until(t_go)
    opened[0] = 0
    for lane in triggers:
        lane.send()
    await sleep_until(t_end + 1.5)  # answers and frames still in flight
    for lane in triggers:
        if lane.client is not None:
            lane.client.transport.close()
    everyone = subs + idlers
    ws_errors = sum(c.errors for c in everyone)
    await close_clients(everyone)
    conn.send(
        (
            "done",
            {
                "answered_in_window": st["answered_in_window"],
                "received_in_window": st["in_window"],
                "latencies_us": lat.tobytes(),
                "sent": st["sent"],
                "answered": st["answered"],
                "received": st["received"],
                "http_errors": len(errors),
                "first_http_error": errors[0] if errors else None,
                "ws_errors": ws_errors,
                "http_connections_opened": opened[0],
            },
        )
    )


def measure(args: argparse.Namespace) -> Callable[..., dict[str, Any]]:
    def run(target: Target, proc: ServerProcess, server_cpu: int | None) -> dict[str, Any]:
        workers = worker_count(args)
        subscribers = args.channels * args.subscribers
        idle = max(0, args.clients - subscribers)
        specs = [
            {
                "target": target,
                "subscriptions": c,
                "n_channels": args.channels,
                "idle": i,
                "lanes": lanes,
                "total_lanes": args.inflight,
                "pad": max(0, args.data_bytes - 16),
                "close": args.close,
                "setup_s": args.setup_seconds,
            }
            for c, i, lanes in zip(
                split(subscribers, workers),
                split(idle, workers),
                split(args.inflight, workers),
                strict=True,
            )
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
        triggers = sum(d["answered_in_window"] for d in done)
        seconds = cpu["window_s"]
        answered = sum(d["answered"] for d in done)
        received = sum(d["received"] for d in done)
        deliveries = sum(d["received_in_window"] for d in done)
        return {
            "server_cpu_us_per_trigger": per_unit_us(cpu["server_cpu_s"], triggers),
            "server_cpu_us_per_delivery": per_unit_us(cpu["server_cpu_s"], deliveries),
            "deliveries_per_s": round(deliveries / seconds) if seconds else 0,
            "triggers_per_s": round(triggers / seconds) if seconds else 0,
            **{f"trigger_to_frame_{k}": v for k, v in latency_ms(lat).items()},
            "triggers": triggers,
            "deliveries_in_window": deliveries,
            "generator_cpu_us_per_trigger": per_unit_us(cpu["generator_cpu_s"], triggers),
            "clients": sum(r["clients"] for r in ready),
            "answered_total": answered,
            "received_total": received,
            "lost": answered * args.subscribers - received,
            "http_errors": sum(d["http_errors"] for d in done),
            "first_http_error": next(
                (d["first_http_error"] for d in done if d["first_http_error"]), None
            ),
            "ws_errors": sum(d["ws_errors"] for d in done),
            # Opened after the start (soketi closes each connection after one answer).
            "http_connections_opened": sum(d["http_connections_opened"] for d in done),
            "generators": len(done),
            **cpu,
        }

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=1000, help="channels triggered, round robin")
    ap.add_argument("--subscribers", type=int, default=1, help="subscribers of each channel")
    ap.add_argument("--clients", type=int, default=5000, help="connections in all (rest idle)")
    ap.add_argument("--inflight", type=int, default=16, help="keep-alive trigger connections")
    ap.add_argument(
        "--close",
        action="store_true",
        help="a new connection for every trigger (Connection: close), for both servers",
    )
    ap.add_argument("--data-bytes", type=int, default=100, help="bytes of each event's data")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=3.0, help="triggers before the window opens")
    ap.add_argument("--setup-seconds", type=float, default=120.0, help="bound to connect all")
    add_server_args(ap)
    args = ap.parse_args()
    limit = raise_nofile()
    subscribers = args.channels * args.subscribers
    if max(args.clients, subscribers) + args.inflight + 100 > limit:
        sys.exit(f"fd hard limit {limit} is too low for {args.clients} clients")
    if args.inflight < worker_count(args):
        args.workers = args.inflight  # every generator needs a lane
    params = {
        "channels": args.channels,
        "subscribers_per_channel": args.subscribers,
        "clients": max(args.clients, subscribers),
        "inflight": args.inflight,
        "connection_close": args.close,
        "data_bytes": max(16, args.data_bytes),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "workers": worker_count(args),
    }
    result = side_by_side(
        args,
        "rest_triggers",
        params,
        measure(args),
        [
            "server_cpu_us_per_trigger",
            "server_cpu_us_per_delivery",
            "triggers_per_s",
            "deliveries_per_s",
            "trigger_to_frame_p50_ms",
            "trigger_to_frame_p99_ms",
        ],
    )
    print(json.dumps(result), flush=True)
    if any("error" in result.get(k, {}) for k in ("bastion", "soketi")):
        sys.exit(1)


if __name__ == "__main__":
    main()
