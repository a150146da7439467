"""JSON Web Tokens for sign-in and channel grants (JWT mode, ``[apps.jwt]``).

Pure: no clock and no file access. The caller reads the key files and passes
their text in (``read_file``), and passes ``now`` (Unix seconds) to every
:meth:`JwtVerifier.verify`. PyJWT is used for the signature only (``PyJWS``):
its claim checks read the system clock, so ``exp``/``nbf``/``iat``, ``aud`` and
``iss`` are checked here against the ``now`` we are given.

Rules that close the usual JWT holes:

* only the configured algorithms are accepted, ``none`` never;
* the key is chosen by the token's algorithm *family*: an HS256 token is only
  ever checked with the HS256 secret, an RS256/ES256 token only with a public
  key of the matching type, so a public key can never be used as an HMAC
  secret (algorithm confusion);
* ``exp`` is required, and so is ``sub``, an identity string
  (:func:`~bastion.protocol.names.is_valid_identity`: no control character, no
  lone surrogate, at most 128 characters);
* a role claim (``role_claim``), when present, is a string of 1-64 characters
  without control characters (:func:`~bastion.security.roles.is_valid_role`);
  anything else is refused (``invalid_role``) like any bad token;
* a ``channels`` grant ending in ``*`` must end at a segment boundary (see
  :func:`grants`): a token carrying ``private-user-1*`` is refused (``channels``)
  rather than let it grant ``private-user-12``.

A failure raises :class:`TokenError` whose ``check`` names the failed check in
a word (``signature``, ``expired``…); it never carries the token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bastion.errors import PeerError
from bastion.protocol.names import is_valid_identity
from bastion.security.roles import is_valid_role

if TYPE_CHECKING:
    from bastion.config import JwtSettings

__all__ = [
    "CHECKS",
    "GRANT_SEPARATORS",
    "Claims",
    "JwtVerifier",
    "TokenError",
    "grants",
    "is_valid_grant",
    "looks_like_jwt",
]

#: Every value :attr:`TokenError.check` can take.
CHECKS = frozenset(
    {
        "malformed",
        "algorithm",
        "signature",
        "expired",
        "not_yet_valid",
        "audience",
        "issuer",
        "missing_exp",
        "missing_sub",
        "invalid_sub",
        "unknown_kid",
        "channels",
        "invalid_role",
    }
)

#: Characters that end a segment of a channel name: every character of the
#: channel-name set that is not a letter or a digit.
GRANT_SEPARATORS = frozenset("-_=@,.;")

#: Longest token looked at; anything longer is malformed before any decoding.
MAX_TOKEN_LENGTH = 8192

#: Three base64url parts; the signature may be empty (``alg: none``), so that such
#: a token is recognised as a JWT and refused for its algorithm.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_ASYMMETRIC = {"RS256": "RSA", "ES256": "EC"}


class TokenError(PeerError):
    """A token failed verification.

    Args:
        check: the failed check, one of :data:`CHECKS`.
    """

    def __init__(self, check: str) -> None:
        assert check in CHECKS, check
        self.check = check
        super().__init__(check)


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims Bastion reads from a verified token.

    Attributes:
        sub: the user id (``sub``).
        exp: expiry, Unix seconds (``exp``).
        channels: channel grants: exact names, or prefixes ending in ``*``.
        user_info: the ``user_info`` claim (presence member data), if any.
        socket_id: the ``socket_id`` claim binding the token to one connection, if any.
        watchlist: the ``watchlist`` claim (user ids), if any.
        role: the role claim (``role_claim``), if any.
    """

    sub: str
    exp: float
    channels: tuple[str, ...] = ()
    user_info: Any = None
    socket_id: str | None = None
    watchlist: tuple[str, ...] = ()
    role: str | None = None


def looks_like_jwt(value: str | None) -> bool:
    """Whether ``value`` has the shape of a compact JWT (three base64url parts).

    A Pusher HMAC auth value (``key:hex``) never has this shape: it has a colon.
    """
    return bool(value) and _JWT_SHAPE.fullmatch(value or "") is not None


def is_valid_grant(pattern: str) -> bool:
    """Whether ``pattern`` is a ``channels`` entry a token may carry.

    Any entry not ending in ``*`` is (an exact name). One ending in ``*`` is valid
    when what comes before the ``*`` is empty (every channel) or ends with one of
    :data:`GRANT_SEPARATORS`, so that the wildcard always covers whole segments:
    ``private-user-1-*`` is valid, ``private-user-1*`` is not (it would also cover
    ``private-user-12``).
    """
    if not pattern.endswith("*"):
        return True
    prefix = pattern[:-1]
    return not prefix or prefix[-1] in GRANT_SEPARATORS


def grants(channels: Iterable[str], name: str) -> bool:
    """Whether a ``channels`` claim grants the channel ``name``.

    An entry grants the exact name; a valid entry ending in ``*`` (see
    :func:`is_valid_grant`) grants every name that starts with what comes before
    the ``*``, which ends at a segment boundary; ``*`` alone grants every name. An
    invalid wildcard entry grants nothing (verification refuses tokens carrying
    one; this holds for claims made any other way too). A ``*`` anywhere but at
    the end is literal, and so never matches a valid channel name.
    """
    for pattern in channels:
        if pattern.endswith("*"):
            if is_valid_grant(pattern) and name.startswith(pattern[:-1]):
                return True
        elif pattern == name:
            return True
    return False


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _string_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TokenError("malformed")
    return tuple(value)


class JwtVerifier:
    """Verifies tokens for one app.

    Args:
        algorithms: the accepted algorithms (subset of HS256, RS256, ES256).
        secret: the HS256 key.
        public_key: a PEM public key (RSA for RS256, P-256 EC for ES256).
        jwks: a JWKS document (``{"keys": [...]}``), keys picked by ``kid``.
        audience: required ``aud`` value, when set.
        issuer: required ``iss`` value, when set.
        leeway: seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        role_claim: the claim that names the sign-in's role.

    Raises:
        ValueError: a key cannot be loaded or does not fit the algorithms.
    """

    def __init__(
        self,
        algorithms: Iterable[str],
        *,
        secret: bytes | None = None,
        public_key: str | None = None,
        jwks: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
        role_claim: str = "role",
    ) -> None:
        self.algorithms = frozenset(algorithms)
        self.role_claim = role_claim
        unknown = self.algorithms - {"HS256", *_ASYMMETRIC}
        if unknown:
            raise ValueError(f"unsupported algorithms {sorted(unknown)}")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._secret = secret if "HS256" in self.algorithms else None
        if "HS256" in self.algorithms and not secret:
            raise ValueError("HS256 needs a secret")
        #: Family ("RSA"/"EC") → the public key from the PEM file.
        self._public: dict[str, Any] = {}
        if public_key is not None:
            key = load_pem_public_key(public_key.encode())
            family = _family(key)
            if family is None or _algorithm_of(family) not in self.algorithms:
                raise ValueError("public_key_file does not fit the configured algorithms")
            self._public[family] = key
        #: kid → (family, key) from the JWKS file; symmetric keys are never taken.
        self._jwks: dict[str, tuple[str, Any]] = {}
        if jwks is not None:
            try:
                document = json.loads(jwks)
                keys = document["keys"] if isinstance(document, dict) else None
            except (ValueError, KeyError):
                raise ValueError("jwks_file is not a JWKS document") from None
            if not isinstance(keys, list):
                raise ValueError("jwks_file has no keys list")
            for entry in keys:
                if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
                    continue  # "oct" (shared secrets) never verify asymmetric tokens
                kid = entry.get("kid")
                if not isinstance(kid, str):
                    raise ValueError("every jwks_file key needs a string kid")
                try:
                    loaded = jwt.PyJWK.from_dict(entry)
                except jwt.PyJWTError:
                    raise ValueError(f"jwks_file key {kid!r} cannot be loaded") from None
                family = _family(loaded.key)
                if family is not None:
                    self._jwks[kid] = (family, loaded.key)
        asymmetric = {alg for alg in self.algorithms if alg in _ASYMMETRIC}
        if asymmetric and not self._public and not self._jwks:
            raise ValueError(f"{sorted(asymmetric)} need a public key or a JWKS")

    @classmethod
    def from_settings(cls, settings: JwtSettings, read_file: Callable[[str], str]) -> JwtVerifier:
        """Build a verifier from ``[apps.jwt]``; ``read_file`` returns a file's text."""
        secret = settings.secret.get_secret_value().encode() if settings.secret else None
        return cls(
            settings.algorithms,
            secret=secret,
            public_key=read_file(settings.public_key_file) if settings.public_key_file else None,
            jwks=read_file(settings.jwks_file) if settings.jwks_file else None,
            audience=settings.audience,
            issuer=settings.issuer,
            leeway=settings.leeway_seconds,
            role_claim=settings.role_claim,
        )

    def verify(self, token: str, now: float) -> Claims:
        """Verify ``token`` at Unix time ``now`` and return its claims.

        Raises:
            TokenError: naming the first failed check.
        """
        if len(token) > MAX_TOKEN_LENGTH or not looks_like_jwt(token):
            raise TokenError("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenError("algorithm")  # "none" is never in self.algorithms
        key = self._key_for(alg, header.get("kid"))
        try:
            decoded = jwt.PyJWS().decode_complete(token, key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise TokenError("signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("algorithm") from None
        except jwt.InvalidKeyError:
            raise TokenError("signature") from None
        except jwt.PyJWTError:
            raise TokenError("malformed") from None
        try:
            payload = json.loads(decoded["payload"])
        except ValueError:
            raise TokenError("malformed") from None
        if not isinstance(payload, dict):
            raise TokenError("malformed")
        return self._claims(payload, now)

    def _key_for(self, alg: str, kid: Any) -> Any:
        if alg == "HS256":
            return self._secret
        family = _ASYMMETRIC[alg]
        if self._jwks and kid is not None:
            entry = self._jwks.get(kid) if isinstance(kid, str) else None
            if entry is None or entry[0] != family:
                raise TokenError("unknown_kid")
            return entry[1]
        key = self._public.get(family)
        if key is None:
            # A JWKS without a kid in the token, or a PEM of the other type.
            raise TokenError("unknown_kid")
        return key

    def _claims(self, payload: dict[str, Any], now: float) -> Claims:
        leeway = self.leeway
        exp = payload.get("exp")
        if exp is None:
            raise TokenError("missing_exp")
        if not _number(exp):
            raise TokenError("malformed")
        # As PyJWT: valid while now < exp + leeway.
        if now >= exp + leeway:
            raise TokenError("expired")
        for name in ("nbf", "iat"):
            value = payload.get(name)
            if value is None:
                continue
            if not _number(value):
                raise TokenError("malformed")
            if value > now + leeway:
                raise TokenError("not_yet_valid")
        if self.audience is not None:
            aud = payload.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or self.audience not in audiences:
                raise TokenError("audience")
        if self.issuer is not None and payload.get("iss") != self.issuer:
            raise TokenError("issuer")
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenError("missing_sub")
        if not is_valid_identity(sub):
            # Over 128 characters, a control character, or a lone surrogate from a
            # "\ud800" escape: no user id, and unstorable in Redis or the audit log.
            raise TokenError("invalid_sub")
        socket_id = payload.get("socket_id")
        if socket_id is not None and not isinstance(socket_id, str):
            raise TokenError("malformed")
        channels = _string_tuple(payload.get("channels"))
        if not all(is_valid_grant(pattern) for pattern in channels):
            raise TokenError("channels")
        role = payload.get(self.role_claim)
        if role is not None and not is_valid_role(role):
            # Too long, a control character, not a string: as bad as a bad signature.
            raise TokenError("invalid_role")
        return Claims(
            sub=sub,
            exp=float(exp),
            channels=channels,
            user_info=payload.get("user_info"),
            socket_id=socket_id,
            watchlist=_string_tuple(payload.get("watchlist")),
            role=role,
        )


def _family(key: Any) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "EC"
    return None


def _algorithm_of(family: str) -> str:
    return "RS256" if family == "RSA" else "ES256"
