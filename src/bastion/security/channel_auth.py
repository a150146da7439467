"""Who may subscribe to a private, presence or encrypted channel: pure policy.

A subscribe to a channel that needs authorization is granted by one of two
signed sources, tried in this order:

1. **A JWT grant** (apps with ``[apps.jwt]``, private and presence channels only):
   the subscribe's ``auth`` is itself a token whose ``channels`` claim grants the
   channel (a *ticket*), or ``auth`` is empty and the connection's own sign-in
   token, still valid, grants it. Encrypted channels are left to HMAC: the client
   needs the auth endpoint's ``shared_secret`` for them anyway.
2. **The auth endpoint's HMAC** of ``socket_id:channel`` (``:channel_data`` for
   presence), under any of the app's active secrets (constant-time compare).

On a presence channel the grant names the member: the token's ``sub`` and
``user_info``, or the signed ``channel_data``'s ``user_id`` and ``user_info``. A
signed-in connection may join a presence channel without ``channel_data`` (pusher-js
does this): it joins as its signed-in user.

Everything here takes plain values (the wall clock's ``now`` included) and raises
:class:`~bastion.errors.Refused` with the subscription refusal's reason; nothing
is logged or remembered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.names import ChannelKind, ChannelType, is_valid_presence_user_id
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import channel_auth_string, verify_auth
from bastion.security.tokens import JwtVerifier, TokenError, grants, looks_like_jwt

__all__ = ["Grant", "SignedInUser", "authorize_subscribe", "parse_channel_data"]


@dataclass(frozen=True, slots=True)
class SignedInUser:
    """What a subscribing connection's sign-in vouches for.

    Attributes:
        user_id: the signed-in user.
        user_info: its ``user_info``.
        token_grants: the sign-in token's ``channels`` claim (empty for HMAC).
        token_valid: whether that token is still valid (not past ``exp``).
    """

    user_id: str
    user_info: Any
    token_grants: tuple[str, ...] = ()
    token_valid: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    """A granted subscribe: the presence member it makes, if any."""

    user_id: str | None = None
    user_info: Any = None


def authorize_subscribe(
    request: msg.Subscribe,
    channel_type: ChannelType,
    *,
    socket_id: str,
    signed_in: SignedInUser | None,
    app_key: str,
    secrets: Sequence[bytes],
    verifier: JwtVerifier | None,
    now: float,
) -> Grant:
    """Grant ``request`` on a channel that needs authorization, or refuse it.

    Args:
        request: the subscribe.
        channel_type: what its channel is (``needs_auth`` is true).
        socket_id: the subscribing connection.
        signed_in: the connection's sign-in, if any.
        app_key: the app's key (the first half of an HMAC ``auth``).
        secrets: the app's active secrets, newest first.
        verifier: the app's JWT verifier, in JWT mode.
        now: Unix seconds (token expiry).

    Raises:
        Refused: ``SUBSCRIBE_AUTH_MISSING``, ``SUBSCRIBE_AUTH_INVALID`` or
            ``SUBSCRIBE_CHANNEL_DATA``, with the channel named.
    """
    granted = _token_grant(request, channel_type, socket_id, signed_in, verifier, now)
    if granted is not None:
        return granted
    return _hmac_grant(request, channel_type, socket_id, signed_in, app_key, secrets)


def _hmac_grant(
    request: msg.Subscribe,
    channel_type: ChannelType,
    socket_id: str,
    signed_in: SignedInUser | None,
    app_key: str,
    secrets: Sequence[bytes],
) -> Grant:
    name = request.channel
    if not request.auth:
        raise Refused(Reason.SUBSCRIBE_AUTH_MISSING, channel=name)
    presence = channel_type.kind is ChannelKind.PRESENCE
    channel_data = request.channel_data
    if presence and channel_data is None and signed_in is None:
        raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=name)
    message = channel_auth_string(socket_id, name, channel_data if presence else None)
    if not verify_auth(request.auth, app_key, secrets, message):
        raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, channel=name)
    if not presence:
        return Grant()
    if channel_data is None:
        assert signed_in is not None
        return Grant(signed_in.user_id, signed_in.user_info)
    return Grant(*parse_channel_data(channel_data, name))


def _token_grant(
    request: msg.Subscribe,
    channel_type: ChannelType,
    socket_id: str,
    signed_in: SignedInUser | None,
    verifier: JwtVerifier | None,
    now: float,
) -> Grant | None:
    """A JWT grant; ``None`` when no token applies (HMAC decides)."""
    kind = channel_type.kind
    if verifier is None or kind not in (ChannelKind.PRESENCE, ChannelKind.PRIVATE):
        return None
    name = request.channel
    auth = request.auth
    if auth and looks_like_jwt(auth):
        try:
            claims = verifier.verify(auth, now)
        except TokenError as error:
            detail = f"Channel token refused: {error.check}"
            raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name) from None
        if not grants(claims.channels, name):
            detail = "Channel token does not grant this channel"
            raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
        if claims.socket_id is not None and claims.socket_id != socket_id:
            detail = "Channel token is bound to another socket_id"
            raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
        if not is_valid_presence_user_id(claims.sub):
            detail = "Channel token sub is not a valid presence user_id"
            raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
        user_id, user_info = claims.sub, claims.user_info
    elif (
        not auth
        and signed_in is not None
        and signed_in.token_valid
        and grants(signed_in.token_grants, name)
    ):
        user_id, user_info = signed_in.user_id, signed_in.user_info
    else:
        return None
    if kind is not ChannelKind.PRESENCE:
        return Grant()
    if request.channel_data is not None:
        # Not signed by anyone here; tolerated only when it names the token's user
        # (a pusher-js app may send it so the client knows "me").
        stated, _ = parse_channel_data(request.channel_data, name)
        if stated != user_id:
            detail = "Token sub does not match channel_data.user_id"
            raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
    return Grant(user_id, user_info)


def parse_channel_data(channel_data: str, channel: str) -> tuple[str, Any]:
    """The ``user_id`` (as a string) and ``user_info`` of a presence ``channel_data``.

    Raises:
        Refused: ``SUBSCRIBE_CHANNEL_DATA``: not a JSON object, or no valid user id.
    """
    try:
        data = msg.loads(channel_data)
    except Refused:
        raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel) from None
    if not isinstance(data, dict):
        raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel)
    raw = data.get("user_id")
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel)
    user_id = str(raw)
    if not is_valid_presence_user_id(user_id):
        raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel)
    return user_id, data.get("user_info")
