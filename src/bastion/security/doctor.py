"""``bastion doctor``: a configuration checked against a production checklist.

Each check yields findings at one of three levels: ``pass`` (the control is in
place), ``warn`` (legal and sometimes right, but worth a look before production)
and ``fail`` (a hole: the command exits non-zero). Findings name the setting and
never print a secret, only what is wrong with it.

Pure: a :class:`~bastion.config.Settings` in, findings out.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from bastion.security.proxies import IPNetwork, parse_networks

if TYPE_CHECKING:
    from bastion.config import AppSettings, Settings

__all__ = ["Finding", "Level", "examine", "worst"]

Level = Literal["pass", "warn", "fail"]

#: Secrets shorter than this many characters fail (32 random bytes as hex are 64).
MIN_SECRET_CHARS = 32
#: Fewer distinct characters than this in a secret means it is not random.
MIN_DISTINCT_CHARS = 12
#: Secrets from documentation and examples: never in production.
_EXAMPLE_SECRET = re.compile(
    r"(?i)(replace-?me|change-?(me|it)|app-secret|example|secret123|password|placeholder"
    r"|your-|goes-?here|dummy|(admin|metrics|cluster|test)-?(token|secret))"
)
#: A run of this many consecutive characters (``0123…``, ``abcd…``, or backwards) is
#: typed, not random: 64 random hex digits hold one less than once in two million.
MAX_SEQUENCE_RUN = 8
#: A value that repeats a unit shorter than this is a pattern, not a secret.
MIN_PATTERN_UNIT = 16
#: ``https://*.com``-style wildcards: any site under a public suffix of one label.
_BROAD_WILDCARD = re.compile(r"^[a-z][a-z0-9+.-]*://\*\.[^.]+(:\d+)?$", re.I)
_ORDER = {"pass": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report."""

    level: Level
    check: str
    message: str


def worst(findings: list[Finding]) -> Level:
    """The most severe level among ``findings`` (``pass`` for none)."""
    return max((f.level for f in findings), key=_ORDER.__getitem__, default="pass")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _longest_run(text: str) -> int:
    """The longest run of characters whose code points step by +1 (or by -1)."""
    longest = run = 1 if text else 0
    step = 0
    for before, after in itertools.pairwise(text):
        delta = ord(after) - ord(before)
        if delta in (1, -1) and (delta == step or run == 1):
            run += 1
        else:
            run = 2 if delta in (1, -1) else 1
        step = delta
        longest = max(longest, run)
    return longest


def _repeats_a_short_unit(text: str) -> bool:
    return any(
        text == (text[:unit] * (len(text) // unit + 1))[: len(text)]
        for unit in range(1, min(MIN_PATTERN_UNIT, len(text) // 2 + 1))
    )


def _secret_problem(secret: str) -> str | None:
    """What makes ``secret`` (a secret, key or token) guessable, in words; ``None`` if nothing.

    Never returns any part of the value itself.
    """
    if _EXAMPLE_SECRET.search(secret):
        return "looks like an example or placeholder value"
    if len(secret) < MIN_SECRET_CHARS:
        return f"is shorter than {MIN_SECRET_CHARS} characters"
    if len(set(secret)) < MIN_DISTINCT_CHARS:
        return "has too few distinct characters to be random"
    if _repeats_a_short_unit(secret):
        return "repeats a short pattern"
    if _longest_run(secret) >= MAX_SEQUENCE_RUN:
        return "contains a typed sequence (such as 0123… or abcd…)"
    return None


def _wide_public(values: list[str]) -> tuple[list[str], list[str]]:
    """Networks of ``values`` that span much of the public internet: (huge, wide).

    Huge: IPv4 /8 or wider, IPv6 /16 or wider (``0.0.0.0/0``, ``::/0``, ``2000::/3``).
    Wide: IPv4 wider than /16, IPv6 wider than /32. Private, loopback and link-local
    ranges are never counted, however wide (``10.0.0.0/8``, ``fc00::/7``).
    """
    huge, wide = [], []
    for net in parse_networks(values):
        if net.is_private or net.is_loopback or net.is_link_local:
            continue
        v4 = net.version == 4
        if net.prefixlen <= (8 if v4 else 16):
            huge.append(str(net))
        elif net.prefixlen < (16 if v4 else 32):
            wide.append(str(net))
    return huge, wide


def _shared(values: list[str], others: tuple[IPNetwork, ...]) -> list[IPNetwork]:
    """Networks of ``values`` that overlap one of ``others``."""
    return [
        net
        for net in parse_networks(values)
        if any(net.version == other.version and net.overlaps(other) for other in others)
    ]


def _within(net: IPNetwork, others: tuple[IPNetwork, ...]) -> bool:
    return any(
        net.version == other.version and net.subnet_of(other)  # type: ignore[arg-type]
        for other in others
    )


def _transport(settings: Settings) -> Iterator[Finding]:
    host = settings.server.host
    proxies = settings.security.trusted_proxies
    if _is_loopback(host):
        if proxies:
            yield Finding("pass", "transport", "listens on loopback behind trusted proxies")
        else:
            yield Finding(
                "warn",
                "transport",
                "listens on loopback but security.trusted_proxies is empty: behind a proxy "
                "every client shares the proxy's address, limits and blocks",
            )
    elif settings.server.tls is not None:
        yield Finding(
            "pass",
            "transport",
            f"server.host {host!r} serves TLS itself ({settings.server.tls.min_version} or newer)",
        )
    else:
        yield Finding(
            "warn",
            "transport",
            f"server.host {host!r} is reachable from the network without TLS: set "
            "[server.tls], or put a TLS proxy in front and listen on loopback",
        )


def _tokens_in_clear(settings: Settings) -> Iterator[Finding]:
    """Admin and metrics bearer tokens must not cross the network in clear.

    A node whose ``server.host`` is not loopback and that serves no TLS itself
    (``[server.tls]``) is reachable over plain TCP, whether or not a TLS proxy also
    sits in front of it (``security.trusted_proxies``): a peer may always bypass the
    proxy. The admin token is exposed when ``allow_from`` admits such peers: a
    failure when it admits networks beyond the trusted proxies (they connect
    directly), a warning when it admits only the proxies (the token crosses the
    proxy-to-node hop in clear). The metrics token may be sent by any peer: a
    failure on such a node without a proxy, a warning with one.
    """
    server, security = settings.server, settings.security
    exposed = not _is_loopback(server.host) and server.tls is None
    # A "proxy" range spanning the internet (failed on its own) proves nothing here.
    huge, _ = _wide_public(security.trusted_proxies)
    proxies = tuple(net for net in parse_networks(security.trusted_proxies) if str(net) not in huge)
    admin = settings.admin
    if admin.token is None:
        yield Finding("pass", "admin", "off: no token, the admin API answers 404")
    else:
        remote = [net for net in parse_networks(admin.allow_from) if not net.is_loopback]
        direct = [str(net) for net in remote if not _within(net, proxies)]
        if not remote:
            yield Finding("pass", "admin", "token set; callable from loopback peers only")
        elif server.tls is not None:
            yield Finding("pass", "admin", "token set; remote peers reach it over TLS only")
        elif not exposed:
            yield Finding(
                "pass",
                "admin",
                "token set; the node listens on loopback, so the remote networks in "
                "admin.allow_from cannot reach it",
            )
        elif direct:
            yield Finding(
                "fail",
                "admin",
                f"admin.allow_from admits {', '.join(direct)} on {server.host!r} without TLS: "
                "those peers connect directly and the bearer token crosses the network in "
                "clear; set [server.tls], or listen on loopback behind a TLS proxy",
            )
        else:
            yield Finding(
                "warn",
                "admin",
                f"admin.allow_from admits only the trusted proxies, on {server.host!r} without "
                "TLS: the bearer token crosses the proxy-to-node hop in clear; keep that hop "
                "on a private link, or set [server.tls]",
            )
    metrics = settings.metrics
    if metrics.enabled and metrics.token is not None:
        if not exposed:
            yield Finding("pass", "metrics", "never sent in clear over the network")
        elif proxies:
            yield Finding(
                "warn",
                "metrics",
                f"{server.host!r} serves plain TCP beside the proxy: a scraper that sends the "
                "token to the node directly sends it in clear; scrape through the TLS proxy, "
                "or set [server.tls]",
            )
        else:
            yield Finding(
                "fail",
                "metrics",
                f"any peer may scrape /metrics with the token on {server.host!r} without TLS: "
                "it would cross the network in clear; set [server.tls] or use a TLS proxy",
            )


def _admin_behind_proxy(settings: Settings) -> Iterator[Finding]:
    """The admin API and the dashboard should never be reachable through a proxy.

    The admin API checks the TCP peer, and behind a reverse proxy the peer is the
    proxy: when the proxy's address is in ``admin.allow_from`` (a proxy on this host,
    with loopback in both lists), every client it forwards reaches ``/api/security``
    and ``/dashboard`` as an allowed peer, and only the token stands in the way.
    """
    proxies = parse_networks(settings.security.trusted_proxies)
    if settings.admin.token is None or not proxies:
        return
    shared = [str(net) for net in _shared(settings.admin.allow_from, proxies)]
    reach = (
        f"admin.allow_from admits the proxy's own address ({', '.join(shared)}), so every "
        "client the proxy forwards reaches the admin API and /dashboard as an allowed peer "
        "and only the token stands in the way"
        if shared
        else "the admin API and /dashboard answer whatever a reverse proxy in "
        "security.trusted_proxies forwards from an address in admin.allow_from"
    )
    yield Finding(
        "warn",
        "admin.proxy",
        f"{reach}; deny /api/security and /dashboard at the proxy and reach them over "
        "loopback (an SSH tunnel) instead",
    )


def _token_strength(settings: Settings) -> Iterator[Finding]:
    """Bearer tokens and the cluster key, held to the same rule as app secrets."""
    values = {
        "admin.token": settings.admin.token,
        "metrics.token": settings.metrics.token,
        "adapter.cluster_secret": settings.adapter.cluster_secret,
        "alerts.secret": settings.alerts.secret,
    }
    for check, value in values.items():
        if value is None:
            continue
        problem = _secret_problem(value.get_secret_value())
        if problem:
            yield Finding("fail", check, f"the value {problem}; use 32 random bytes (64 hex)")
        else:
            yield Finding("pass", check, "long and random-looking")


def _address_lists(settings: Settings) -> Iterator[Finding]:
    """``trusted_proxies`` and ``never_block`` must not span the public internet.

    Trusting everyone's ``X-Forwarded-For`` lets any client pick the address its
    limits, blocks and audit rows apply to (loopback, which is never blocked,
    included); never blocking everyone turns blocks off while reputation looks on.
    """
    security = settings.security
    lists = {
        "security.trusted_proxies": (
            security.trusted_proxies,
            "any client could set X-Forwarded-For and choose the address its limits, "
            "blocks and audit rows apply to",
        ),
        "security.never_block": (
            security.reputation.never_block,
            "addresses there are never blocked, automatically or by hand",
        ),
    }
    for check, (values, why) in lists.items():
        huge, wide = _wide_public(values)
        if huge:
            yield Finding("fail", check, f"{', '.join(huge)} spans the public internet: {why}")
        elif wide:
            yield Finding(
                "warn",
                check,
                f"very wide public range(s) {', '.join(wide)}: make sure each address is "
                f"yours ({why})",
            )
        elif values:
            yield Finding("pass", check, f"{len(values)} network(s), none of them wide")


def _app_secrets(app: AppSettings) -> Iterator[Finding]:
    check = f"apps.{app.id}.secret"
    problem = _secret_problem(app.secret.get_secret_value())
    if problem:
        yield Finding("fail", check, f"the secret {problem}; use 32 random bytes (64 hex)")
    else:
        yield Finding("pass", check, "long and random-looking")
    for index, retiring in enumerate(app.previous_secrets):
        if retiring.expires_at is None:
            yield Finding(
                "warn",
                f"apps.{app.id}.previous_secrets.{index}",
                "a retiring secret without expires_at stays valid until removed",
            )
    if app.jwt is not None and app.jwt.secret is not None:
        problem = _secret_problem(app.jwt.secret.get_secret_value())
        if problem:
            yield Finding("fail", f"apps.{app.id}.jwt.secret", f"the JWT key {problem}")
    if app.jwt is not None and app.jwt.allow_query_token:
        yield Finding(
            "warn",
            f"apps.{app.id}.jwt.allow_query_token",
            "tokens in connection URLs land in proxy and load-balancer access logs and "
            "browser history, where Bastion cannot redact them; prefer pusher:signin",
        )


def _app_origins(app: AppSettings) -> Iterator[Finding]:
    check = f"apps.{app.id}.allowed_origins"
    origins = app.allowed_origins
    if origins is None:
        yield Finding("warn", check, "unset: pages on any origin may open WebSockets")
        return
    if "*" in origins:
        yield Finding("fail", check, "contains '*' (development only): any origin is allowed")
        return
    broad = [origin for origin in origins if _BROAD_WILDCARD.match(origin)]
    if broad:
        yield Finding("warn", check, f"very broad wildcard(s): {', '.join(broad)}")
    else:
        yield Finding("pass", check, f"{len(origins)} origin pattern(s)")


def _app_limits(app: AppSettings) -> Iterator[Finding]:
    if app.enable_client_messages:
        check = f"apps.{app.id}.client_events"
        if app.max_client_events_per_second > 100:
            yield Finding("warn", check, "more than 100 client events/s per connection")
        elif app.client_event_allowlist is None:
            yield Finding(
                "warn", check, "client events on, with no client_event_allowlist of names"
            )
        else:
            yield Finding("pass", check, "rate-limited and allow-listed")
    if app.rest_requests is None:
        yield Finding("warn", f"apps.{app.id}.rest_requests", "no per-app REST rate limit")
    for hook in app.webhooks:
        url = urlsplit(hook.url)
        if url.scheme == "http" and not _is_loopback(url.hostname or ""):
            yield Finding(
                "warn",
                f"apps.{app.id}.webhooks",
                f"webhook to {url.hostname} over plain http: payloads and signatures in clear",
            )


def _alerts(settings: Settings) -> Iterator[Finding]:
    """Security alerts on, and their POSTs not sent in clear to another host."""
    alerts = settings.alerts
    if not alerts.enabled:
        yield Finding("warn", "alerts", "off: no threshold raises an alert")
        return
    if alerts.url is None:
        yield Finding("pass", "alerts", "on: audited, logged and counted (no url)")
        return
    url = urlsplit(alerts.url)
    if url.scheme == "http" and not _is_loopback(url.hostname or ""):
        yield Finding(
            "warn", "alerts.url", f"alerts to {url.hostname} over plain http: bodies in clear"
        )
    else:
        yield Finding("pass", "alerts", "on, and sent to the operator's endpoint")


def examine(settings: Settings) -> list[Finding]:
    """Every finding for ``settings``, in a stable order."""
    findings = list(_transport(settings))
    findings.extend(_address_lists(settings))
    findings.extend(_tokens_in_clear(settings))
    findings.extend(_admin_behind_proxy(settings))
    findings.extend(_token_strength(settings))
    if not settings.apps:
        findings.append(Finding("fail", "apps", "no apps configured"))
    for app in settings.apps:
        findings.extend(_app_secrets(app))
        findings.extend(_app_origins(app))
        findings.extend(_app_limits(app))
    audit = settings.audit
    if not audit.enabled:
        findings.append(Finding("fail", "audit", "the audit log is off: refusals leave no trail"))
    else:
        findings.append(
            Finding("pass", "audit", f"on, {audit.retention_days} days, {audit.max_rows} rows")
        )
    findings.extend(_alerts(settings))
    if not settings.security.reputation.enabled:
        findings.append(Finding("warn", "security.reputation", "off: nothing is blocked"))
    else:
        findings.append(Finding("pass", "security.reputation", "on"))
    adapter = settings.adapter
    if adapter.driver == "redis" and adapter.url is not None:
        host = urlsplit(adapter.url).hostname or ""
        if adapter.url.startswith("redis://") and not _is_loopback(host):
            findings.append(
                Finding("warn", "adapter.url", "Redis on another host without TLS (rediss://)")
            )
        if adapter.cluster_secret is None:
            findings.append(
                Finding(
                    "warn",
                    "adapter.cluster_secret",
                    "unset: the bus key is derived from the app secrets",
                )
            )
    return findings
