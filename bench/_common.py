"""Helpers shared by bench/fanout.py and bench/connections.py.

Process management for the server under test (a real Bastion or the bare floor in
fanout.py), /proc readers, and a raw Pusher WebSocket subscriber that, once
subscribed, only counts received bytes (every benchmark delivery has the same length).

Everything talks to 127.0.0.1 only, and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from pathlib import Path

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

    def __init__(self, cmd: list[str], ready_prefix: str, cpu: int | None) -> None:
        self.cmd = cmd
        self.ready_prefix = ready_prefix
        self.cpu = cpu
        # Lives as long as the server: stderr goes to a file so a pipe can never fill.
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115
        self.lines: deque[str] = deque(maxlen=50)
        self._ready = threading.Event()
        self.ready_line = ""
        self.proc: subprocess.Popen[str] | None = None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self._ready.is_set() and line.startswith(self.ready_prefix):
                self.ready_line = line.strip()
                self._ready.set()

    def start(self, timeout: float = 30.0) -> str:
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
def bastion_server(cpu: int | None):
    """Start `python -m bastion serve` on a temp config; yield (process, port)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(CONFIG_TOML)
        path = f.name
    server = ServerProcess(
        [sys.executable, "-m", "bastion", "serve", "--config", path],
        "bastion listening on http://",
        cpu,
    )
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
