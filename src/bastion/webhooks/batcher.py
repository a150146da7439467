"""Batching of webhook events per endpoint: up to N events or T ms per request.

Pure: ``now`` (monotonic seconds, for the window) and ``time_ms`` (Unix
milliseconds, for the body) are arguments. Each (app, url) has at most one open
batch; it closes when it holds ``max_events`` events (the next event opens a new one
at once) or ``max_ms`` after its first event, whichever comes first. So memory is
bounded by endpoints times ``max_events``, whatever the event rate.

Because the window is the same for every endpoint and ``now`` never goes backwards,
batches fall due in the order they were opened: the open table is one
insertion-ordered dict and :meth:`Batcher.due` stops at the first batch not yet due.
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.webhooks.payloads import WebhookEvent, encode_body

__all__ = ["Batch", "Batcher"]


@dataclass(frozen=True, slots=True)
class Batch:
    """One closed batch: the events of one request to one endpoint.

    Attributes:
        app_id: the app whose endpoint it is.
        url: the endpoint.
        time_ms: Unix milliseconds when the batch was opened (the body's ``time_ms``).
        events: the webhook event objects, in the order they happened.
    """

    app_id: str
    url: str
    time_ms: int
    events: tuple[WebhookEvent, ...]

    def body(self) -> bytes:
        """The exact request body (encoded once; the signature is over these bytes)."""
        return encode_body(self.time_ms, self.events)


@dataclass(slots=True)
class _Open:
    deadline: float
    time_ms: int
    events: list[WebhookEvent]


class Batcher:
    """Collects events per (app, url) into batches.

    Args:
        max_events: events in one batch at most (> 0).
        max_ms: milliseconds after its first event a batch closes; ``0`` closes every
            batch at once (one event per request).
    """

    def __init__(self, max_events: int, max_ms: int) -> None:
        if max_events < 1:
            raise ValueError("max_events must be positive")
        if max_ms < 0:
            raise ValueError("max_ms must not be negative")
        self.max_events = max_events
        self.window = max_ms / 1000
        self._open: dict[tuple[str, str], _Open] = {}

    def __len__(self) -> int:
        """Open batches."""
        return len(self._open)

    def add(
        self, app_id: str, url: str, event: WebhookEvent, now: float, time_ms: int
    ) -> Batch | None:
        """Add ``event`` for the endpoint; return the batch it completed, if any."""
        key = (app_id, url)
        batch = self._open.get(key)
        if batch is None:
            batch = _Open(now + self.window, time_ms, [])
            self._open[key] = batch
        batch.events.append(event)
        if len(batch.events) >= self.max_events or self.window <= 0:
            del self._open[key]
            return Batch(app_id, url, batch.time_ms, tuple(batch.events))
        return None

    def due(self, now: float) -> list[Batch]:
        """Close and return the batches whose window is over at ``now``, oldest first."""
        out: list[Batch] = []
        while self._open:
            key = next(iter(self._open))
            batch = self._open[key]
            if batch.deadline > now:
                break
            del self._open[key]
            out.append(Batch(key[0], key[1], batch.time_ms, tuple(batch.events)))
        return out

    def next_deadline(self) -> float | None:
        """When the oldest open batch closes, or ``None`` when none is open."""
        if not self._open:
            return None
        return next(iter(self._open.values())).deadline

    def drain(self) -> list[Batch]:
        """Close every open batch now, oldest first (shutdown)."""
        out = [
            Batch(app_id, url, batch.time_ms, tuple(batch.events))
            for (app_id, url), batch in self._open.items()
        ]
        self._open.clear()
        return out
