"""Webhooks: batching, signing and at-least-once delivery from the durable queue.

Modules:
    signing: the Pusher webhook headers (pure).
    retry: the back-off and the retry/give-up decision (pure).
    dispatcher: the asyncio task that sends what the queue holds.
"""

from __future__ import annotations

__all__: list[str] = []
