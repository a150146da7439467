"""Sends what the durable webhook queue holds: at least once, bounded, never blocking the loop.

One asyncio task (:meth:`WebhookDispatcher._run`) claims due rows from the
:class:`~bastion.store.webhook_queue.WebhookQueue` through :func:`asyncio.to_thread`
and starts one attempt task per row. It sleeps until :meth:`~WebhookDispatcher.wake`
(new rows), a finished attempt (a slot freed), the earliest next attempt, or
:data:`IDLE_POLL_SECONDS` (rows retried by ``bastion webhooks retry`` from another
process), whichever comes first.

Claims are leases in the queue file (see :mod:`bastion.store.webhook_queue`), so
several workers on one file never send the same row at once. The lease is
:func:`lease_seconds` of ``timeout_seconds``: far longer than one attempt and the
recording of its outcome, so it only runs out for a process that died or stalled;
its rows are then sent by another worker or the next start (at once when the dead
process was on this host and its pid is gone). A clean stop releases this
dispatcher's claims at once.

Bounds: each endpoint URL has ``concurrency_per_endpoint`` slots and a row is only
claimed when its endpoint has a free slot, so a hanging endpoint holds its own
slots and nothing else; at most :data:`MAX_IN_FLIGHT` attempts run at once over all
endpoints. Every attempt (address check, connect, send, answer) is bounded by
``timeout_seconds``; the answer's body is never read.

Ordering: deliveries to one endpoint may arrive out of order (several are in
flight at once, and a retried one comes after newer ones). Receivers order by
``time_ms`` and drop duplicates by ``Idempotency-Key``.

Each attempt is signed at send time with the app's newest secret, so a rotation
between enqueue and send is honoured; an app removed from the configuration
meanwhile sends nothing and the row becomes a dead letter.

SSRF: for an app with ``webhooks_refuse_private``, the host is resolved first and
the delivery is refused (dead letter, ``webhook_refused_private`` audit) unless
every address is globally routable unicast (:func:`is_refused_address`: IPv4
wrapped in IPv6 is judged by the IPv4 address; carrier-grade NAT, Teredo and the
other special-purpose blocks are refused). The
request then goes to the address that was checked (``Host`` and TLS SNI keep the
name), so a second DNS answer cannot swap in an internal address.

Security alerts (:mod:`bastion.server.alerts`) use the same queue as the sender
:data:`~bastion.security.alerts.ALERTS_SENDER`: such a row is signed with
``[alerts] secret`` under the key :data:`~bastion.security.alerts.ALERTS_KEY`, is
subject to ``[alerts] refuse_private``, and is sent only while its URL is still
``[alerts] url`` (otherwise it becomes a dead letter): an alert never goes to an
app's endpoint, and an app's webhook is never signed with the alerts secret.

Logs and audit events carry ``scheme://host/path`` at most: never the query string
(it may hold a token), the body, the headers or the signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

import httpx

from bastion.security.alerts import ALERTS_KEY, ALERTS_SENDER
from bastion.security.audit import AuditEvent, MetadataValue, redact
from bastion.store.webhook_queue import Delivery, WebhookQueue, WebhookQueueError
from bastion.webhooks.retry import decide
from bastion.webhooks.signing import webhook_headers

if TYPE_CHECKING:
    from bastion.config import AlertSettings, WebhookDeliverySettings
    from bastion.core.hub import AppState
    from bastion.metrics import Metrics

__all__ = [
    "IDLE_POLL_SECONDS",
    "MAX_IN_FLIGHT",
    "MIN_LEASE_SECONDS",
    "WebhookDispatcher",
    "is_refused_address",
    "lease_seconds",
    "safe_url",
]

log = logging.getLogger("bastion.webhooks")

#: Longest sleep with nothing due: how soon rows retried from the CLI are seen.
IDLE_POLL_SECONDS: Final = 1.0
#: Attempts in flight at once, all endpoints together.
MAX_IN_FLIGHT: Final = 256
#: Rows claimed per poll at most.
_CLAIM_BATCH: Final = 64
#: Seconds between retention prunes and queue-depth counts.
_HOUSEKEEPING_SECONDS: Final = 60.0
#: Bytes of an answer's body read (and dropped) at most.
_ANSWER_BYTES: Final = 65_536
#: Longest error text kept in a dead letter.
_ERROR_CHARS: Final = 200
#: Shortest claim lease, whatever the per-attempt timeout.
MIN_LEASE_SECONDS: Final = 60.0


def lease_seconds(timeout_seconds: float) -> float:
    """How long a claim lasts for attempts bounded by ``timeout_seconds``.

    Three attempts' worth and at least :data:`MIN_LEASE_SECONDS`, so an attempt and
    the recording of its outcome (which may wait on another process's lock) end well
    before the lease; a crashed process's rows wait this long at most.
    """
    return max(MIN_LEASE_SECONDS, 3.0 * timeout_seconds)


def safe_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no query, fragment or user info (for logs)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))


#: IANA special-purpose IPv4 blocks that are not globally reachable (RFC 6890 and its
#: updates). Listed here as well as asked of :mod:`ipaddress`, whose answers differ
#: between Python versions (3.11 calls multicast and 192.0.0.0/24 "global").
_NOT_GLOBAL_V4: Final = tuple(
    ipaddress.IPv4Network(block)
    for block in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT (cloud metadata at 100.100.100.200)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local (cloud metadata at 169.254.169.254)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
    )
)
#: The same for IPv6, after the IPv4-embedding forms have been unwrapped.
_NOT_GLOBAL_V6: Final = tuple(
    ipaddress.IPv6Network(block)
    for block in (
        "::/8",  # unspecified, loopback, IPv4-compatible and IPv4-translated forms
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): the IPv4 position is a local choice
        "100::/8",  # discard-only and reserved
        "2001::/23",  # IETF protocol assignments, Teredo (2001::/32) included
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 segment identifiers
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
#: NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 destination.
_NAT64_WELL_KNOWN: Final = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to ``ip`` is really delivered to, if it wraps one.

    IPv4-mapped (``::ffff:a.b.c.d``), 6to4 (``2002:AABB:CCDD::/48``) and NAT64 with
    the well-known prefix (``64:ff9b::a.b.c.d``). Teredo also embeds an IPv4
    address, but it lies in ``2001::/23`` and is refused whole.
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def is_refused_address(address: str) -> bool:
    """Whether ``address`` is one ``webhooks_refuse_private`` must not reach.

    Only globally routable unicast addresses are allowed. An IPv6 address that
    wraps an IPv4 one (mapped, 6to4, NAT64) is judged by the IPv4 address it
    wraps. An address is then accepted only when :mod:`ipaddress` calls it
    global and not private, loopback, link-local, site-local, multicast,
    reserved or unspecified, and it lies in none of the special-purpose blocks
    listed above (carrier-grade NAT ``100.64.0.0/10``, Teredo, the local-use
    NAT64 prefix, documentation and benchmarking ranges among them).
    Unparseable text: refused.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address.split("%", 1)[0]
        )
    except ValueError:
        return True
    blocks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _NOT_GLOBAL_V4
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
        else:
            blocks = _NOT_GLOBAL_V6
            if ip.is_site_local:
                return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or any(ip in block for block in blocks)
    )


class _Refused(Exception):
    """The endpoint resolves to an address the app may not reach."""


class WebhookDispatcher:
    """Delivers queued webhooks with retries; see the module docstring.

    Args:
        settings: the ``[webhooks]`` settings.
        queue: the open queue (closed by its owner, not here).
        apps: app id → its state (key and newest secret are read at send time).
        metrics: counters to update.
        audit: receives ``webhook_dead`` and ``webhook_refused_private`` events.
        alerts: ``[alerts]``, which signs and aims the alert rows (none: they die).
        transport: an httpx transport for tests; the default opens real connections.
        clock: Unix seconds.
        jitter: random values in ``[0, 1)`` for the back-off.
    """

    def __init__(
        self,
        settings: WebhookDeliverySettings,
        queue: WebhookQueue,
        apps: Mapping[str, AppState],
        metrics: Metrics,
        audit: Callable[[AuditEvent], None] | None = None,
        *,
        alerts: AlertSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.apps = apps
        self.metrics = metrics
        self._audit = audit
        self.alerts = alerts
        self._transport = transport
        self._clock = clock
        self._jitter = jitter
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._attempts: set[asyncio.Task[None]] = set()
        #: endpoint URL → attempts in flight to it.
        self._busy: dict[str, int] = {}
        #: Seconds each claim is leased for.
        self.lease_seconds = lease_seconds(settings.timeout_seconds)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering; rows left pending by an earlier run are picked up too."""
        if self._task is not None:
            return
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._client = httpx.AsyncClient(
            transport=self._transport,
            timeout=self.settings.timeout_seconds,
            follow_redirects=False,  # a redirect could point anywhere, internal included
            trust_env=False,  # no proxy from the environment between us and the SSRF check
            limits=httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=32),
        )
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def wake(self) -> None:
        """New rows were enqueued: look now."""
        self._wakeup.set()

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - the agreed interface
        """Stop: no new attempts; wait for in-flight ones up to ``timeout`` seconds.

        Attempts still running at the deadline are cancelled; their rows stay
        pending (nothing is recorded for them), their claims are released, and
        another worker or the next start sends them again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        if self._attempts:
            # Keep a sliver of the budget for cancelling what does not finish in time.
            grace = min(0.5, timeout * 0.2)
            await asyncio.wait(
                set(self._attempts), timeout=max(0.0, deadline - grace - loop.time())
            )
        for attempt in list(self._attempts):
            attempt.cancel()
        if self._attempts:
            await asyncio.wait(set(self._attempts), timeout=max(0.01, deadline - loop.time()))
        try:
            await asyncio.to_thread(self.queue.release_all)
        except WebhookQueueError as exc:
            # The rows are not lost: their leases end and they are sent after that.
            log.error("webhook queue: %s", exc)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), max(0.01, deadline - loop.time()))

    # --- the loop ---------------------------------------------------------------------

    def _full_endpoints(self) -> list[str]:
        limit = self.settings.concurrency_per_endpoint
        return [url for url, busy in self._busy.items() if busy >= limit]

    async def _run(self) -> None:
        next_housekeeping = 0.0
        while not self._stopping:
            self._wakeup.clear()
            now = self._clock()
            try:
                if now >= next_housekeeping:
                    next_housekeeping = now + _HOUSEKEEPING_SECONDS
                    await self._housekeeping(now)
                free = MAX_IN_FLIGHT - len(self._attempts)
                claimed: list[Delivery] = []
                if free > 0:
                    claimed = await asyncio.to_thread(
                        self.queue.claim_due,
                        now,
                        limit=min(free, _CLAIM_BATCH),
                        skip_urls=self._full_endpoints(),
                        lease_seconds=self.lease_seconds,
                    )
                unused = self._start_attempts(claimed)
                if unused:
                    # Their endpoint filled up within the batch: free for others now.
                    await asyncio.to_thread(self.queue.release, unused)
                if len(claimed) == min(free, _CLAIM_BATCH) and free > 0:
                    continue  # there may be more due right now
                next_due = await asyncio.to_thread(
                    self.queue.next_due_at, self._clock(), skip_urls=self._full_endpoints()
                )
            except WebhookQueueError as exc:
                log.error("webhook queue: %s", exc)
                next_due = None
            except Exception:  # the loop must outlive any one bad poll
                log.exception("webhook dispatcher: unexpected error; polling again")
                next_due = None
            wait = IDLE_POLL_SECONDS
            if next_due is not None:
                wait = min(wait, max(0.0, next_due - self._clock()))
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)

    async def _housekeeping(self, now: float) -> None:
        pruned = await asyncio.to_thread(self.queue.prune, now=now)
        if pruned:
            log.info("webhook queue: pruned %d delivered or dead rows", pruned)
        counts = await asyncio.to_thread(self.queue.counts)
        self.metrics.webhook_queue_pending = counts.pending

    def _start_attempts(self, claimed: list[Delivery]) -> list[int]:
        """Start an attempt per row that has a slot; returns the ids of the others."""
        limit = self.settings.concurrency_per_endpoint
        unused: list[int] = []
        for delivery in claimed:
            if self._busy.get(delivery.url, 0) >= limit or len(self._attempts) >= MAX_IN_FLIGHT:
                unused.append(delivery.id)  # its endpoint filled up within this batch
                continue
            self._busy[delivery.url] = self._busy.get(delivery.url, 0) + 1
            task = asyncio.create_task(self._attempt(delivery), name="webhook-attempt")
            self._attempts.add(task)
            self.metrics.webhooks_in_flight = len(self._attempts)
            task.add_done_callback(functools.partial(self._finished, url=delivery.url))
        return unused

    def _finished(self, task: asyncio.Task[None], *, url: str) -> None:
        self._attempts.discard(task)
        self.metrics.webhooks_in_flight = len(self._attempts)
        busy = self._busy.get(url, 0) - 1
        if busy > 0:
            self._busy[url] = busy
        else:
            self._busy.pop(url, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt failed unexpectedly", exc_info=task.exception())
        self._wakeup.set()  # a slot is free

    # --- one attempt ------------------------------------------------------------------

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            await self._deliver(delivery)
        except asyncio.CancelledError:
            # Stopping: nothing is recorded, the row stays pending for the next start.
            raise
        except WebhookQueueError as exc:
            log.error("webhook queue: %s", exc)
            # If this fails too, the lease ends and the row is sent after that.
            with contextlib.suppress(WebhookQueueError):
                await asyncio.to_thread(self.queue.release, [delivery.id])

    def _signer(self, delivery: Delivery) -> tuple[str, str, bool] | str:
        """The key, secret and ``refuse_private`` of a delivery's sender, or why none."""
        if delivery.app_id == ALERTS_SENDER:
            alerts = self.alerts
            if alerts is None or alerts.secret is None or alerts.url != delivery.url:
                return "alerts are no longer sent to this url"
            return ALERTS_KEY, alerts.secret.get_secret_value(), alerts.refuse_private
        app = self.apps.get(delivery.app_id)
        if app is None:
            return "app is no longer configured"
        settings = app.settings
        return settings.key, settings.secret.get_secret_value(), settings.webhooks_refuse_private

    async def _deliver(self, delivery: Delivery) -> None:
        signer = self._signer(delivery)
        if isinstance(signer, str):
            await self._dead(delivery, signer, attempted=False)
            return
        key, secret, refuse_private = signer
        headers = webhook_headers(
            key=key,
            secret=secret,
            body=delivery.body,
            idempotency_key=delivery.idempotency_key,
        )
        status: int | None = None
        error: str | None = None
        retry_after: str | None = None
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                url = delivery.url
                extensions: dict[str, str] = {}
                if refuse_private:
                    url, host_header, extensions = await self._pinned(delivery.url)
                    headers["Host"] = host_header
                    # A pinned connection is not reused for another name at this address.
                    headers["Connection"] = "close"
                status, retry_after = await self._post(url, delivery.body, headers, extensions)
        except _Refused as refused:
            await self._refused(delivery, str(refused))
            return
        except TimeoutError:
            error = f"timed out after {self.settings.timeout_seconds:g} s"
        except (httpx.HTTPError, OSError) as exc:
            error = _describe(exc)
        now = self._clock()
        decision = decide(
            status=status,
            error=error,
            retry_after=retry_after,
            attempt=delivery.attempts + 1,
            age_from=delivery.age_from,
            now=now,
            initial=self.settings.retry_initial_seconds,
            maximum=self.settings.retry_max_seconds,
            give_up_after=self.settings.give_up_after_seconds,
            jitter=self._jitter(),
        )
        if decision.action == "done":
            await asyncio.to_thread(self.queue.mark_done, delivery.id, now=now)
            metrics = self.metrics
            metrics.webhooks_delivered[delivery.app_id] += 1
            metrics.webhook_seconds.observe(delivery.app_id, max(0.0, now - delivery.created_at))
            metrics.webhook_attempts.observe(delivery.app_id, delivery.attempts + 1)
            return
        self.metrics.webhook_attempts_failed[delivery.app_id] += 1
        reason = decision.reason or "failed"
        if decision.action == "retry":
            assert decision.next_attempt_at is not None
            await asyncio.to_thread(
                self.queue.mark_retry,
                delivery.id,
                next_attempt_at=decision.next_attempt_at,
                error=reason,
            )
            log.info(
                "webhook to %s failed (%s, attempt %d); retrying in %.1f s",
                safe_url(delivery.url),
                reason,
                delivery.attempts + 1,
                decision.next_attempt_at - now,
            )
            self._wakeup.set()  # its next attempt may be the earliest now
            return
        await self._dead(delivery, reason, attempted=True)

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], extensions: dict[str, str]
    ) -> tuple[int, str | None]:
        assert self._client is not None
        request = self._client.build_request(
            "POST", url, content=body, headers=headers, extensions=extensions
        )
        # Streamed: at most _ANSWER_BYTES of the answer are read (and dropped), so a
        # receiver cannot make us buffer a large answer, yet a short one leaves the
        # connection reusable.
        response = await self._client.send(request, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > _ANSWER_BYTES:
                    break
            return response.status_code, response.headers.get("Retry-After")
        finally:
            await response.aclose()

    async def _pinned(self, url: str) -> tuple[str, str, dict[str, str]]:
        """Resolve ``url``'s host, refuse internal addresses, and pin the request to one.

        Returns:
            The URL with the checked address as host, the ``Host`` header value, and
            the request extensions (TLS SNI keeps the name, so certificates still verify).

        Raises:
            _Refused: an address is internal (or the URL has no usable host).
        """
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise _Refused("the URL has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        if not addresses:
            raise OSError(f"no address for {host}")
        bad = [a for a in addresses if is_refused_address(a)]
        if bad:
            raise _Refused(f"{host} resolves to a refused address ({bad[0]})")
        address = addresses[0]
        netloc = f"[{address}]" if ":" in address else address
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        return pinned, host_header, extensions

    # --- dead letters -----------------------------------------------------------------

    async def _dead(self, delivery: Delivery, reason: str, *, attempted: bool) -> None:
        now = self._clock()
        await asyncio.to_thread(
            self.queue.mark_dead, delivery.id, now=now, error=reason, attempted=attempted
        )
        self.metrics.webhooks_dead[delivery.app_id] += 1
        if attempted:
            self.metrics.webhook_attempts.observe(delivery.app_id, delivery.attempts + 1)
        log.warning(
            "webhook to %s moved to the dead letters (delivery %d): %s",
            safe_url(delivery.url),
            delivery.id,
            reason,
        )
        self._record("webhook_dead", delivery, reason, now, attempted=attempted)

    async def _refused(self, delivery: Delivery, reason: str) -> None:
        now = self._clock()
        await asyncio.to_thread(
            self.queue.mark_dead, delivery.id, now=now, error=f"refused: {reason}", attempted=False
        )
        self.metrics.webhooks_dead[delivery.app_id] += 1
        self.metrics.webhook_attempts_failed[delivery.app_id] += 1
        log.warning(
            "webhook to %s refused: %s (webhooks_refuse_private); moved to the dead letters",
            safe_url(delivery.url),
            reason,
        )
        self._record("webhook_refused_private", delivery, reason, now, attempted=False)

    def _record(
        self, type: str, delivery: Delivery, reason: str, now: float, *, attempted: bool
    ) -> None:
        if self._audit is None:
            return
        metadata: dict[str, MetadataValue] = {
            "host": urlsplit(delivery.url).hostname or "",
            "delivery_id": delivery.id,
            "attempts": delivery.attempts + (1 if attempted else 0),
        }
        event = AuditEvent(
            id=uuid.uuid4().hex,
            time=now,
            type=type,
            severity="warning",
            ip=None,
            app_id=delivery.app_id,
            socket_id=None,
            user_id=None,
            message=f"Webhook delivery given up: {reason}",
            metadata=metadata,
        )
        try:
            self._audit(event)
        except Exception:  # auditing must not take delivery down with it
            log.exception("could not audit a webhook dead letter")


def _describe(exc: BaseException) -> str:
    """A short, URL-free description of a network error for logs and dead letters."""
    text = str(exc).split("\n", 1)[0]
    # httpx sometimes names the URL; keep the error class and drop anything URL-shaped.
    if "://" in text:
        text = ""
    text = redact(text)[:_ERROR_CHARS]
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
