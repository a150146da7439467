"""Cluster benchmark: ``--workers 2`` on the Redis bus vs one process, and the bus hop.

Needs the Redis on 127.0.0.1:6379 (``--redis-url``); every run uses its own key
prefix. Prints ONE JSON line.

1. **Fan-out, one process vs two workers.** The same N subscribers on one public
   channel and the same K events (signed REST triggers over ``--inflight``
   keep-alive connections, as in ``fanout.py``), first against
   ``bastion serve`` (one process, ``local`` adapter), then against
   ``bastion serve --workers 2`` (``redis`` adapter). The kernel spreads both the
   subscribers and the trigger connections over the workers, so about half of
   every event's deliveries cross Redis. Which worker holds a connection is read
   from ``/proc`` (never guessed), so each subscriber's k-th frame is matched to the
   k-th event *its* worker handled (workers may order concurrent triggers
   differently). Reports deliveries/s, p50/p99 latency (trigger sent -> frame
   received) and deliveries per server CPU-second (the workers' CPU summed; the
   Redis server's own CPU is not included).
2. **The cost of the Redis hop.** Against the two workers: one subscriber on each
   worker and one keep-alive trigger connection held by worker A. Sequential events
   (the next is sent once both subscribers got the previous one and the ``200``
   came back): the subscriber on A is same-worker delivery, the one on B went
   A -> Redis -> B. Reports both latency distributions and their difference.

Everything is on 127.0.0.1, bounded by the counts and ``--max-seconds``. Nothing is
pinned to a CPU: more than one worker is meant to use more than one core, and on a
small machine the driver and Redis compete with them (see ``other_processes_cpu_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import sys
import time
import uuid
from array import array
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    CONFIG_TOML,
    HOST,
    Counter,
    CpuSampler,
    Subscriber,
    bastion_workers,
    close_all,
    cluster_config,
    connect_subscribers,
    connection_owners,
    cpu_seconds,
    environment,
    iter_server_frames,
    local_port,
    raise_nofile,
)
from fanout import WARMUP_SEQ, TriggerClient, signed_trigger

#: Seconds the warm-up may take to reach every subscriber (the bus subscribes to a
#: channel's topic shortly after the first local subscriber joined).
WARMUP_SECONDS = 15.0


def _seq_of(payload: bytes) -> int:
    i = payload.find(b'"data":"')
    return int(payload[i + 8 : i + 16]) if i >= 0 else -1


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


class _Trace:
    """Parse one subscriber's frames: the order of events and when each arrived."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.order: list[int] = []
        self.arrival: dict[int, float] = {}
        self.frame_len = 0
        self.on_seq: Callable[[int], None] | None = None

    def __call__(self, data: bytes, _n: int) -> None:
        now = time.perf_counter()
        self.buf.extend(data)
        for opcode, payload, size in iter_server_frames(self.buf):
            if opcode != 0x1:
                continue
            seq = _seq_of(payload)
            self.order.append(seq)
            self.arrival.setdefault(seq, now)
            self.frame_len = self.frame_len or size
            if self.on_seq is not None:
                self.on_seq(seq)


async def _trigger_lane(
    port: int, on_response: Callable[[TriggerClient], None]
) -> tuple[TriggerClient, int]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(lambda: TriggerClient(on_response), HOST, port)
    return client, local_port(transport)


async def _one_trigger(port: int, seq: int, pad: int) -> None:
    """Send one event on a fresh connection and wait for its answer."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    client, _ = await _trigger_lane(port, lambda c: done.done() or done.set_result(None))
    client.transport.write(signed_trigger(seq, pad, int(time.time())))
    try:
        await asyncio.wait_for(done, 10)
    finally:
        client.transport.close()
    if client.errors:
        raise RuntimeError(f"trigger refused: {client.errors[0]}")


async def _warm_up(port: int, pad: int, got_all: Callable[[], bool]) -> None:
    """Trigger warm-up events until ``got_all()``; the bus joins a channel soon after
    its first local subscriber, so the first events may miss another worker."""
    deadline = time.perf_counter() + WARMUP_SECONDS
    while time.perf_counter() < deadline:
        await _one_trigger(port, WARMUP_SEQ, pad)
        wait_until = min(deadline, time.perf_counter() + 1.0)
        while time.perf_counter() < wait_until:
            if got_all():
                return
            await asyncio.sleep(0.01)
    raise RuntimeError(f"warm-up did not reach every subscriber in {WARMUP_SECONDS:.0f} s")


async def measure_fanout(
    port: int, pids: list[int], args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    """N subscribers, K events over ``--inflight`` lanes; figures over every delivery."""
    loop = asyncio.get_running_loop()
    n, k = args.subscribers, args.events
    t0 = time.perf_counter()
    subs = await connect_subscribers(
        port, n, Counter(), time_limit=max(5.0, deadline - time.perf_counter())
    )
    connect_s = time.perf_counter() - t0
    try:
        owners = connection_owners(port, pids)
        worker_of = {id(s): owners[local_port(s.transport)] for s in subs}
        per_worker = {pid: [s for s in subs if worker_of[id(s)] == pid] for pid in pids}
        # One traced subscriber per worker gives the order in which *that* worker
        # handled the events; every subscriber of the worker sees the same order.
        traces = {pid: _Trace() for pid in pids if per_worker[pid]}
        for pid, trace in traces.items():
            per_worker[pid][0].on_trace = trace

        def warm(s: Subscriber) -> bool:
            frame_len = next((t.frame_len for t in traces.values() if t.frame_len), 0)
            return frame_len > 0 and s.nbytes >= frame_len and s.nbytes % frame_len == 0

        await _warm_up(port, args.pad, lambda: all(warm(s) for s in subs))
        # A last warm-up that every subscriber must get exactly once: nothing of the
        # earlier ones is still in flight after it.
        frame_len = next(t.frame_len for t in traces.values() if t.frame_len)
        before = {id(s): s.nbytes for s in subs}
        await _one_trigger(port, WARMUP_SEQ, args.pad)
        settle = time.perf_counter() + WARMUP_SECONDS
        while any(s.nbytes < before[id(s)] + frame_len for s in subs):
            if time.perf_counter() > settle:
                raise RuntimeError("the last warm-up event did not reach every subscriber")
            await asyncio.sleep(0.01)
        counters = {pid: Counter() for pid in traces}
        all_done: list[asyncio.Future[None]] = []
        for pid, counter in counters.items():
            counter.frame_len = frame_len
            counter.expected = len(per_worker[pid]) * k
            counter.done = loop.create_future()
            all_done.append(counter.done)
            for s in per_worker[pid]:
                s.counter = counter
        for s in subs:
            s.nbytes = 0
            s.frames = 0
        for trace in traces.values():
            trace.order.clear()

        now_s = int(time.time())
        requests = [signed_trigger(i, args.pad, now_s) for i in range(k)]
        send_times = array("d", [0.0] * k)
        state = {"next": 0, "answered": 0}
        answered: asyncio.Future[None] = loop.create_future()

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

        lanes = [(await _trigger_lane(port, on_response))[0] for _ in range(args.inflight)]
        cpu0, me0 = sum(cpu_seconds(p) for p in pids), time.process_time()
        machine = CpuSampler()
        start = time.perf_counter()
        for lane in lanes:
            send_next(lane)
        complete = True
        try:
            await asyncio.wait_for(
                asyncio.gather(*all_done, answered), max(1.0, deadline - time.perf_counter())
            )
        except TimeoutError:
            complete = False
        cpu1, me1 = sum(cpu_seconds(p) for p in pids), time.process_time()
        busy = machine.since((cpu1 - cpu0) + (me1 - me0))
        errors = [e for lane in lanes for e in lane.errors]
        for lane in lanes:
            lane.transport.close()
    finally:
        close_all(subs)

    latencies: list[float] = []
    delivered = 0
    last = 0.0
    for pid, counter in counters.items():
        order = traces[pid].order
        delivered += counter.delivered
        last = max(last, counter.last_delivery)
        for idx, arrived in zip(counter.frame_index, counter.arrival, strict=True):
            seq = order[idx] if idx < len(order) and 0 <= order[idx] < k else idx
            latencies.append(arrived - send_times[seq])
    elapsed = (last if delivered else time.perf_counter()) - start
    return {
        "workers": len(pids),
        "subscribers_per_worker": [len(per_worker[p]) for p in pids],
        "deliveries": delivered,
        "expected_deliveries": n * k,
        "complete": complete and delivered == n * k,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(delivered / elapsed) if elapsed > 0 else 0,
        "p50_ms": _pct(latencies, 0.50),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": round(max(latencies) * 1000, 3) if latencies else None,
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "deliveries_per_server_cpu_s": round(delivered / (cpu1 - cpu0)) if cpu1 > cpu0 else 0,
        "driver_cpu_s": round(me1 - me0, 2),
        "trigger_errors": len(errors),
        "first_trigger_error": errors[0] if errors else None,
        "connect_s": round(connect_s, 2),
        **busy,
    }


async def measure_hop(
    port: int, pids: list[int], args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    """One subscriber per worker, triggers held by worker A, sequential events."""
    loop = asyncio.get_running_loop()
    a, b = pids[0], pids[1]
    subs: dict[int, tuple[Subscriber, _Trace]] = {}
    extra: list[Subscriber] = []
    lane: TriggerClient | None = None
    spare: list[TriggerClient] = []
    try:
        # Connect until each worker holds one subscriber (the kernel hashes ports).
        for _ in range(64):
            if len(subs) == 2:
                break
            trace = _Trace()
            (sub,) = await connect_subscribers(port, 1, Counter(), on_trace=trace)
            owner = connection_owners(port, pids)[local_port(sub.transport)]
            if owner in subs:
                extra.append(sub)
            else:
                subs[owner] = (sub, trace)
        if len(subs) != 2:
            raise RuntimeError("could not place a subscriber on each worker")
        waiting: dict[str, Any] = {"seq": -1, "future": None}

        def on_seq(_seq: int) -> None:
            future = waiting["future"]
            seq = waiting["seq"]
            ready = all(seq in t.arrival for _s, t in subs.values())
            if ready and future is not None and not future.done():
                future.set_result(None)

        for _s, t in subs.values():
            t.on_seq = on_seq
        await _warm_up(port, args.pad, lambda: all(t.arrival for _s, t in subs.values()))

        answered: dict[str, Any] = {"future": None}

        def on_response(_client: TriggerClient) -> None:
            future = answered["future"]
            if future is not None and not future.done():
                future.set_result(None)

        for _ in range(64):
            client, client_port = await _trigger_lane(port, on_response)
            if connection_owners(port, pids).get(client_port) == a:
                lane = client
                break
            spare.append(client)
        if lane is None:
            raise RuntimeError("could not place a trigger connection on worker A")

        send_times: dict[int, float] = {}
        now_s = int(time.time())
        for seq in range(args.hop_events):
            if time.perf_counter() > deadline:
                break
            waiting["seq"] = seq
            waiting["future"] = delivered = loop.create_future()
            answered["future"] = response = loop.create_future()
            send_times[seq] = time.perf_counter()
            lane.transport.write(signed_trigger(seq, args.pad, now_s))
            await asyncio.wait_for(asyncio.gather(delivered, response), 10)
        if lane.errors:
            raise RuntimeError(f"trigger refused: {lane.errors[0]}")
    finally:
        close_all([s for s, _t in subs.values()] + extra)
        for client in [*spare, *([lane] if lane is not None else [])]:
            client.transport.close()

    def latencies(pid: int) -> list[float]:
        arrival = subs[pid][1].arrival
        return [arrival[seq] - sent for seq, sent in send_times.items() if seq in arrival]

    same, cross = latencies(a), latencies(b)
    out = {
        "hop_events": len(send_times),
        "same_worker_p50_ms": _pct(same, 0.50),
        "same_worker_p99_ms": _pct(same, 0.99),
        "cross_worker_p50_ms": _pct(cross, 0.50),
        "cross_worker_p99_ms": _pct(cross, 0.99),
    }
    for q in ("p50", "p99"):
        s, c = out[f"same_worker_{q}_ms"], out[f"cross_worker_{q}_ms"]
        out[f"redis_hop_{q}_ms"] = None if s is None or c is None else round(c - s, 3)
    return out


def _redis_reachable(url: str) -> bool:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("bench/cluster.py talks to 127.0.0.1 only")
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), 2.0):
            return True
    except OSError:
        return False


async def run(args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + args.max_seconds
    out: dict[str, Any] = {
        "subscribers": args.subscribers,
        "events": args.events,
        "inflight": args.inflight,
        "hop_events": args.hop_events,
        "data_bytes": 8 + args.pad,
    }
    if importlib.util.find_spec("bastion.adapters.redis") is None:
        out["bus"] = "missing"
        out["error"] = "the Redis bus (bastion.adapters.redis) is not in this checkout"
        return out
    if not _redis_reachable(args.redis_url):
        out["bus"] = "unreachable"
        out["error"] = f"no Redis at {args.redis_url}"
        return out
    out["bus"] = "redis"
    with bastion_workers(1, CONFIG_TOML) as (proc, port, pids):
        try:
            single = await measure_fanout(port, pids, args, deadline)
        except Exception as exc:
            out["error"] = f"one process: {type(exc).__name__}: {exc}"
            out["stderr_tail"] = proc.stderr_tail(1500)
            return out
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    with bastion_workers(2, cluster_config(args.redis_url, prefix)) as (proc, port, pids):
        try:
            cluster = await measure_fanout(port, pids, args, deadline)
            hop = await measure_hop(port, pids, args, deadline)
        except Exception as exc:
            out["error"] = f"two workers: {type(exc).__name__}: {exc}"
            out["stderr_tail"] = proc.stderr_tail(1500)
            return out
    for name, figures in (("single", single), ("cluster", cluster)):
        for key, value in figures.items():
            out[f"{name}_{key}"] = value
    out["cluster_vs_single"] = (
        round(cluster["deliveries_per_s"] / single["deliveries_per_s"], 3)
        if single["deliveries_per_s"]
        else None
    )
    out.update(hop)
    out["loadavg_1m_end"] = os.getloadavg()[0]
    out.update(environment(sys.argv))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=2000)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--inflight", type=int, default=2, help="concurrent trigger connections")
    ap.add_argument("--hop-events", type=int, default=500, help="sequential events, hop test")
    ap.add_argument("--pad", type=int, default=92, help="filler bytes in each event's data")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--max-seconds", type=float, default=110.0, help="bound for the whole run")
    args = ap.parse_args()
    raise_nofile()
    result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
