"""Start a node: build the hub, listen, run the heartbeat tick, drain on signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable

from bastion.adapters.base import Adapter
from bastion.adapters.local import LocalAdapter
from bastion.adapters.redis import RedisAdapter
from bastion.api.ops import Ops
from bastion.api.rest import RestApi
from bastion.config import Settings
from bastion.core.hub import Hub
from bastion.metrics import Metrics
from bastion.security.audit import AuditEvent, from_refusal
from bastion.security.config_audit import CONFIG_LOADED, config_event, fingerprints
from bastion.server.blocklist import NodeBlockList
from bastion.server.context import Outbox, ServerContext, frame_text
from bastion.server.http import HttpConnection
from bastion.server.refusals import RefusalPath, RefusalRecord
from bastion.server.tls import server_context
from bastion.store.audit import AuditLog, AuditLogError
from bastion.store.audit import query as query_audit
from bastion.store.blocks import BlockStore
from bastion.store.webhook_queue import WebhookQueue
from bastion.webhooks.dispatcher import WebhookDispatcher
from bastion.webhooks.producer import WebhookProducer

__all__ = ["Node", "run", "serve"]

log = logging.getLogger("bastion.server")

#: Seconds a drain waits for closing connections before the process exits.
DRAIN_SECONDS = 5.0
#: Seconds a stop waits for the audit writer to flush what is queued.
AUDIT_FLUSH_SECONDS = 10.0
#: Seconds a stop waits for webhook attempts in flight; what is left stays pending
#: in the queue and is sent after the next start.
WEBHOOK_STOP_SECONDS = 5.0


class Node:
    """One running Bastion node (usable in-process by tests and benchmarks)."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.refusals = RefusalPath(self.metrics)
        self.hub = Hub(settings, frame_text, loop.time, self._make_adapter())
        self.hub.adapter.attach(self.hub.deliver_remote)
        self.rest = RestApi(self.hub, self.refusals, self.metrics)
        self.ctx = ServerContext(
            settings, self.hub, self.refusals, self.metrics, loop, self.rest, Outbox(loop)
        )
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
        # Last: the endpoints read the attributes above at request time.
        self.ctx.ops = Ops(self)

    def _make_adapter(self) -> Adapter:
        """The cluster bus ``[adapter]`` asks for."""
        settings = self.settings
        if settings.adapter.driver == "redis":
            # Forged bus messages are audited through the audit log once it is open.
            return RedisAdapter(
                settings.adapter, settings.apps, metrics=self.metrics, audit=self._audit_event
            )
        return LocalAdapter()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start serving."""
        warn_unenforced(self.settings)
        server = self.settings.server
        # First: a bad certificate or key fails start-up before any store is opened.
        tls = None if server.tls is None else await asyncio.to_thread(server_context, server.tls)
        if self.settings.audit.enabled:
            # Opening runs retention over the whole file: keep it off the loop. Before
            # listening, so a refusal is never missed and a bad path fails start-up.
            self.audit = await asyncio.to_thread(AuditLog.from_settings, self.settings.audit)
            self.refusals.listeners.append(self._audit_refusal)
            await asyncio.to_thread(self._audit_config, self.audit)
        try:
            await self._start_webhooks()
            await self._start_blocklist()
            await self.hub.adapter.start()
            self._server = await self.ctx.loop.create_server(
                lambda: HttpConnection(self.ctx),
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
            await self._stop_blocklist()
            await self._stop_webhooks()
            if self.audit is not None:  # do not leave the writer thread behind
                self.refusals.listeners.remove(self._audit_refusal)
                await asyncio.to_thread(self.audit.close, AUDIT_FLUSH_SECONDS)
                self.audit = None
            raise
        self._tick = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        server = self.settings.server
        interval = min(max(min(server.activity_timeout, server.pong_timeout) / 4, 0.05), 1.0)
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            now = self.ctx.loop.time()
            for connection in list(self.ctx.connections):
                connection.check_liveness(now, server.activity_timeout, server.pong_timeout)
            self.hub.flush_subscription_counts()
            ticks += 1
            if ticks % 30 == 0:
                self.hub.expire_cache()

    async def stop(self) -> None:
        """Stop accepting, ask every client to reconnect elsewhere (4200), close."""
        self.ctx.draining = True
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
                await asyncio.wait_for(self._server.wait_closed(), DRAIN_SECONDS)
        # The adapter first: with a cluster, the vacated of channels this node held
        # last is decided in Redis after the drain, and must still reach the webhooks.
        await self.hub.adapter.stop()
        # After the drain: the last connections' channels have vacated (their held
        # channel_vacated are sent now, not dropped); before the audit log closes, so
        # a drop is audited.
        await self._stop_webhooks()
        # Before the audit log closes: a block made during the drain is audited too.
        await self._stop_blocklist()
        if self.audit is not None:
            # After the drain, so the refusals of the last connections are written too.
            with contextlib.suppress(ValueError):
                self.refusals.listeners.remove(self._audit_refusal)
            audit, self.audit = self.audit, None
            if not await asyncio.to_thread(audit.close, AUDIT_FLUSH_SECONDS):
                log.warning("audit log did not flush within %.0f s", AUDIT_FLUSH_SECONDS)

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

    def _audit_refusal(self, record: RefusalRecord) -> None:
        assert self.audit is not None
        self.audit.record(from_refusal(record, id=uuid.uuid4().hex, time=time.time()))

    def _audit_event(self, event: AuditEvent) -> None:
        if self.audit is not None:
            self.audit.record(event)

    async def _start_webhooks(self) -> None:
        """Open the queue (off the loop: a bad path fails start-up), start delivering.

        Only when some app has webhooks, so a node without any writes no queue file.
        """
        if not any(app.webhooks for app in self.settings.apps):
            return
        settings = self.settings.webhooks
        queue = await asyncio.to_thread(
            WebhookQueue.open,
            settings.queue_path,
            max_pending=settings.max_pending,
            retention_days=settings.retention_days,
        )
        dispatcher = WebhookDispatcher(
            settings, queue, self.hub.apps_by_id, self.metrics, audit=self._audit_event
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

    async def _stop_webhooks(self) -> None:
        """Write what is held or batched, let attempts in flight finish, close the queue."""
        producer, self.webhook_producer = self.webhook_producer, None
        dispatcher, self.webhook_dispatcher = self.webhook_dispatcher, None
        queue, self.webhook_queue = self.webhook_queue, None
        if producer is not None:
            with contextlib.suppress(ValueError):
                self.hub.listeners.remove(producer.on_event)
            await producer.flush()
        if dispatcher is not None:
            await dispatcher.stop(WEBHOOK_STOP_SECONDS)
        if queue is not None:
            await asyncio.to_thread(queue.close)

    async def _start_blocklist(self) -> None:
        """Open the blocks file (off the loop: a bad path fails start-up) and load it."""
        settings = self.settings.security.reputation
        store = await asyncio.to_thread(BlockStore, settings.store_path)
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


def warn_unenforced(settings: Settings) -> None:
    """Say loudly which accepted settings this release does not act on yet."""
    if settings.adapter.driver == "redis":
        # The bus carries publishes, client events and server-to-user events; the
        # rest of #5 is not cluster-wide yet, and an operator must know it.
        log.warning(
            "adapter.driver=redis: events and occupied/vacated are cluster-wide, but "
            "presence members, subscription counts, channel queries and rate limits "
            "are still per node"
        )


async def run(settings: Settings, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before anyone is told we listen: a SIGTERM right after that line must drain.
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    node = Node(settings, loop)
    await node.start()
    if on_ready is not None:
        on_ready(settings.server.host, node.port)
    await stop.wait()
    log.info("draining on signal")
    await node.stop()


def serve(settings: Settings, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Run a node on uvloop when available (measured faster), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(run(settings, on_ready))
    else:
        uvloop.run(run(settings, on_ready))
