"""Helpers shared by bench/fanout.py and bench/connections.py.

Process management for the server under test (a real Bastion or the bare floor in
fanout.py), /proc readers, and a raw Pusher WebSocket subscriber that, once
subscribed, only counts received bytes (every benchmark delivery has the same length).

Everything talks to 127.0.0.1 only, and every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import multiprocessing
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import uvloop
from websockets.frames import Frame, Opcode

HOST = "127.0.0.1"
APP_ID = "1"
APP_KEY = "bench-key"
APP_SECRET = "bench-secret-0123456789abcdef"
CHANNEL = "bench"
BENCH_DIR = Path(__file__).resolve().parent
_TMP = Path(tempfile.gettempdir())

CONFIG_TOML = f"""\
[server]
host = "{HOST}"
port = 0

# Every client of a benchmark is on loopback: the per-address limits would measure
# themselves, not the server, so they are raised out of the way (and noted in the README).
[security]
max_connections_per_ip = 1000000
new_connections_per_ip = {{ rate = 1000000, burst = 1000000 }}
rest_requests_per_ip = {{ rate = 1000000, burst = 1000000 }}

[audit]
path = "{_TMP / "bastion-bench-audit.sqlite3"}"

[security.reputation]
store_path = "{_TMP / "bastion-bench-blocks.sqlite3"}"

[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"
# soketi's defaults, so the side-by-side benchmarks load both servers alike: client
# events on and not rate limited (soketi: -1; nor is any inbound message, so the
# per-connection message budget is raised too: a ping-pong pair sends ~50 a second
# each way, the default budget's rate), and a replay guard large enough for the
# tens of thousands of distinct signed triggers one REST run sends within 600 s.
enable_client_messages = true
max_client_events_per_second = 1000000
max_messages_per_second = {{ rate = 1000000, burst = 1000000 }}
replay_guard_max_entries = 1000000
"""

# Subscribers read into one shared buffer: once subscribed they never look at the bytes.
_SHARED = memoryview(bytearray(256 * 1024))


# --- process helpers -----------------------------------------------------------------


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard limit; return the new limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpu: int) -> bool:
    """Pin a process to one CPU when the machine has at least two; say if it did."""
    if (os.cpu_count() or 1) < 2:
        return False
    os.sched_setaffinity(pid, {cpu})
    return True


def environment(argv: list[str]) -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(terse=True),
        },
        "command": shlex.join(["python", *argv]),
    }


class ServerProcess:
    """A server subprocess whose stdout is drained in a thread (so it never blocks)."""

    def __init__(
        self,
        cmd: list[str],
        ready_prefix: str,
        cpu: int | None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cmd = cmd
        self.ready_prefix = ready_prefix  # found anywhere in a line (soketi colours its own)
        self.cpu = cpu
        self.env = env or {}
        # Lives as long as the server: stderr goes to a file so a pipe can never fill.
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115
        self.lines: deque[str] = deque(maxlen=50)
        self._ready = threading.Event()
        self.ready_line = ""
        self.proc: subprocess.Popen[str] | None = None
        self.gc_probe: str | None = None  # the GC probe's output file, when started with one

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self._ready.is_set() and self.ready_prefix in line:
                self.ready_line = line.strip()
                self._ready.set()

    def start(self, timeout: float = 30.0) -> str:
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        if self.cpu is not None:
            pin(self.proc.pid, self.cpu)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.stderr_tail()
                self.stop()
                raise RuntimeError(
                    f"server did not print {self.ready_prefix!r}: {shlex.join(self.cmd)}\n{err}"
                )
        return self.ready_line

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_tail(self, limit: int = 4000) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")[-limit:]

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def bastion_server(cpu: int | None, config: str = CONFIG_TOML, gc_probe: str | None = None):
    """Start `python -m bastion serve` on a temp config; yield (process, port).

    With ``gc_probe`` (a file path) the server is started through
    ``bench/_gc_probe.py``, which times every garbage collection of the server
    process and appends JSON lines to that file.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config)
        path = f.name
    launcher = ["-m", "bastion"]
    env = {}
    if gc_probe is not None:
        launcher = [str(BENCH_DIR / "_gc_probe.py")]
        env["BENCH_GC_PROBE_FILE"] = gc_probe
    server = ServerProcess(
        [sys.executable, *launcher, "serve", "--config", path],
        "bastion listening on http://",
        cpu,
        env,
    )
    server.gc_probe = gc_probe
    try:
        line = server.start()
        port = int(line.rsplit(":", 1)[1].strip("/"))
        yield server, port
    finally:
        server.stop()
        os.unlink(path)


@contextlib.contextmanager
def floor_server(cpu: int | None):
    """Start the bare floor server from fanout.py; yield (process, port)."""
    server = ServerProcess(
        [sys.executable, str(BENCH_DIR / "fanout.py"), "--serve-floor"],
        "floor listening on http://",
        cpu,
    )
    try:
        line = server.start()
        yield server, int(line.rsplit(":", 1)[1].strip("/"))
    finally:
        server.stop()


# --- WebSocket subscriber ------------------------------------------------------------


def iter_server_frames(buf: bytearray) -> list[tuple[int, bytes, int]]:
    """Remove complete unmasked frames from ``buf``; return (opcode, payload, size)."""
    out: list[tuple[int, bytes, int]] = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if n - pos < 4:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if n - pos < 10:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if b1 & 0x80:
            head += 4  # a server must not mask, but skip the key if one does
        if n - pos < head + length:
            break
        out.append((b0 & 0x0F, bytes(buf[pos + head : pos + head + length]), head + length))
        pos += head + length
    del buf[:pos]
    return out


def masked_text_frame(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=True, extensions=[])


def subscribe_frame(channel: str) -> bytes:
    return masked_text_frame(
        json.dumps({"event": "pusher:subscribe", "data": {"channel": channel}}).encode()
    )


SUBSCRIBE = subscribe_frame(CHANNEL)
WS_PATH = f"/app/{APP_KEY}?protocol=7&client=bench&version=1.0"


class Counter:
    """Delivery accounting shared by all subscribers of one run."""

    def __init__(self) -> None:
        self.frame_len = 1 << 62  # unknown until calibrated: no boundary is ever crossed
        self.delivered = 0
        self.expected = 0
        self.last_delivery = 0.0
        self.frame_index = array("l")  # k-th delivery of some subscriber ...
        self.arrival = array("d")  # ... seen at this perf_counter time
        self.done: asyncio.Future[None] | None = None

    def on_frames(self, old: int, new: int) -> None:
        now = time.perf_counter()
        self.frame_index.extend(range(old, new))
        self.arrival.extend([now] * (new - old))
        self.delivered += new - old
        self.last_delivery = now
        if self.delivered >= self.expected and self.done is not None and not self.done.done():
            self.done.set_result(None)


class Subscriber(asyncio.BufferedProtocol):
    """Pusher client: handshake, wait for connection_established, subscribe, count.

    With ``trace=True`` it also parses every delivered frame and records the sequence
    number in its data, giving the order in which the server processed the events
    (every subscriber of a single-threaded server sees the same order).
    """

    __slots__ = (
        "buf",
        "counter",
        "counting",
        "frames",
        "nbytes",
        "on_trace",
        "ready",
        "request",
        "stage",
        "subscribe",
        "transport",
    )

    def __init__(
        self,
        counter: Counter,
        on_trace: Callable[[bytes, int], None] | None = None,
        subscribe: bytes = SUBSCRIBE,
    ) -> None:
        self.counter = counter
        self.on_trace = on_trace
        self.subscribe = subscribe
        key = base64.b64encode(os.urandom(16))
        self.request = (
            (
                f"GET {WS_PATH} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: "
            ).encode()
            + key
            + b"\r\n\r\n"
        )
        self.buf = bytearray()
        self.stage = 0  # 0 handshake, 1 wait established, 2 wait subscribed, 3 counting
        self.counting = False
        self.nbytes = 0
        self.frames = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed at stage {self.stage}: {exc}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED

    def buffer_updated(self, nbytes: int) -> None:
        if self.counting:
            self.nbytes += nbytes
            if self.on_trace is not None:
                self.on_trace(bytes(_SHARED[:nbytes]), nbytes)
            frames = self.nbytes // self.counter.frame_len
            if frames != self.frames:
                self.counter.on_frames(self.frames, frames)
                self.frames = frames
            return
        self.buf += _SHARED[:nbytes]
        self._setup()

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        self.transport.close()

    def _setup(self) -> None:
        if self.stage == 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                self._fail(bytes(self.buf[:200]).decode("latin-1"))
                return
            del self.buf[: end + 4]
            self.stage = 1
        for opcode, payload, _size in iter_server_frames(self.buf):
            if opcode == 0x8:
                self._fail(f"close frame {payload[:2].hex()} {payload[2:]!r}")
                return
            if opcode != 0x1:
                continue
            if b'"pusher:error"' in payload:
                self._fail(payload.decode("utf-8", "replace"))
                return
            if self.stage == 1 and b'"pusher:connection_established"' in payload:
                self.transport.write(self.subscribe)
                self.stage = 2
            elif self.stage == 2 and b'"pusher_internal:subscription_succeeded"' in payload:
                self.stage = 3
        if self.stage == 3:
            self.counting = True
            leftover = bytes(self.buf)
            self.buf = bytearray()
            self.ready.set_result(None)
            if leftover:
                self.nbytes += len(leftover)
                if self.on_trace is not None:
                    self.on_trace(leftover, len(leftover))


async def connect_subscribers(
    port: int,
    n: int,
    counter: Counter,
    *,
    concurrency: int = 200,
    time_limit: float = 60.0,
    on_trace: Callable[[bytes, int], None] | None = None,
    channels: int = 1,
) -> list[Subscriber]:
    """Open ``n`` subscribed clients (the first one traced); raise on any failure.

    With ``channels`` > 1, client i subscribes to ``bench-<i % channels>`` instead of
    the one shared channel.
    """
    frames = [SUBSCRIBE]
    if channels > 1:
        frames = [subscribe_frame(f"{CHANNEL}-{c}") for c in range(channels)]
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    subs: list[Subscriber] = []

    async def one(i: int) -> None:
        trace = on_trace if i == 0 else None
        async with sem:
            sub_frame = frames[i % len(frames)]
            _t, sub = await loop.create_connection(
                lambda: Subscriber(counter, trace, sub_frame), HOST, port
            )
            subs.append(sub)
            await sub.ready

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), time_limit)
    except BaseException:
        for t in tasks:
            t.cancel()
        for s in subs:
            s.transport.close()
        raise
    # Keep the traced client first so callers can find it.
    subs.sort(key=lambda s: s.on_trace is None)
    return subs


def close_all(subs: list[Subscriber]) -> None:
    for s in subs:
        s.transport.close()


class CpuSampler:
    """Machine-wide CPU accounting from /proc/stat, to tell how busy the box was."""

    _FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

    def __init__(self) -> None:
        self.start = self._read()

    @classmethod
    def _read(cls) -> dict[str, float]:
        with open("/proc/stat") as f:
            values = f.readline().split()[1 : 1 + len(cls._FIELDS)]
        tick = os.sysconf("SC_CLK_TCK")
        return {k: int(v) / tick for k, v in zip(cls._FIELDS, values, strict=True)}

    def since(self, our_cpu_s: float) -> dict[str, float]:
        """Seconds of CPU used on the machine since start, minus ``our_cpu_s``."""
        end = self._read()
        d = {k: end[k] - self.start[k] for k in self._FIELDS}
        busy = d["user"] + d["nice"] + d["system"] + d["irq"]
        return {
            "other_processes_cpu_s": round(max(0.0, busy - our_cpu_s), 2),
            "softirq_s": round(d["softirq"], 2),
            "steal_s": round(d["steal"], 2),
            "idle_s": round(d["idle"], 2),
        }


# --- several worker processes (bench/cluster.py) ------------------------------------


def cluster_config(redis_url: str, prefix: str) -> str:
    """:data:`CONFIG_TOML` with the Redis adapter (``prefix`` keeps runs apart)."""
    return CONFIG_TOML.replace(
        "\n[[apps]]",
        f'\n[adapter]\ndriver = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n\n[[apps]]',
        1,
    )


@contextlib.contextmanager
def bastion_workers(workers: int, config: str = CONFIG_TOML):
    """Start `python -m bastion serve --workers N`; yield (process, port, worker PIDs).

    With one worker there is no supervisor: the server process is the worker.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config)
        path = f.name
    cmd = [sys.executable, "-m", "bastion", "serve", "--config", path]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    server = ServerProcess(cmd, "bastion listening on http://", None)
    try:
        line = server.start()
        port = int(line.rsplit(":", 1)[1].strip("/"))
        pids = [server.pid]
        if workers > 1:
            # The supervisor logs each worker's PID before it prints the listening line.
            log = server.stderr_tail(1 << 20)
            pids = [
                int(log.split(f"worker {i} listening (pid ", 1)[1].split(")", 1)[0])
                for i in range(workers)
            ]
        yield server, port, pids
    finally:
        server.stop(timeout=40.0)
        os.unlink(path)


def connection_owners(server_port: int, pids: list[int]) -> dict[int, int]:
    """Client port -> PID of the process holding the server side of that connection.

    Read from the kernel: the server side of each loopback connection to
    ``server_port`` in /proc/net/tcp, its socket inode in one process's /proc/PID/fd.
    """
    inode_of: dict[str, int] = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port:
                inode_of[fields[9]] = int(remote.rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target.startswith("socket:["):
                    client_port = inode_of.get(target[8:-1])
                    if client_port is not None:
                        owners[client_port] = pid
    return owners


def local_port(transport: asyncio.BaseTransport) -> int:
    return int(transport.get_extra_info("sockname")[1])


# =====================================================================================
# Side by side with a peer server (client_events, rest_triggers, connect_storm, soak)
# =====================================================================================
#
# The benchmarks below run the same load against Bastion and against soketi 1.6.1
# (installed by /work/shared/peers/install-soketi.sh), one server after the other, and
# measure the server's CPU time per unit of work. The load is generated by separate
# processes (a `Fleet`), so their CPU is never counted as the server's; their own CPU
# is measured too, to tell when the generator, not the server, was the limit.

PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/tmp/bastion-peers"))
SOKETI_START = PEERS_DIR / "start-soketi.sh"
SOKETI_APP = ("12345", "peer-key", "peer-secret")  # what start-soketi.sh configures
SERVER_KINDS = ("bastion", "soketi")
#: What --server may name: the two servers, or the bare floor of fanout.py (a
#: handshake, connection_established, public subscribe, ping and close, no checks).
SERVER_CHOICES = (*SERVER_KINDS, "floor")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, object]:
    """nproc, CPU model, memory and load average: what the figures depend on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "loadavg": loadavg(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Target:
    """A running server under test, as the load generators need to know it."""

    kind: str  # "bastion" or "soketi"
    port: int
    pid: int
    app_id: str
    key: str
    secret: str

    @property
    def ws_path(self) -> str:
        return f"/app/{self.key}?protocol=7&client=bench&version=1.0"


@contextlib.contextmanager
def soketi_server(cpu: int | None) -> Iterator[tuple[ServerProcess, int]]:
    """Start soketi through the peers' start script on a free port; yield (process, port).

    The script ``exec``s node, so the PID is node's and its CPU is soketi's. Its
    metrics listener and its UDP discovery get free ports of their own, so a soketi
    someone else runs on this machine can neither collide with nor join this one.
    """
    if not SOKETI_START.exists():
        raise RuntimeError(f"{SOKETI_START} missing: run /work/shared/peers/install-soketi.sh")
    port = free_port()
    env = {
        "SOKETI_METRICS_HOST": HOST,
        "SOKETI_METRICS_SERVER_PORT": str(free_port()),
        "SOKETI_CLUSTER_HOST": HOST,
        "SOKETI_CLUSTER_PORT": str(free_port()),
        "SOKETI_CLUSTER_BROADCAST_ADDRESS": "127.255.255.255",
        "SOKETI_SHUTDOWN_GRACE_PERIOD": "200",
    }
    server = ServerProcess([str(SOKETI_START), str(port)], "Server is up and running", cpu, env)
    try:
        server.start(timeout=60.0)
        deadline = time.monotonic() + 10
        while True:  # the line is printed from the listen callback; make sure anyway
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"soketi does not accept on {port}")
            time.sleep(0.05)
        yield server, port
    finally:
        server.stop()


@contextlib.contextmanager
def serve(
    kind: str, cpu: int | None, gc_probe: str | None = None
) -> Iterator[tuple[ServerProcess, Target]]:
    """Start a server of ``kind`` (one of SERVER_CHOICES); yield (process, target)."""
    if kind == "bastion":
        with bastion_server(cpu, gc_probe=gc_probe) as (proc, port):
            yield proc, Target(kind, port, proc.pid, APP_ID, APP_KEY, APP_SECRET)
    elif kind == "soketi":
        with soketi_server(cpu) as (proc, port):
            yield proc, Target(kind, port, proc.pid, *SOKETI_APP)
    elif kind == "floor":
        with floor_server(cpu) as (proc, port):
            yield proc, Target(kind, port, proc.pid, APP_ID, APP_KEY, APP_SECRET)
    else:
        raise ValueError(f"unknown server kind {kind!r}")


# --- signing (what an app server / an official server SDK does) -----------------------


def channel_auth(
    target: Target, socket_id: str, channel: str, channel_data: str | None = None
) -> str:
    """The ``auth`` value of a private/presence subscribe, ``key:hex hmac``."""
    message = (
        f"{socket_id}:{channel}"
        if channel_data is None
        else (f"{socket_id}:{channel}:{channel_data}")
    )
    digest = hmac.new(target.secret.encode(), message.encode(), hashlib.sha256).hexdigest()
    return f"{target.key}:{digest}"


def signed_post(path: str, body: bytes, key: str, secret: str, timestamp: int) -> bytes:
    """A complete signed HTTP/1.1 POST, as the official server SDKs sign it.

    Query parameters auth_key, auth_timestamp, auth_version=1.0 and body_md5, sorted,
    then auth_signature = HMAC-SHA256(secret, "POST\\n<path>\\n<query>").
    """
    params = {
        "auth_key": key,
        "auth_timestamp": str(timestamp),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    to_sign = f"POST\n{path}\n{query}".encode()
    signature = hmac.new(secret.encode(), to_sign, hashlib.sha256).hexdigest()
    return (
        f"POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\n"
        f"Host: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def signed_trigger_for(target: Target, channel: str, data: str, name: str = "bench-event") -> bytes:
    """``POST /apps/<id>/events`` with ``channels: [channel]``, as the SDKs send it."""
    body = json.dumps(
        {"name": name, "channels": [channel], "data": data}, separators=(",", ":")
    ).encode()
    return signed_post(
        f"/apps/{target.app_id}/events", body, target.key, target.secret, int(time.time())
    )


class TriggerClient(asyncio.Protocol):
    """Keep-alive HTTP client; calls ``on_response(self)`` after each full response."""

    def __init__(self, on_response: Callable[[TriggerClient], None]) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.on_response = on_response
        self.errors: list[str] = []
        self.body = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = bytearray()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status != 200:
            self.errors.append(f"{status} {bytes(self.body[:200]).decode('utf-8', 'replace')}")
        self.on_response(self)


# --- a Pusher client on a raw socket ---------------------------------------------------

_ZERO_KEY = b"\0\0\0\0"


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame with the all-zero masking key.

    RFC 6455 only says a client's key must be unpredictable (a browser defence, which
    servers do not and cannot check); with zero the payload needs no XOR here, while
    the server still unmasks as always. It keeps the generator cheap, not the server.
    """
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _ZERO_KEY + payload


CLOSE_FRAME = client_frame((1000).to_bytes(2, "big"), 0x8)
PONG_EVENT = client_frame(b'{"event":"pusher:pong","data":{}}')


def now_us() -> int:
    """CLOCK_MONOTONIC in microseconds: the same clock in every process of the machine."""
    return time.perf_counter_ns() // 1000


class PusherClient(asyncio.Protocol):
    """Handshake, ``connection_established``, subscribe (signing its own auth), then relay.

    ``channels`` is a list of ``(name, channel_data)``; private and presence channels
    are signed with the target's secret, as an app's auth endpoint would. Once every
    subscription succeeded, each text frame is handed to ``on_message(client,
    payload)``, except ``pusher:ping`` (answered) and ``pusher:error`` (counted).
    WebSocket pings are answered with pongs (soketi's uWebSockets sends them).
    """

    def __init__(
        self,
        target: Target,
        channels: Sequence[tuple[str, str | None]] = (),
        on_message: Callable[[PusherClient, bytes], None] | None = None,
        tag: int = 0,
    ) -> None:
        self.target = target
        self.channels = channels
        self.on_message = on_message
        self.tag = tag
        self.buf = b""
        self.stage = 0  # 0 handshake, 1 wait established, 2 subscribing, 3 open
        self.pending = 0
        self.socket_id = ""
        self.errors = 0
        self.last_error = ""
        self.closing = False
        self.t_start = time.perf_counter()
        self.t_established = 0.0
        self.t_ready = 0.0
        loop = asyncio.get_running_loop()
        self.established: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    # asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(  # type: ignore[attr-defined]
            (
                f"GET {self.target.ws_path} HTTP/1.1\r\nHost: {HOST}:{self.target.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.stage = 4
        why = ConnectionError(f"closed before ready: {exc or 'EOF'} {self.last_error}")
        for fut in (self.established, self.ready):
            if not fut.done():
                fut.set_exception(why)
                fut.exception()  # retrieved: nobody may be waiting any more
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.stage == 0:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self._fail(data[:200].decode("latin-1"))
                return
            data = data[end + 4 :]
            self.stage = 1
        pos = 0
        n = len(data)
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > n:
                break
            opcode = data[pos] & 0x0F
            payload = data[pos + head : end]
            pos = end
            if opcode == 0x1:
                if self.stage == 3 and b'"pusher:' not in payload:
                    if self.on_message is not None:
                        self.on_message(self, payload)
                else:
                    self._system(payload)
            elif opcode == 0x9:
                self.transport.write(client_frame(payload, 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                # The server closes the TCP connection first (RFC 6455 §7.1.1), so the
                # TIME_WAIT is its own and this side's ports are free again at once.
                if not self.closing:
                    self.last_error = f"close {payload[:2].hex()} {payload[2:80]!r}"
                    self.closing = True
                    self.transport.write(client_frame(payload[:2], 0x8))  # type: ignore[union-attr]
                return
        if pos < n:
            self.buf = data[pos:]

    # Pusher ----------------------------------------------------------------------
    def _system(self, payload: bytes) -> None:
        if b'"pusher:ping"' in payload:
            self.transport.write(PONG_EVENT)  # type: ignore[union-attr]
            return
        if b'"pusher:error"' in payload or b'"pusher:subscription_error"' in payload:
            self.errors += 1
            self.last_error = payload[:300].decode("utf-8", "replace")
            if self.stage < 3:
                self._fail(self.last_error)
            return
        if self.stage == 3:
            if self.on_message is not None:
                self.on_message(self, payload)
            return
        msg = json.loads(payload)
        event = msg.get("event")
        if event == "pusher:connection_established" and self.stage == 1:
            data = msg["data"]
            self.socket_id = (json.loads(data) if isinstance(data, str) else data)["socket_id"]
            self.t_established = time.perf_counter()
            self.established.set_result(None)
            if self.channels:
                self.stage = 2
                self.pending = len(self.channels)
                self.transport.write(  # type: ignore[union-attr]
                    b"".join(self.subscribe_frame(c, d) for c, d in self.channels)
                )
            else:
                self._open()
        elif event == "pusher_internal:subscription_succeeded" and self.stage == 2:
            self.pending -= 1
            if self.pending == 0:
                self._open()

    def _open(self) -> None:
        self.stage = 3
        self.t_ready = time.perf_counter()
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, why: str) -> None:
        self.last_error = why
        for fut in (self.established, self.ready):
            if not fut.done():
                fut.set_exception(ConnectionError(why))
                fut.exception()
        if self.transport is not None:
            self.transport.close()

    def subscribe_frame(self, channel: str, channel_data: str | None = None) -> bytes:
        data: dict[str, str] = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            data["auth"] = channel_auth(self.target, self.socket_id, channel, channel_data)
        if channel_data is not None:
            data["channel_data"] = channel_data
        return client_frame(
            json.dumps({"event": "pusher:subscribe", "data": data}, separators=(",", ":")).encode()
        )

    def send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def close(self) -> asyncio.Future[None]:
        """Close handshake: send a close frame and let the server close the TCP first."""
        if not self.closing and self.transport is not None and not self.transport.is_closing():
            self.closing = True
            self.transport.write(CLOSE_FRAME)
        return self.closed

    def abort(self) -> None:
        """Drop the connection without a close frame (a network drop, as a server sees it)."""
        if self.transport is not None:
            self.transport.abort()


async def open_clients(
    target: Target,
    specs: Sequence[tuple[Sequence[tuple[str, str | None]], Callable[..., None] | None]],
    concurrency: int = 200,
    time_limit: float = 120.0,
) -> list[PusherClient]:
    """Open one :class:`PusherClient` per ``(channels, on_message)``; wait until ready.

    Clients come back in the order of ``specs`` (``tag`` is the index). Raises on the
    first failure, after closing every client already open.
    """
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    clients: list[PusherClient | None] = [None] * len(specs)

    async def one(i: int) -> None:
        channels, on_message = specs[i]
        async with sem:
            _t, client = await loop.create_connection(
                lambda: PusherClient(target, channels, on_message, i), HOST, target.port
            )
            clients[i] = client
            await client.ready

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(specs))]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), time_limit)
    except BaseException:
        for t in tasks:
            t.cancel()
        for c in clients:
            if c is not None:
                c.abort()
        raise
    return [c for c in clients if c is not None]


async def close_clients(clients: Sequence[PusherClient], wait_s: float = 5.0) -> None:
    """Close handshake for every client; abort those the server did not close in time."""
    waits = [c.close() for c in clients]
    if waits:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), wait_s)
    for c in clients:
        if not c.closed.done():
            c.abort()


# --- load-generator processes ---------------------------------------------------------


def _fleet_main(fn: Callable[[Any, Any], Any], conn: Any, spec: Any) -> None:
    raise_nofile()
    try:
        uvloop.run(fn(conn, spec))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise


class Fleet:
    """Load-generator processes (multiprocessing, spawn) driven over pipes.

    Each runs ``fn(conn, spec)`` (a coroutine function) under uvloop. The protocol is
    the benchmark's own; by convention a worker sends ``("ready", info)`` once its
    clients are connected, waits for ``("go", t_go, t_start, t_end)`` (perf_counter
    instants: CLOCK_MONOTONIC is one clock for every process of the machine), and
    sends ``("done", result)``. A worker that raises sends ``("error", traceback)``.
    """

    def __init__(
        self, fn: Callable[[Any, Any], Any], specs: Sequence[Any], cpus: set[int] | None
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_fleet_main, args=(fn, child, spec), daemon=True)
            proc.start()
            child.close()
            if cpus:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(proc.pid, cpus)
            self.procs.append(proc)
            self.conns.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send_all(self, message: Any) -> None:
        for conn in self.conns:
            conn.send(message)

    def recv_all(self, expect: str, timeout: float) -> list[Any]:
        """One message from each worker, of kind ``expect``; raise on error or timeout."""
        deadline = time.monotonic() + timeout
        out = []
        for i, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"generator {i} sent no {expect!r} in {timeout:.0f} s")
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"generator {i} failed:\n{value}")
            if kind != expect:
                raise RuntimeError(f"generator {i} sent {kind!r}, expected {expect!r}")
            out.append(value)
        return out

    def close(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()  # our own child, by its PID
                proc.join(5)
        for conn in self.conns:
            conn.close()


async def recv_pipe(conn: Any, wait_s: float | None = None) -> Any:
    """Await the next message on a multiprocessing pipe without blocking the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        if not conn.poll():
            await asyncio.wait_for(fut, wait_s)
    finally:
        loop.remove_reader(fd)
        os.set_blocking(fd, True)  # the loop made it non-blocking; pipes need blocking
    return conn.recv()


async def sleep_until(instant: float) -> None:
    await asyncio.sleep(max(0.0, instant - time.perf_counter()))


def generator_cpus(server_cpu: int | None) -> set[int] | None:
    """Every CPU but the server's (None: not pinned)."""
    if server_cpu is None:
        return None
    return set(range(os.cpu_count() or 1)) - {server_cpu}


def split(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous ranges of near-equal size."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


class Window:
    """CPU accounting of the server, the generators and the rest of the machine."""

    def __init__(self, server_pid: int, generator_pids: Sequence[int]) -> None:
        self.server_pid = server_pid
        self.generator_pids = list(generator_pids)
        self.t0 = time.perf_counter()
        self.server0 = cpu_seconds(server_pid)
        self.gen0 = [cpu_seconds(p) for p in self.generator_pids]
        self.me0 = time.process_time()
        self.machine = CpuSampler()
        self.loadavg0 = loadavg()

    def close(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t0
        server = cpu_seconds(self.server_pid) - self.server0
        gens = [cpu_seconds(p) - c for p, c in zip(self.generator_pids, self.gen0, strict=True)]
        me = time.process_time() - self.me0
        busy = self.machine.since(server + sum(gens) + me)
        busiest = max(gens, default=0.0) / seconds if seconds > 0 else 0.0
        return {
            "window_s": round(seconds, 3),
            "server_cpu_s": round(server, 3),
            "server_cpu_share": round(server / seconds, 3) if seconds > 0 else None,
            "generator_cpu_s": round(sum(gens), 3),
            "generator_cpu_share_per_process": [round(g / seconds, 3) for g in gens],
            # One generator process at >= 90 % of a core could not have gone faster.
            "generator_bottleneck": busiest >= 0.9,
            # Idle CPU left on the machine: near 0 means everything, the generator and
            # the server included, waited for a core (other work on a shared box).
            "machine_idle_share": round(busy["idle_s"] / (seconds * (os.cpu_count() or 1)), 3)
            if seconds > 0
            else None,
            "rss_kib": vm_rss_kib(self.server_pid),
            "loadavg_start": self.loadavg0,
            "loadavg_end": loadavg(),
            **busy,
        }


# --- figures --------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def latency_ms(values_us: Sequence[int]) -> dict[str, float | None]:
    """p50 / p99 / max of microsecond latencies, in milliseconds."""
    if not values_us:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values_us)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 3)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] / 1000, 3)}


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure over the runs without an error; other keys from
    the first such run. ``runs_ok`` counts them."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0].get("error") if runs else "no run", "runs_ok": 0}
    out: dict[str, Any] = {}
    for key, value in good[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out[key] = value
            if isinstance(value, bool):
                out[key] = any(r.get(key) for r in good)  # e.g. a bottleneck in any run
            continue
        vals = [r[key] for r in good if isinstance(r.get(key), (int, float))]
        med = median(vals)
        out[key] = round(med) if isinstance(value, int) else round(med, 3)
    out["runs_ok"] = len(good)
    return out


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The options every side-by-side benchmark shares."""
    ap.add_argument(
        "--server", choices=SERVER_CHOICES, default="bastion", help="measure this server only"
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run the bare floor server each round (connect storms: what uvloop and "
        "httptools alone cost), and print Bastion / floor",
    )
    ap.add_argument(
        "--compare",
        "--peer",
        dest="compare",
        choices=["soketi"],
        default=None,
        help="run the same load against Bastion, then soketi; print both and the ratio",
    )
    ap.add_argument("--repeat", type=int, default=1, help="(Bastion, soketi) rounds; medians")
    ap.add_argument("--workers", type=int, default=0, help="generator processes (0: auto)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin to CPUs")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each run, wait until this share of the machine's CPU is idle (0: never)",
    )
    ap.add_argument("--wait-max", type=float, default=300.0, help="longest such wait, seconds")


def wait_for_quiet(idle_share: float, max_wait: float, probe_s: float = 2.0) -> dict[str, Any]:
    """Wait (bounded) until the machine's idle share over ``probe_s`` reaches ``idle_share``.

    On a shared machine, other people's test suites come and go; starting a run in a
    lull makes its figures less noisy. Returns how long it waited and the idle share
    it last saw.
    """
    t0 = time.monotonic()
    seen = None
    while True:
        sampler = CpuSampler()
        time.sleep(probe_s)
        busy = sampler.since(0.0)
        total = busy["idle_s"] + busy["other_processes_cpu_s"] + busy["softirq_s"]
        seen = round(busy["idle_s"] / total, 3) if total > 0 else None
        if seen is None or seen >= idle_share or time.monotonic() - t0 >= max_wait:
            return {"waited_s": round(time.monotonic() - t0, 1), "idle_share_before": seen}


def worker_count(args: argparse.Namespace) -> int:
    """Generator processes: as asked, else one per CPU the server does not use."""
    if args.workers > 0:
        return int(args.workers)
    return max(1, (os.cpu_count() or 2) - 1)


def side_by_side(
    args: argparse.Namespace,
    name: str,
    params: dict[str, Any],
    measure: Callable[[Target, ServerProcess, int | None], dict[str, Any]],
    ratio_keys: Sequence[str],
) -> dict[str, Any]:
    """Run ``measure`` against each server, ``--repeat`` rounds, Bastion then soketi.

    Servers run one after the other, never together (a 2-core machine has no room for
    two), each freshly started for each run. Prints nothing; returns the JSON object.
    """
    kinds = list(SERVER_KINDS) if args.compare else [args.server]
    if getattr(args, "floor", False) and "floor" not in kinds:
        kinds.append("floor")
    server_cpu = 0 if args.pin and (os.cpu_count() or 1) >= 2 else None
    if server_cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, generator_cpus(server_cpu) or {0})
    out: dict[str, Any] = {"bench": name, "params": params, "machine": machine_info()}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(args.repeat):
        for kind in kinds:
            probe = None
            if getattr(args, "gc_probe", False) and kind == "bastion":
                probe = str(_TMP / f"bastion-bench-gc-{os.getpid()}-{rep}.jsonl")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(probe)
            quiet = wait_for_quiet(args.wait_idle, args.wait_max) if args.wait_idle > 0 else {}
            try:
                with serve(kind, server_cpu, probe) as (proc, t):
                    try:
                        result = measure(t, proc, server_cpu)
                    except Exception as exc:
                        result = {
                            "error": f"{type(exc).__name__}: {exc}"[:2000],
                            "server_stderr_tail": proc.stderr_tail(1500),
                        }
            except Exception as exc:  # the server did not start
                result = {"error": f"start {kind}: {type(exc).__name__}: {exc}"[:2000]}
            result["loadavg_after"] = loadavg()
            result.update(quiet)
            runs[kind].append(result)
    for kind in kinds:
        out[kind] = summarise(runs[kind])
    for peer in ("soketi", "floor"):
        if "bastion" in out and peer in out:
            b, p = out["bastion"], out[peer]
            out[f"ratio_bastion_over_{peer}"] = {
                key: round(b[key] / p[key], 3)
                for key in ratio_keys
                if isinstance(b.get(key), (int, float))
                and isinstance(p.get(key), (int, float))
                and p[key]
            }
    out["runs"] = runs
    out["pinned"] = server_cpu is not None
    out["loadavg_end"] = loadavg()
    out["command"] = shlex.join(["python", *sys.argv])
    return out


def fleet_window(
    target: Target,
    fn: Callable[[Any, Any], Any],
    specs: Sequence[Any],
    server_cpu: int | None,
    *,
    warmup: float,
    seconds: float,
    setup_s: float,
    done_s: float = 60.0,
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Start generators, wait until ready, run warm-up then the measured window.

    Returns the generators' ``ready`` infos, their ``done`` results and the CPU
    figures of the window (see :class:`Window`).
    """
    fleet = Fleet(fn, specs, generator_cpus(server_cpu))
    try:
        ready = fleet.recv_all("ready", setup_s + 30)
        t_go = time.perf_counter() + 0.2
        t_start = t_go + warmup
        t_end = t_start + seconds
        fleet.send_all(("go", t_go, t_start, t_end))
        time.sleep(max(0.0, t_start - time.perf_counter()))
        window = Window(target.pid, fleet.pids)
        time.sleep(max(0.0, t_end - time.perf_counter()))
        cpu = window.close()
        done = fleet.recv_all("done", done_s)
    finally:
        fleet.close()
    return ready, done, cpu


def per_unit_us(cpu_s: float, units: int) -> float | None:
    return round(cpu_s * 1e6 / units, 2) if units else None


class HttpLane:
    """One signed REST request at a time on a keep-alive connection, reopened whenever
    the server does not keep it alive (soketi answers ``Connection: close``)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client: TriggerClient | None = None
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None
        self.opened = 0

    def _on_response(self, client: TriggerClient) -> None:
        if self.waiter is not None and not self.waiter.done():
            status = client.parser.get_status_code()
            self.waiter.set_result((status, client.parser.should_keep_alive()))

    async def request(self, data: bytes) -> int:
        """Send one complete request; return the status (0 when the connection failed)."""
        loop = asyncio.get_running_loop()
        if self.client is None or self.client.closed:
            _t, self.client = await loop.create_connection(
                lambda: TriggerClient(self._on_response), HOST, self.port
            )
            self.opened += 1
        self.waiter = loop.create_future()
        self.client.transport.write(data)
        try:
            status, keep = await asyncio.wait_for(self.waiter, 30)
        except TimeoutError:
            status, keep = 0, False
        if not keep:
            self.client.transport.close()
            self.client = None
        return int(status)

    def close(self) -> None:
        if self.client is not None:
            self.client.transport.close()
