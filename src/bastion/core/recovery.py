"""Recovery on subscribe: a resuming client gets what it missed, then the newer live events.

When a subscribe carries ``bastion_resume`` and has succeeded (authorization
done, ``subscription_succeeded`` written), :meth:`Recoveries.answer` asks the
history what the client's position missed
(:meth:`~bastion.adapters.base.History.since`) and writes, in this order:

1. when the history says ``recovered``, every missed event, framed as it was live
   (with its ``bastion_position``), in position order;
2. ``bastion:recovery`` with the verdict and the position the client is now at;
3. the recorded events that arrived while the history was read (held since the
   subscribe, :meth:`~bastion.core.fanout.FanOut.hold`), newer ones only: an event
   that is in the replay, or that the client is told it is past, is not sent twice.

On one node the history answers in the same call and nothing is ever held. A
resume that is malformed, or whose position is past the channel's last event (a
forged one), goes through the refusal path (``bastion:recovery`` false,
``invalid_position``): the subscribe stands either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bastion.adapters.base import ClusterUnavailable
from bastion.core.fanout import FanOut
from bastion.core.history import HistoryPolicy, Recovery, Unrecovered
from bastion.core.state import AppState, Channel, Session
from bastion.eager import drive
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.positions import Position, Resume, parse_position
from bastion.protocol.refusals import Reason

__all__ = ["Recoveries", "wants_hold"]

log = logging.getLogger("bastion.history")


def wants_hold(app: AppState, name: str, resume: Resume | None) -> bool:
    """Whether a subscribe's live history events wait for its recovery answer."""
    policy = app.history
    return (
        resume is not None and resume.problem is None and policy is not None and policy.covers(name)
    )


class Recoveries:
    """Answers the resumes of one node's subscribes.

    Args:
        fanout: the node's fan-out (framing, and its history).
    """

    __slots__ = ("_fanout",)

    def __init__(self, fanout: FanOut) -> None:
        self._fanout = fanout

    def answer(
        self,
        app: AppState,
        session: Session,
        channel: Channel,
        resume: Resume,
        still_subscribed: Callable[[], bool],
    ) -> None:
        """Answer ``resume`` once the subscribe succeeded (maybe later, with Redis)."""
        name = channel.name
        frame = self._fanout.frame
        if resume.problem is not None:
            session.refuse(Refused(Reason.RESUME_INVALID, resume.problem, channel=name))
            return
        policy = app.history
        if policy is None or not policy.covers(name):
            session.write(
                frame(
                    msg.recovery(
                        name, recovered=False, position=None, reason=Unrecovered.HISTORY_OFF
                    )
                )
            )
            return

        def done(found: Recovery | None) -> None:
            # Always taken, even when the client left meanwhile: nothing stays held.
            held = channel.held.pop(session.socket_id, [])
            if not still_subscribed():
                return
            self._write(session, name, found, held)

        drive(self._since(app.id, name, resume, policy), done)

    async def _since(
        self, app_id: str, name: str, resume: Resume, policy: HistoryPolicy
    ) -> Recovery | None:
        try:
            return await self._fanout.history.since(
                app_id, name, resume.position, resume.socket_id, policy.limits
            )
        except ClusterUnavailable:
            return None
        except Exception:  # a defect must not leave the subscriber's events held
            log.exception("reading the history of a resume failed")
            return None

    def _write(
        self,
        session: Session,
        name: str,
        found: Recovery | None,
        held: list[tuple[str, bytes]] | None,
    ) -> None:
        frame = self._fanout.frame
        if held is None:  # overflowed: the held events already went out
            reached = found.position if found is not None else None
            text = msg.recovery(
                name, recovered=False, position=_text(reached), reason=Unrecovered.OVERFLOW
            )
            session.write(frame(text))
            return
        if found is None:
            text = msg.recovery(
                name, recovered=False, position=None, reason=Unrecovered.UNAVAILABLE
            )
            session.write(frame(text))
        elif found.reason == Unrecovered.FUTURE:
            session.refuse(Refused(Reason.RESUME_FUTURE, channel=name))
        else:
            epoch = found.position.epoch if found.position is not None else ""
            for entry in found.entries:
                text = msg.channel_event(
                    entry.event, name, entry.data, None, f"{epoch}:{entry.offset}"
                )
                session.write(frame(text))
            text = msg.recovery(
                name,
                recovered=found.recovered,
                position=_text(found.position),
                replayed=len(found.entries),
                reason=found.reason,
            )
            session.write(frame(text))
        reached = found.position if found is not None else None
        written = len(found.entries) if found is not None else 0
        for position, held_frame in held:
            if _newer(position, reached):
                session.write(held_frame)
                written += 1
        self._fanout.deliveries += written


def _text(position: Position | None) -> str | None:
    return None if position is None else str(position)


def _newer(position: str, reached: Position | None) -> bool:
    """Whether a held event at ``position`` is past what the answer covered."""
    if reached is None:
        return True
    held = parse_position(position)
    # Another epoch began meanwhile: its events are all new to the client.
    return held is None or held.epoch != reached.epoch or held.offset > reached.offset
