"""The ``redis`` cluster: nodes share events and state over one Redis.

Split by job:

* :mod:`.client` — the client factory and how a Redis is named in logs;
* :mod:`.session` — connect, run, notice a loss, reconnect with back-off;
* :mod:`.topics` — the bus: topics by interest, signed messages in and out;
* :mod:`.state` — this node's share of the cluster state, reconciled, and reads;
* :mod:`.history` — channel history in Streams, recorded and published by one script;
* :mod:`.scripts` — the atomic Lua scripts and their keys;

and :func:`redis_cluster` puts them together for a node.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis

from bastion.adapters import wire
from bastion.adapters.base import Cluster, ReplayClaims
from bastion.adapters.redis.client import describe_error, describe_url
from bastion.adapters.redis.history import RedisHistory
from bastion.adapters.redis.session import RedisSession
from bastion.adapters.redis.state import QUERY_WAIT, RedisState
from bastion.adapters.redis.topics import MAX_PENDING, RedisBus
from bastion.adapters.replay import LocalReplayClaims
from bastion.config import AdapterSettings, AppSettings
from bastion.metrics import Metrics
from bastion.protocol.signing import REPEAT_GRACE_SECONDS, REST_TIMESTAMP_WINDOW
from bastion.security.audit import AuditEvent
from bastion.security.replay import Verdict

__all__ = ["RedisReplayClaims", "describe_url", "redis_cluster"]

log = logging.getLogger("bastion.bus")


class RedisReplayClaims:
    """Implements :class:`~bastion.adapters.base.ReplayClaims` over Redis.

    This node's own guard first (it catches the node's own replays without a round
    trip, and holds alone while Redis is down), then one script on Redis's clock
    that claims the signature for the cluster, keeping the SDKs' repeat grace.
    """

    def __init__(self, session: RedisSession, local: LocalReplayClaims) -> None:
        self._session = session
        self._local = local

    async def claim(
        self, app_id: str, signature: str, timestamp: int, now: float, *, max_entries: int
    ) -> Verdict:
        """The node's verdict, then the cluster's."""
        verdict = self._local.check(app_id, signature, timestamp, now, max_entries=max_entries)
        scripts = self._session.scripts
        if verdict is not Verdict.ACCEPTED or not self._session.healthy or scripts is None:
            return verdict
        grace_ms = int(REPEAT_GRACE_SECONDS * 1000)
        ttl_ms = int((timestamp + REST_TIMESTAMP_WINDOW - now) * 1000)
        try:
            claimed = await asyncio.wait_for(
                scripts.claim(app_id, signature, grace_ms, ttl_ms), QUERY_WAIT
            )
        except (TimeoutError, aioredis.RedisError) as error:
            log.warning(
                "redis bus %s: replay guard unavailable (%s); this node's guard only",
                self._session.where,
                describe_error(error),
            )
            return verdict
        return Verdict.ACCEPTED if claimed else Verdict.REPLAYED


def redis_cluster(
    settings: AdapterSettings,
    apps: Sequence[AppSettings],
    *,
    clock: Callable[[], float],
    metrics: Metrics | None = None,
    audit: Callable[[AuditEvent], None] | None = None,
    node_id: str | None = None,
    wall_clock: Callable[[], float] = time.time,
    max_pending: int = MAX_PENDING,
) -> Cluster:
    """A node's bus, state and replay claims over the Redis of ``[adapter]``.

    Args:
        settings: the ``[adapter]`` settings (``url`` must be set).
        apps: the node's apps (their secrets derive the key without ``cluster_secret``;
            their payload limits bound an incoming message).
        clock: monotonic seconds (the count throttle).
        metrics: the node's metrics, if any.
        audit: records an audit event (forged messages and values), if any.
        node_id: this node's id on the bus (random by default).
        wall_clock: Unix seconds (message timestamps).
        max_pending: bound of the outgoing queue.
    """
    if settings.url is None:
        raise ValueError("adapter.url is required for the redis adapter")
    secret = settings.cluster_secret
    key = wire.cluster_key(
        secret.get_secret_value() if secret is not None else None,
        [app.secret.get_secret_value() for app in apps],
    )
    # JSON escaping can grow data up to 6x; names and ids add a little.
    largest = max((app.max_event_payload_bytes for app in apps), default=10_240)
    session = RedisSession(
        settings.url,
        describe_url(settings.url),
        node_id or uuid.uuid4().hex,
        settings.heartbeat_seconds,
        settings.reconnect_max_seconds,
        key,
        metrics,
    )
    bus = RedisBus(
        session,
        settings.prefix,
        [app.id for app in apps],
        6 * largest + 16_384,
        audit=audit,
        wall_clock=wall_clock,
        max_pending=max_pending,
    )
    state = RedisState(session, bus, settings.prefix, clock)
    history = RedisHistory(session, bus, settings.prefix, key)
    session.attach(bus, state, history)
    local = LocalReplayClaims()
    replay: ReplayClaims = (
        RedisReplayClaims(session, local) if settings.shared_replay_guard else local
    )
    return Cluster(bus, state, replay, history)
