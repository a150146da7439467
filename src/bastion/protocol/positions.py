"""Channel history positions and the ``bastion_resume`` field of a subscribe. Pure.

A position names one recorded event of a channel: ``"{epoch}:{offset}"``. The
offset counts the channel's recorded events from 1 (0: before the first); the
epoch is random, chosen when the channel's history starts and again whenever it
is lost, so an offset is only ever compared with offsets of the same history
(docs/decisions/0020-history-and-recovery.md). To clients a position is an opaque
string they keep and send back.

The resume field is decoded here without ever refusing the subscribe it rides on:
a client that sends a malformed one still joins the channel, and is told
``recovered: false`` (the :class:`Resume` carries the problem, which the hub
records as a refusal when it answers).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from bastion.protocol.names import is_valid_socket_id

__all__ = [
    "EPOCH_LENGTH",
    "MAX_OFFSET",
    "MAX_POSITION_LENGTH",
    "Position",
    "Resume",
    "decode_resume",
    "parse_position",
]

#: Characters of an epoch Bastion makes (URL-safe base64 of 6 random bytes).
EPOCH_LENGTH = 8
#: Largest offset: JavaScript numbers are exact up to 2**53 - 1.
MAX_OFFSET = 2**53 - 1
#: Longest position accepted: a 16-character epoch, ``:``, 16 digits.
MAX_POSITION_LENGTH = 33

# [0-9], not \d (every Unicode digit); no leading zero but for 0 itself.
_POSITION = re.compile(r"([A-Za-z0-9_\-]{1,16}):(0|[1-9][0-9]{0,15})")


class Position(msgspec.Struct, frozen=True, gc=False):
    """One point of a channel's history: its epoch and an offset in it."""

    epoch: str
    offset: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.offset}"


def parse_position(text: Any) -> Position | None:
    """The position ``text`` names; ``None`` for anything that is not one."""
    if not isinstance(text, str) or len(text) > MAX_POSITION_LENGTH:
        return None
    match = _POSITION.fullmatch(text)
    if match is None:
        return None
    offset = int(match[2])
    if offset > MAX_OFFSET:
        return None
    return Position(match[1], offset)


class Resume(msgspec.Struct, frozen=True, gc=False):
    """What a subscribe's ``bastion_resume`` asked for.

    Attributes:
        position: the last position the client holds (``None``: it holds none yet
            and asks to be told where the channel is).
        socket_id: the connection on which the client last advanced that position
            (events published excluding it are not replayed to it).
        problem: why the field was malformed (``None`` when it was not); the
            subscribe goes ahead and recovery answers ``false``.
    """

    position: Position | None = None
    socket_id: str | None = None
    problem: str | None = None


def decode_resume(value: Any) -> Resume:
    """A subscribe's ``bastion_resume`` value (present, so the client asks to recover)."""
    if not isinstance(value, dict):
        return Resume(problem="bastion_resume must be an object")
    raw_position = value.get("position")
    position = None
    if raw_position is not None:
        position = parse_position(raw_position)
        if position is None:
            return Resume(problem="bastion_resume position is not a valid position")
    socket_id = value.get("socket_id")
    if socket_id is not None and (
        not isinstance(socket_id, str) or not is_valid_socket_id(socket_id)
    ):
        return Resume(problem="bastion_resume socket_id is not a socket id")
    return Resume(position, socket_id)
