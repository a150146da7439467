"""The node's blocked addresses: reputation in, O(1) answer at accept, shared through SQLite.

:class:`NodeBlockList` is what :attr:`ServerContext.blocklist` points at.

* :meth:`NodeBlockList.check` is asked at accept (and once a trusted proxy names
  the client): a dictionary lookup in memory, nothing else. A blocked address is
  recorded as an ``ip_blocked`` refusal every time; the refusal path aggregates
  the repeats of one address (a line and an audit row when it starts knocking,
  then one per minute with the exact count), so a blocked host hammering us
  cannot flood either.
* :meth:`NodeBlockList.on_refusal` listens to the refusal path and feeds
  :class:`~bastion.security.reputation.Reputation`. A block it produces is in
  force at once in memory; it is then persisted off the loop, audited
  (``ip_blocked_auto``), logged at WARNING, and the address's open WebSocket
  connections are closed with 4100.
* A sync task reads the store's changes every ``sync_seconds``: manual blocks and
  unblocks from ``bastion block``/``unblock`` (and other nodes' blocks). When the
  store cannot be read (Redis down, a locked file) it retries every round but logs
  the outage once (:class:`~bastion.security.repeats.FailureEpisode`): the first
  failure, a reminder every :data:`REMIND_EVERY_SECONDS` while it lasts, and one
  line when it syncs again, with the number of failures and the duration.
* :meth:`NodeBlockList.block_manual` / :meth:`NodeBlockList.unblock_manual` are an
  operator acting through the admin API (:mod:`bastion.api.admin`): in force on
  this node at once, audited (``ip_blocked_manual`` / ``ip_unblocked``) like the
  CLI, and written to the shared store off the loop, so other nodes apply them
  within their ``sync_seconds``. Store writes run one at a time, in the order
  they were made, so a block followed at once by its unblock never lands reversed.

With ``[security.reputation] enabled = false`` nothing is scored, but blocks from
the store still apply.

The store is the SQLite blocks file (nodes on one host), or with ``[adapter]
driver = "redis"`` the cluster's Redis (:mod:`bastion.store.redis_blocks`, nodes on
any host): :func:`open_block_store` picks it. A Redis that is down at start does
not fail start-up: the node starts with no blocks from the store and the sync
task reads them all once Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from bastion.config import ReputationSettings, Settings
from bastion.protocol.refusals import Reason
from bastion.security.audit import AuditEvent, from_block, from_unblock
from bastion.security.repeats import FailureEpisode
from bastion.security.reputation import Block, BlockSet, Reputation, canonical_ip
from bastion.server.context import ServerContext
from bastion.server.refusals import RefusalRecord
from bastion.store.blocks import BlockChange, BlockStore, BlockStoreError
from bastion.store.redis_blocks import RedisBlockStore

__all__ = [
    "CLOSE_CODE",
    "PRUNE_EVERY_SECONDS",
    "REMIND_EVERY_SECONDS",
    "BlockBackend",
    "NodeBlockList",
    "open_block_store",
]

log = logging.getLogger("bastion.blocks")

#: Close code for a blocked address's open connections: 4100 tells pusher-js to
#: reconnect with back-off, and every reconnect is dropped at accept until expiry.
CLOSE_CODE = 4100
#: Seconds between prunes of the store's old rows.
PRUNE_EVERY_SECONDS = 3600.0
#: Seconds between reminders while the blocks cannot be synced.
REMIND_EVERY_SECONDS = 600.0


class BlockBackend(Protocol):
    """What a node needs of a block store (the SQLite file or Redis); synchronous."""

    @property
    def path(self) -> str:
        """Where the blocks are, for log lines (never a password)."""
        ...

    def block(self, block: Block, *, now: float) -> bool: ...
    def unblock(self, ip: str, *, now: float) -> Block | None: ...
    def active(self, *, now: float) -> list[Block]: ...
    def last_change_id(self) -> int: ...
    def changes(self, since: int, *, limit: int = 10_000) -> list[BlockChange]: ...
    def prune(self, *, now: float, keep_seconds: float = ...) -> int: ...
    def close(self) -> None: ...


def open_block_store(settings: Settings) -> BlockBackend:
    """The blocks shared by the nodes: Redis with the redis adapter, else the file.

    Blocking (the file is opened and created): call it off the loop.

    Raises:
        BlockStoreError: the blocks file cannot be opened.
    """
    adapter = settings.adapter
    if adapter.driver == "redis" and adapter.url is not None:
        return RedisBlockStore(adapter.url, adapter.prefix)
    return BlockStore(settings.security.reputation.store_path)


class NodeBlockList:
    """Blocked addresses of one node (the :class:`~bastion.server.context.BlockList`).

    Args:
        settings: ``[security.reputation]``.
        ctx: the node's shared context (refusal path, open connections, loop).
        store: the open blocks file.
        audit: records one audit event (or ``None`` when the audit log is off);
            called on the loop, must not block.
        clock: Unix seconds (block expiry is wall-clock, shared with the CLI).
    """

    def __init__(
        self,
        settings: ReputationSettings,
        ctx: ServerContext,
        store: BlockBackend,
        audit: Callable[[AuditEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.store = store
        self.audit = audit
        self.clock = clock
        self.reputation = Reputation.from_settings(settings)
        self.blocks = BlockSet()
        #: The current run of failed syncs with the store, reported once.
        self.sync_failures = FailureEpisode(REMIND_EVERY_SECONDS)
        self._change_id = 0
        self._sync: asyncio.Task[None] | None = None
        # Persist tasks in flight; kept so they are not collected and are awaited at stop.
        self._pending: set[asyncio.Task[Any]] = set()
        #: Serialises store writes so they land in the order they were made.
        self._writes = asyncio.Lock()

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Load the blocks in force, then start the sync task."""
        now = self.clock()
        try:
            # The change id first: a change made between the two reads is read again.
            self._change_id = await asyncio.to_thread(self.store.last_change_id)
            for block in await asyncio.to_thread(self.store.active, now=now):
                if not self._exempt(block.ip):
                    self.blocks.put(block)
            await asyncio.to_thread(self.store.prune, now=now)
        except BlockStoreError as exc:
            if not isinstance(self.store, RedisBlockStore):
                raise  # a bad blocks file fails start-up
            # Redis down: serve now; the sync task reads every change once it is back.
            self._change_id = 0
            self.sync_failures.failure(self.clock())
            log.warning("blocks not loaded at start (%s); syncing when redis is back", exc)
        if self.blocks:
            log.info("%d blocked addresses loaded from %s", len(self.blocks), self.store.path)
        self._sync = asyncio.create_task(self._sync_forever(), name="bastion-blocks-sync")

    async def stop(self) -> None:
        """Stop syncing, finish pending writes, close the store."""
        if self._sync is not None:
            self._sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync
            self._sync = None
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    # --- the BlockList protocol ------------------------------------------------------

    def check(self, ip: str, now: float) -> bool:
        """Whether ``ip`` is blocked at ``now``; a ``True`` is already counted."""
        if not self.blocks:  # the common case costs one length check
            return False
        key = canonical_ip(ip)
        if key is None:
            return False
        block = self.blocks.get(key, now)
        if block is None:
            return False
        # Counted every time; the refusal path aggregates the log lines and audit rows.
        self.ctx.refusals.record(
            Reason.IP_BLOCKED, ip=key, detail=f"blocked ({block.source}) until {block.until:.0f}"
        )
        return True

    # --- reputation -------------------------------------------------------------------

    def on_refusal(self, record: RefusalRecord) -> None:
        """Refusal listener: score the address, block it when it crosses the threshold."""
        if record.ip is None or record.reason is Reason.IP_BLOCKED:
            return  # no address to score; and a block must not feed itself
        now = self.clock()
        block = self.reputation.add(record.ip, record.reason.value.slug, now)
        if block is not None and self.blocks.add(block, now):
            log.warning(
                "address blocked ip=%s until=%.0f score=%.1f last=%s",
                block.ip,
                block.until,
                block.score,
                record.reason.value.slug,
            )
            if self.audit is not None:
                self.audit(from_block(block, id=uuid.uuid4().hex, time=now))
            self._persist(block, now)
            self._close_connections(block.ip)

    def _persist(self, block: Block, now: float) -> None:
        self._spawn(self._write_block(block, now), block.ip)

    async def _write_block(self, block: Block, now: float) -> None:
        async with self._writes:
            await asyncio.to_thread(self.store.block, block, now=now)

    # --- an operator (the admin API) ---------------------------------------------------

    def active_blocks(self) -> list[Block]:
        """Every block in force on this node now, soonest to end first."""
        return self.blocks.active(self.clock())

    def block_manual(self, ip: str, ttl_seconds: float, reason: str) -> Block:
        """Block ``ip`` for ``ttl_seconds`` on an operator's word.

        In force on this node at once (its open connections are closed with
        :data:`CLOSE_CODE`), audited ``ip_blocked_manual``, then written to the
        shared store off the loop. An operator's block replaces any block in force.

        Args:
            ip: the address (any spelling :func:`canonical_ip` accepts).
            ttl_seconds: how long the block lasts (> 0).
            reason: why (kept and audited; redacted in the audit log).

        Raises:
            ValueError: ``ip`` is not an address, is in ``never_block``, or the
                TTL is not positive.
        """
        key = canonical_ip(ip)
        if key is None:
            raise ValueError("not an IP address")
        if self.reputation.exempt(key):
            raise ValueError("the address is in security.reputation.never_block")
        if not ttl_seconds > 0:
            raise ValueError("the TTL must be positive")
        now = self.clock()
        block = Block(ip=key, until=now + ttl_seconds, reason=reason, source="manual", created=now)
        self.blocks.put(block)
        log.warning("address blocked ip=%s until=%.0f source=manual", key, block.until)
        if self.audit is not None:
            self.audit(from_block(block, id=uuid.uuid4().hex, time=now))
        self._persist(block, now)
        self._close_connections(key)
        return block

    def unblock_manual(self, ip: str) -> Block | None:
        """Lift the block of ``ip`` on an operator's word.

        Lifted on this node at once and its reputation score forgotten; the store
        is written off the loop. Audited ``ip_unblocked`` when a block was lifted
        (here, or only in the store when this node had not synced it yet).

        Returns:
            The block this node had in force, or ``None``.

        Raises:
            ValueError: ``ip`` is not an address.
        """
        key = canonical_ip(ip)
        if key is None:
            raise ValueError("not an IP address")
        now = self.clock()
        previous = self.blocks.remove(key)
        if previous is not None and not previous.active(now):
            previous = None
        self.reputation.forget(key)
        if previous is not None:
            log.info("address unblocked ip=%s source=manual", key)
            if self.audit is not None:
                self.audit(from_unblock(key, id=uuid.uuid4().hex, time=now, previous=previous))
        self._spawn(self._write_unblock(key, now, audited=previous is not None), key)
        return previous

    async def _write_unblock(self, ip: str, now: float, *, audited: bool) -> None:
        async with self._writes:
            stored = await asyncio.to_thread(self.store.unblock, ip, now=now)
        if stored is not None and not audited and self.audit is not None:
            # A block this node had not synced yet (from the CLI or another node).
            self.audit(from_unblock(ip, id=uuid.uuid4().hex, time=now, previous=stored))

    def _spawn(self, work: Coroutine[Any, Any, Any], ip: str) -> None:
        task = self.ctx.loop.create_task(work)
        self._pending.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._pending.discard(task)
            if not task.cancelled() and task.exception() is not None:
                # In force in memory either way; only other nodes and restarts miss it.
                log.warning("block of %s not persisted: %s", ip, task.exception())

        task.add_done_callback(done)

    def _close_connections(self, ip: str) -> None:
        for connection in list(self.ctx.connections):
            if connection.ip is not None and canonical_ip(connection.ip) == ip:
                # Soon, not now: we may be inside this very connection's frame handler.
                self.ctx.loop.call_soon(connection.close, CLOSE_CODE, "Address blocked")

    # --- sync with the store ------------------------------------------------------------

    def _exempt(self, ip: str) -> bool:
        """A stored block of a ``never_block`` address is not applied: the CLI may have
        been run with another config, or another node with another list."""
        if not self.reputation.exempt(ip):
            return False
        log.warning("ignoring the stored block of %s: it is in never_block", ip)
        return True

    async def _sync_forever(self) -> None:
        last_prune = self.clock()
        while True:
            await asyncio.sleep(self.settings.sync_seconds)
            try:
                await self.sync()
                now = self.clock()
                if now - last_prune >= PRUNE_EVERY_SECONDS or now < last_prune:
                    last_prune = now
                    await asyncio.to_thread(self.store.prune, now=now)
            except BlockStoreError as exc:
                # A locked or vanished file must not stop the node: retry next round,
                # and say so once per outage rather than once per round.
                report = self.sync_failures.failure(self.clock())
                if report is not None and report.event == "failed":
                    log.warning(
                        "blocks not synced: %s (retrying every %g s; logged again when"
                        " synced, or every %.0f s while it lasts)",
                        exc,
                        self.settings.sync_seconds,
                        REMIND_EVERY_SECONDS,
                    )
                elif report is not None:
                    log.warning(
                        "blocks still not synced after %d failures over %.0f s: %s",
                        report.failures,
                        report.seconds,
                        exc,
                    )
            else:
                report = self.sync_failures.success(self.clock())
                if report is not None:
                    log.info(
                        "blocks synced again after %d failures over %.0f s",
                        report.failures,
                        report.seconds,
                    )

    async def sync(self) -> int:
        """Apply the store's changes since the last sync; returns how many were read."""
        changes = await asyncio.to_thread(self.store.changes, self._change_id)
        now = self.clock()
        for change in changes:
            self._change_id = max(self._change_id, change.change_id)
            if change.block is None or not change.block.active(now):
                if self.blocks.remove(change.ip) is not None:
                    log.info("address unblocked ip=%s", change.ip)
                if change.block is None:
                    self.reputation.forget(change.ip)  # an operator forgave it
                continue
            if self._exempt(change.ip):
                continue
            current = self.blocks.get(change.ip, now)
            if current != change.block:
                self.blocks.put(change.block)  # the store's word is final
                if current is None:
                    log.warning(
                        "address blocked ip=%s until=%.0f source=%s",
                        change.ip,
                        change.block.until,
                        change.block.source,
                    )
                    self._close_connections(change.ip)
        self.blocks.prune(now)
        return len(changes)
