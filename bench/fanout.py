"""Fan-out benchmark: N subscribers on one public channel, events via the REST API.

Default run: measure the bare floor server, then a real Bastion process, and print
ONE JSON line with Bastion's figures, the floor's, and the ratio bastion/floor.

* ``--floor``: only the floor. The floor is a bare uvloop server defined in this file
  (``--serve-floor``, run as a subprocess): the same Pusher handshake and subscribe
  flow, and on ``POST /apps/<id>/events`` it serializes the event once, frames it once
  and writes the same bytes to every subscriber's transport. It checks no signature,
  keeps no state beyond a channel -> transports map and has no limits, so it is the
  cost of the sockets plus the minimum of Python per delivery.
* ``--bastion``: only Bastion (``python -m bastion serve``).

How it measures: the server runs pinned to CPU 0, this driver to CPU 1. N raw
WebSocket clients connect, wait for ``pusher:connection_established``, subscribe
and wait for ``pusher_internal:subscription_succeeded``. Every event carries a
fixed-width sequence number, so every delivered frame has the same length; one
warm-up event learns that length, then each client only counts bytes. Each crossing
of a frame boundary is one delivery, timed against the send time of its event (the
first client parses frames, which gives the order in which the server handled the
events when several triggers are in flight). deliveries_per_s = deliveries /
(last delivery - first trigger sent). Triggers are signed Pusher REST calls sent over
``--inflight`` keep-alive connections, each sending its next event when the previous
answer arrives.

Everything is on 127.0.0.1 and bounded by ``--events`` and ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from array import array
from base64 import b64encode
from typing import Any

import httptools
import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contextlib

from _common import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    CHANNEL,
    HOST,
    Counter,
    CpuSampler,
    TriggerClient,
    bastion_server,
    close_all,
    connect_subscribers,
    cpu_seconds,
    environment,
    floor_server,
    iter_server_frames,
    pin,
    raise_nofile,
    signed_post,
)

GOAL_DELIVERIES_PER_S = 150_000
GOAL_RATIO = 0.60
WARMUP_SEQ = 99_999_999  # same width as the real sequence numbers

# =====================================================================================
# The floor server (runs in its own process via --serve-floor)
# =====================================================================================

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ESTABLISHED = json.dumps(
    {
        "event": "pusher:connection_established",
        "data": json.dumps({"socket_id": "1.1", "activity_timeout": 120}),
    },
    separators=(",", ":"),
).encode()
_HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_HTTP_404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_CHANNELS: dict[str, set[Any]] = {}


def _server_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def _unmask(key: bytes, data: bytes) -> bytes:
    n = len(data)
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big")


class FloorConnection(asyncio.Protocol):
    """HTTP (httptools) until upgraded, then a hand-rolled minimal WebSocket."""

    __slots__ = ("body", "buf", "channels", "key", "parser", "transport", "url", "ws")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.ws = False
        self.buf = bytearray()
        self.url = b""
        self.key = b""
        self.body: list[bytes] = []
        self.channels: list[str] = []

    def connection_lost(self, exc: Exception | None) -> None:
        for name in self.channels:
            _CHANNELS.get(name, set()).discard(self.transport)

    def on_message_begin(self) -> None:
        self.url = b""
        self.key = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-key":
            self.key = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return
        path = self.url.partition(b"?")[0]
        if self.parser.get_method() == b"POST" and path == f"/apps/{APP_ID}/events".encode():
            event = json.loads(b"".join(self.body))
            payload = json.dumps(
                {"event": event["name"], "channel": event["channel"], "data": event["data"]},
                separators=(",", ":"),
            ).encode()
            frame = _server_frame(payload)  # framed once ...
            for transport in _CHANNELS.get(event["channel"], ()):
                transport.write(frame)  # ... the same bytes to everyone, no await
            self.transport.write(_HTTP_OK)
        else:
            self.transport.write(_HTTP_404)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.ws:
            self.buf += data
            self._frames()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            accept = b64encode(hashlib.sha1(self.key + _GUID).digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept
                + b"\r\n\r\n"
                + _server_frame(_ESTABLISHED)
            )
            self.ws = True
            self.buf += data[exc.args[0] :]
            self._frames()
        except httptools.HttpParserError:
            self.transport.close()

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 6:
            length = buf[1] & 0x7F
            head = 2
            if length == 126:
                length = int.from_bytes(buf[2:4], "big")
                head = 4
            elif length == 127:
                length = int.from_bytes(buf[2:10], "big")
                head = 10
            if len(buf) < head + 4 + length:
                return
            opcode = buf[0] & 0x0F
            payload = _unmask(bytes(buf[head : head + 4]), bytes(buf[head + 4 : head + 4 + length]))
            del buf[: head + 4 + length]
            if opcode == 0x1:
                self._message(payload)
            elif opcode == 0x8:
                self.transport.write(_server_frame(payload[:2], 0x8))
                self.transport.close()
                return
            elif opcode == 0x9:
                self.transport.write(_server_frame(payload, 0xA))

    def _message(self, payload: bytes) -> None:
        msg = json.loads(payload)
        if msg.get("event") == "pusher:subscribe":
            name = msg["data"]["channel"]
            _CHANNELS.setdefault(name, set()).add(self.transport)
            self.channels.append(name)
            reply = {
                "event": "pusher_internal:subscription_succeeded",
                "channel": name,
                "data": "{}",
            }
            self.transport.write(_server_frame(json.dumps(reply, separators=(",", ":")).encode()))
        elif msg.get("event") == "pusher:ping":
            self.transport.write(_server_frame(b'{"event":"pusher:pong","data":"{}"}'))


async def _serve_floor(max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FloorConnection, HOST, 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"floor listening on http://{HOST}:{port}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    server.close()


# =====================================================================================
# The driver
# =====================================================================================


def signed_trigger(seq: int, pad: int, timestamp: int) -> bytes:
    """A complete signed ``POST /apps/<id>/events`` request for event ``seq``."""
    body = json.dumps(
        {"name": "e", "channel": CHANNEL, "data": f"{seq:08d}" + "x" * pad},
        separators=(",", ":"),
    ).encode()
    return signed_post(f"/apps/{APP_ID}/events", body, APP_KEY, APP_SECRET, timestamp)


async def measure(port: int, pid: int, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Connect, subscribe, calibrate, trigger; return this server's figures."""
    loop = asyncio.get_running_loop()
    n, k = args.subscribers, args.events
    counter = Counter()
    order: list[int] = []
    trace_buf = bytearray()
    learned: dict[str, int] = {}

    def on_trace(data: bytes, _n: int) -> None:
        trace_buf.extend(data)
        for opcode, payload, size in iter_server_frames(trace_buf):
            if opcode != 0x1:
                continue
            i = payload.find(b'"data":"')
            order.append(int(payload[i + 8 : i + 16]) if i >= 0 else -1)
            learned.setdefault("frame_len", size)

    t0 = time.perf_counter()
    subs = await connect_subscribers(
        port, n, counter, on_trace=on_trace, time_limit=max(5.0, deadline - time.perf_counter())
    )
    connect_s = time.perf_counter() - t0
    try:
        # --- calibrate with one warm-up event ------------------------------------------
        warm_done = loop.create_future()
        _t, warm = await loop.create_connection(
            lambda: TriggerClient(lambda c: warm_done.done() or warm_done.set_result(None)),
            HOST,
            port,
        )
        warm.transport.write(signed_trigger(WARMUP_SEQ, args.pad, int(time.time())))
        await asyncio.wait_for(warm_done, 15)
        if warm.errors:
            raise RuntimeError(f"warm-up trigger refused: {warm.errors[0]}")
        warm.transport.close()
        wait_until = time.perf_counter() + 15
        while time.perf_counter() < wait_until:
            frame_len = learned.get("frame_len")
            if frame_len and sum(s.nbytes for s in subs) >= n * frame_len:
                break
            await asyncio.sleep(0.02)
        else:
            raise RuntimeError("warm-up event did not reach every subscriber in 15 s")
        stray = [s.nbytes for s in subs if s.nbytes != frame_len]
        if stray:
            raise RuntimeError(f"{len(stray)} subscribers got unexpected bytes: {stray[:5]}")
        for s in subs:
            s.nbytes = 0
            s.frames = 0
        order.clear()
        counter.frame_len = frame_len
        counter.expected = n * k
        counter.done = loop.create_future()

        # --- trigger k events over args.inflight connections ----------------------------
        now_s = int(time.time())
        requests = [signed_trigger(i, args.pad, now_s) for i in range(k)]
        send_times = array("d", [0.0] * k)
        state = {"next": 0, "answered": 0}
        answered = loop.create_future()

        def send_next(client: TriggerClient) -> None:
            i = state["next"]
            if i < k:
                state["next"] = i + 1
                send_times[i] = time.perf_counter()
                client.transport.write(requests[i])

        def on_response(client: TriggerClient) -> None:
            state["answered"] += 1
            if state["answered"] >= k and not answered.done():
                answered.set_result(None)
            send_next(client)

        lanes = []
        for _ in range(args.inflight):
            _t, c = await loop.create_connection(lambda: TriggerClient(on_response), HOST, port)
            lanes.append(c)
        cpu_srv0, cpu_me0 = cpu_seconds(pid), time.process_time()
        machine = CpuSampler()
        start = time.perf_counter()
        for c in lanes:
            send_next(c)
        complete = True
        try:
            await asyncio.wait_for(
                asyncio.gather(counter.done, answered), max(1.0, deadline - time.perf_counter())
            )
        except TimeoutError:
            complete = False
        cpu_srv1, cpu_me1 = cpu_seconds(pid), time.process_time()
        busy = machine.since((cpu_srv1 - cpu_srv0) + (cpu_me1 - cpu_me0))
        errors = [e for c in lanes for e in c.errors]
        for c in lanes:
            c.transport.close()
    finally:
        close_all(subs)

    # --- latency: k-th frame of a subscriber belongs to event order[k] ------------------
    latencies = []
    for idx, arrived in zip(counter.frame_index, counter.arrival, strict=True):
        seq = order[idx] if idx < len(order) and 0 <= order[idx] < k else idx
        latencies.append(arrived - send_times[seq])
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2)

    end = counter.last_delivery if counter.delivered else time.perf_counter()
    elapsed = end - start
    return {
        "deliveries": counter.delivered,
        "expected_deliveries": n * k,
        "complete": complete and counter.delivered == n * k,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(counter.delivered / elapsed) if elapsed > 0 else 0,
        "events_per_s": round(counter.delivered / n / elapsed, 1) if elapsed > 0 else 0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
        "frame_bytes": frame_len,
        "trigger_errors": len(errors),
        "first_trigger_error": errors[0] if errors else None,
        "server_cpu_s": round(cpu_srv1 - cpu_srv0, 2),
        "deliveries_per_server_cpu_s": round(counter.delivered / (cpu_srv1 - cpu_srv0))
        if cpu_srv1 > cpu_srv0
        else 0,
        "driver_cpu_s": round(cpu_me1 - cpu_me0, 2),
        "connect_s": round(connect_s, 2),
        # How much else ran on the machine meanwhile: non-zero means a noisy figure.
        **busy,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over repetitions (a single run is returned as is)."""
    if len(runs) == 1:
        return dict(runs[0])
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [r[key] for r in runs if r.get(key) is not None]
            med = _median(vals)
            out[key] = round(med) if isinstance(value, int) else round(med, 2)
    out["complete"] = all(r["complete"] for r in runs)
    out["trigger_errors"] = sum(r["trigger_errors"] for r in runs)
    out["first_trigger_error"] = next(
        (r["first_trigger_error"] for r in runs if r["first_trigger_error"]), None
    )
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    max_seconds = args.max_seconds or 150.0 * args.repeat
    deadline = time.perf_counter() + max_seconds
    server_cpu = 0 if args.pin and pin(0, 1) else None  # driver on CPU 1, server on CPU 0
    out: dict[str, Any] = {
        "subscribers": args.subscribers,
        "events": args.events,
        "inflight": args.inflight,
        "repeat": args.repeat,
        "data_bytes": 8 + args.pad,
    }
    floors: list[dict[str, Any]] = []
    bastions: list[dict[str, Any]] = []

    async def one(kind: str) -> None:
        if kind == "floor":
            with floor_server(server_cpu) as (proc, port):
                floors.append(await measure(port, proc.pid, args, deadline))
            return
        with bastion_server(server_cpu) as (proc, port):
            try:
                bastions.append(await measure(port, proc.pid, args, deadline))
            except Exception as exc:
                out["error"] = f"bastion: {type(exc).__name__}: {exc}"
                out["bastion_stderr_tail"] = proc.stderr_tail(1500)

    kinds = {"both": ["floor", "bastion"], "floor": ["floor"], "bastion": ["bastion"]}[args.mode]
    for rep in range(args.repeat):
        # Alternate the order so neither server always runs on a "fresh" machine.
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            await one(kind)
            if "error" in out:
                break
        if "error" in out:
            break

    floor = _summary(floors) if floors else None
    bastion = _summary(bastions) if bastions else None
    main = floor if args.mode == "floor" else bastion
    out["server"] = "floor" if args.mode == "floor" else "bastion"
    if main is not None:
        out.update(main)
    else:
        out.update({"deliveries": 0, "deliveries_per_s": 0, "p50_ms": None, "p99_ms": None})
    if floor is not None:
        for key in ("deliveries_per_s", "deliveries_per_server_cpu_s", "p50_ms", "p99_ms"):
            out[f"floor_{key}"] = floor[key]
        out["floor_complete"] = floor["complete"]
    else:
        out["floor_deliveries_per_s"] = None
    out["ratio"] = out["ratio_cpu"] = None
    if bastion is not None and floor is not None and floor["deliveries_per_s"]:
        # Wall-clock ratio (the goal), and the same per server CPU-second, which is
        # steadier when the machine is shared.
        out["ratio"] = round(bastion["deliveries_per_s"] / floor["deliveries_per_s"], 3)
        out["ratio_cpu"] = round(
            bastion["deliveries_per_server_cpu_s"] / floor["deliveries_per_server_cpu_s"], 3
        )
    if args.repeat > 1:
        out["runs_deliveries_per_s"] = {
            "bastion": [r["deliveries_per_s"] for r in bastions],
            "floor": [r["deliveries_per_s"] for r in floors],
        }
    if bastion is not None:
        out["goals"] = {
            "deliveries_per_s": GOAL_DELIVERIES_PER_S,
            "ratio": GOAL_RATIO,
            "deliveries_per_s_met": bastion["deliveries_per_s"] >= GOAL_DELIVERIES_PER_S,
            "ratio_met": None if out["ratio"] is None else out["ratio"] >= GOAL_RATIO,
        }
    out["pinned"] = server_cpu is not None
    out["loadavg_1m_end"] = os.getloadavg()[0]
    out.update(environment(sys.argv))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=5000)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--inflight", type=int, default=2, help="concurrent trigger connections")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; medians")
    ap.add_argument("--pad", type=int, default=92, help="filler bytes in each event's data")
    ap.add_argument(
        "--max-seconds", type=float, default=None, help="bound for the whole run (150 s x repeat)"
    )
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin to CPUs")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--floor", dest="mode", action="store_const", const="floor")
    group.add_argument("--bastion", dest="mode", action="store_const", const="bastion")
    group.add_argument("--serve-floor", dest="mode", action="store_const", const="serve-floor")
    ap.set_defaults(mode="both")
    args = ap.parse_args()
    raise_nofile()
    if args.mode == "serve-floor":
        uvloop.run(_serve_floor(max_seconds=600))
        return
    result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
