"""``bastion doctor``: a configuration checked against a production checklist.

Each check yields findings at one of three levels: ``pass`` (the control is in
place), ``warn`` (legal and sometimes right, but worth a look before production)
and ``fail`` (a hole: the command exits non-zero). Findings name the setting and
never print a secret, only what is wrong with it.

Pure: a :class:`~bastion.config.Settings` in, findings out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from bastion.security.proxies import parse_networks

if TYPE_CHECKING:
    from bastion.config import AppSettings, Settings

__all__ = ["Finding", "Level", "examine", "worst"]

Level = Literal["pass", "warn", "fail"]

#: Secrets shorter than this many characters fail (32 random bytes as hex are 64).
MIN_SECRET_CHARS = 32
#: Fewer distinct characters than this in a secret means it is not random.
MIN_DISTINCT_CHARS = 12
#: Secrets from documentation and examples: never in production.
_EXAMPLE_SECRET = re.compile(r"(?i)(replace-?me|change-?me|app-secret|example|secret123|password)")
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


def _secret_problem(secret: str) -> str | None:
    if _EXAMPLE_SECRET.search(secret):
        return "looks like an example or placeholder value"
    if len(secret) < MIN_SECRET_CHARS:
        return f"is shorter than {MIN_SECRET_CHARS} characters"
    if len(set(secret)) < MIN_DISTINCT_CHARS:
        return "has too few distinct characters to be random"
    return None


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

    A token is exposed when peers off this host may send it (the admin API:
    ``allow_from`` admits a non-loopback network; ``/metrics``: any peer may
    present the token) to a node reachable from the network (``server.host`` not
    loopback) that neither serves TLS itself (``[server.tls]``) nor sits behind a
    TLS-terminating proxy (``security.trusted_proxies``).
    """
    server, security = settings.server, settings.security
    in_clear = not _is_loopback(server.host) and server.tls is None and not security.trusted_proxies
    admin = settings.admin
    if admin.token is None:
        yield Finding("pass", "admin", "off: no token, the admin API answers 404")
    else:
        remote = [str(net) for net in parse_networks(admin.allow_from) if not net.is_loopback]
        if remote and in_clear:
            yield Finding(
                "fail",
                "admin",
                f"admin.allow_from admits {', '.join(remote)} on {server.host!r} without TLS: "
                "the bearer token would cross the network in clear; set [server.tls], or "
                "listen on loopback behind a TLS proxy (security.trusted_proxies)",
            )
        elif remote:
            yield Finding("pass", "admin", "token set; remote peers reach it over TLS only")
        else:
            yield Finding("pass", "admin", "token set; callable from loopback only")
    metrics = settings.metrics
    if metrics.enabled and metrics.token is not None:
        if in_clear:
            yield Finding(
                "fail",
                "metrics.token",
                f"any peer may scrape /metrics with the token on {server.host!r} without TLS: "
                "it would cross the network in clear; set [server.tls] or use a TLS proxy",
            )
        else:
            yield Finding("pass", "metrics.token", "never sent in clear over the network")


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


def examine(settings: Settings) -> list[Finding]:
    """Every finding for ``settings``, in a stable order."""
    findings = list(_transport(settings))
    findings.extend(_tokens_in_clear(settings))
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
