"""Bastion's exception tree.

Everything Bastion raises on purpose derives from :class:`BastionError`. The tree
separates a remote peer's fault from local misuse, because they are handled in
opposite ways: a peer's fault is answered on the wire (a Pusher code or an HTTP
status), counted and audited, and never crashes anything; local misuse (bad
configuration, a programming error) stops start-up loudly::

    BastionError
    ├── ConfigError                 local: invalid settings; start-up exits 2; names
    │                               the fields at fault in ``fields``
    ├── AuditLogError               local: the audit log cannot be opened or read
    │                               (bastion.store.audit); start-up exits 1
    ├── BlockStoreError             local: the blocks file cannot be opened or written
    │                               (bastion.store.blocks); start-up exits 1
    ├── WebhookQueueError           local: the webhook queue cannot be opened, read or
    │                               written (bastion.store.webhook_queue); start-up exits 1
    ├── TlsError                    local: the TLS certificate or key cannot be used
    │                               (bastion.server.tls); start-up exits 1
    └── PeerError                   remote: the client or caller did something wrong
        ├── Refused                 carries a Reason (see bastion.protocol.refusals);
        │                           the one refusal path turns it into a code/status
        └── TokenError              a JWT failed one named check
                                    (bastion.security.tokens); the hub turns it into
                                    a Refused with that check as the detail

The mapping from a :class:`~bastion.protocol.refusals.Reason` to a WebSocket
close code, a ``pusher:error`` code or an HTTP status lives in one table:
``bastion.protocol.refusals``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion.protocol.refusals import Reason

__all__ = ["BastionError", "ConfigError", "PeerError", "Refused"]


class BastionError(Exception):
    """Root of every error Bastion raises on purpose."""


class ConfigError(BastionError):
    """The configuration is invalid; the message names the fields, never their values.

    Args:
        message: what is wrong, field by field (``server.port: Input should be a
            valid integer``).
        fields: the paths of the fields at fault, as data (``server.port``,
            ``apps.0.secret``, ``apps[ID].jwt``, an environment variable or the
            file that could not be read), so that no caller parses the message.
    """

    def __init__(self, message: str, *, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.fields: tuple[str, ...] = tuple(fields)


class PeerError(BastionError):
    """A remote peer (WebSocket client or REST caller) sent something we refuse."""


class Refused(PeerError):
    """A refusal with a documented reason.

    Args:
        reason: which rule refused the input; decides the code or status.
        detail: a human-readable explanation naming the rule, never the data.
        channel: the channel the refusal concerns, for channel-level answers.
    """

    def __init__(
        self, reason: Reason, detail: str | None = None, *, channel: str | None = None
    ) -> None:
        self.reason = reason
        self.detail = detail or reason.value.message
        self.channel = channel
        super().__init__(self.detail)
