"""Whether a ``pusher:signin`` (or a URL token) signs a connection in, and as whom.

Pure policy over plain values. The ``auth`` of a ``pusher:signin`` is the auth
endpoint's HMAC of ``socket_id::user::user_data``, or, for an app in JWT mode, a
token whose ``sub`` must be ``user_data.id``. With a token nothing else in
``user_data`` is trusted (a token does not sign it): ``user_info``, the
watchlist and the role come from the token's claims. With HMAC the role is the
``role_key`` of ``user_data`` (the app's auth endpoint signed it); a role that is
not a short string without control characters is refused
(``SIGNIN_DATA_INVALID``), as a token's is (``SIGNIN_TOKEN_INVALID``). A
connection signed in as one user cannot sign in as another (``SIGNIN_CONFLICT``);
signing in again as the same user renews the sign-in (a fresh token).

Refusals are raised as :class:`~bastion.errors.Refused`; the details name the
check that failed, never a token or a signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.names import is_valid_user_id
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import signin_auth_string, verify_auth
from bastion.security.roles import is_valid_role
from bastion.security.tokens import Claims, JwtVerifier, TokenError, looks_like_jwt

__all__ = ["SignIn", "verify_signin", "verify_signin_token"]


@dataclass(frozen=True, slots=True)
class SignIn:
    """A verified sign-in.

    Attributes:
        user_id: who the connection is now.
        user_info: its ``user_info``.
        watchlist: the user ids it watches (validated, as given).
        user_data: what ``pusher:signin_success`` echoes.
        claims: the token's claims (JWT sign-ins), ``None`` for HMAC.
        role: the role the app signed, if any.
    """

    user_id: str
    user_info: Any
    watchlist: tuple[str, ...]
    user_data: str
    claims: Claims | None
    role: str | None = None


def verify_signin(
    request: msg.Signin,
    *,
    socket_id: str,
    current_user: str | None,
    app_key: str,
    secrets: Sequence[bytes],
    verifier: JwtVerifier | None,
    now: float,
    role_key: str = "role",
) -> SignIn:
    """Verify a ``pusher:signin``.

    Args:
        request: the sign-in.
        socket_id: the connection signing in.
        current_user: who it is signed in as already, if anyone.
        app_key: the app's key.
        secrets: the app's active secrets, newest first.
        verifier: the app's JWT verifier, in JWT mode.
        now: Unix seconds (token expiry).
        role_key: the ``user_data`` key naming an HMAC sign-in's role.

    Raises:
        Refused: ``SIGNIN_INVALID``, ``SIGNIN_TOKEN_INVALID``, ``SIGNIN_DATA_INVALID``
            or ``SIGNIN_CONFLICT``.
    """
    claims: Claims | None = None
    if verifier is not None and looks_like_jwt(request.auth):
        claims = _verify_token(verifier, socket_id, request.auth, now)
    else:
        message = signin_auth_string(socket_id, request.user_data)
        if not verify_auth(request.auth, app_key, secrets, message):
            raise Refused(Reason.SIGNIN_INVALID)
    try:
        user = msg.loads(request.user_data)
    except Refused:
        raise Refused(Reason.SIGNIN_DATA_INVALID) from None
    user_id = user.get("id") if isinstance(user, dict) else None
    if not isinstance(user_id, str) or not is_valid_user_id(user_id):
        raise Refused(Reason.SIGNIN_DATA_INVALID)
    if claims is not None and claims.sub != user_id:
        raise Refused(Reason.SIGNIN_TOKEN_INVALID, "sub does not match user_data.id")
    if current_user is not None and current_user != user_id:
        raise Refused(Reason.SIGNIN_CONFLICT)
    raw_watchlist: Any
    if claims is not None:
        raw_watchlist, user_info = list(claims.watchlist), claims.user_info
        role = claims.role
    else:
        raw_watchlist, user_info = user.get("watchlist") or [], user.get("user_info")
        role = user.get(role_key)
        if role is not None and not is_valid_role(role):
            raise Refused(Reason.SIGNIN_DATA_INVALID, "The sign-in's role is not a valid role")
    if not isinstance(raw_watchlist, list) or not all(
        isinstance(item, str) and is_valid_user_id(item) for item in raw_watchlist
    ):
        raise Refused(Reason.SIGNIN_DATA_INVALID)
    return SignIn(user_id, user_info, tuple(raw_watchlist), request.user_data, claims, role)


def verify_signin_token(
    token: str,
    *,
    socket_id: str,
    current_user: str | None,
    verifier: JwtVerifier | None,
    now: float,
) -> SignIn:
    """Verify a bare sign-in token (the URL's ``?token=``).

    ``user_data`` is made from the claims (``id`` = ``sub``, ``user_info``).

    Raises:
        Refused: ``SIGNIN_TOKEN_INVALID``, ``SIGNIN_DATA_INVALID`` or ``SIGNIN_CONFLICT``.
    """
    if verifier is None:
        raise Refused(Reason.SIGNIN_TOKEN_INVALID, "App does not accept tokens")
    claims = _verify_token(verifier, socket_id, token, now)
    if not is_valid_user_id(claims.sub):
        raise Refused(Reason.SIGNIN_TOKEN_INVALID, "sub is not a valid user id")
    if current_user is not None and current_user != claims.sub:
        raise Refused(Reason.SIGNIN_CONFLICT)
    user: dict[str, Any] = {"id": claims.sub}
    if claims.user_info is not None:
        user["user_info"] = claims.user_info
    if not all(is_valid_user_id(item) for item in claims.watchlist):
        raise Refused(Reason.SIGNIN_DATA_INVALID)
    return SignIn(
        claims.sub, claims.user_info, tuple(claims.watchlist), msg.dumps(user), claims, claims.role
    )


def _verify_token(verifier: JwtVerifier, socket_id: str, token: str, now: float) -> Claims:
    try:
        claims = verifier.verify(token, now)
    except TokenError as error:
        # The detail names the check, never the token.
        raise Refused(
            Reason.SIGNIN_TOKEN_INVALID, f"Sign-in token refused: {error.check}"
        ) from None
    if claims.socket_id is not None and claims.socket_id != socket_id:
        raise Refused(Reason.SIGNIN_TOKEN_INVALID, "Sign-in token is bound to another socket_id")
    return claims
