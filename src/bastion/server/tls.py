"""TLS served by the node itself: the server's :class:`ssl.SSLContext`, built once.

``[server.tls]`` names a PEM certificate chain and its private key. The context is
built when the node starts, before it listens, so a missing, unreadable or
mismatched file stops start-up with a :class:`TlsError` naming the file (never
quoting the file's content: the key is a secret). Everything above the transport
(HTTP parsing, the WebSocket upgrade, REST, limits) is the same with or without TLS.

What the context allows, and why:

* TLS 1.2 at least (``min_version = "TLSv1.3"`` raises it), with the cipher
  choices of :func:`ssl.create_default_context` (forward-secret AEAD suites).
* No TLS compression (CRIME) and no renegotiation (a cheap way for one client
  to make the server do repeated handshakes).
* ALPN offers ``http/1.1`` only: the server speaks HTTP/1.1 and WebSockets over it.
* Client certificates are not asked for; clients authenticate with Pusher
  signatures and tokens, as they do without TLS.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from bastion.errors import BastionError

if TYPE_CHECKING:
    from bastion.config import TlsSettings

__all__ = ["TlsError", "server_context"]

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(BastionError):
    """The TLS certificate or key cannot be used; the message names the file.

    Local misuse, like :class:`~bastion.errors.ConfigError`, but found when the
    node starts (the files are read then): ``bastion serve`` exits 1.
    """


class _EncryptedKey(Exception):
    """Raised from the password callback: never prompt on a terminal for a passphrase."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the controlling terminal and hang
    # a service that has none.
    raise _EncryptedKey


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TlsError(f"cannot read the TLS {what} file {path!r}: {exc.strerror}") from None


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The server-side context for ``settings``.

    Raises:
        TlsError: a file is missing or unreadable, is not PEM of the right kind, the
            key is encrypted, or the key does not belong to the certificate. The
            message names the file and the problem, never the file's content.
    """
    cert, key = settings.cert, settings.key
    # Read first, so that "missing" or "not a certificate" names the right file;
    # OpenSSL's own errors do not say which of the two it was reading.
    if b"-----BEGIN CERTIFICATE-----" not in _read(cert, "certificate"):
        raise TlsError(f"the TLS certificate file {cert!r} holds no PEM certificate")
    key_pem = _read(key, "key")
    if b"PRIVATE KEY-----" not in key_pem:
        raise TlsError(f"the TLS key file {key!r} holds no PEM private key")
    if b"ENCRYPTED" in key_pem:
        raise TlsError(f"the TLS key file {key!r} is encrypted: give an unencrypted key")
    del key_pem

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[settings.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise TlsError(f"the TLS key file {key!r} is encrypted: give an unencrypted key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"the TLS key file {key!r} does not match the certificate in {cert!r}"
            ) from None
        # The reason is OpenSSL's short code (e.g. PEM_LIB): it names no content.
        raise TlsError(
            f"cannot load the TLS certificate {cert!r} with the key {key!r}: "
            f"{exc.reason or 'invalid PEM'}"
        ) from None
    except OSError as exc:  # the file changed between the read above and this load
        raise TlsError(
            f"cannot read the TLS certificate {cert!r} or key {key!r}: {exc.strerror}"
        ) from None
    return context
