"""Channel, event, user and socket id rules, and channel classification.

Classification is by **anchored** prefix only: a name merely containing
``cache-`` or ``private-`` somewhere is a public channel, and only names that
start with ``private-`` or ``presence-`` need a signature.

Identity strings (presence user ids, sign-in user ids, watchlist entries, a
JWT's ``sub``) are 1-128 characters with no control character (C0, DEL, C1)
and no UTF-16 surrogate code point: a JSON ``\ud800`` escape decodes to a lone
surrogate that no UTF-8 encoder (Redis, SQLite, a log line) accepts, and C1
controls such as U+0085 break log lines. :func:`is_valid_identity` is that rule;
sign-in user ids and watchlist entries are held to the stricter
:func:`is_valid_user_id`.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

__all__ = [
    "CLIENT_EVENT_PREFIX",
    "RESERVED_EVENT_PREFIXES",
    "SERVER_TO_USER_PREFIX",
    "ChannelKind",
    "ChannelType",
    "classify_channel",
    "is_client_event_name",
    "is_valid_channel_name",
    "is_valid_event_name",
    "is_valid_identity",
    "is_valid_presence_user_id",
    "is_valid_socket_id",
    "is_valid_user_id",
]

SERVER_TO_USER_PREFIX = "#server-to-user-"
CLIENT_EVENT_PREFIX = "client-"
RESERVED_EVENT_PREFIXES = ("pusher:", "pusher_internal:")
MAX_USER_ID_LENGTH = 128

_CHANNEL_CHARS = re.compile(r"[A-Za-z0-9_\-=@,.;]+")
# [0-9], not \d: Python's \d matches every Unicode decimal digit.
_SOCKET_ID = re.compile(r"[0-9]{1,20}\.[0-9]{1,20}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Never in an identity string: C0 controls, DEL, C1 controls (Unicode category Cc)
#: and surrogate code points (a str holds one only when it came from a lone escape).
_NOT_IN_IDENTITY = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class ChannelKind(enum.Enum):
    """What a channel needs to be joined and what it carries."""

    PUBLIC = "public"
    PRIVATE = "private"
    ENCRYPTED = "private-encrypted"
    PRESENCE = "presence"
    SERVER_TO_USER = "server-to-user"


@dataclass(frozen=True, slots=True)
class ChannelType:
    """A channel's kind and whether it keeps its last event (``cache-`` variants)."""

    kind: ChannelKind
    cached: bool = False

    @property
    def needs_auth(self) -> bool:
        """Whether subscribing needs a signature (``private-*`` and ``presence-*``)."""
        return self.kind in (ChannelKind.PRIVATE, ChannelKind.ENCRYPTED, ChannelKind.PRESENCE)

    @property
    def allows_client_events(self) -> bool:
        """Client events are allowed on private and presence channels, not encrypted ones."""
        return self.kind in (ChannelKind.PRIVATE, ChannelKind.PRESENCE)


_PREFIXES: tuple[tuple[str, ChannelType], ...] = (
    # Longest first, so that the most specific anchored prefix wins.
    ("private-encrypted-cache-", ChannelType(ChannelKind.ENCRYPTED, cached=True)),
    ("private-encrypted-", ChannelType(ChannelKind.ENCRYPTED)),
    ("presence-cache-", ChannelType(ChannelKind.PRESENCE, cached=True)),
    ("private-cache-", ChannelType(ChannelKind.PRIVATE, cached=True)),
    ("presence-", ChannelType(ChannelKind.PRESENCE)),
    ("private-", ChannelType(ChannelKind.PRIVATE)),
    ("cache-", ChannelType(ChannelKind.PUBLIC, cached=True)),
    (SERVER_TO_USER_PREFIX, ChannelType(ChannelKind.SERVER_TO_USER)),
)
_PUBLIC = ChannelType(ChannelKind.PUBLIC)


#: Names remembered by the memos below: an attacker's stream of fresh names only
#: evicts (least recently used), so memory stays bounded.
_MEMO = 4096


@functools.lru_cache(maxsize=_MEMO)
def classify_channel(name: str) -> ChannelType:
    """The type of channel ``name``, by anchored prefix (memoised: it runs per message)."""
    for prefix, channel_type in _PREFIXES:
        if name.startswith(prefix):
            return channel_type
    return _PUBLIC


def is_valid_identity(text: str) -> bool:
    """An identity string: 1-128 characters, no control character, no surrogate.

    Controls are C0 (U+0000-U+001F), DEL (U+007F) and C1 (U+0080-U+009F);
    surrogates are U+D800-U+DFFF, which a Python str only holds when it was
    decoded from a lone ``\\uD8xx`` escape (a proper pair decodes to one code
    point). Whatever passes encodes to UTF-8.
    """
    return 0 < len(text) <= MAX_USER_ID_LENGTH and not _NOT_IN_IDENTITY.search(text)


def is_valid_user_id(user_id: str) -> bool:
    """A signed-in user id: 1-128 characters of the channel-name set (Pusher).

    The same set as channel names, so that a signed-in user's
    ``#server-to-user-{user_id}`` channel is always a valid name. Stricter than
    :func:`is_valid_identity` (ASCII only), which it implies.
    """
    return 0 < len(user_id) <= MAX_USER_ID_LENGTH and bool(_CHANNEL_CHARS.fullmatch(user_id))


def is_valid_presence_user_id(user_id: str) -> bool:
    """A presence ``user_id``: any identity string (see :func:`is_valid_identity`).

    Looser than :func:`is_valid_user_id`: presence ids never name a channel, and
    real apps use e-mail addresses with ``+`` and non-ASCII names as ids.
    """
    return is_valid_identity(user_id)


def is_valid_channel_name(name: str, max_length: int) -> bool:
    """Pusher's channel name rules.

    ``A-Z a-z 0-9 _ - = @ , . ;`` up to ``max_length`` characters; ``#`` only in
    the ``#server-to-user-{user_id}`` form.
    """
    if not 0 < len(name) <= max_length:
        return False
    if name.startswith(SERVER_TO_USER_PREFIX):
        user_id = name[len(SERVER_TO_USER_PREFIX) :]
        return bool(_CHANNEL_CHARS.fullmatch(user_id))
    return bool(_CHANNEL_CHARS.fullmatch(name))


def is_valid_event_name(name: str, max_length: int) -> bool:
    """An event name: 1 to ``max_length`` characters, no control characters."""
    return 0 < len(name) <= max_length and not _CONTROL.search(name)


@functools.lru_cache(maxsize=_MEMO)
def is_client_event_name(name: str, max_length: int) -> bool:
    """A client event name: starts with ``client-`` (memoised: it runs per message)."""
    return name.startswith(CLIENT_EVENT_PREFIX) and is_valid_event_name(name, max_length)


def is_valid_socket_id(socket_id: str) -> bool:
    """The ``digits.digits`` form the official SDKs require."""
    return bool(_SOCKET_ID.fullmatch(socket_id))
