"""Users: sign-in (HMAC or token), the session's deadlines, watchlists, terminations.

A verified sign-in (:mod:`bastion.security.signin`) moves the session to
SIGNED_IN (:mod:`bastion.core.session`) and indexes it under its user, which is
how ``#server-to-user-{id}`` events and ``terminate_connections`` find it. The
user's first signed-in connection on this node, and its last, go to the cluster
state, which decides online and offline for the whole cluster and hands them back
to the watchers (:meth:`Users.notify_watchers`). A watchlist's first report is
read from the cluster; changes that arrive before it is written follow it.

In an app with ``max_connections_per_user``, a connection's first sign-in waits
for the cluster state's count of the user's connections
(:meth:`~bastion.adapters.base.ClusterState.claim_connection`: at once on one node,
one Redis round trip in a cluster): over the cap it is refused
(``USER_CONNECTION_LIMIT``, the connection stays anonymous), or, with
``user_connection_policy = "close_oldest"``, the user's oldest connections are
closed wherever they are (``SESSION_REPLACED``) and this one signs in. A sign-in
again as the same user (a fresh token) is not counted again.

A sign-in also sets the connection's tier (:mod:`bastion.security.roles`): its
role's limits when the app configures that role, else the signed-in default; a
role the app does not configure is reported once per app and role
(:class:`~bastion.core.events.RoleUnknown`, for the audit log).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bastion.adapters.base import ClusterState, ClusterUnavailable
from bastion.core import events as ev
from bastion.core.fanout import FanOut
from bastion.core.session import SessionPhase, check_transition, next_step
from bastion.core.state import MAX_SUSPENDED, MAX_UNKNOWN_ROLES, AppState, Session
from bastion.eager import drive
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.refusals import Reason
from bastion.security.signin import SignIn, verify_signin, verify_signin_token

__all__ = ["Users"]


class Users:
    """Sign-ins, watchlists and terminations of the node's sessions.

    Args:
        fanout: the node's fan-out.
        state: the node's cluster state.
        clock: monotonic seconds (session deadlines).
        wall_clock: Unix seconds (token expiry).
        notify: reports a security notice (the audit log); never blocks.
    """

    def __init__(
        self,
        fanout: FanOut,
        state: ClusterState,
        clock: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
        notify: Callable[[ev.Notice], None] | None = None,
    ) -> None:
        self._fanout = fanout
        self._state = state
        self._clock = clock
        self._wall_clock = wall_clock
        self._notify = notify

    def signin(self, app: AppState, session: Session, request: msg.Signin) -> None:
        """Sign the connection in as the user in ``user_data`` (:mod:`~bastion.security.signin`)."""
        signed = verify_signin(
            request,
            socket_id=session.socket_id,
            current_user=session.user_id,
            app_key=app.settings.key,
            secrets=app.secrets,
            verifier=app.jwt,
            now=self._wall_clock(),
            role_key=app.settings.role_key,
        )
        self._admit(app, session, signed)

    def signin_token(self, app: AppState, session: Session, token: str) -> None:
        """Sign the connection in with a bare token (the URL's ``?token=``).

        ``user_data`` is made from the claims (``id`` = ``sub``, ``user_info``) and
        echoed in ``pusher:signin_success`` as for a ``pusher:signin``.
        """
        signed = verify_signin_token(
            token,
            socket_id=session.socket_id,
            current_user=session.user_id,
            verifier=app.jwt,
            now=self._wall_clock(),
        )
        self._admit(app, session, signed)

    def _admit(self, app: AppState, session: Session, signed: SignIn) -> None:
        """Sign in now, or once the cluster has counted the user's connections."""
        if app.suspended and self.is_suspended(app, signed.user_id):
            raise Refused(Reason.SIGNIN_SUSPENDED)
        limit = app.settings.max_connections_per_user
        if limit is None or session.user_id is not None:
            self._signed_in(app, session, signed)
            return
        socket_id = session.socket_id
        if socket_id in app.signing_in:
            # pusher-js never sends a second sign-in before the first is answered.
            raise Refused(Reason.SIGNIN_CONFLICT)
        app.signing_in[socket_id] = session
        user_id = signed.user_id

        def counted(admitted: bool) -> None:
            if app.signing_in.pop(socket_id, None) is None:
                # Closed (or replaced) while the cluster counted: give the place back.
                if admitted:
                    self._state.release_connection(app.id, user_id, socket_id)
                return
            if admitted:
                self._signed_in(app, session, signed)
            else:
                session.refuse(Refused(Reason.USER_CONNECTION_LIMIT))

        close_oldest = app.settings.user_connection_policy == "close_oldest"
        claim = self._state.claim_connection(
            app.id, user_id, socket_id, limit, close_oldest=close_oldest
        )
        drive(claim, counted)

    def _signed_in(self, app: AppState, session: Session, signed: SignIn) -> None:
        first_time = session.user_id is None
        if first_time:
            app.unsigned -= 1
        session.phase = check_transition(session.phase, SessionPhase.SIGNED_IN)
        session.user_id = signed.user_id
        session.user_info = signed.user_info
        session.tier = self._tier(app, signed)
        # A fresh sign-in replaces the previous one's token, expiry and grants (an
        # HMAC sign-in has none of them).
        claims = signed.claims
        if claims is None:
            session.token_expires_at = None
            session.grants = ()
        else:
            # exp is wall-clock; the session deadline is on the hub's monotonic clock.
            session.token_expires_at = self._clock() + (claims.exp - self._wall_clock())
            session.grants = claims.channels
        sockets = app.users.setdefault(signed.user_id, {})
        came_online = not sockets
        sockets[session.socket_id] = session
        session.write(self._fanout.frame(msg.signin_success(signed.user_data)))
        if came_online:
            self._state.user_on(app.id, signed.user_id)
        if first_time and signed.watchlist:
            self._watch(app, session, list(signed.watchlist))

    def _tier(self, app: AppState, signed: SignIn) -> str:
        """The sign-in's tier; an unconfigured role is reported once per app and role."""
        tiers = app.tiers
        role = signed.role
        if (
            role is not None
            and tiers.roles
            and role not in tiers.roles
            and role not in app.unknown_roles
            and len(app.unknown_roles) < MAX_UNKNOWN_ROLES
        ):
            app.unknown_roles.add(role)
            if self._notify is not None:
                self._notify(ev.RoleUnknown(app.id, signed.user_id, role))
        return tiers.tier_of(role)

    def signed_out(self, app: AppState, session: Session) -> None:
        """A closed connection leaves its user's index and its watchlist."""
        user_id = session.user_id
        if user_id is not None:
            sockets = app.users.get(user_id)
            if sockets is not None:
                sockets.pop(session.socket_id, None)
                if not sockets:
                    del app.users[user_id]
                    self._state.user_off(app.id, user_id)
            self._state.release_connection(app.id, user_id, session.socket_id)
        else:
            app.unsigned -= 1
            app.signing_in.pop(session.socket_id, None)
        for watched in session.watchlist:
            watchers = app.watchers.get(watched)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del app.watchers[watched]

    def check_session(self, app: AppState, session: Session, now: float) -> None:
        """Apply the session's deadlines at ``now`` (the hub clock, each tick).

        Sends ``bastion:token_expiring`` once per token when it is within
        ``expiry_warning_seconds`` of ``exp``; refuses the connection
        (``TOKEN_EXPIRED``) once ``exp + expiry_grace_seconds`` has passed, and
        (``SIGNIN_DEADLINE``) when it has not signed in ``signin_deadline_seconds``
        after it opened.
        """
        if session.opened_at is None:
            session.opened_at = now  # the first check starts the clock
        step = next_step(
            session.phase, now, session.opened_at, session.token_expires_at, app.deadlines
        )
        if step is None:
            return
        session.phase = check_transition(session.phase, step.phase)
        if step.refusal is not None:
            session.refuse(Refused(step.refusal))
        else:
            session.write(self._fanout.frame(msg.token_expiring(step.expires_in)))

    # --- watchlists ------------------------------------------------------------------

    def _watch(self, app: AppState, session: Session, watchlist: list[str]) -> None:
        limit = app.settings.max_watchlist_size
        accepted = tuple(dict.fromkeys(watchlist))[:limit]
        session.watchlist = accepted
        for watched in accepted:
            app.watchers.setdefault(watched, set()).add(session)

        def report(cluster_online: set[str] | None) -> None:
            pending, session.watch_pending = session.watch_pending, None
            if session.watchlist is not accepted:
                return  # closed meanwhile
            found = cluster_online or set()
            online = [user_id for user_id in accepted if user_id in app.users or user_id in found]
            offline = [user_id for user_id in accepted if user_id not in online]
            groups = [
                (name, ids) for name, ids in (("online", online), ("offline", offline)) if ids
            ]
            if groups:
                session.write(self._fanout.frame(msg.watchlist_events(groups)))
            for frame in pending or ():  # changes since the read, in order, after it
                session.write(frame)

        if accepted:
            # Online/offline changes that arrive before the report is written wait.
            session.watch_pending = []
            drive(self._online(app, list(accepted)), report)
        if len(dict.fromkeys(watchlist)) > limit:
            session.refuse(Refused(Reason.WATCHLIST_TOO_LONG))

    async def _online(self, app: AppState, user_ids: list[str]) -> set[str] | None:
        """Those of ``user_ids`` signed in anywhere; ``None`` when the cluster cannot say."""
        try:
            return await self._state.online(app.id, user_ids)
        except ClusterUnavailable:
            return None

    def notify_watchers(self, app: AppState, user_id: str, status: str) -> None:
        """``user_id`` came online or went offline in the cluster: tell its watchers here."""
        watchers = app.watchers.get(user_id)
        if not watchers:
            return
        frame = self._fanout.frame(msg.watchlist_events([(status, [user_id])]))
        for session in watchers:
            if session.watch_pending is not None:
                session.watch_pending.append(frame)
            else:
                session.write(frame)
        self._fanout.deliveries += len(watchers)

    # --- suspensions (user_error_budget) ---------------------------------------------

    def is_suspended(self, app: AppState, user_id: str) -> bool:
        """Whether ``user_id`` is in a suspension's cool-down (an ended one is forgotten)."""
        until = app.suspended.get(user_id)
        if until is None:
            return False
        if until > self._clock():
            return True
        del app.suspended[user_id]
        return False

    def suspend_local(self, app: AppState, user_id: str, cooldown: float) -> int:
        """Refuse ``user_id``'s sign-ins for ``cooldown`` seconds; close its connections here.

        Returns how many were closed.
        """
        suspended = app.suspended
        now = self._clock()
        if user_id not in suspended and len(suspended) >= MAX_SUSPENDED:
            for ended in [user for user, until in suspended.items() if until <= now]:
                del suspended[ended]
            if len(suspended) >= MAX_SUSPENDED:  # still full: the soonest to end goes
                del suspended[min(suspended, key=suspended.__getitem__)]
        suspended[user_id] = max(suspended.get(user_id, now), now + cooldown)
        sessions = list(app.users.get(user_id, {}).values())
        for session in sessions:
            session.refuse(Refused(Reason.USER_SUSPENDED))
        return len(sessions)

    @staticmethod
    def replace_local(app: AppState, user_id: str, socket_ids: tuple[str, ...]) -> None:
        """Close those of ``socket_ids`` this node holds for ``user_id``: replaced.

        A connection still waiting for its own count goes too: the cluster no
        longer counts it.
        """
        sockets = app.users.get(user_id, {})
        for socket_id in socket_ids:
            session = sockets.get(socket_id) or app.signing_in.get(socket_id)
            if session is not None:
                session.refuse(Refused(Reason.SESSION_REPLACED))

    @staticmethod
    def terminate_local(app: AppState, user_id: str) -> int:
        """Close ``user_id``'s connections on this node; how many."""
        sessions = list(app.users.get(user_id, {}).values())
        for session in sessions:
            session.refuse(Refused(Reason.TERMINATED))
        return len(sessions)
