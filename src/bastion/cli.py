"""The ``bastion`` command: ``serve``, ``audit``, ``block``, ``unblock``, ``blocks``, ``webhooks``,
``doctor``, ``apps new`` and ``secrets generate`` (:mod:`bastion.cli_keys`).

Exit codes: 0 after a clean shutdown, 2 for an invalid configuration or usage
(nothing listens in that case), 1 when the audit log, the blocks file, the
webhook queue or the TLS certificate and key cannot be opened at start-up
(``serve --workers N``: also when a worker keeps crashing); ``audit`` exits 1
when the log cannot be read; ``block``/``unblock``/``blocks`` exit 2 for an
invalid address or one in ``never_block``, and 1 when the blocks file or the
audit log cannot be written; ``webhooks failed``/``webhooks retry`` exit 1 when
the queue file cannot be read or written, and ``webhooks retry`` exits 1 when an
id is not a dead letter.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bastion import __version__, logs
from bastion.cli_keys import apps, secrets_group
from bastion.config import AppSettings, Settings, load_settings, settings_from_mapping
from bastion.errors import ConfigError
from bastion.security.audit import (
    AuditEvent,
    from_block,
    from_unblock,
    parse_time,
    webhook_retry_event,
)
from bastion.security.proxies import parse_networks
from bastion.security.reputation import Block, canonical_ip, parse_duration
from bastion.store.audit import AuditLogError
from bastion.store.blocks import BlockStoreError
from bastion.store.webhook_queue import WebhookQueueError

__all__ = ["main"]


def _dev_app() -> dict[str, object]:
    return {
        "id": str(secrets.randbelow(900_000) + 100_000),
        "key": secrets.token_hex(10),
        "secret": secrets.token_hex(32),
        "enable_client_messages": True,
    }


def _effective_settings(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    dev_app: dict[str, object] | None,
) -> Settings:
    """The file (or defaults) with ``BASTION_*``, then ``--host``/``--port``, then
    the ``--dev`` app when the file has none. Read at start and again on SIGHUP.

    Raises:
        ConfigError: naming the field.
    """
    settings = load_settings(config_path)
    if host is not None or port is not None or (dev_app is not None and not settings.apps):
        data = settings.model_dump(mode="python")
        data["apps"] = [{**app, "secret": app["secret"].get_secret_value()} for app in data["apps"]]
        if host is not None:
            data["server"]["host"] = host
        if port is not None:
            data["server"]["port"] = port
        if dev_app is not None and not data["apps"]:
            data["apps"] = [dev_app]
        settings = settings_from_mapping(data, environ={})
    return settings


def _dev_banner(app: AppSettings, host: str, port: int) -> str:
    secret = app.secret.get_secret_value()
    return f"""
Bastion dev mode: a throw-away app was generated for this run.

  app id:  {app.id}
  key:     {app.key}
  secret:  {secret}

pusher-js (browser or Node):

  const pusher = new Pusher("{app.key}", {{
    wsHost: "{host}", wsPort: {port}, forceTLS: false,
    enabledTransports: ["ws"], cluster: "bastion",
  }});
  pusher.subscribe("my-channel").bind("my-event", (data) => console.log(data));

Trigger an event with the Python SDK (pip install pusher):

  import pusher
  client = pusher.Pusher(app_id="{app.id}", key="{app.key}", secret="{secret}",
                         host="{host}", port={port}, ssl=False)
  client.trigger("my-channel", "my-event", {{"message": "hello"}})
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bastion")
def main() -> None:
    """Bastion: a security-first, Pusher-compatible real-time WebSocket server."""


def _log_levels(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``--log-level-for NAME=LEVEL`` values as one mapping (the last one for a name wins)."""
    levels: dict[str, str] = {}
    for value in values:
        try:
            name, level = logs.parse_level_for(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
        levels[name] = level
    return levels


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML configuration file (BASTION_* environment variables override it).",
)
@click.option("--dev", is_flag=True, help="Generate a throw-away app when none is configured.")
@click.option("--host", help="Override server.host.")
@click.option("--port", type=int, help="Override server.port (0 picks a free port).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
    help="console: text lines; json: one JSON object per line (both redacted).",
)
@click.option(
    "--log-level-for",
    "log_levels",
    metavar="NAME=LEVEL",
    multiple=True,
    callback=_log_levels,
    help="Level of one logger and its children, e.g. websockets=error (repeatable).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),  # = workers.MAX_WORKERS; not imported: keeps --help light
    default=1,
    show_default=True,
    help="Worker processes sharing the port (SO_REUSEPORT); more than 1 needs"
    ' adapter.driver = "redis".',
)
# Set by the supervisor of `--workers N` on the workers it starts; not for operators.
@click.option("--worker-of", "worker_of", type=int, hidden=True)
@click.option("--worker-index", "worker_index", type=click.IntRange(0), default=0, hidden=True)
def serve(
    config_path: Path | None,
    dev: bool,
    host: str | None,
    port: int | None,
    log_level: str,
    log_format: logs.LogFormat,
    log_levels: dict[str, str],
    workers: int,
    worker_of: int | None,
    worker_index: int,
) -> None:
    """Start a server and run until SIGINT or SIGTERM; SIGHUP reloads --config."""
    if worker_of is not None:
        from bastion.server.workers import run_worker

        sys.exit(run_worker(worker_of, worker_index, log_level, log_format, log_levels))
    logs.configure(log_level, log_format, log_levels)
    # Generated once: a reload of a file without apps keeps the same throw-away app.
    dev_app = _dev_app() if dev else None
    try:
        settings = _effective_settings(config_path, host, port, dev_app)
    except ConfigError as exc:
        click.echo(f"bastion: config error: {exc}", err=True)
        sys.exit(2)
    if workers > 1 and settings.adapter.driver != "redis":
        # Each worker would deliver only to its own subscribers: a silent split brain.
        click.echo(
            f'bastion: --workers {workers} needs adapter.driver = "redis" (got'
            f" {settings.adapter.driver!r}): workers share events only through the bus",
            err=True,
        )
        sys.exit(2)
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        click.echo("bastion: --workers needs SO_REUSEPORT, which this platform lacks", err=True)
        sys.exit(2)
    if not settings.apps:
        logging.getLogger("bastion").warning(
            "no apps configured: every connection will be refused (add [[apps]] or use --dev)"
        )

    from bastion.server.runtime import serve as serve_forever
    from bastion.server.tls import TlsError, server_context

    scheme = "http" if settings.server.tls is None else "https"
    reload: Callable[[], Settings] | None = None
    if config_path is not None:
        path = config_path

        def reload() -> Settings:
            return _effective_settings(path, host, port, dev_app)

    def on_ready(bound_host: str, bound_port: int) -> None:
        if dev:
            click.echo(_dev_banner(settings.apps[0], bound_host, bound_port))
        click.echo(f"bastion listening on {scheme}://{bound_host}:{bound_port}")
        sys.stdout.flush()

    try:
        if workers > 1:
            from bastion.server.workers import supervise

            if settings.server.tls is not None:
                # Checked once here, so a bad file is one clear error, not N crashing workers.
                server_context(settings.server.tls)
            sys.exit(
                supervise(
                    settings,
                    workers,
                    on_ready,
                    log_level=log_level,
                    log_format=log_format,
                    log_levels=log_levels,
                    reload=reload,
                )
            )
        serve_forever(settings, on_ready, reload=reload)
    except OSError as exc:
        click.echo(f"bastion: cannot listen: {exc.strerror}", err=True)
        sys.exit(1)
    except (AuditLogError, BlockStoreError, WebhookQueueError, TlsError) as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)


class _SecondsParam(click.ParamType[float, Any]):
    """A command-line value parsed into seconds by ``parse`` (its ValueError is the message)."""

    def __init__(self, name: str, parse: Callable[[str], float]) -> None:
        self.name = name
        self._parse = parse

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return self._parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


#: ``30m``, ``1h``, ``2d``, ``1w`` ago, an ISO 8601 time or Unix seconds.
_TIME = _SecondsParam("time", lambda text: parse_time(text, now=time.time()))


def _iso(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _line(event: AuditEvent) -> str:
    return (
        f"{_iso(event.time)} {event.severity:<7} {event.type} ip={event.ip or '-'}"
        f" app={event.app_id or '-'} socket={event.socket_id or '-'} {event.message}"
    )


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML configuration file whose [audit] path is read.",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read this SQLite file instead of the configured one.",
)
@click.option("--since", type=_TIME, help="From this time: 30m, 1h, 2d, 1w or ISO 8601.")
@click.option("--until", type=_TIME, help="Before this time (same forms as --since).")
@click.option("--type", "event_type", metavar="SLUG", help="Only this refusal slug.")
@click.option("--severity", type=click.Choice(["info", "warning"]), help="Only this severity.")
@click.option("--ip", help="Only events from this IP address.")
@click.option("--app", "app_id", metavar="ID", help="Only events of this app id.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most N events."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit(
    config_path: Path | None,
    db_path: Path | None,
    since: float | None,
    until: float | None,
    event_type: str | None,
    severity: str | None,
    ip: str | None,
    app_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Print security audit events, newest first (no running server needed)."""
    from bastion.store.audit import query

    if db_path is None:
        try:
            settings = load_settings(config_path)
        except ConfigError as exc:
            click.echo(f"bastion: config error: {exc}", err=True)
            sys.exit(2)
        db_path = Path(settings.audit.path)
    try:
        events = query(
            db_path,
            since=since,
            until=until,
            type=event_type,
            severity=severity,
            ip=ip,
            app_id=app_id,
            limit=limit,
        )
    except AuditLogError as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)
    for event in events:
        click.echo(json.dumps(asdict(event), sort_keys=True) if as_json else _line(event))


# --- blocks ----------------------------------------------------------------------------

#: Seconds ``bastion block`` waits for its audit row to be written.
_AUDIT_WRITE_SECONDS = 10.0

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML configuration file naming the blocks file and the audit log.",
)


#: ``90``, ``30s``, ``30m``, ``1h``, ``2d``, ``1w`` (seconds, > 0).
_DURATION = _SecondsParam("duration", parse_duration)


def _settings_or_exit(config_path: Path | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        click.echo(f"bastion: config error: {exc}", err=True)
        sys.exit(2)


def _address_or_exit(text: str) -> str:
    # Strict: parse_ip would also take the "host:port" forms proxies write.
    try:
        ipaddress.ip_address(text.strip())
    except ValueError:
        click.echo(f"bastion: not an IP address: {text!r}", err=True)
        sys.exit(2)
    address = canonical_ip(text)
    assert address is not None
    return address


def _write_audit(settings: Settings, event: AuditEvent) -> None:
    """Write ``event`` to the configured audit log now (nothing when it is disabled)."""
    if not settings.audit.enabled:
        return
    from bastion.store.audit import AuditLog

    audit_log = AuditLog.from_settings(settings.audit)
    audit_log.record(event)
    if not audit_log.close(_AUDIT_WRITE_SECONDS) or audit_log.failed or audit_log.dropped:
        raise AuditLogError(f"the audit event was not written to {settings.audit.path!r}")


@main.command()
@click.argument("ip")
@click.option(
    "--ttl",
    type=_DURATION,
    default="1h",
    show_default=True,
    help="How long the block lasts: 30m, 1h, 2d, 1w.",
)
@click.option("--reason", default="blocked by an operator", help="Why (kept and audited).")
@_config_option
def block(ip: str, ttl: float, reason: str, config_path: Path | None) -> None:
    """Block IP on every node sharing the blocks (within sync_seconds)."""
    from bastion.server.blocklist import open_block_store

    settings = _settings_or_exit(config_path)
    address = _address_or_exit(ip)
    reputation = settings.security.reputation
    for network in parse_networks(reputation.never_block):
        if ipaddress.ip_address(address) in network:
            click.echo(
                f"bastion: refusing to block {address}: it is in"
                f" security.reputation.never_block ({network})",
                err=True,
            )
            sys.exit(2)
    now = time.time()
    entry = Block(ip=address, until=now + ttl, reason=reason, source="manual", created=now)
    try:
        store = open_block_store(settings)  # Redis with the redis adapter, else the file
        try:
            store.block(entry, now=now)
        finally:
            store.close()
        _write_audit(settings, from_block(entry, id=uuid.uuid4().hex, time=now))
    except (BlockStoreError, AuditLogError) as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)
    click.echo(f"blocked {address} until {_iso(entry.until)}")


@main.command()
@click.argument("ip")
@_config_option
def unblock(ip: str, config_path: Path | None) -> None:
    """Lift the block of IP (nodes apply it within sync_seconds)."""
    from bastion.server.blocklist import open_block_store

    settings = _settings_or_exit(config_path)
    address = _address_or_exit(ip)
    now = time.time()
    try:
        store = open_block_store(settings)
        try:
            previous = store.unblock(address, now=now)
        finally:
            store.close()
        if previous is not None:
            event = from_unblock(address, id=uuid.uuid4().hex, time=now, previous=previous)
            _write_audit(settings, event)
    except (BlockStoreError, AuditLogError) as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)
    click.echo(f"unblocked {address}" if previous is not None else f"{address} was not blocked")


@main.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def blocks(config_path: Path | None, as_json: bool) -> None:
    """List the blocks in force (no running server needed)."""
    from bastion.server.blocklist import open_block_store
    from bastion.store.blocks import list_active

    settings = _settings_or_exit(config_path)
    try:
        if settings.adapter.driver == "redis":
            store = open_block_store(settings)
            try:
                active = store.active(now=time.time())
            finally:
                store.close()
        else:  # read-only: never creates the file
            active = list_active(settings.security.reputation.store_path, now=time.time())
    except BlockStoreError as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)
    for entry in active:
        if as_json:
            line = {
                "ip": entry.ip,
                "until": _iso(entry.until),
                "source": entry.source,
                "reason": entry.reason,
                "created": _iso(entry.created),
            }
            click.echo(json.dumps(line, sort_keys=True))
        else:
            click.echo(f"{entry.ip:<39} {_iso(entry.until)} {entry.source:<6} {entry.reason}")


# --- webhooks --------------------------------------------------------------------------


def _url_without_query(url: str) -> str:
    # The query string may carry a receiver's token: never printed.
    from bastion.webhooks.dispatcher import safe_url

    return safe_url(url)


@main.group()
def webhooks() -> None:
    """Inspect and retry webhook dead letters (no running server needed)."""


@webhooks.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML configuration file whose [webhooks] queue_path is read.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="At most N dead letters.",
)
def failed(config_path: Path | None, as_json: bool, limit: int) -> None:
    """List dead letters, most recently given up first."""
    from bastion.store.webhook_queue import list_dead_letters

    settings = _settings_or_exit(config_path)
    try:
        letters = list_dead_letters(settings.webhooks.queue_path, limit=limit)
    except WebhookQueueError as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)
    for letter in letters:
        url = _url_without_query(letter.url)
        if as_json:
            line = {
                "id": letter.id,
                "app_id": letter.app_id,
                "url": url,
                "attempts": letter.attempts,
                "last_error": letter.last_error,
                "created": _iso(letter.created_at),
                "died": _iso(letter.died_at),
            }
            click.echo(json.dumps(line, sort_keys=True))
        else:
            click.echo(
                f"{letter.id:>8} app={letter.app_id} {url} attempts={letter.attempts}"
                f" created={_iso(letter.created_at)} died={_iso(letter.died_at)}"
                f" error={letter.last_error or '-'}"
            )


@webhooks.command()
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead letter.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML configuration file whose [webhooks] queue_path is read.",
)
def retry(ids: tuple[int, ...], retry_all: bool, config_path: Path | None) -> None:
    """Move dead letters ID... (or --all) back to the queue, due now.

    A running node sends them within a second or two; otherwise the next start does.
    """
    from bastion.store.webhook_queue import WebhookQueue

    if bool(ids) == retry_all:
        click.echo("bastion: give dead letter ids or --all (not both)", err=True)
        sys.exit(2)
    settings = _settings_or_exit(config_path)
    delivery = settings.webhooks
    if not Path(delivery.queue_path).exists():
        # Opening would create an empty queue file where the operator did not expect one.
        click.echo(f"bastion: no webhook queue at {delivery.queue_path!r}", err=True)
        sys.exit(1)
    try:
        with WebhookQueue.open(
            delivery.queue_path,
            max_pending=delivery.max_pending,
            retention_days=delivery.retention_days,
        ) as queue:
            moved = queue.retry_dead(None if retry_all else ids, now=time.time())
        if moved:
            event = webhook_retry_event(list(moved), id=uuid.uuid4().hex, time=time.time())
            _write_audit(settings, event)
    except (WebhookQueueError, AuditLogError) as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)
    click.echo(f"retrying {len(moved)} dead letter{'s' if len(moved) != 1 else ''}")
    missing = sorted(set(ids) - set(moved))
    for id in missing:
        click.echo(f"bastion: {id} is not a dead letter", err=True)
    if missing:
        sys.exit(1)


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="TOML configuration file to check.",
)
def doctor(config_path: Path) -> None:
    """Check a configuration against the production checklist.

    Prints one PASS / WARN / FAIL line per check (never a secret's value) and
    exits 1 when any check fails, 2 when the file is not a valid configuration.
    """
    from bastion.security.doctor import examine, worst

    settings = _settings_or_exit(config_path)
    findings = examine(settings)
    for finding in findings:
        click.echo(f"{finding.level.upper():<4}  {finding.check}: {finding.message}")
    verdict = worst(findings)
    counts = {level: sum(f.level == level for f in findings) for level in ("pass", "warn", "fail")}
    click.echo(f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed")
    if verdict == "fail":
        sys.exit(1)


main.add_command(apps)
main.add_command(secrets_group)
