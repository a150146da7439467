"""Tail-latency soak: churn, REST events and presence client events for minutes.

Issue #13's soak, scaled by flags. Defaults: ``--connections`` 10,200 in all —
10,000 subscribers spread over ``--channels`` 110 public channels, and
``--presence-channels`` 10 presence channels of ``--presence-members`` 20 members
— for ``--minutes`` 14 (after ``--warmup`` seconds of the same load):

* ``--rest-rate`` 50 signed REST events a second, round robin over the 110
  channels (each reaches ~91 subscribers);
* every presence member sends a client event (a small object) every
  ``--client-event-interval`` 2 s, relayed to the other members;
* ``--churn`` 50 connections a second leave (close handshake after a 2 s grace in
  which they still count what they receive) and are replaced at once by a new
  connection that subscribes to the same channel (the same user on presence).

Each delivery is timed from the send time in its data (CLOCK_MONOTONIC, shared by
all processes). A delivery is *expected* by every connection that had its
``subscription_succeeded`` and was not leaving when the event was sent; ``lost``
counts expected deliveries that never arrived (the run waits a few seconds after
the last event). Per minute: deliveries, p50/p99/worst latency (REST and client
events apart), the server's CPU and RSS; RSS every ``--sample-seconds``.

Bastion is started through ``bench/_gc_probe.py``, which times every garbage
collection of the server process: per minute, collections and pause totals by
generation and the longest pause, and overall the pauses of 1/10/50 ms or more.
soketi (``--compare soketi``, after Bastion) gets the same load; no GC probe.

All load comes from one generator process (the load is far below saturation;
its CPU share is in the output). Prints ONE JSON object. Loopback only; bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    Fleet,
    HttpLane,
    PusherClient,
    ServerProcess,
    Target,
    Window,
    add_server_args,
    client_frame,
    close_clients,
    cpu_seconds,
    generator_cpus,
    latency_ms,
    open_clients,
    raise_nofile,
    recv_pipe,
    side_by_side,
    signed_post,
    sleep_until,
    vm_rss_kib,
)

GRACE_S = 2.0  # a leaving connection still reads this long before its close handshake
DRAIN_S = 4.0  # after the last event, before counting what was lost


class Channel:
    """Connections of one channel, each with a bit of its own (never reused)."""

    __slots__ = ("live", "members", "name", "next_bit")

    def __init__(self, name: str) -> None:
        self.name = name
        self.next_bit = 0
        self.live = 0  # bits of connections subscribed and not leaving
        self.members: list[PusherClient] = []  # presence: the live members, to send from


class Soak:
    """The generator's state: channels, events sent, what arrived."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.target: Target = spec["target"]
        self.rest = [Channel(f"soak-{c}") for c in range(spec["channels"])]
        self.presence = [Channel(f"presence-soak-{p}") for p in range(spec["presence_channels"])]
        cap = int((spec["warmup"] + spec["seconds"] + 5) * spec["rest_rate"]) + 16
        self.rest_expected = [0] * cap
        self.rest_got = [0] * cap
        self.rest_sent = 0
        members = spec["presence_channels"] * spec["presence_members"]
        cap = int((spec["warmup"] + spec["seconds"] + 5) * members / spec["ce_interval"]) + 16
        self.ce_expected = [0] * cap
        self.ce_got = [0] * cap
        self.ce_sent = 0
        self.minutes = max(1, int(-(-spec["seconds"] // 60)))
        self.rest_lat = [array("q") for _ in range(self.minutes)]
        self.ce_lat = [array("q") for _ in range(self.minutes)]
        self.start_us = 1 << 62
        self.end_us = 1 << 62
        self.clients: list[PusherClient] = []  # live, not leaving
        self.leaving: set[PusherClient] = set()
        self.churned = 0
        self.churn_failures: list[str] = []
        self.http_errors: list[str] = []
        self.rng = random.Random(13)
        self.tasks: set[asyncio.Task[Any]] = set()

    # --- receiving -----------------------------------------------------------------
    def _bucket(self, now: int) -> int:
        m = (now - self.start_us) // 60_000_000
        return m if 0 <= m < self.minutes and now < self.end_us else -1

    def on_rest(self, client: PusherClient, payload: bytes) -> None:
        now = time.perf_counter_ns() // 1000
        i = payload.find(b'"data":"')
        if i < 0:
            return
        e = int(payload[i + 24 : i + 32])
        # A replacement may receive before it is adopted: no bit, not expected yet.
        self.rest_got[e] |= getattr(client, "bit", 0)
        m = self._bucket(now)
        if m >= 0:
            self.rest_lat[m].append(now - int(payload[i + 8 : i + 24]))

    def on_presence(self, client: PusherClient, payload: bytes) -> None:
        if b'"client-' not in payload:
            return  # member_added / member_removed
        now = time.perf_counter_ns() // 1000
        i = payload.find(b'"t":')
        j = payload.find(b'"e":')
        if i < 0 or j < 0:
            return
        e = int(payload[j + 4 : payload.find(b",", j)])
        self.ce_got[e] |= getattr(client, "bit", 0)
        m = self._bucket(now)
        if m >= 0:
            self.ce_lat[m].append(now - int(payload[i + 4 : payload.find(b",", i)]))

    # --- connections -----------------------------------------------------------------
    def spec_for(self, kind: str, index: int, user: int) -> tuple[Any, Any]:
        if kind == "rest":
            return [(self.rest[index].name, None)], self.on_rest
        data = json.dumps(
            {"user_id": f"u{user}", "user_info": {"name": f"member {user}"}},
            separators=(",", ":"),
        )
        return [(self.presence[index].name, data)], self.on_presence

    def adopt(self, client: PusherClient, kind: str, index: int, user: int) -> None:
        """A ready connection joins its channel's live set, with a new bit."""
        ch = self.rest[index] if kind == "rest" else self.presence[index]
        client.kind, client.index, client.user = kind, index, user  # type: ignore[attr-defined]
        client.bit = 1 << ch.next_bit  # type: ignore[attr-defined]
        ch.next_bit += 1
        ch.live |= client.bit  # type: ignore[attr-defined]
        if kind == "presence":
            ch.members.append(client)
        self.clients.append(client)

    async def open_initial(self) -> None:
        spec = self.spec
        plan: list[tuple[str, int, int]] = [
            ("rest", i % spec["channels"], i) for i in range(spec["subscribers"])
        ]
        plan += [
            ("presence", j % spec["presence_channels"], j)
            for j in range(spec["presence_channels"] * spec["presence_members"])
        ]
        clients = await open_clients(
            self.target,
            [self.spec_for(*p) for p in plan],
            concurrency=200,
            time_limit=spec["setup_s"],
        )
        for client, p in zip(clients, plan, strict=True):
            self.adopt(client, *p)

    async def replace(self, old: PusherClient) -> None:
        """``old`` leaves (still reading for GRACE_S); a new connection takes its place."""
        kind, index, user = old.kind, old.index, old.user  # type: ignore[attr-defined]
        ch = self.rest[index] if kind == "rest" else self.presence[index]
        ch.live &= ~old.bit  # type: ignore[attr-defined]
        if kind == "presence":
            ch.members.remove(old)
        self.leaving.add(old)
        self.churned += 1
        try:
            (new,) = await open_clients(self.target, [self.spec_for(kind, index, user)], 1, 30)
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.churn_failures.append(f"{type(exc).__name__}: {exc}"[:300])
        else:
            self.adopt(new, kind, index, user)
        await asyncio.sleep(GRACE_S)
        await close_clients([old], 5)
        self.leaving.discard(old)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- load loops --------------------------------------------------------------------
    async def every(
        self, rate: float, t_from: float, t_until: float, act: Callable[[], None]
    ) -> None:
        """Call ``act`` ``rate`` times a second on an absolute schedule (no drift)."""
        k = 0
        while True:
            at = t_from + k / rate
            if at >= t_until:
                return
            await sleep_until(at)
            act()
            k += 1

    def churn_one(self) -> None:
        if not self.clients:
            return
        i = self.rng.randrange(len(self.clients))
        old = self.clients[i]
        self.clients[i] = self.clients[-1]
        self.clients.pop()
        self.spawn(self.replace(old))

    def client_event(self, order: list[tuple[int, int]], state: list[int]) -> None:
        """The next member in a fixed rotation sends one client event."""
        p, k = order[state[0] % len(order)]
        state[0] += 1
        ch = self.presence[p]
        if not ch.members:
            return
        sender = ch.members[k % len(ch.members)]
        e = self.ce_sent
        if e >= len(self.ce_expected):
            return
        self.ce_sent += 1
        self.ce_expected[e] = ch.live & ~sender.bit  # type: ignore[attr-defined]
        sender.send(
            client_frame(
                b'{"event":"client-message","channel":"%s","data":{"t":%d,"e":%d,"text":"hi"}}'
                % (ch.name.encode(), time.perf_counter_ns() // 1000, e)
            )
        )

    def rest_event(self, lanes: asyncio.Queue[HttpLane]) -> None:
        e = self.rest_sent
        if e >= len(self.rest_expected):
            return
        self.rest_sent += 1
        self.spawn(self._post(lanes, e))

    async def _post(self, lanes: asyncio.Queue[HttpLane], e: int) -> None:
        """Send event ``e`` on the next free lane (timed and expected from then on)."""
        lane = await lanes.get()
        try:
            ch = self.rest[e % len(self.rest)]
            self.rest_expected[e] = ch.live
            data = b"%016d%08d" % (time.perf_counter_ns() // 1000, e)
            body = b'{"name":"soak-event","channels":["%s"],"data":"%s"}' % (
                ch.name.encode(),
                data,
            )
            request = signed_post(
                f"/apps/{self.target.app_id}/events",
                body,
                self.target.key,
                self.target.secret,
                int(time.time()),
            )
            try:
                status = await lane.request(request)
            except OSError as exc:
                status = 0
                self.http_errors.append(str(exc)[:200])
            if status != 200:
                self.http_errors.append(f"status {status}")
        finally:
            lanes.put_nowait(lane)

    # --- figures -------------------------------------------------------------------------
    def lost(self) -> dict[str, int]:
        out = {}
        for name, expected, got, sent in (
            ("rest", self.rest_expected, self.rest_got, self.rest_sent),
            ("client_event", self.ce_expected, self.ce_got, self.ce_sent),
        ):
            exp = sum(expected[e].bit_count() for e in range(sent))
            miss = sum((expected[e] & ~got[e]).bit_count() for e in range(sent))
            out[f"{name}_events_sent"] = sent
            out[f"{name}_expected_deliveries"] = exp
            out[f"{name}_lost_deliveries"] = miss
        return out


async def generator(conn: Any, spec: dict[str, Any]) -> None:
    soak = Soak(spec)
    await soak.open_initial()
    lanes = [HttpLane(soak.target.port) for _ in range(spec["lanes"])]
    pool: asyncio.Queue[HttpLane] = asyncio.Queue()
    for lane in lanes:
        pool.put_nowait(lane)
    conn.send(("ready", {"clients": len(soak.clients)}))
    _go, t_go, t_start, t_end = await recv_pipe(conn, 600)
    soak.start_us, soak.end_us = int(t_start * 1e6), int(t_end * 1e6)
    members = [
        (p, k) for k in range(spec["presence_members"]) for p in range(spec["presence_channels"])
    ]
    ce_state = [0]
    loops = [
        soak.every(spec["rest_rate"], t_go, t_end, lambda: soak.rest_event(pool)),
        soak.every(
            len(members) / spec["ce_interval"],
            t_go,
            t_end,
            lambda: soak.client_event(members, ce_state),
        ),
    ]
    if spec["churn"] > 0:
        loops.append(soak.every(spec["churn"], t_go, t_end, soak.churn_one))
    await asyncio.gather(*loops)
    await asyncio.sleep(DRAIN_S)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*list(soak.tasks), return_exceptions=True), 15)
    everyone = soak.clients + list(soak.leaving)
    ws_errors = sum(c.errors for c in everyone)
    first_error = next((c.last_error for c in everyone if c.errors), None)
    minutes = []
    for m in range(soak.minutes):
        minutes.append(
            {
                "minute": m + 1,
                "rest_deliveries": len(soak.rest_lat[m]),
                **{f"rest_{k}": v for k, v in latency_ms(soak.rest_lat[m]).items()},
                "client_event_deliveries": len(soak.ce_lat[m]),
                **{f"client_event_{k}": v for k, v in latency_ms(soak.ce_lat[m]).items()},
            }
        )
    all_lat = array("q")
    for a in soak.rest_lat + soak.ce_lat:
        all_lat.extend(a)
    result = {
        "per_minute": minutes,
        **soak.lost(),
        **{f"all_{k}": v for k, v in latency_ms(all_lat).items()},
        "deliveries_measured": len(all_lat),
        "churned": soak.churned,
        "churn_failures": len(soak.churn_failures),
        "first_churn_failure": soak.churn_failures[0] if soak.churn_failures else None,
        "http_errors": len(soak.http_errors),
        "first_http_error": soak.http_errors[0] if soak.http_errors else None,
        "http_connections_opened": sum(lane.opened for lane in lanes),
        "ws_errors": ws_errors,
        "first_ws_error": first_error,
    }
    conn.send(("done", result))
    await recv_pipe(conn, 120)
    for lane in lanes:
        lane.close()
    await close_clients(everyone, 10)


def gc_summary(path: str, t_start: float, t_end: float, minutes: int) -> dict[str, Any]:
    """Collections and pauses of the server inside [t_start, t_end), per minute and in all."""
    per: list[dict[str, Any]] = [
        {"collections": [0, 0, 0], "pause_ms": [0.0, 0.0, 0.0], "max_ms": 0.0}
        for _ in range(minutes)
    ]
    longs: list[list[float]] = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") != "interval" or not t_start <= rec["t1"] < t_end + 1.0:
                continue
            m = min(minutes - 1, max(0, int((rec["t1"] - t_start) // 60)))
            for g, (n, total, worst) in rec["gen"].items():
                per[m]["collections"][int(g)] += n
                per[m]["pause_ms"][int(g)] = round(per[m]["pause_ms"][int(g)] + total, 3)
                per[m]["max_ms"] = max(per[m]["max_ms"], worst)
            longs += [x for x in rec["long"] if t_start <= x[0] < t_end]
    pauses = sorted((x[2] for x in longs), reverse=True)
    return {
        "gc_collections": [sum(p["collections"][g] for p in per) for g in range(3)],
        "gc_pause_ms_total": round(sum(sum(p["pause_ms"]) for p in per), 1),
        "gc_max_pause_ms": max((p["max_ms"] for p in per), default=0.0),
        "gc_pauses_ge_1ms": sum(1 for x in pauses if x >= 1),
        "gc_pauses_ge_10ms": sum(1 for x in pauses if x >= 10),
        "gc_pauses_ge_50ms": sum(1 for x in pauses if x >= 50),
        "gc_longest": [
            {"at_s": round(x[0] - t_start, 2), "generation": x[1], "ms": x[2], "collected": x[3]}
            for x in sorted(longs, key=lambda x: -x[2])[:10]
        ],
        "gc_per_minute": per,
    }


def measure(args: argparse.Namespace) -> Callable[..., dict[str, Any]]:
    def run(target: Target, proc: ServerProcess, server_cpu: int | None) -> dict[str, Any]:
        members = args.presence_channels * args.presence_members
        seconds = args.minutes * 60
        spec = {
            "target": target,
            "subscribers": max(0, args.connections - members),
            "channels": args.channels,
            "presence_channels": args.presence_channels,
            "presence_members": args.presence_members,
            "rest_rate": args.rest_rate,
            "ce_interval": args.client_event_interval,
            "churn": args.churn,
            "lanes": args.lanes,
            "warmup": args.warmup,
            "seconds": seconds,
            "setup_s": args.setup_seconds,
        }
        fleet = Fleet(generator, [spec], generator_cpus(server_cpu))
        try:
            (ready,) = fleet.recv_all("ready", args.setup_seconds + 30)
            t_go = time.perf_counter() + 0.2
            t_start = t_go + args.warmup
            t_end = t_start + seconds
            fleet.send_all(("go", t_go, t_start, t_end))
            time.sleep(max(0.0, t_start - time.perf_counter()))
            window = Window(target.pid, fleet.pids)
            samples = []  # (seconds since start, rss KiB, server CPU s, generator CPU s)
            while True:
                now = time.perf_counter()
                samples.append(
                    (
                        round(now - t_start, 1),
                        vm_rss_kib(target.pid),
                        cpu_seconds(target.pid),
                        sum(cpu_seconds(p) for p in fleet.pids),
                    )
                )
                if now >= t_end:
                    break
                time.sleep(max(0.0, min(args.sample_seconds, t_end - now)))
            cpu = window.close()
            (done,) = fleet.recv_all("done", DRAIN_S + 120)
            fleet.send_all(("close",))
        finally:
            fleet.close(30)
        minutes = done["per_minute"]
        for m, row in enumerate(minutes):
            inside = [s for s in samples if m * 60 <= s[0] <= (m + 1) * 60]
            if len(inside) >= 2:
                row["server_cpu_s"] = round(inside[-1][2] - inside[0][2], 2)
                row["generator_cpu_s"] = round(inside[-1][3] - inside[0][3], 2)
            row["rss_kib_end"] = inside[-1][1] if inside else None
        out: dict[str, Any] = {
            "lost_deliveries": done["rest_lost_deliveries"] + done["client_event_lost_deliveries"],
            **{k: v for k, v in done.items() if k != "per_minute"},
            "clients": ready["clients"],
            "rss_kib_start": samples[0][1],
            "rss_kib_end": samples[-1][1],
            "rss_kib_max": max(s[1] for s in samples),
            "server_cpu_us_per_delivery": round(
                cpu["server_cpu_s"] * 1e6 / max(1, done["deliveries_measured"]), 2
            ),
            **cpu,
        }
        if proc.gc_probe:
            out.update(gc_summary(proc.gc_probe, t_start, t_end, len(minutes)))
            for row, gcm in zip(minutes, out.pop("gc_per_minute"), strict=True):
                row["gc"] = gcm
        out["per_minute"] = minutes
        out["rss_kib_series"] = [[s[0], s[1]] for s in samples]
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=10_200, help="connections in all")
    ap.add_argument("--channels", type=int, default=110, help="public channels for REST events")
    ap.add_argument("--presence-channels", type=int, default=10)
    ap.add_argument("--presence-members", type=int, default=20, help="members per presence channel")
    ap.add_argument("--rest-rate", type=float, default=50.0, help="REST events a second")
    ap.add_argument(
        "--client-event-interval", type=float, default=2.0, help="seconds between a member's events"
    )
    ap.add_argument("--churn", type=float, default=50.0, help="connections replaced a second")
    ap.add_argument("--lanes", type=int, default=8, help="keep-alive REST connections")
    ap.add_argument("--minutes", type=float, default=14.0, help="measured minutes")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of load before minute 1")
    ap.add_argument("--sample-seconds", type=float, default=10.0, help="RSS/CPU sampling period")
    ap.add_argument("--setup-seconds", type=float, default=240.0, help="bound to connect all")
    add_server_args(ap)
    args = ap.parse_args()
    args.gc_probe = True
    limit = raise_nofile()
    if args.connections + 2 * args.churn * GRACE_S + 200 > limit:
        sys.exit(f"fd hard limit {limit} is too low for {args.connections} connections")
    params = {
        k: getattr(args, k)
        for k in (
            "connections",
            "channels",
            "presence_channels",
            "presence_members",
            "rest_rate",
            "client_event_interval",
            "churn",
            "lanes",
            "minutes",
            "warmup",
        )
    }
    result = side_by_side(
        args,
        "soak",
        params,
        measure(args),
        [
            "all_p50_ms",
            "all_p99_ms",
            "all_max_ms",
            "lost_deliveries",
            "rss_kib_end",
            "server_cpu_us_per_delivery",
        ],
    )
    print(json.dumps(result), flush=True)
    if any("error" in result.get(k, {}) for k in ("bastion", "soketi")):
        sys.exit(1)


if __name__ == "__main__":
    main()
