"""The cluster state in Redis: this node's share, reconciled; the cluster's, read.

The node records *desired* state as its hub reports transitions (channels held,
subscriber counts, presence members, signed-in users), and the session's syncer
makes Redis record it, one atomic script per change (:mod:`.scripts`), in order,
by desired state: an entry is written only if it still differs when its turn
comes, so a channel left and joined again meanwhile costs nothing. Each script
says whether this node was the first or the last holder, which decides the
cluster's events once: ``channel_occupied`` / ``channel_vacated`` and presence
``member_added`` / ``member_removed`` (hub events for the webhooks, on this node
only), the member frames and the sign-ins' online / offline (control messages
for every node: this node's hub directly, the others over the bus), and the
channel's subscription count (announced throttled, :mod:`bastion.protocol.counts`).

Every heartbeat the node refreshes its liveness key and reaps the nodes whose key
expired: the reap script removes a dead node's channels, members and sign-ins in
one step, so exactly one survivor announces what only the dead node held. After a
reconnection the node re-asserts its share (an ``occupied`` may be reported again
if Redis lost its data). While the bus is down nothing is decided for the cluster:
member and sign-in changes reach this node's own clients at once, and the reads
raise :class:`~bastion.adapters.base.ClusterUnavailable`.

A user id that cannot be written to Redis (not encodable as UTF-8) is dropped
from the shared state and counted (``bus_dropped{reason="unencodable"}``): one bad
entry never takes the session down.

Users' connections (``max_connections_per_user``) are the one decision a caller
waits for: :meth:`RedisState.claim_connection` runs its script at once (one round
trip) rather than on the syncer, and what it replaced is closed on every node.
While the bus is down (or the script does not answer in time) the node decides
alone, counting the user's connections it holds itself
(``bastion_user_limits_per_node_total``), and records them once Redis is back;
releases are written by the syncer like every other transition.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from bastion.adapters.base import Cached, ChannelState, ClusterUnavailable, Emit, Receive
from bastion.adapters.messages import (
    MemberAdded,
    MemberRemoved,
    Message,
    Replaced,
    SubscriptionCount,
    UserOffline,
    UserOnline,
)
from bastion.adapters.redis.client import COMMAND_TIMEOUT, describe_error
from bastion.adapters.redis.scripts import (
    StateScripts,
    connection_tag,
    member_tag,
    split_connection_tag,
    split_tag,
)
from bastion.adapters.redis.session import RedisSession
from bastion.core import events as ev
from bastion.protocol import messages as msg
from bastion.protocol.counts import CountThrottle

__all__ = ["RedisState", "StateBus"]

_T = TypeVar("_T")

log = logging.getLogger("bastion.bus")

#: Seconds a cluster-wide read (REST query, members, cache, watchlists) may take.
QUERY_WAIT = 2.0
#: Seconds a read waits for this node's own pending changes to reach Redis first.
SETTLE_WAIT = 0.5


class StateBus(Protocol):
    """What the state asks of the bus (:class:`~.topics.RedisBus`)."""

    def broadcast(self, message: Message) -> None:
        """Send a control message to the other nodes."""

    async def publish_now(self, client: Any, message: Message) -> None:
        """Send a control message on ``client`` at once (a clean stop)."""

    def forged(self, reason: str, size: int) -> None:
        """Count, and log and audit at a bounded rate, something forged."""

    def drop(self, reason: str) -> None:
        """Count something the cluster will not get."""


def _ignore_message(message: Message) -> None:
    """The receiver before the hub attaches."""


def _ignore_event(event: ev.HubEvent) -> None:
    """The emitter before the hub attaches."""


class RedisState:
    """Implements :class:`~bastion.adapters.base.ClusterState` over Redis.

    Args:
        session: the node's Redis session.
        bus: the node's bus (control messages for the other nodes).
        prefix: the cluster's key prefix.
        clock: monotonic seconds (the count throttle).
    """

    def __init__(
        self,
        session: RedisSession,
        bus: StateBus,
        prefix: str,
        clock: Callable[[], float],
    ) -> None:
        self._session = session
        self._bus = bus
        self.prefix = prefix
        self._clock = clock
        self._receive: Receive = _ignore_message
        self._emit: Emit = _ignore_event
        #: ``{app_id}:{channel}`` entries this node has local interest in (desired).
        self._occ_wanted: set[str] = set()
        #: Entries Redis records for this node, as far as this session knows.
        self._occ_held: set[str] = set()
        #: Re-read what Redis holds for this node before the next reconcile.
        self._reload = False
        #: Presence members on this node (desired): tag → (user_info JSON, first socket).
        self._pres_wanted: dict[str, tuple[str, str | None]] = {}
        #: Member tags Redis records for this node, as far as this session knows.
        self._pres_held: set[str] = set()
        #: ``{app_id}\\n{user_id}`` of users signed in on this node (desired, held).
        self._users_wanted: set[str] = set()
        self._users_held: set[str] = set()
        #: entry → this node's subscriber count; entries whose count Redis lacks.
        self._counts: dict[str, int] = {}
        self._counts_dirty: set[str] = set()
        #: Apps that send subscription_count events (their totals are broadcast).
        #: Per app, not per channel: nothing to forget when a channel goes.
        self._announcing: set[str] = set()
        #: This node's announcements of cluster totals, throttled.
        self._throttle = CountThrottle()
        #: entry → a cache channel's last event to record (the latest wins).
        self._cache_out: dict[str, tuple[str, str, int]] = {}
        #: Connection tags this node counts (desired), and those Redis records.
        self._conns_wanted: set[str] = set()
        self._conns_held: set[str] = set()
        #: Tags released here that Redis still counts (their release is on its way).
        self._conns_leaving: set[str] = set()
        #: (app, user) → the socket ids this node counts, oldest first (what an
        #: outage's decisions count).
        self._conns_by_user: dict[tuple[str, str], dict[str, None]] = {}

    def attach(self, receive: Receive, emit: Emit) -> None:
        """Where decisions go."""
        self._receive = receive
        self._emit = emit

    def forged(self, kind: str) -> None:
        """A value read from Redis did not open under the cluster key."""
        self._bus.forged(kind, 0)

    # --- transitions -----------------------------------------------------------------

    def channel_on(self, app_id: str, channel: str) -> None:
        """Hold the channel in Redis (soon, on the syncer)."""
        self._occ_wanted.add(f"{app_id}:{channel}")
        self._session.wake_syncer()

    def channel_off(self, app_id: str, channel: str) -> None:
        """Let the channel go in Redis (soon, on the syncer)."""
        entry = f"{app_id}:{channel}"
        self._occ_wanted.discard(entry)
        self._counts.pop(entry, None)
        self._counts_dirty.discard(entry)
        # Whatever the cluster decides, this node has nothing more to announce.
        self._throttle.forget(app_id, channel)
        self._session.wake_syncer()

    def count(self, app_id: str, channel: str, subscribers: int, *, announce: bool) -> None:
        """Record this node's subscriber count of ``channel`` (soon, on the syncer)."""
        entry = f"{app_id}:{channel}"
        if announce:
            self._announcing.add(app_id)
        else:
            self._announcing.discard(app_id)
        if self._counts.get(entry) != subscribers:
            self._counts[entry] = subscribers
            self._counts_dirty.add(entry)
            self._session.wake_syncer()

    def member_on(
        self, app_id: str, channel: str, user_id: str, user_info: Any, socket_id: str
    ) -> None:
        """Add a member (soon); member_added goes out if new to the cluster."""
        info = msg.dumps(user_info)
        if not self._session.healthy:
            # Nothing can be decided for the cluster: this node's clients learn now.
            self._receive(MemberAdded(app_id, channel, user_id, user_info, socket_id))
        tag = member_tag(f"{app_id}:{channel}", user_id)
        if _encodable(tag):
            self._pres_wanted[tag] = (info, socket_id)
            self._session.wake_syncer()
        else:
            self._bus.drop("unencodable")

    def member_off(self, app_id: str, channel: str, user_id: str) -> None:
        """Remove a member (soon); member_removed goes out if it left the cluster."""
        if not self._session.healthy:
            self._receive(MemberRemoved(app_id, channel, user_id))
        self._pres_wanted.pop(member_tag(f"{app_id}:{channel}", user_id), None)
        self._session.wake_syncer()

    def user_on(self, app_id: str, user_id: str) -> None:
        """Record a user signed in on this node (soon)."""
        if not self._session.healthy:
            self._receive(UserOnline(app_id, user_id))
        tag = f"{app_id}\n{user_id}"
        if _encodable(tag):
            self._users_wanted.add(tag)
            self._session.wake_syncer()
        else:
            self._bus.drop("unencodable")

    def user_off(self, app_id: str, user_id: str) -> None:
        """Record a user's last connection on this node gone (soon)."""
        if not self._session.healthy:
            self._receive(UserOffline(app_id, user_id))
        self._users_wanted.discard(f"{app_id}\n{user_id}")
        self._session.wake_syncer()

    async def claim_connection(
        self, app_id: str, user_id: str, socket_id: str, limit: int, *, close_oldest: bool
    ) -> bool:
        """Count the connection in Redis (one script), or on this node while it cannot."""
        tag = connection_tag(app_id, user_id, socket_id)
        if not _encodable(tag):
            self._bus.drop("unencodable")
            return self._claim_here(tag, limit, close_oldest=close_oldest)
        if self._session.healthy and self._leaving(app_id, user_id):
            # A connection of this user closed here and Redis still counts it: the
            # release goes first, or a user who reopens a tab at once is refused.
            await self._session.settle(SETTLE_WAIT)
        scripts = self._session.scripts
        if self._session.healthy and scripts is not None:
            try:
                replaced = await asyncio.wait_for(
                    scripts.claim_connection(tag, limit, close_oldest=close_oldest), QUERY_WAIT
                )
            except Exception as error:  # Redis down or slow: this node decides alone
                log.warning(
                    "redis bus %s: user connection count unavailable (%s); counting per node",
                    self._session.where,
                    describe_error(error),
                )
            else:
                if replaced is None:
                    return False
                self._count(tag)
                self._conns_held.add(tag)
                if replaced:
                    for victim in replaced:
                        # Ours or not, Redis no longer counts it.
                        gone = connection_tag(app_id, user_id, victim)
                        self._conns_held.discard(gone)
                        self._conns_leaving.discard(gone)
                    self._decide(Replaced(app_id, user_id, tuple(replaced)))
                return True
        return self._claim_here(tag, limit, close_oldest=close_oldest)

    def _claim_here(self, tag: str, limit: int, *, close_oldest: bool) -> bool:
        """The decision of this node alone: the user's connections it holds."""
        metrics = self._session.metrics
        if metrics is not None:
            metrics.user_limits_per_node += 1
        app_id, user_id, _ = split_connection_tag(tag)
        counted = self._conns_by_user.get((app_id, user_id), {})
        excess = len(counted) - limit + 1
        if excess > 0:
            if not close_oldest:
                return False
            oldest = tuple(list(counted)[:excess])
            for victim in oldest:
                self._uncount(connection_tag(app_id, user_id, victim))
            # This node only: the others cannot be told, or decide for themselves.
            self._receive(Replaced(app_id, user_id, oldest))
        self._count(tag)
        self._session.wake_syncer()  # recorded in Redis once it is back
        return True

    def release_connection(self, app_id: str, user_id: str, socket_id: str) -> None:
        """Stop counting the connection (in Redis soon, on the syncer)."""
        tag = connection_tag(app_id, user_id, socket_id)
        if tag in self._conns_wanted:
            self._uncount(tag)
            self._session.wake_syncer()

    def _leaving(self, app_id: str, user_id: str) -> bool:
        """Whether Redis still counts a connection of the user that closed here."""
        if not self._conns_leaving:
            return False
        user = connection_tag(app_id, user_id, "")
        return any(tag.startswith(user) for tag in self._conns_leaving)

    def _count(self, tag: str) -> None:
        app_id, user_id, socket_id = split_connection_tag(tag)
        self._conns_wanted.add(tag)
        self._conns_by_user.setdefault((app_id, user_id), {})[socket_id] = None

    def _uncount(self, tag: str) -> None:
        app_id, user_id, socket_id = split_connection_tag(tag)
        self._conns_wanted.discard(tag)
        if tag in self._conns_held:
            self._conns_leaving.add(tag)
        counted = self._conns_by_user.get((app_id, user_id))
        if counted is not None:
            counted.pop(socket_id, None)
            if not counted:
                del self._conns_by_user[(app_id, user_id)]

    def cache(self, app_id: str, channel: str, event: str, data: str, ttl_seconds: int) -> None:
        """Record a cache channel's last event in Redis (with the next writes)."""
        if not self._session.healthy:
            return
        self._cache_out[f"{app_id}:{channel}"] = (event, data, max(1, ttl_seconds) * 1000)
        self._session.wake_writer()

    def tick(self) -> None:
        """Announce the held subscription counts that are due."""
        for app_id, channel, total in self._throttle.due(self._clock()):
            self._announce(app_id, channel, total)

    # --- reads -------------------------------------------------------------------------

    async def members(self, app_id: str, channel: str) -> dict[str, Any]:
        """The cluster's members of ``channel``: user id → user_info."""

        async def read(scripts: StateScripts) -> dict[str, Any]:
            raw = await scripts.members(f"{app_id}:{channel}")
            return {user_id: _loads(info) for user_id, info in raw.items()}

        return await self._query(read)

    async def cached(self, app_id: str, channel: str) -> Cached | None:
        """A cache channel's last event in the cluster."""

        async def read(scripts: StateScripts) -> Cached | None:
            found = await scripts.cached(f"{app_id}:{channel}")
            return None if found is None else Cached(*found)

        return await self._query(read)

    async def online(self, app_id: str, user_ids: list[str]) -> set[str]:
        """Those of ``user_ids`` signed in anywhere."""
        wanted = [user_id for user_id in user_ids if _encodable(user_id)]

        async def read(scripts: StateScripts) -> set[str]:
            return await scripts.online(app_id, wanted)

        return await self._query(read)

    async def channel_states(
        self, app_id: str, names: list[str] | None, prefix: str = "", limit: int | None = None
    ) -> dict[str, ChannelState]:
        """The cluster's view of ``names``, or of the occupied channels with ``prefix``."""

        async def read(scripts: StateScripts) -> dict[str, ChannelState]:
            if names is None:
                found = await scripts.occupied(app_id, prefix, limit)
                return {
                    name: ChannelState(True, subscriptions, users)
                    for name, (subscriptions, users) in found.items()
                }
            infos = await scripts.channel_info([f"{app_id}:{name}" for name in names])
            return {
                name: ChannelState(occupied, subscriptions, users)
                for name, (occupied, subscriptions, users) in zip(names, infos, strict=True)
            }

        return await self._query(read)

    async def _query(self, read: Callable[[StateScripts], Coroutine[Any, Any, _T]]) -> _T:
        # Read this node's own writes: its pending interest, member and count changes
        # are applied first (not waiting forever under constant churn).
        await self._session.settle(SETTLE_WAIT)
        scripts = self._session.scripts
        if not self._session.healthy or scripts is None:
            raise ClusterUnavailable("the redis bus is disconnected")
        try:
            return await asyncio.wait_for(read(scripts), QUERY_WAIT)
        except TimeoutError:
            raise ClusterUnavailable("the redis bus did not answer in time") from None
        except Exception as error:  # a Redis error or a broken reply: no partial answer
            raise ClusterUnavailable(describe_error(error)) from None

    # --- the session's side ----------------------------------------------------------

    async def begin(self, scripts: StateScripts) -> None:
        """A new session: register, then re-assert this node's share.

        What the last session left in Redis is the starting point: channels left
        during an outage are vacated now; a reaped node starts from nothing.
        """
        await asyncio.wait_for(scripts.beat(), COMMAND_TIMEOUT)
        self._reload = True
        await self.reconcile(scripts)

    async def write(self, client: Any, scripts: StateScripts) -> None:
        """Write the cache events waiting (the session's writer)."""
        if not self._cache_out:
            return
        writes, self._cache_out = self._cache_out, {}
        # Reset on any exit (a cancelled session too): no unclosed pipelines.
        async with client.pipeline(transaction=False) as pipe:
            for entry, (event, data, ttl_ms) in writes.items():
                scripts.write_cache(pipe, entry, event, data, ttl_ms)
            await asyncio.wait_for(pipe.execute(), COMMAND_TIMEOUT)

    async def reconcile(self, scripts: StateScripts) -> None:
        """Make Redis record this node's share as it is now, one change at a time.

        By desired state: an entry is written only if it still differs when its
        turn comes. Changes made during a pass wake the syncer for another one.
        """
        if self._reload:
            self._reload = False
            self._occ_held = await _timed(scripts.held())
            self._pres_held = await _timed(scripts.held_members())
            self._users_held = await _timed(scripts.held_users())
            self._conns_held = await _timed(scripts.held_connections())
            self._conns_leaving = self._conns_held - self._conns_wanted
            self._counts_dirty = set(self._counts)
        # Members leave before their channel is vacated, and join after it is occupied.
        members = self._pres_held
        for tag in sorted(members - self._pres_wanted.keys()):
            if tag in self._pres_wanted or tag not in members:
                continue
            removed = await _timed(scripts.member_off(tag))
            members.discard(tag)
            if removed:
                self._member_removed(tag)
        users = self._users_held
        for tag in sorted(users - self._users_wanted):
            if tag in self._users_wanted or tag not in users:
                continue
            offline = await _timed(scripts.user_off(tag))
            users.discard(tag)
            if offline:
                self._decide(_user_message(tag, online=False))
        conns = self._conns_held
        for tag in sorted(conns - self._conns_wanted):
            if tag in self._conns_wanted or tag not in conns:
                continue
            await _timed(scripts.release_connection(tag))
            conns.discard(tag)
            self._conns_leaving.discard(tag)
        for tag in sorted(self._conns_wanted - conns):
            if tag not in self._conns_wanted or tag in conns:
                continue
            # Decided while Redis was away: counted now, with no limit to apply.
            await _timed(scripts.assert_connection(tag))
            conns.add(tag)
        held = self._occ_held
        for entry in sorted(held - self._occ_wanted):
            if entry in self._occ_wanted or entry not in held:
                continue
            vacated = await _timed(scripts.off(entry))
            held.discard(entry)
            if vacated:
                self._report(ev.ChannelVacated, entry)
            elif not entry.partition(":")[2].startswith("presence-"):
                # The others' subscribers learn the smaller total, once (this node
                # keeps no throttle state for a channel it left).
                ((_, total, _),) = await _timed(scripts.channel_info([entry]))
                app_id, _, channel = entry.partition(":")
                self._announce(app_id, channel, total)
        for entry in sorted(self._occ_wanted - held):
            if entry not in self._occ_wanted or entry in held:
                continue
            occupied = await _timed(scripts.on(entry))
            held.add(entry)
            if occupied:
                self._report(ev.ChannelOccupied, entry)
        for tag in sorted(self._pres_wanted.keys() - members):
            wanted = self._pres_wanted.get(tag)
            if wanted is None or tag in members:
                continue
            added = await _timed(scripts.member_on(tag, wanted[0]))
            members.add(tag)
            if added:
                app_id, channel, user_id = split_tag(tag)
                self._emit_safely(ev.MemberAdded(app_id, channel, user_id))
                info = _loads(wanted[0])
                self._decide(MemberAdded(app_id, channel, user_id, info, wanted[1]))
        for tag in sorted(self._users_wanted - users):
            if tag not in self._users_wanted or tag in users:
                continue
            online = await _timed(scripts.user_on(tag))
            users.add(tag)
            if online:
                self._decide(_user_message(tag, online=True))
        dirty = {entry for entry in self._counts_dirty if entry in self._counts}
        # A count whose channel Redis does not record for us yet waits for its turn.
        self._counts_dirty = dirty - held
        counts = {entry: self._counts[entry] for entry in dirty & held}
        if counts:
            totals = await _timed(scripts.counts(counts))
            for entry, total in totals.items():
                if entry not in self._counts:
                    continue  # left meanwhile: nothing of it may be remembered
                app_id, _, channel = entry.partition(":")
                self._count_changed(app_id, channel, total)

    async def liveness(self, scripts: StateScripts) -> None:
        """One heartbeat: refresh this node's liveness, reap the dead."""
        if await _timed(scripts.beat()):
            # Our registration was gone: survivors took us for dead and removed our
            # share (reporting it vacated). Start again from what Redis has.
            log.warning("redis bus %s: this node was reaped; re-asserting", self._session.where)
            self._reload = True
            self._session.wake_syncer()
        for dead in await _timed(scripts.dead_nodes()):
            reaped = await _timed(scripts.reap(dead))
            log.info(
                "redis bus %s: reaped node %s (%d channels vacated, %d members removed)",
                self._session.where,
                dead,
                len(reaped.vacated),
                len(reaped.removed),
            )
            for tag in reaped.offline:
                self._decide(_user_message(tag, online=False))
            for tag in reaped.removed:
                self._member_removed(tag)
            for entry in reaped.vacated:
                self._report(ev.ChannelVacated, entry)

    async def leave(self, scripts: StateScripts, client: Any) -> None:
        """A clean stop: remove what is left of this node's share, then unregister.

        Decisions go to the other nodes directly on ``client`` (the session is over).
        """
        for tag in sorted(await scripts.held_users()):
            if await scripts.user_off(tag):
                await self._bus.publish_now(client, _user_message(tag, online=False))
        for tag in sorted(await scripts.held_members()):
            if await scripts.member_off(tag):
                app_id, channel, user_id = split_tag(tag)
                await self._bus.publish_now(client, MemberRemoved(app_id, channel, user_id))
                self._emit_safely(ev.MemberRemoved(app_id, channel, user_id))
        for entry in sorted(await scripts.held()):
            if await scripts.off(entry):
                self._report(ev.ChannelVacated, entry)
        for tag in sorted(await scripts.held_connections()):
            await scripts.release_connection(tag)
        await scripts.leave()

    # --- decisions ---------------------------------------------------------------------

    def _decide(self, message: Message) -> None:
        """A cluster decision: to this node's clients, then to the other nodes."""
        try:
            self._receive(message)
        except Exception:  # a delivery bug must not end the bus session
            log.exception("delivering a cluster decision failed")
        self._bus.broadcast(message)

    def _member_removed(self, tag: str) -> None:
        app_id, channel, user_id = split_tag(tag)
        self._emit_safely(ev.MemberRemoved(app_id, channel, user_id))
        self._decide(MemberRemoved(app_id, channel, user_id))

    def _count_changed(self, app_id: str, channel: str, total: int) -> None:
        if channel.startswith("presence-"):
            return  # presence channels count members, not subscriptions
        if self._throttle.push(app_id, channel, total, self._clock()):
            self._announce(app_id, channel, total)

    def _announce(self, app_id: str, channel: str, total: int) -> None:
        """The cluster's count of ``channel``: the webhook event, and the clients' event."""
        self._emit_safely(ev.SubscriptionCountChanged(app_id, channel, total))
        if app_id in self._announcing:  # else no bus traffic
            self._decide(SubscriptionCount(app_id, channel, total))

    def _report(self, kind: type[ev.ChannelOccupied] | type[ev.ChannelVacated], entry: str) -> None:
        # App ids cannot hold ":", so the entry splits back unambiguously.
        app_id, _, channel = entry.partition(":")
        self._emit_safely(kind(app_id, channel))

    def _emit_safely(self, event: ev.HubEvent) -> None:
        try:
            self._emit(event)
        except Exception:  # a listener's defect must not end the bus session
            log.exception("reporting %s failed", type(event).__name__)


def _user_message(tag: str, *, online: bool) -> UserOnline | UserOffline:
    app_id, _, user_id = tag.partition("\n")
    return UserOnline(app_id, user_id) if online else UserOffline(app_id, user_id)


async def _timed(operation: Coroutine[Any, Any, _T]) -> _T:
    return await asyncio.wait_for(operation, COMMAND_TIMEOUT)


def _encodable(text: str) -> bool:
    """Whether ``text`` can be written to Redis (UTF-8, no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _loads(text: str) -> Any:
    """A JSON value recorded by a node (``None`` if it is not valid JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return None
