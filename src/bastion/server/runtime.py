"""Start a node: build the hub, listen, run the heartbeat tick, reload and drain on signal.

Signals (:func:`run`): SIGINT and SIGTERM drain the node within
``[server] drain_seconds``: the listener stops accepting, every client is closed
with 4200, held and batched webhooks are written to the durable queue and the
attempts in flight get what is left of the deadline (an unfinished one stays
queued for the next start), and the audit log is flushed. SIGHUP asks the
``reload`` callable for new settings (``bastion serve --config FILE`` reads the
file again) and applies them live (:mod:`bastion.server.reload`); an invalid file
or a change that needs a restart is logged, by field name, and the running
configuration is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from bastion.adapters.base import Cluster
from bastion.adapters.cluster_limits import ClusterLimits
from bastion.adapters.local import local_cluster
from bastion.adapters.redis import redis_cluster
from bastion.api.admin import AdminApi
from bastion.api.ops import Ops
from bastion.api.rest import RestApi
from bastion.api.routes import front_door
from bastion.config import Settings
from bastion.core import events as ev
from bastion.core.hub import Hub
from bastion.errors import ConfigError
from bastion.metrics import Metrics
from bastion.security.audit import (
    AuditEvent,
    from_refusal,
    role_unknown_event,
    user_suspended_event,
)
from bastion.security.config_audit import CONFIG_LOADED, config_event, fingerprints
from bastion.security.limits import LimiterFactory, memory_limiters
from bastion.server.alerts import NodeAlerts
from bastion.server.apps import app_states
from bastion.server.blocklist import NodeBlockList, open_block_store
from bastion.server.collector import Collector
from bastion.server.context import Outbox, ServerContext, frame_text
from bastion.server.http import HttpConnection
from bastion.server.lag import LoopLagProbe
from bastion.server.refusals import RefusalPath, RefusalSummary
from bastion.server.reload import (
    ReloadResult,
    ReloadSource,
    record_refused,
    reload_settings,
)
from bastion.server.tls import server_context
from bastion.server.user_budget import UserErrorBudgets
from bastion.store.audit import AuditLog, AuditLogError
from bastion.store.audit import query as query_audit
from bastion.store.webhook_queue import WebhookQueue
from bastion.webhooks.dispatcher import WebhookDispatcher
from bastion.webhooks.producer import WebhookProducer

__all__ = ["Node", "run", "serve"]

log = logging.getLogger("bastion.server")

#: Default of ``[server] drain_seconds``: how long a stop may take in all.
DRAIN_SECONDS = 5.0
#: Seconds the audit writer always gets to flush at a stop, even past the drain
#: deadline: audit rows are never given up for it.
AUDIT_FLUSH_FLOOR_SECONDS = 1.0
#: Seconds an audit flush may take outside a drain (a start that failed half-way).
AUDIT_FLUSH_SECONDS = 10.0


class Node:
    """One running Bastion node (usable in-process by tests and benchmarks).

    Args:
        settings: the loaded configuration.
        loop: the event loop the node runs on (its ``time`` is the monotonic clock).
        wall_clock: Unix seconds for authentication: the expiry of retiring secrets
            (REST signatures and channel auth), the REST timestamp window and token
            expiry. ``time.time`` in production; tests pass a clock they move.
    """

    def __init__(
        self,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.refusals = RefusalPath(self.metrics)
        #: Security alerts (``[alerts]``): fed by refusals, audit events and the tick.
        self.alerts: NodeAlerts | None = None
        if settings.alerts.enabled:
            self.alerts = NodeAlerts(settings.alerts, self.metrics, loop, audit=self._audit_event)
            self.refusals.listeners.append(self.alerts.on_refusal)
        #: Samples the loop's lag between start and stop.
        self.lag = LoopLagProbe(loop, self.metrics)
        #: Cluster-wide rate limits (redis adapter only), synced between start and stop.
        self.cluster_limits: ClusterLimits | None = None
        limiters = self._make_limiters()
        #: The node's bus, cluster state and replay claims.
        self.cluster = self._make_cluster(loop)
        self.hub = Hub(
            settings,
            frame_text,
            loop.time,
            self.cluster,
            app_states(settings, wall_clock),
            wall_clock=wall_clock,
            limiters=limiters,
        )
        self.rest = RestApi(
            self.hub, self.refusals, self.metrics, self.cluster.replay, limiters=limiters
        )
        self.ctx = ServerContext(
            settings,
            self.hub,
            self.refusals,
            self.metrics,
            loop,
            self.rest,
            Outbox(loop),
            limiters=limiters,
            wall_clock=wall_clock,
        )
        # Security notices of the hub (an unconfigured role, a suspension) are audited.
        self.hub.notices.append(self._audit_notice)
        #: Each signed-in user's error budget (``user_error_budget``), fed by refusals.
        self.user_budgets = UserErrorBudgets(self.ctx)
        self.refusals.listeners.append(self.user_budgets.on_refusal)
        self._server: asyncio.Server | None = None
        self._tick: asyncio.Task[None] | None = None
        #: The audit log, open between start and stop when ``[audit]`` enables it.
        self.audit: AuditLog | None = None
        #: Blocked addresses and IP reputation, between start and stop.
        self.blocklist: NodeBlockList | None = None
        #: The durable webhook queue, its producer and dispatcher, between start and
        #: stop, when some app has webhooks.
        self.webhook_queue: WebhookQueue | None = None
        self.webhook_producer: WebhookProducer | None = None
        self.webhook_dispatcher: WebhookDispatcher | None = None
        #: Work a live reload started (a replaced webhook producer's flush, opening
        #: the queue); a stop waits for it.
        self._background: set[asyncio.Task[None]] = set()
        #: The security admin API (``[admin]``), served by the route table.
        self.admin: AdminApi
        # Last: the endpoints read the attributes above at request time.
        self.rebuild_ops()

    def _make_cluster(self, loop: asyncio.AbstractEventLoop) -> Cluster:
        """The cluster ``[adapter]`` asks for."""
        settings = self.settings
        if settings.adapter.driver == "redis":
            # Forged bus messages are audited through the audit log once it is open.
            return redis_cluster(
                settings.adapter,
                settings.apps,
                clock=loop.time,
                metrics=self.metrics,
                audit=self._audit_event,
            )
        return local_cluster(loop.time)

    def _make_limiters(self) -> LimiterFactory:
        """Per-address and per-app limits: cluster-wide with the redis adapter."""
        if self.settings.adapter.driver == "redis":
            self.cluster_limits = ClusterLimits(self.settings.adapter)
            return self.cluster_limits
        return memory_limiters

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start serving."""
        server = self.settings.server
        # First: a bad certificate or key fails start-up before any store is opened.
        tls = None if server.tls is None else await asyncio.to_thread(server_context, server.tls)
        if self.settings.audit.enabled:
            # Opening runs retention over the whole file: keep it off the loop. Before
            # listening, so a refusal is never missed and a bad path fails start-up.
            self.audit = await asyncio.to_thread(AuditLog.from_settings, self.settings.audit)
            self.refusals.summaries.append(self._audit_refusal)
            await asyncio.to_thread(self._audit_config, self.audit)
        try:
            await self._start_webhooks()
            await self._start_blocklist()
            await self.cluster.bus.start()
            if self.cluster_limits is not None:
                await self.cluster_limits.start()
            self._server = await self.ctx.loop.create_server(
                functools.partial(HttpConnection, self.ctx),
                host=server.host,
                port=server.port,
                backlog=4096,
                reuse_address=True,
                ssl=tls,
                # A client that opens TCP and stalls the TLS handshake (or its
                # closing) holds a socket for this long at most, as for the HTTP head.
                ssl_handshake_timeout=server.handshake_timeout if tls is not None else None,
                ssl_shutdown_timeout=server.handshake_timeout if tls is not None else None,
            )
        except BaseException:
            if self.cluster_limits is not None:
                await self.cluster_limits.stop()
            await self._stop_blocklist()
            await self._stop_webhooks()
            if self.audit is not None:  # do not leave the writer thread behind
                self.refusals.flush_all()
                self.refusals.summaries.remove(self._audit_refusal)
                await asyncio.to_thread(self.audit.close, AUDIT_FLUSH_SECONDS)
                self.audit = None
            raise
        self.lag.start()
        self._tick = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        while True:
            # Read each tick: a live reload may change the timeouts.
            server = self.settings.server
            interval = min(max(min(server.activity_timeout, server.pong_timeout) / 4, 0.05), 1.0)
            await asyncio.sleep(interval)
            now = self.ctx.loop.time()
            for connection in list(self.ctx.connections):
                connection.check_liveness(now, server.activity_timeout, server.pong_timeout)
            self.hub.tick()
            self.refusals.flush()  # aggregated refusals whose window ended
            if self.alerts is not None:
                self.alerts.poll()  # forged bus messages, webhook dead letters

    async def stop(self) -> None:
        """Stop accepting, ask every client to reconnect elsewhere (4200), close.

        Takes at most ``[server] drain_seconds`` (plus, only if the audit writer is
        behind, :data:`AUDIT_FLUSH_FLOOR_SECONDS`): the listener gets half of it to
        see its connections close, the webhook attempts in flight get what is left.
        """
        loop = self.ctx.loop
        budget = self.settings.server.drain_seconds
        deadline = loop.time() + budget
        self.ctx.draining = True
        self.lag.stop()
        if self._server is not None:
            self._server.close()
        for connection in list(self.ctx.connections):
            connection.close(4200, "Server shutting down; reconnect")
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), budget / 2)
        # The bus first: with a cluster, the vacated of channels this node held last
        # is decided in Redis after the drain, and must still reach the webhooks.
        await self.cluster.bus.stop()
        if self.cluster_limits is not None:  # after the drain: its refusals still count
            await self.cluster_limits.stop()
        if self._background:  # a reload's producer flush or queue opening
            await asyncio.wait(set(self._background), timeout=max(deadline - loop.time(), 0.01))
        if self.alerts is not None:  # alerts raised so far are queued before it closes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.alerts.flush(), max(deadline - loop.time(), 0.01))
        # After the drain: the last connections' channels have vacated (their held
        # channel_vacated are sent now, not dropped); before the audit log closes, so
        # a drop is audited.
        await self._stop_webhooks(deadline)
        # Before the audit log closes: a block made during the drain is audited too.
        await self._stop_blocklist()
        # Every aggregated count still open is logged and audited: nothing is lost.
        self.refusals.flush_all()
        if self.audit is not None:
            # After the drain, so the refusals of the last connections are written too.
            with contextlib.suppress(ValueError):
                self.refusals.summaries.remove(self._audit_refusal)
            audit, self.audit = self.audit, None
            flush = max(deadline - loop.time(), AUDIT_FLUSH_FLOOR_SECONDS)
            if not await asyncio.to_thread(audit.close, flush):
                log.warning("audit log did not flush within %.1f s", flush)

    def _audit_config(self, audit: AuditLog) -> None:
        """Record the configuration this node starts with, naming what changed."""
        try:
            last = query_audit(self.settings.audit.path, type=CONFIG_LOADED, limit=1)
        except AuditLogError:
            last = []
        previous = last[0].metadata if last else None
        event = config_event(
            fingerprints(self.settings), previous, id=uuid.uuid4().hex, time=time.time()
        )
        audit.record(event)
        if event.severity == "warning":
            log.warning("%s", event.message)

    def _audit_refusal(self, summary: RefusalSummary) -> None:
        assert self.audit is not None
        repeats = (summary.count, summary.first, summary.last) if summary.aggregated else None
        event = from_refusal(
            summary.record, id=uuid.uuid4().hex, time=summary.last, repeats=repeats
        )
        self.audit.record(event)

    def _audit_notice(self, notice: ev.Notice) -> None:
        """A hub security notice, written to the audit log (and logged once)."""
        event_id, now = uuid.uuid4().hex, time.time()
        if isinstance(notice, ev.RoleUnknown):
            log.info("app %s: a sign-in named the unconfigured role %r", notice.app_id, notice.role)
            event = role_unknown_event(
                notice.app_id, notice.user_id, notice.role, id=event_id, time=now
            )
        else:
            self.metrics.users_suspended[notice.app_id] += 1
            log.warning(
                "app %s: a user spent its error budget; signed out everywhere for %g s",
                notice.app_id,
                notice.cooldown_seconds,
            )
            event = user_suspended_event(
                notice.app_id,
                notice.user_id,
                notice.cooldown_seconds,
                notice.closed,
                id=event_id,
                time=now,
            )
        self._audit_event(event)

    def _audit_event(self, event: AuditEvent) -> None:
        if self.alerts is not None:  # new blocks count towards an alert
            self.alerts.on_audit(event)
        if self.audit is not None:
            self.audit.record(event)

    def audit_event(self, event: AuditEvent) -> None:
        """Record ``event`` in the audit log (nothing when it is off or closed)."""
        self._audit_event(event)

    # --- live reload (bastion.server.reload) ---------------------------------------------

    def reload(self, settings: Settings, source: ReloadSource) -> None:
        """Apply ``settings`` now, or log (field names only) and keep the running ones.

        For the signal doors (SIGHUP, the supervisor); the admin API calls
        :func:`~bastion.server.reload.reload_settings` itself to answer with the result.
        """
        with contextlib.suppress(ConfigError):  # logged and audited, naming the fields
            reload_settings(self, settings, source)

    def apply_config(self, settings: Settings) -> ReloadResult:
        """``PUT /api/security/config``: apply ``settings`` live, or raise.

        Raises:
            RestartRequired: naming the fields; nothing was applied.
            ConfigError: an app's JWT key file cannot be read; nothing was applied.
        """
        return reload_settings(self, settings, "api")

    def reload_failed(self, source: ReloadSource, fields: list[str], detail: str = "") -> None:
        """A reload whose new settings did not validate: count, log and audit it."""
        record_refused(self, source, "invalid", fields, detail)

    def rebuild_ops(self) -> None:
        """Build the operator endpoints and the route table that serves them.

        At start, and when ``[metrics]`` or ``[admin]`` changed: the new access
        rules apply from the next request on.
        """
        ops = Ops(self)
        self.admin = AdminApi(self, ops)
        self.ctx.ops = ops
        self.ctx.door = front_door(self.ctx, self.hub, self.rest, ops, self.admin)

    def replace_webhooks(self) -> None:
        """The apps' webhook endpoints changed: route hub events by the new ones.

        The old producer's held and batched events are written to the queue in the
        background; the queue is opened when the first endpoint appears.
        """
        producer, dispatcher, queue = (
            self.webhook_producer,
            self.webhook_dispatcher,
            self.webhook_queue,
        )
        if producer is None or dispatcher is None or queue is None:
            if self._server is not None and self._wants_queue():
                self._spawn(self._start_webhooks())
            return
        replacement = WebhookProducer(
            self.settings.webhooks,
            self.settings.apps,
            queue,
            self.ctx.loop,
            wake=dispatcher.wake,
            metrics=self.metrics,
            audit=self._audit_event,
        )
        listeners = self.hub.listeners
        listeners[listeners.index(producer.on_event)] = replacement.on_event
        self.webhook_producer = replacement
        self._spawn(producer.flush())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.ctx.loop.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("live reload: background work failed: %s", task.exception())

    def _wants_queue(self) -> bool:
        """Whether some app has webhooks or alerts are sent to an operator endpoint."""
        settings = self.settings
        alerts = settings.alerts.enabled and settings.alerts.url is not None
        return alerts or any(app.webhooks for app in settings.apps)

    async def _start_webhooks(self) -> None:
        """Open the queue (off the loop: a bad path fails start-up), start delivering.

        Only when some app has webhooks or alerts have a URL, so a node without
        either writes no queue file.
        """
        if not self._wants_queue() or self.webhook_queue is not None:
            return
        settings = self.settings.webhooks
        queue = await asyncio.to_thread(
            WebhookQueue.open,
            settings.queue_path,
            max_pending=settings.max_pending,
            retention_days=settings.retention_days,
        )
        dispatcher = WebhookDispatcher(
            settings,
            queue,
            self.hub.apps_by_id,
            self.metrics,
            audit=self._audit_event,
            alerts=self.settings.alerts,
        )
        try:
            # Sends what an earlier run left pending, right away.
            await dispatcher.start()
        except BaseException:
            await asyncio.to_thread(queue.close)
            raise
        producer = WebhookProducer(
            settings,
            self.settings.apps,
            queue,
            self.ctx.loop,
            wake=dispatcher.wake,
            metrics=self.metrics,
            audit=self._audit_event,
        )
        self.webhook_queue = queue
        self.webhook_dispatcher = dispatcher
        self.webhook_producer = producer
        self.hub.listeners.append(producer.on_event)
        if self.alerts is not None:
            self.alerts.attach(queue, dispatcher.wake)

    async def _stop_webhooks(self, deadline: float | None = None) -> None:
        """Write what is held or batched, let attempts in flight finish, close the queue.

        Attempts in flight get until ``deadline`` (loop time; unset: the default
        drain); what does not finish stays pending and is sent after the next start.
        """
        loop = self.ctx.loop
        if deadline is None:
            deadline = loop.time() + DRAIN_SECONDS
        producer, self.webhook_producer = self.webhook_producer, None
        dispatcher, self.webhook_dispatcher = self.webhook_dispatcher, None
        queue, self.webhook_queue = self.webhook_queue, None
        if self.alerts is not None:
            self.alerts.detach()
        if producer is not None:
            with contextlib.suppress(ValueError):
                self.hub.listeners.remove(producer.on_event)
            await producer.flush()
        if dispatcher is not None:
            await dispatcher.stop(max(deadline - loop.time(), 0.0))
        if queue is not None:
            await asyncio.to_thread(queue.close)

    async def _start_blocklist(self) -> None:
        """Open the blocks file (off the loop: a bad path fails start-up) and load it."""
        settings = self.settings.security.reputation
        # The blocks file, or the cluster's Redis with the redis adapter.
        store = await asyncio.to_thread(open_block_store, self.settings)
        blocklist = NodeBlockList(settings, self.ctx, store, audit=self._audit_event)
        try:
            await blocklist.start()
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        self.blocklist = blocklist
        self.ctx.blocklist = blocklist
        if settings.enabled:
            self.refusals.listeners.append(blocklist.on_refusal)

    async def _stop_blocklist(self) -> None:
        blocklist, self.blocklist = self.blocklist, None
        if blocklist is None:
            return
        with contextlib.suppress(ValueError):
            self.refusals.listeners.remove(blocklist.on_refusal)
        self.ctx.blocklist = None
        await blocklist.stop()


#: Reads the settings to reload on SIGHUP; raises ConfigError when they are invalid.
ReloadSettings = Callable[[], Settings]


def _on_sighup(node: Node | None, reload: ReloadSettings | None, source: ReloadSource) -> None:
    if node is None:
        return  # still starting: run() applies it once the node listens
    if reload is None:
        log.warning("SIGHUP: nothing to reload (started without --config)")
        return
    try:
        settings = reload()
    except ConfigError as exc:
        # The message names fields and never echoes a value (bastion.config).
        node.reload_failed(source, list(exc.fields), str(exc))
        return
    node.reload(settings, source)


async def run(
    settings: Settings,
    on_ready: Callable[[str, int], None] | None = None,
    *,
    reload: ReloadSettings | None = None,
    reload_source: ReloadSource = "sighup",
) -> None:
    """Serve until SIGINT or SIGTERM, then drain; reload on SIGHUP.

    Args:
        settings: the configuration to start with.
        on_ready: called with the host and bound port once listening.
        reload: reads the settings to apply on SIGHUP (``None``: nothing to reload).
        reload_source: how reloads are named in logs, metrics and the audit log.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    started: list[Node] = []
    early: list[bool] = []

    def on_sighup() -> None:
        if not started:
            early.append(True)
        _on_sighup(started[0] if started else None, reload, reload_source)

    # Before anyone is told we listen: a SIGTERM right after that line must drain,
    # and a SIGHUP must never take the default action (terminate).
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    node = Node(settings, loop)
    await node.start()
    started.append(node)
    if early:  # a SIGHUP while starting: apply it now rather than lose it
        _on_sighup(node, reload, reload_source)
    # What start-up built is frozen before the first client: the process's own.
    collector = Collector(loop, node.metrics)
    collector.start()
    if on_ready is not None:
        on_ready(settings.server.host, node.port)
    await stop.wait()
    log.info("draining on signal")
    try:
        await node.stop()
    finally:
        collector.stop()


def serve(
    settings: Settings,
    on_ready: Callable[[str, int], None] | None = None,
    *,
    reload: ReloadSettings | None = None,
) -> None:
    """Run a node on uvloop when available (measured faster), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(run(settings, on_ready, reload=reload))
    else:
        uvloop.run(run(settings, on_ready, reload=reload))
