"""Channel history costs, in process: memory per channel and per event, and resume time.

Prints ONE JSON line:

* ``bytes_per_event`` — Python memory of one kept event (``tracemalloc``), beyond
  its payload, for payloads of ``--payload`` ASCII bytes (each a string of its
  own): ``--channels`` channels each filled to ``--events`` events, measured as the
  growth from empty histories, divided by the events, minus the payload bytes;
* ``bytes_per_empty_channel`` — a channel history that holds no event (its epoch,
  offset and bookkeeping in the app's table);
* ``bytes_per_full_channel`` — one channel at the defaults (100 events of
  ``--payload`` bytes), everything included;
* ``resume_100_us`` — time to answer a resume that missed 100 events through the
  hub (history read, 100 frames framed and written to a fake session, the answer),
  median of ``--repeat`` runs;
* ``publish_us`` — time of one hub publish on a history channel with one
  subscriber, and ``publish_plain_us`` the same on a channel without history;
* ``delivery_ns`` and ``delivery_plain_ns`` — CPU per delivery of a fan-out to
  ``--subscribers`` fake sessions, with and without history (the event is
  recorded and its frame built once per publish, so history's cost per delivery
  shrinks with the number of subscribers).

Usage: ``python bench/history.py [--channels 1000] [--events 100] [--payload 200]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from typing import Any

from bastion.adapters.memory import MemoryCluster
from bastion.config import HistorySettings, settings_from_mapping
from bastion.core.history import AppHistory, HistoryLimits
from bastion.core.hub import Hub, Session
from bastion.protocol import messages as msg
from bastion.protocol.positions import Resume, parse_position
from bastion.server.apps import app_states


def _limits(events: int) -> HistoryLimits:
    return HistoryLimits.from_settings(
        HistorySettings(max_events=events, max_bytes=16 * 1024 * 1024, max_channels=10**6)
    )


def _epoch_factory() -> Any:
    counter = iter(range(10**9))
    return lambda: f"e{next(counter):07d}"


def memory(channels: int, events: int, payload: int) -> dict[str, float]:
    """Bytes per empty channel, per kept event (beyond its payload), per full channel."""
    limits = _limits(events)
    filler = "x" * (payload - 12)
    names = [f"chat-{index:06d}" for index in range(channels)]
    gc.collect()
    tracemalloc.start()
    history = AppHistory()
    new_epoch = _epoch_factory()
    base = tracemalloc.get_traced_memory()[0]
    for name in names:
        history.since(name, None, None, 0.0, limits, new_epoch)
    empty = tracemalloc.get_traced_memory()[0]
    for round_ in range(events):
        for index, name in enumerate(names):
            # A string of its own per event, as a parsed REST body gives.
            data = f"{round_:06d}{index:06d}{filler}"
            history.append(name, "message", data, None, 1.0, limits, new_epoch)
    full = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_event = (full - empty) / (channels * events)
    return {
        "bytes_per_empty_channel": round((empty - base) / channels, 1),
        "bytes_per_event": round(per_event - payload, 1),
        "bytes_per_full_channel": round((full - base) / channels, 1),
    }


def _hub(history: bool) -> tuple[Hub, Any]:
    app: dict[str, Any] = {"id": "1", "key": "k", "secret": "s"}
    if history:
        app["history"] = {"channel_prefixes": ["chat-"], "max_events": 100}
    settings = settings_from_mapping({"apps": [app]}, environ={})
    cluster = MemoryCluster(time.monotonic).join("local")
    hub = Hub(settings, bytes, time.monotonic, cluster, app_states(settings))
    return hub, hub.apps_by_id["1"]


def _session(written: list[bytes]) -> Session:
    return Session("1.1", written.append, lambda refused: None)


def resume_time(repeat: int, payload: int) -> float:
    """Microseconds to answer a resume that missed 100 events (median)."""
    hub, app = _hub(history=True)
    data = "x" * payload
    times = []
    for run in range(repeat):
        channel = f"chat-{run}"
        written: list[bytes] = []
        first = _session(written)
        hub.subscribe(app, first, msg.Subscribe(channel=channel, resume=Resume()))
        answer = json.loads(json.loads(written[-1])["data"])
        start = parse_position(answer["position"])
        hub.unsubscribe(app, first, channel)
        for _ in range(100):
            hub.publish(app, [channel], "message", data)
        written.clear()
        again = Session(f"2.{run}", written.append, lambda refused: None)
        request = msg.Subscribe(channel=channel, resume=Resume(start))
        began = time.perf_counter()
        hub.subscribe(app, again, request)
        times.append(time.perf_counter() - began)
        assert len(written) == 102, len(written)  # succeeded, 100 events, the answer
    return statistics.median(times) * 1e6


def publish_time(history: bool, count: int, payload: int, subscribers: int = 1) -> float:
    """Microseconds per hub publish to a channel with ``subscribers`` fake sessions."""
    hub, app = _hub(history)
    written: list[bytes] = []
    for index in range(subscribers):
        session = Session(f"1.{index}", written.append, lambda refused: None)
        hub.subscribe(app, session, msg.Subscribe(channel="chat-1"))
    data = "x" * payload
    began = time.process_time()
    for _ in range(count):
        hub.publish(app, ["chat-1"], "message", data)
        written.clear()
    return (time.process_time() - began) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--payload", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=51)
    parser.add_argument("--publishes", type=int, default=50_000)
    parser.add_argument("--subscribers", type=int, default=1000)
    args = parser.parse_args()
    result: dict[str, Any] = {"bench": "history", "python": sys.version.split()[0]}
    result.update(vars(args))
    result.update(memory(args.channels, args.events, args.payload))
    result["resume_100_us"] = round(resume_time(args.repeat, args.payload), 1)
    result["publish_us"] = round(publish_time(True, args.publishes, args.payload), 3)
    result["publish_plain_us"] = round(publish_time(False, args.publishes, args.payload), 3)
    fanouts = max(1, args.publishes // args.subscribers)
    for key, history in (("delivery_ns", True), ("delivery_plain_ns", False)):
        per_publish = publish_time(history, fanouts, args.payload, args.subscribers)
        result[key] = round(per_publish / args.subscribers * 1000, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
