"""What a flood of refused frames costs the server, its log and its audit log.

Starts a real Bastion process (``python -m bastion serve`` on a temp config with
its own audit log), opens ONE anonymous WebSocket with the public app key and sends
a refused frame (``{"event":"x"}`` by default) as fast as the socket takes it, for
``--seconds``. When the server closes the connection the driver opens a new one, as
an attacker would, until the time is up or the address is dropped at accept
(blocked). Then it stops the server (which flushes the audit writer), counts the
audit rows and the log lines, and prints ONE JSON line.

``frames_written`` counts what the driver wrote, including frames still in
socket buffers when the server closed the connection; ``refusals`` is what the
server refused (the sum of the audit rows' counts, exact), and ``server_cpu_s``
its CPU time during the flood. The driver is pinned to CPU 1 and the server to
CPU 0 (``--no-pin`` turns that off), so ``other_processes_cpu_s`` is mostly the
driver itself.

Scenarios (``--scenario``):

* ``exempt``: the shipped defaults; 127.0.0.1 is in ``never_block``, so the
  address is never scored (the reproduction of issue #11 item 1);
* ``scored``: ``never_block = []``, so the refusals score the address and a block
  ends the flood.

Everything is on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    HOST,
    WS_PATH,
    CpuSampler,
    ServerProcess,
    cpu_seconds,
    environment,
    iter_server_frames,
    masked_text_frame,
    pin,
)

FRAMES = {
    "no-such-event": b'{"event":"x"}',
    "unknown-pusher": b'{"event":"pusher:bogus","data":{}}',
    "bad-client-name": b'{"event":"client-\\u0001","channel":"private-a","data":{}}',
    "malformed": b"{",
    "ping": b'{"event":"pusher:ping","data":{}}',
}
#: Frames written per loop iteration while the socket takes them.
BATCH = 64


def config(tmp: Path, scenario: str) -> str:
    reputation = "never_block = []\n" if scenario == "scored" else ""
    return f"""\
[server]
host = "{HOST}"
port = 0

[audit]
path = "{tmp / "audit.sqlite3"}"

[security.reputation]
store_path = "{tmp / "blocks.sqlite3"}"
{reputation}
[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"
"""


class Flooder(asyncio.Protocol):
    """One connection: handshake, wait for connection_established, then flood."""

    def __init__(self, frame: bytes, stats: dict[str, int]) -> None:
        self.chunk = masked_text_frame(frame) * BATCH
        self.stats = stats
        self.buf = bytearray()
        self.stage = 0  # 0 handshake, 1 waiting for established, 2 flooding
        self.paused = False
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        key = base64.b64encode(os.urandom(16)).decode()
        self.request = (
            f"GET {WS_PATH} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n"
        ).encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result("dropped" if self.stage < 2 else "lost")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.stage == 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                self.done.set_result("refused " + bytes(self.buf[:12]).decode("latin-1"))
                self.transport.close()
                return
            del self.buf[: end + 4]
            self.stage = 1
        for opcode, payload, _size in iter_server_frames(self.buf):
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.stats[f"close_{code}"] = self.stats.get(f"close_{code}", 0) + 1
                if not self.done.done():
                    self.done.set_result(f"closed {code}")
                self.transport.close()
                return
            if self.stage == 1 and b'"pusher:connection_established"' in payload:
                self.stage = 2
                self.stats["connections"] += 1
                self._pump()
            elif b'"pusher:error"' in payload:
                self.stats["errors_received"] += 1
            elif b'"pusher:pong"' in payload:
                self.stats["pongs_received"] += 1

    def _pump(self) -> None:
        if self.paused or self.done.done() or self.transport.is_closing():
            return
        self.transport.write(self.chunk)
        self.stats["frames_written"] += BATCH
        asyncio.get_running_loop().call_soon(self._pump)


async def flood(port: int, frame: bytes, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats = {
        "frames_written": 0,
        "errors_received": 0,
        "pongs_received": 0,
        "connections": 0,
        "dropped_at_accept": 0,
    }
    ends: dict[str, int] = {}
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        try:
            _t, flooder = await asyncio.wait_for(
                loop.create_connection(lambda: Flooder(frame, stats), HOST, port), 5
            )
        except (OSError, TimeoutError):
            stats["dropped_at_accept"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            end = await asyncio.wait_for(
                asyncio.shield(flooder.done), max(0.01, deadline - time.perf_counter())
            )
        except TimeoutError:
            flooder.transport.close()
            break
        ends[end] = ends.get(end, 0) + 1
        if end == "dropped":
            stats["dropped_at_accept"] += 1
            if stats["dropped_at_accept"] >= 20:
                break  # blocked: the flood is over
            await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    return {
        **stats,
        "connection_ends": ends,
        "flood_s": round(elapsed, 2),
        "frames_written_per_s": round(stats["frames_written"] / elapsed),
    }


def audit_counts(db: Path) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        rows = connection.execute(
            "SELECT type, count(*), sum(coalesce(json_extract(metadata, '$.count'), 1))"
            " FROM audit_events WHERE type != 'config_loaded' GROUP BY type ORDER BY 2 DESC"
        ).fetchall()
    return {
        "audit_rows": sum(row[1] for row in rows),
        "refusals": sum(row[2] for row in rows),
        "audit_rows_by_type": {row[0]: row[1] for row in rows},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": args.scenario, "frame": args.frame}
    with tempfile.TemporaryDirectory(prefix="bastion-flood-") as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "bastion.toml"
        path.write_text(config(tmp, args.scenario))
        server = ServerProcess(
            [sys.executable, "-m", "bastion", "serve", "--config", str(path)],
            "bastion listening on http://",
            0 if args.pin else None,
        )
        line = server.start()
        port = int(line.rsplit(":", 1)[1].strip("/"))
        try:
            if args.pin:
                pin(os.getpid(), 1)
            await asyncio.sleep(0.5)
            sampler = CpuSampler()
            cpu0 = cpu_seconds(server.pid)
            out.update(await flood(port, FRAMES[args.frame], args.seconds))
            server_cpu = cpu_seconds(server.pid) - cpu0
            out["server_cpu_s"] = round(server_cpu, 2)
            out.update(sampler.since(server_cpu))
        finally:
            server.stop(timeout=30)
        log = server.stderr_tail(1 << 30).splitlines()
        out["log_lines"] = len(log)
        out["log_lines_refused"] = sum(1 for text in log if "refused reason=" in text)
        out["log_lines_blocked"] = sum(1 for text in log if "address blocked" in text)
        out.update(audit_counts(tmp / "audit.sqlite3"))
    seconds = out["flood_s"]
    out["per_s"] = {
        "refusals": round(out["refusals"] / seconds),
        "audit_rows": round(out["audit_rows"] / seconds, 1),
        "log_lines": round(out["log_lines"] / seconds, 1),
        "server_cpu": round(out["server_cpu_s"] / seconds, 2),
    }
    out.update(environment(sys.argv))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=("exempt", "scored"), default="exempt")
    ap.add_argument("--frame", choices=sorted(FRAMES), default="no-such-event")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to flood")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    args = ap.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
