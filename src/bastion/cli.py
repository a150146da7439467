"""The ``bastion`` command: ``serve``, ``--version``, ``--help``.

Exit codes: 0 after a clean shutdown, 2 for an invalid configuration or usage
(nothing listens in that case).
"""

from __future__ import annotations

import logging
import secrets
import sys
from pathlib import Path

import click

from bastion import __version__
from bastion.config import AppSettings, load_settings, settings_from_mapping
from bastion.errors import ConfigError

__all__ = ["main"]


def _dev_app() -> dict[str, object]:
    return {
        "id": str(secrets.randbelow(900_000) + 100_000),
        "key": secrets.token_hex(10),
        "secret": secrets.token_hex(32),
        "enable_client_messages": True,
    }


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
def serve(
    config_path: Path | None, dev: bool, host: str | None, port: int | None, log_level: str
) -> None:
    """Start a server and run until SIGINT or SIGTERM."""
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        settings = load_settings(config_path)
        if host is not None or port is not None or (dev and not settings.apps):
            data = settings.model_dump(mode="python")
            data["apps"] = [
                {**app, "secret": app["secret"].get_secret_value()} for app in data["apps"]
            ]
            if host is not None:
                data["server"]["host"] = host
            if port is not None:
                data["server"]["port"] = port
            if dev and not data["apps"]:
                data["apps"] = [_dev_app()]
            settings = settings_from_mapping(data, environ={})
    except ConfigError as exc:
        click.echo(f"bastion: config error: {exc}", err=True)
        sys.exit(2)
    if not settings.apps:
        logging.getLogger("bastion").warning(
            "no apps configured: every connection will be refused (add [[apps]] or use --dev)"
        )

    from bastion.server.runtime import serve as serve_forever

    def on_ready(bound_host: str, bound_port: int) -> None:
        if dev:
            click.echo(_dev_banner(settings.apps[0], bound_host, bound_port))
        click.echo(f"bastion listening on http://{bound_host}:{bound_port}")
        sys.stdout.flush()

    try:
        serve_forever(settings, on_ready)
    except OSError as exc:
        click.echo(f"bastion: cannot listen: {exc.strerror}", err=True)
        sys.exit(1)
