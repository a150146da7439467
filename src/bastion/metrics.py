"""In-process counters, exported to Prometheus by :mod:`bastion.api.ops`.

Labels are app ids, refusal slugs, close code classes, route templates and fixed
words only — never a secret, a token, a user id, an address or any client text.

Histograms are counted here in plain Python, on the event (a connection's close,
a REST answer, a webhook's outcome, a loop-lag sample, a client message), into
fixed buckets: :class:`Histogram` keeps one short list per label set, and the
collector turns them into histogram families at scrape time. Nothing is observed
per broadcast delivery: fan-out stays a loop of writes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = [
    "CONNECTION_SECONDS_BUCKETS",
    "GC_PAUSE_BUCKETS",
    "LOOP_LAG_BUCKETS",
    "MESSAGES_PER_MINUTE_BUCKETS",
    "MESSAGE_BYTES_BUCKETS",
    "MESSAGE_BYTES_INDEX",
    "MESSAGE_BYTES_SUM",
    "REQUEST_SECONDS_BUCKETS",
    "WEBHOOK_ATTEMPTS_BUCKETS",
    "WEBHOOK_SECONDS_BUCKETS",
    "Histogram",
    "Metrics",
    "close_class",
    "status_class",
]

#: Upper bounds, in seconds, of the ``bastion_gc_pause_seconds`` buckets (+Inf after).
GC_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: ``bastion_connection_duration_seconds``: a second to a day.
CONNECTION_SECONDS_BUCKETS = (
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    10_800.0,
    43_200.0,
    86_400.0,
)
#: ``bastion_connection_messages_per_minute``: what a connection sent, per minute of its life.
MESSAGES_PER_MINUTE_BUCKETS = (0.0, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3000.0)
#: ``bastion_message_size_bytes``: a client message's payload, in bytes. Integers, as
#: the sizes are: counted per message, an int compared with ints is the fast path.
MESSAGE_BYTES_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16_384, 65_536)
#: The bucket of every size up to 1 KiB, looked up instead of searched: most client
#: messages are that small, and a tuple index is the cheapest thing CPython does.
MESSAGE_BYTES_INDEX = tuple(bisect_left(MESSAGE_BYTES_BUCKETS, size) for size in range(1025))
#: Where a message-size series keeps its sum (after the buckets and +Inf).
MESSAGE_BYTES_SUM = len(MESSAGE_BYTES_BUCKETS) + 1
#: ``bastion_rest_request_duration_seconds`` and ``bastion_publish_fanout_seconds``.
REQUEST_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: ``bastion_webhook_delivery_seconds``: queued to answered 2xx, retries included.
WEBHOOK_SECONDS_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: ``bastion_webhook_attempts``: attempts a delivery took, counted when it ends.
WEBHOOK_ATTEMPTS_BUCKETS = (1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0)
#: ``bastion_event_loop_lag_seconds``: how late a sampling timer fired.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

K = TypeVar("K", bound=Hashable)


class Histogram(Generic[K]):
    """Observations counted into fixed buckets, one series per key.

    A series is one list: the count of each bucket of :attr:`bounds` (a value
    lands in the first bucket whose bound is at least the value, Prometheus's
    ``le``), then the +Inf bucket, then the sum of the values. The counts are
    integers, and so is the sum of an ``integer`` histogram (sizes): integer
    arithmetic is what CPython does fastest. Hot paths may keep a series
    (:meth:`series`) and count into it themselves.

    Args:
        bounds: the buckets' upper bounds, increasing.
        integer: the values are integers (the sum starts at ``0``, not ``0.0``).
    """

    __slots__ = ("bounds", "by_key", "integer")

    def __init__(self, bounds: tuple[float, ...], *, integer: bool = False) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = bounds
        self.integer = integer
        #: key → counts per bucket, the +Inf count, then the sum.
        self.by_key: dict[K, list[float]] = {}

    def series(self, key: K) -> list[float]:
        """The series of ``key`` (made empty the first time)."""
        series = self.by_key.get(key)
        if series is None:
            empty: list[float] = [0] * (len(self.bounds) + 1)
            empty.append(0 if self.integer else 0.0)
            series = self.by_key[key] = empty
        return series

    def observe(self, key: K, value: float) -> None:
        """Count ``value`` in ``key``'s series."""
        series = self.by_key.get(key)
        if series is None:
            series = self.series(key)
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value


def close_class(code: int) -> str:
    """The class of a WebSocket close code, a bounded label.

    ``normal`` (1000, 1001, 1005: a close without a code), ``lost`` (1006: the
    transport ended without a close), ``protocol`` (other 1xxx: a broken frame),
    and Pusher's three ranges: ``error`` (4000-4099, do not reconnect),
    ``backoff`` (4100-4199, reconnect slowly), ``reconnect`` (4200-4299); else
    ``other``.
    """
    if code in (1000, 1001, 1005):
        return "normal"
    if code == 1006:
        return "lost"
    if 1000 <= code < 2000:
        return "protocol"
    if 4000 <= code < 4100:
        return "error"
    if 4100 <= code < 4200:
        return "backoff"
    if 4200 <= code < 4300:
        return "reconnect"
    return "other"


def status_class(status: int) -> str:
    """``2xx`` to ``5xx`` (anything else: ``other``), a bounded label."""
    return f"{status // 100}xx" if 200 <= status <= 599 else "other"


class Metrics:
    """Counters for connections, messages, refusals and webhook deliveries."""

    def __init__(self) -> None:
        #: (refusal slug, app id or "") → count.
        self.refusals: Counter[tuple[str, str]] = Counter()
        #: app id → connections opened.
        self.connections_opened: Counter[str] = Counter()
        #: (app id, close code) → connections closed.
        self.connections_closed: Counter[tuple[str, int]] = Counter()
        #: (app id, close code) → how long connections lived, at their close (the
        #: collector exports the code's class: :func:`close_class`).
        self.connection_seconds: Histogram[tuple[str, int]] = Histogram(CONNECTION_SECONDS_BUCKETS)
        #: app id → messages a connection sent per minute of its life, at its close.
        self.connection_rates: Histogram[str] = Histogram(MESSAGES_PER_MINUTE_BUCKETS)
        #: (app id, ``address`` or ``user``) → connections that were reconnects
        #: (:mod:`bastion.security.reconnects`).
        self.reconnects: Counter[tuple[str, str]] = Counter()
        #: app id → client frames received.
        self.messages_in: Counter[str] = Counter()
        #: app id → the size of each client message, bytes (connections count into
        #: their app's series themselves, see :meth:`Histogram.series`).
        self.message_bytes: Histogram[str] = Histogram(MESSAGE_BYTES_BUCKETS, integer=True)
        #: app id → REST events published.
        self.events_published: Counter[str] = Counter()
        #: app id → frames dropped unsent for connections that fell behind (held
        #: while their transport was paused, then cut as slow consumers or closed).
        self.frames_discarded: Counter[str] = Counter()
        #: app id → bytes of those frames.
        self.bytes_discarded: Counter[str] = Counter()
        # --- HTTP (bastion.server.http) ---
        #: (route template, status) → seconds from the request read to its answer written
        #: (the collector exports the status's class: :func:`status_class`).
        self.request_seconds: Histogram[tuple[str, int]] = Histogram(REQUEST_SECONDS_BUCKETS)
        #: app id → seconds from a publish request read to its local fan-out written.
        self.publish_seconds: Histogram[str] = Histogram(REQUEST_SECONDS_BUCKETS)
        # --- the event loop (bastion.server.lag) ---
        #: "" → how late each sampling timer fired, seconds.
        self.loop_lag: Histogram[str] = Histogram(LOOP_LAG_BUCKETS)
        # --- webhooks (bastion.webhooks.dispatcher; dropped: the producer) ---
        #: app id → deliveries answered with a 2xx.
        self.webhooks_delivered: Counter[str] = Counter()
        #: app id → attempts that failed (network error, time-out, non-2xx, refused).
        self.webhook_attempts_failed: Counter[str] = Counter()
        #: app id → deliveries moved to the dead letters.
        self.webhooks_dead: Counter[str] = Counter()
        #: app id → deliveries dropped because the queue held ``max_pending`` rows.
        self.webhooks_dropped: Counter[str] = Counter()
        #: app id → seconds from queued to answered 2xx, per delivered delivery.
        self.webhook_seconds: Histogram[str] = Histogram(WEBHOOK_SECONDS_BUCKETS)
        #: app id → attempts per delivery, counted when it is delivered or dead.
        self.webhook_attempts: Histogram[str] = Histogram(WEBHOOK_ATTEMPTS_BUCKETS)
        #: Pending rows in the queue at the dispatcher's last count (a gauge).
        self.webhook_queue_pending = 0
        #: Attempts in flight right now (a gauge).
        self.webhooks_in_flight = 0
        # --- the cluster bus (bastion.adapters.redis) ---
        #: 1 while the node is connected to the bus, else 0 (a gauge).
        self.bus_connected = 0
        #: Times the bus connection was (re-)established.
        self.bus_connects = 0
        #: app id → events written to the bus.
        self.bus_published: Counter[str] = Counter()
        #: app id → events from other nodes handed to local delivery.
        self.bus_received: Counter[str] = Counter()
        #: reason → events not sent or not delivered: ``disconnected`` and ``backlog``
        #: (outgoing, bus down or slow), ``stale`` and ``replayed`` (incoming).
        self.bus_dropped: Counter[str] = Counter()
        #: reason → incoming bus messages refused as forged or malformed.
        self.bus_forged: Counter[str] = Counter()
        #: Users' connection counts decided by this node alone (Redis unavailable).
        self.user_limits_per_node = 0
        #: app id → users this node suspended for spending their error budget.
        self.users_suspended: Counter[str] = Counter()
        # --- live configuration reloads (bastion.server.reload) ---
        #: result → reloads: ``applied``, ``unchanged``, ``restart_required``, ``invalid``.
        self.config_reloads: Counter[str] = Counter()
        # --- security alerts (bastion.server.alerts) ---
        #: (alert, severity) → alerts raised.
        self.alerts: Counter[tuple[str, str]] = Counter()
        # --- the cycle collector (bastion.server.collector; bastion serve only) ---
        #: generation → pauses per bucket of :data:`GC_PAUSE_BUCKETS`, then +Inf.
        self.gc_pauses: dict[int, list[int]] = {}
        #: generation → seconds paused in total.
        self.gc_pause_seconds: dict[int, float] = {}

    def connection_closed(self, app_id: str, code: int, seconds: float, messages: int) -> None:
        """Count one connection's end: its close code, how long it lived, how chatty it was.

        The message rate is over the connection's whole life, at least a second of it.
        Every connection ends here: the two observations are written out, not called.
        """
        key = (app_id, code)
        self.connections_closed[key] += 1
        lives = self.connection_seconds.by_key.get(key) or self.connection_seconds.series(key)
        lives[bisect_left(CONNECTION_SECONDS_BUCKETS, seconds)] += 1
        lives[-1] += seconds
        rate = messages * 60.0 / seconds if seconds > 1.0 else messages * 60.0
        rates = self.connection_rates.by_key.get(app_id) or self.connection_rates.series(app_id)
        rates[bisect_left(MESSAGES_PER_MINUTE_BUCKETS, rate)] += 1
        rates[-1] += rate

    def request_answered(
        self, route: str, publish_app: str | None, status: int, seconds: float
    ) -> None:
        """Count one answered HTTP request.

        Args:
            route: the path's template (:func:`bastion.api.templates.request_route`).
            publish_app: the app id when the route publishes events (its answer is
                written after the local fan-out, so a 2xx also times the fan-out).
            status: the answer's status.
            seconds: from the request read to its answer written.
        """
        self.request_seconds.observe((route, status), seconds)
        if publish_app is not None and 200 <= status <= 299:
            self.publish_seconds.observe(publish_app, seconds)

    def gc_collected(self, generation: int, seconds: float) -> None:
        """Count one collection of ``generation`` that paused the process ``seconds``."""
        buckets = self.gc_pauses.get(generation)
        if buckets is None:
            buckets = self.gc_pauses[generation] = [0] * (len(GC_PAUSE_BUCKETS) + 1)
        index = 0
        while index < len(GC_PAUSE_BUCKETS) and seconds > GC_PAUSE_BUCKETS[index]:
            index += 1
        buckets[index] += 1
        self.gc_pause_seconds[generation] = self.gc_pause_seconds.get(generation, 0.0) + seconds

    def refusal_count(self, slug: str) -> int:
        """Refusals with ``slug`` across every app."""
        return sum(count for (name, _), count in self.refusals.items() if name == slug)
