"""Load driver for the I/O stack spike (docs/decisions/0001-io-stack.md).

Starts one spike server as a subprocess (pinned to CPU 0; the driver pins itself to
CPU 1 so each side has one core), then, all on 127.0.0.1:

1. REST: keep-alive ``POST /trigger`` with no subscribers for ``--rest-seconds``, once
   over one connection (sequential) and once over ``--rest-conns`` connections;
2. RSS: the server's VmRSS before and after ``--clients`` idle WebSocket clients;
3. fan-out: ``--events`` POSTs over one keep-alive connection (next POST after the
   previous answer); each client counts received bytes -- every delivery is a frame
   of the same length, so crossing a multiple of that length is one delivery, timed
   against the send time of that event.

Prints one JSON object. Every phase is bounded in count and time.

Example::

    python bench/spike/drive.py sansio --loop uvloop --clients 5000 --events 200
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httptools
import uvloop
from websockets.frames import Frame, Opcode

HERE = Path(__file__).resolve().parent
SERVERS = {
    "aiohttp": HERE / "server_aiohttp.py",
    "sansio": HERE / "server_sansio.py",
    "picows": HERE / "server_picows.py",
}
HOST = "127.0.0.1"

# Clients never look at payload bytes once open, so they all read into one buffer.
_SHARED = memoryview(bytearray(256 * 1024))


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); index 11/12 after the comm.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def post_request(path: bytes, body: bytes) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Run:
    """Shared counters of one fan-out phase."""

    def __init__(self, frame_len: int, events: int, clients: int) -> None:
        self.frame_len = frame_len
        self.events = events
        self.expected = events * clients
        self.send_times = array.array("d", [0.0] * events)
        self.latencies = array.array("d")
        self.delivered = 0
        self.last_delivery = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_frames(self, old: int, new: int) -> None:
        now = time.perf_counter()
        send_times = self.send_times
        lat = self.latencies
        for i in range(old, min(new, self.events)):
            lat.append(now - send_times[i])
        self.delivered += new - old
        self.last_delivery = now
        if self.delivered >= self.expected and not self.done.done():
            self.done.set_result(None)


class Subscriber(asyncio.BufferedProtocol):
    """A raw WebSocket client that only receives and counts bytes."""

    __slots__ = ("frames", "handshake", "head", "is_open", "nbytes", "request", "run", "transport")

    def __init__(self, run: Run, request: bytes) -> None:
        self.run = run
        self.request = request
        self.head = bytearray()
        self.is_open = False
        self.nbytes = 0
        self.frames = 0
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError("closed during handshake"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED

    def buffer_updated(self, nbytes: int) -> None:
        if self.is_open:
            self.nbytes += nbytes
            frames = self.nbytes // self.run.frame_len
            if frames != self.frames:
                self.run.on_frames(self.frames, frames)
                self.frames = frames
            return
        self.head += _SHARED[:nbytes]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        if not self.head.startswith(b"HTTP/1.1 101"):
            self.handshake.set_exception(ConnectionError(bytes(self.head[:80]).decode("latin-1")))
            self.transport.close()
            return
        self.is_open = True
        self.handshake.set_result(None)
        # The spike servers send nothing unprompted, so any extra bytes are payload.
        self.nbytes = len(self.head) - end - 4
        self.head = bytearray()


class HttpClient(asyncio.Protocol):
    """Keep-alive HTTP/1.1 client; calls back on each complete response."""

    def __init__(self, on_response: object) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.on_response = on_response
        self.bad = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() != 200:
            self.bad += 1
        self.on_response(self)  # type: ignore[operator]


async def rest_phase(port: int, conns: int, seconds: float, max_requests: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    req = post_request(b"/trigger", b'{"name":"e","channel":"bench","data":"x"}')
    deadline = time.perf_counter() + seconds
    done = loop.create_future()
    state = {"count": 0, "open": conns, "bad": 0}

    def on_response(client: HttpClient) -> None:
        state["count"] += 1
        if time.perf_counter() < deadline and state["count"] < max_requests:
            client.transport.write(req)
            return
        state["open"] -= 1
        if state["open"] == 0 and not done.done():
            done.set_result(None)

    clients = []
    for _ in range(conns):
        _t, c = await loop.create_connection(lambda: HttpClient(on_response), HOST, port)
        clients.append(c)
    start = time.perf_counter()
    for c in clients:
        c.transport.write(req)
    await asyncio.wait_for(done, seconds + 10)
    elapsed = time.perf_counter() - start
    for c in clients:
        state["bad"] += c.bad
        c.transport.close()
    return {"requests": state["count"], "rps": state["count"] / elapsed, "non_200": state["bad"]}


async def connect_clients(
    run: Run, port: int, n: int, concurrency: int, time_limit: float
) -> list[Subscriber]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    subs: list[Subscriber] = []

    async def one() -> None:
        key = base64.b64encode(os.urandom(16))
        request = (
            b"GET /app/x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        async with sem:
            _t, sub = await loop.create_connection(lambda: Subscriber(run, request), HOST, port)
            subs.append(sub)
            await sub.handshake

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), time_limit)
    return subs


async def fanout_phase(
    run: Run, port: int, payload_for: object, time_limit: float, lanes: int = 1
) -> dict[str, float]:
    """POST every event; ``lanes`` keep-alive connections, each one event in flight.

    With more than one lane the server may handle events out of order; deliveries
    are then attributed by arrival order, so latencies are approximate by up to the
    service time of ``lanes`` events.
    """
    loop = asyncio.get_running_loop()
    sent = {"next": 0, "answered": 0}
    all_answered = loop.create_future()

    def send_next(client: HttpClient) -> None:
        i = sent["next"]
        if i >= run.events:
            return
        sent["next"] = i + 1
        body = payload_for(i)  # type: ignore[operator]
        run.send_times[i] = time.perf_counter()
        client.transport.write(post_request(b"/trigger", body))

    def on_response(client: HttpClient) -> None:
        sent["answered"] += 1
        if sent["answered"] >= run.events and not all_answered.done():
            all_answered.set_result(None)
        send_next(client)

    clients = []
    for _ in range(lanes):
        _t, c = await loop.create_connection(lambda: HttpClient(on_response), HOST, port)
        clients.append(c)
    start = time.perf_counter()
    for c in clients:
        send_next(c)
    complete = True
    try:
        await asyncio.wait_for(asyncio.gather(run.done, all_answered), time_limit)
    except TimeoutError:
        complete = False
    for c in clients:
        c.transport.close()
    end = run.last_delivery if run.delivered else time.perf_counter()
    return {
        "start": start,
        "end": end,
        "complete": complete,
        "non_200": sum(c.bad for c in clients),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    t_begin = time.perf_counter()
    cmd = [
        sys.executable,
        str(SERVERS[args.server]),
        "--loop",
        args.loop,
        "--max-seconds",
        str(args.timeout + 60),
    ]
    if args.fanout:
        cmd += ["--fanout", args.fanout]
    # Popen only starts the process; the one blocking read below runs in an executor.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
    result: dict[str, object] = {}
    subs: list[Subscriber] = []
    try:
        if args.pin and (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(proc.pid, {0})
            os.sched_setaffinity(0, {1})
        assert proc.stdout is not None
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 15)
        ports = [int(p) for p in line.split()[1:]]
        ws_port, http_port = ports[0], ports[-1]
        await asyncio.sleep(0.3)

        c0 = cpu_seconds(proc.pid)
        rest_seq = await rest_phase(http_port, 1, args.rest_seconds, 1_000_000)
        c1 = cpu_seconds(proc.pid)
        rest_conc = await rest_phase(http_port, args.rest_conns, args.rest_seconds, 1_000_000)
        c2 = cpu_seconds(proc.pid)

        pad = max(0, args.payload_bytes - len(b'{"seq":00000000,"pad":""}'))

        def payload_for(i: int) -> bytes:
            return b'{"seq":%08d,"pad":"%s"}' % (i, b"x" * pad)

        payload_len = len(payload_for(0))
        frame_len = len(Frame(Opcode.TEXT, payload_for(0)).serialize(mask=False, extensions=[]))
        run = Run(frame_len, args.events, args.clients)

        rss_before = vm_rss_kib(proc.pid)
        t0 = time.perf_counter()
        subs = await connect_clients(run, ws_port, args.clients, args.connect_concurrency, 60)
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        rss_after = vm_rss_kib(proc.pid)

        cpu_srv0, cpu_drv0 = cpu_seconds(proc.pid), time.process_time()
        remaining = max(5.0, args.timeout - (time.perf_counter() - t_begin))
        fo = await fanout_phase(run, http_port, payload_for, remaining, args.trigger_conns)
        cpu_srv1, cpu_drv1 = cpu_seconds(proc.pid), time.process_time()

        lat = sorted(run.latencies)
        elapsed = float(fo["end"]) - float(fo["start"])
        result = {
            "server": args.server,
            "loop": args.loop,
            "fanout_mode": args.fanout or "raw",
            "clients": args.clients,
            "events": args.events,
            "trigger_conns": args.trigger_conns,
            "payload_bytes": payload_len,
            "frame_bytes": frame_len,
            "deliveries": run.delivered,
            "expected_deliveries": run.expected,
            "complete": fo["complete"],
            "fanout_seconds": round(elapsed, 4),
            "deliveries_per_s": round(run.delivered / elapsed) if elapsed > 0 else 0,
            "p50_ms": round(percentile(lat, 0.50) * 1000, 2),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
            "server_cpu_s_fanout": round(cpu_srv1 - cpu_srv0, 3),
            "deliveries_per_server_cpu_s": round(run.delivered / (cpu_srv1 - cpu_srv0))
            if cpu_srv1 > cpu_srv0
            else None,
            "driver_cpu_s_fanout": round(cpu_drv1 - cpu_drv0, 3),
            "rest_seq_rps": round(rest_seq["rps"]),
            "rest_conc_rps": round(rest_conc["rps"]),
            "rest_conc_conns": args.rest_conns,
            # Per server CPU-second: steadier than wall-clock rates on a shared machine.
            "rest_seq_per_cpu_s": round(rest_seq["requests"] / (c1 - c0)) if c1 > c0 else None,
            "rest_conc_per_cpu_s": round(rest_conc["requests"] / (c2 - c1)) if c2 > c1 else None,
            "rest_non_200": rest_seq["non_200"] + rest_conc["non_200"] + fo["non_200"],
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_per_conn_kib": round((rss_after - rss_before) / args.clients, 2),
            "connect_seconds": round(connect_s, 2),
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        }
    finally:
        for s in subs:
            s.transport.close()
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(loop.run_in_executor(None, proc.wait), 10)
        except TimeoutError:
            proc.kill()
            proc.wait()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description="I/O stack spike load driver")
    ap.add_argument("server", choices=sorted(SERVERS))
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--fanout", default=None, help="server fan-out mode (default: raw)")
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--payload-bytes", type=int, default=100)
    ap.add_argument("--trigger-conns", type=int, default=1, help="fan-out triggers in flight")
    ap.add_argument("--rest-seconds", type=float, default=2.0)
    ap.add_argument("--rest-conns", type=int, default=4)
    ap.add_argument("--connect-concurrency", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=60.0, help="overall bound, seconds")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = uvloop.run(main_async(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
