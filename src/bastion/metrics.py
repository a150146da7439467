"""In-process counters, exported to Prometheus by :mod:`bastion.api.ops`.

Labels are app ids, refusal slugs and close codes only — never a secret, a
token, a user id or any client-supplied text.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["GC_PAUSE_BUCKETS", "Metrics"]

#: Upper bounds, in seconds, of the ``bastion_gc_pause_seconds`` buckets (+Inf after).
GC_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Counters for connections, messages, refusals and webhook deliveries."""

    def __init__(self) -> None:
        #: (refusal slug, app id or "") → count.
        self.refusals: Counter[tuple[str, str]] = Counter()
        #: app id → connections opened.
        self.connections_opened: Counter[str] = Counter()
        #: (app id, close code) → connections closed.
        self.connections_closed: Counter[tuple[str, int]] = Counter()
        #: app id → client frames received.
        self.messages_in: Counter[str] = Counter()
        #: app id → REST events published.
        self.events_published: Counter[str] = Counter()
        #: app id → frames dropped unsent for connections that fell behind (held
        #: while their transport was paused, then cut as slow consumers or closed).
        self.frames_discarded: Counter[str] = Counter()
        #: app id → bytes of those frames.
        self.bytes_discarded: Counter[str] = Counter()
        # --- webhooks (bastion.webhooks.dispatcher; dropped: the producer) ---
        #: app id → deliveries answered with a 2xx.
        self.webhooks_delivered: Counter[str] = Counter()
        #: app id → attempts that failed (network error, time-out, non-2xx, refused).
        self.webhook_attempts_failed: Counter[str] = Counter()
        #: app id → deliveries moved to the dead letters.
        self.webhooks_dead: Counter[str] = Counter()
        #: app id → deliveries dropped because the queue held ``max_pending`` rows.
        self.webhooks_dropped: Counter[str] = Counter()
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
        # --- live configuration reloads (bastion.server.reload) ---
        #: result → reloads: ``applied``, ``unchanged``, ``restart_required``, ``invalid``.
        self.config_reloads: Counter[str] = Counter()
        # --- the cycle collector (bastion.server.collector; bastion serve only) ---
        #: generation → pauses per bucket of :data:`GC_PAUSE_BUCKETS`, then +Inf.
        self.gc_pauses: dict[int, list[int]] = {}
        #: generation → seconds paused in total.
        self.gc_pause_seconds: dict[int, float] = {}

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
