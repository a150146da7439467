"""``bastion apps new`` and ``bastion secrets generate``: credentials from the OS's randomness.

``apps new`` prints a new app's id, key and secret and its ``[[apps]]`` table, or,
with ``--append FILE``, adds the table to the file once the whole file, with it,
still loads (the id and key are new to it); the secret then goes to the file only,
never to the terminal. ``secrets generate`` prints one random secret, for an app's
``secret``, ``cluster_secret``, the admin or metrics token, or a JWT HS256 key.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from bastion.config import AppSettings, load_settings
from bastion.errors import ConfigError
from bastion.security.keys import MIN_SECRET_BYTES, app_toml, new_app, new_secret

__all__ = ["apps", "secrets_group"]


@click.group("apps")
def apps() -> None:
    """Create apps."""


@apps.command("new")
@click.option("--id", "app_id", default=None, help="The new app's id (default: 7 random digits).")
@click.option(
    "--append",
    "append_to",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Add the app to this config file (checked whole before it is written).",
)
def new(app_id: str | None, append_to: Path | None) -> None:
    """Print a new app's credentials and its [[apps]] table, or append it to a file."""
    if app_id is not None:
        try:
            AppSettings.model_validate({"id": app_id, "key": "k", "secret": "s"})
        except ValidationError:
            click.echo("bastion: --id must be 1-64 characters of A-Z a-z 0-9 _ -", err=True)
            sys.exit(2)
    if append_to is None:
        app = new_app(secrets.token_bytes, app_id=app_id)
        click.echo(f"app id:  {app.id}\nkey:     {app.key}\nsecret:  {app.secret}\n")
        click.echo(app_toml(app), nl=False)
        return
    try:
        text = append_to.read_text(encoding="utf-8") if append_to.exists() else ""
        current = load_settings(append_to) if text.strip() else None
    except (OSError, ConfigError) as exc:
        click.echo(f"bastion: {append_to}: {exc}", err=True)
        sys.exit(2)
    existing = current.apps if current is not None else []
    if app_id is not None and any(a.id == app_id for a in existing):
        click.echo(f"bastion: {append_to} already has an app with id {app_id}", err=True)
        sys.exit(2)
    app = new_app(
        secrets.token_bytes,
        app_id=app_id,
        taken_ids={a.id for a in existing},
        taken_keys={a.key for a in existing},
    )
    joined = text + ("" if not text or text.endswith("\n") else "\n") + "\n" + app_toml(app)
    candidate = append_to.with_name(f".{append_to.name}.{os.getpid()}.new")
    try:
        candidate.write_text(joined, encoding="utf-8")
        try:
            load_settings(candidate)
        except ConfigError as exc:
            click.echo(f"bastion: {append_to} with the new app would not load: {exc}", err=True)
            sys.exit(2)
        if append_to.exists():
            os.chmod(candidate, append_to.stat().st_mode & 0o777)
        else:
            os.chmod(candidate, 0o600)
        candidate.replace(append_to)
    finally:
        candidate.unlink(missing_ok=True)
    click.echo(f"app {app.id} (key {app.key}) added to {append_to}")


@click.group("secrets")
def secrets_group() -> None:
    """Generate secrets."""


@secrets_group.command("generate")
@click.option(
    "--bytes",
    "nbytes",
    type=click.IntRange(min=MIN_SECRET_BYTES, max=1024),
    default=32,
    show_default=True,
    help="Random bytes in the secret (printed as twice as many hex digits).",
)
def generate(nbytes: int) -> None:
    """Print one random secret (hex)."""
    click.echo(new_secret(secrets.token_bytes, nbytes))
