"""The durable stores' tables: the audit log (``[audit]``) and the webhook queue (``[webhooks]``).

Models of their own beside :mod:`bastion.config` (which re-exports them and holds
the one ``Settings`` object): where each SQLite file lives, what it keeps and for
how long, and how queued webhooks are batched and delivered. Strict and closed
like every settings model; see docs/configuration.md.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from bastion.limit_settings import STRICT as _STRICT
from bastion.limit_settings import PositiveFloat, PositiveInt

__all__ = ["AuditSettings", "WebhookDeliverySettings"]


class AuditSettings(BaseModel):
    """The security audit log (SQLite, written off the event loop)."""

    model_config = _STRICT

    enabled: bool = True
    #: SQLite file; relative paths are relative to the working directory.
    path: str = "bastion-audit.sqlite3"
    #: Rows older than this many days are deleted.
    retention_days: PositiveInt = 30
    #: Rows kept at most: past it, the oldest rows of the addresses holding the most go.
    max_rows: PositiveInt = 1_000_000


class WebhookDeliverySettings(BaseModel):
    """How webhooks are queued, batched and delivered (``[webhooks]``)."""

    model_config = _STRICT

    #: SQLite file of the durable queue (pending and dead-lettered deliveries).
    queue_path: str = "bastion-webhooks.sqlite3"
    #: Events in one request at most.
    batch_max_events: Annotated[int, Field(gt=0, le=1000)] = 50
    #: Milliseconds an event may wait for others to join its request.
    batch_max_ms: Annotated[int, Field(ge=0, le=60_000)] = 200
    #: Seconds a channel_vacated / member_removed waits for the channel or user to return.
    vacated_delay_seconds: Annotated[float, Field(ge=0, le=60)] = 3
    #: Seconds one delivery attempt may take (connect, send, answer).
    timeout_seconds: PositiveFloat = 10
    #: Requests in flight to one endpoint at once.
    concurrency_per_endpoint: Annotated[int, Field(gt=0, le=100)] = 4
    #: First retry delay, seconds; doubled each attempt (with jitter) up to ``retry_max_seconds``.
    retry_initial_seconds: PositiveFloat = 1
    retry_max_seconds: PositiveFloat = 300
    #: A delivery still failing this many seconds after it was queued goes to the dead letters.
    give_up_after_seconds: PositiveFloat = 86_400
    #: Pending deliveries kept at most; past it new ones are dropped, counted and audited.
    max_pending: PositiveInt = 100_000
    #: Days dead letters and delivered rows are kept.
    retention_days: PositiveInt = 7
