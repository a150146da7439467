"""Run a real Bastion server process for tests.

The server is started exactly as an operator starts it
(``python -m bastion serve --config FILE.toml``) with ``port = 0``; the port the OS
picked is read from the one line the server prints once bound::

    bastion listening on http://127.0.0.1:PORT

stdout and stderr are drained by background threads from the first byte, so a chatty
server can never block on a full pipe, and everything it printed stays available
(``stdout_text``, ``stderr_text``, ``output``) for assertions such as "no secret is ever
logged". The process is stopped with SIGTERM, by its own PID, then SIGKILL after a
(scaled) grace period.

Typical use (pytest fixtures in ``tests/conftest.py`` wrap this)::

    with run_bastion(config_toml(), tmp_path) as server:
        ws = server.ws_url("app-key")
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from . import hygiene
from .timeouts import scaled

__all__ = [
    "DEFAULT_APP",
    "DEFAULT_CONFIG_TOML",
    "DEFAULT_SERVER",
    "DEFAULT_WS_QUERY",
    "LISTENING_RE",
    "REPO_ROOT",
    "SRC_DIR",
    "BastionProcess",
    "BastionStartupError",
    "app_spec",
    "config_toml",
    "render_toml",
    "run_bastion",
    "run_bastion_cli",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC_DIR = REPO_ROOT / "src"

#: The line the server prints (flushed) once its listener is bound.
LISTENING_RE = re.compile(
    r"bastion listening on (?P<url>https?://(?P<host>[^\s/]+?):(?P<port>\d+))\s*$"
)

#: What pusher-js appends to ``/app/{key}`` (protocol 7, see the spec §1).
DEFAULT_WS_QUERY = "protocol=7&client=js&version=8.6.0&flash=false"

#: The app every default test server has (digits for the id: every SDK accepts them).
DEFAULT_APP: Mapping[str, Any] = {
    "id": "12345",
    "key": "app-key",
    "secret": "app-secret",
    "enable_client_messages": True,
    "enable_subscription_count": True,
}

#: ``[server]`` defaults for tests: loopback, OS-chosen port.
DEFAULT_SERVER: Mapping[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "activity_timeout": 120,
}

DEFAULT_CONFIG_TOML = """\
[server]
host = "127.0.0.1"
port = 0
activity_timeout = 120

[[apps]]
id = "12345"
key = "app-key"
secret = "app-secret"
enable_client_messages = true
enable_subscription_count = true
"""

_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_config_counter = itertools.count(1)


# --------------------------------------------------------------------------- TOML


def _toml_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY_RE.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot render non-finite float {value!r} for a test config")
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes (\" \\ \n \t \uXXXX ...) are all valid TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} value {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(v, Mapping) for v in value)
    )


def _emit_table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    scalars = [
        (k, v) for k, v in table.items() if not isinstance(v, Mapping) and not _is_table_array(v)
    ]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    arrays = [(k, v) for k, v in table.items() if _is_table_array(v)]
    for key, value in scalars:
        if value is None:
            continue  # "not set": TOML has no null; leave the server default.
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        sub = (*path, key)
        lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in sub) + "]")
        _emit_table(lines, sub, value)
    for key, items in arrays:
        sub = (*path, key)
        for item in items:
            lines.append("")
            lines.append("[[" + ".".join(_toml_key(p) for p in sub) + "]]")
            _emit_table(lines, sub, item)


def render_toml(document: Mapping[str, Any]) -> str:
    """Render a small TOML document from plain Python values.

    Supports what Bastion configs use: tables (dicts), arrays of tables (lists of
    dicts, e.g. ``apps`` and ``apps.webhooks``), strings, ints, floats, bools, lists.
    ``None`` values are omitted (so the server default applies).
    """
    lines: list[str] = []
    _emit_table(lines, (), document)
    return "\n".join(lines).lstrip("\n") + "\n"


def app_spec(**overrides: Any) -> dict[str, Any]:
    """Return :data:`DEFAULT_APP` with ``overrides`` applied (``None`` removes a key)."""
    spec = dict(DEFAULT_APP)
    for key, value in overrides.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def config_toml(
    *,
    apps: Sequence[Mapping[str, Any]] | None = None,
    server: Mapping[str, Any] | None = None,
    **sections: Any,
) -> str:
    """Build a config file text: test server defaults + ``server`` overrides + ``apps``.

    Args:
        apps: the ``[[apps]]`` entries; defaults to ``[DEFAULT_APP]``. Use
            :func:`app_spec` to derive variants of the default app.
        server: keys merged over :data:`DEFAULT_SERVER` (``None`` removes a key).
        **sections: further top-level tables, e.g. ``adapter={"driver": "local"}``.
    """
    server_table = dict(DEFAULT_SERVER)
    for key, value in (server or {}).items():
        if value is None:
            server_table.pop(key, None)
        else:
            server_table[key] = value
    document: dict[str, Any] = {"server": server_table}
    document.update(sections)
    document["apps"] = [dict(a) for a in (apps if apps is not None else [DEFAULT_APP])]
    return render_toml(document)


# --------------------------------------------------------------------------- process


class BastionStartupError(RuntimeError):
    """The server exited, or never printed its listening line, in time."""

    def __init__(self, message: str, *, returncode: int | None, stdout: str, stderr: str) -> None:
        super().__init__(
            f"{message} (returncode={returncode})\n"
            f"--- server stdout ---\n{stdout[-4000:]}\n--- server stderr ---\n{stderr[-4000:]}"
        )
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class _PipeDrain:
    """Read one pipe to EOF on a daemon thread, keeping every line."""

    def __init__(self, pipe: IO[bytes], name: str, on_line: Any) -> None:
        self._pipe = pipe
        self._name = name
        self._on_line = on_line
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"bastion-{name}-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in iter(self._pipe.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                with self._lock:
                    self.lines.append(line)
                if self._name == "stderr":  # where the server's log goes
                    hygiene.remember_text(f"bastion process {self._name}", line)
                self._on_line(line)
        except (OSError, ValueError):
            pass  # pipe closed under us at teardown
        finally:
            self._on_line(None)

    def text(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


_live: weakref.WeakSet[BastionProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:  # pragma: no cover - safety net for interrupted runs
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.stop(timeout=2.0)


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    # The developer's own BASTION_* settings must not leak into a test server;
    # tests pass what they need through ``env=`` explicitly.
    env["PYTHONUNBUFFERED"] = "1"
    # Work from the checkout even when the package is not pip-installed (-e).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
        for key, value in extra.items():
            if key.startswith("BASTION_") and key.endswith("SECRET"):
                hygiene.remember_secret(value)
    return env


class BastionProcess:
    """A running ``python -m bastion serve`` child process.

    Attributes:
        config_path: the TOML file the server was started with.
        process: the :class:`subprocess.Popen` object.
        pid: the server's process id.
        host, port: where it listens (from its listening line).
        http_url: ``http://host:port`` (REST API base; apps live under ``/apps/{id}``).
    """

    def __init__(
        self,
        config_path: Path,
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        extra_args: Iterable[str] = (),
        python: str | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        hygiene.remember_config_file(self.config_path)
        self.args = [
            python or sys.executable,
            "-m",
            "bastion",
            "serve",
            "--config",
            str(self.config_path),
            *extra_args,
        ]
        self._cond = threading.Condition()
        self._eof_count = 0
        self._listening: re.Match[str] | None = None
        self.process = subprocess.Popen(
            self.args,
            cwd=str(cwd),
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.process.pid
        assert self.process.stdout is not None and self.process.stderr is not None
        self._stdout = _PipeDrain(self.process.stdout, "stdout", self._on_stdout_line)
        self._stderr = _PipeDrain(self.process.stderr, "stderr", self._on_other_line)
        _live.add(self)
        self.host = "127.0.0.1"
        self.port = 0
        self._stopped = False

    # -- output -------------------------------------------------------------------

    def _on_stdout_line(self, line: str | None) -> None:
        with self._cond:
            if line is None:
                self._eof_count += 1
            elif self._listening is None:
                match = LISTENING_RE.search(line.rstrip("\r\n"))
                if match:
                    self._listening = match
            self._cond.notify_all()

    def _on_other_line(self, line: str | None) -> None:
        with self._cond:
            if line is None:
                self._eof_count += 1
            self._cond.notify_all()

    @property
    def stdout_text(self) -> str:
        """Everything the server wrote to stdout so far."""
        return self._stdout.text()

    @property
    def stderr_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self._stderr.text()

    @property
    def output(self) -> str:
        """stdout followed by stderr (for "this never appears anywhere" assertions)."""
        return self.stdout_text + self.stderr_text

    def wait_for_output(
        self, pattern: str | re.Pattern[str], timeout: float | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` matches a line of stdout or stderr; return the match.

        Raises:
            TimeoutError: not seen within ``timeout`` (default ``scaled(10)``) seconds.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + (scaled(10) if timeout is None else timeout)
        with self._cond:
            while True:
                for line in self._stdout.lines + self._stderr.lines:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"server output never matched {regex.pattern!r}")
                if self._eof_count >= 2 and self.process.poll() is not None:
                    raise TimeoutError(
                        f"server exited ({self.process.returncode}) "
                        f"without printing {regex.pattern!r}"
                    )
                self._cond.wait(min(remaining, 0.5))

    # -- lifecycle ----------------------------------------------------------------

    def wait_until_listening(self, timeout: float | None = None) -> None:
        """Block until the listening line is printed, or raise :class:`BastionStartupError`."""
        deadline = time.monotonic() + (scaled(20) if timeout is None else timeout)
        with self._cond:
            while self._listening is None:
                if self.process.poll() is not None and self._eof_count >= 2:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.25))
            match = self._listening
        if match is None:
            exited = self.process.poll() is not None
            self.stop()
            raise BastionStartupError(
                "bastion exited before it was listening"
                if exited
                else "bastion did not print its listening line in time",
                returncode=self.process.returncode,
                stdout=self.stdout_text,
                stderr=self.stderr_text,
            )
        self.host = match.group("host")
        self.port = int(match.group("port"))

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ws_url(self, key: str, query: str | None = DEFAULT_WS_QUERY) -> str:
        """``ws://host:port/app/{key}`` plus ``?query`` (pusher-js's query by default;
        ``query=None`` or ``""`` for none)."""
        base = f"ws://{self.host}:{self.port}/app/{key}"
        return f"{base}?{query}" if query else base

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM by PID, wait, then SIGKILL; drain the pipes. Idempotent.

        Returns:
            the exit code (negative signal number if killed by a signal).
        """
        grace = scaled(10) if timeout is None else timeout
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(scaled(5))
        if not self._stopped:
            self._stopped = True
            # A grandchild holding the pipes open must not hang teardown.
            self._stdout.join(scaled(5))
            self._stderr.join(scaled(5))
            for pipe in (self.process.stdout, self.process.stderr):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
            _live.discard(self)
        return self.process.returncode

    def __enter__(self) -> BastionProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.process.returncode}"
        return f"<BastionProcess pid={self.pid} {self.http_url} {state}>"


def _write_config(config_toml_text: str, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bastion-{os.getpid()}-{next(_config_counter)}.toml"
    path.write_text(config_toml_text, encoding="utf-8")
    return path


def run_bastion(
    config_toml_text: str,
    tmp_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    extra_args: Iterable[str] = (),
    startup_timeout: float | None = None,
) -> BastionProcess:
    """Write ``config_toml_text`` under ``tmp_path``, start Bastion and wait until it listens.

    The returned object is also a context manager that stops the server on exit.

    Raises:
        BastionStartupError: the server exited or did not print its listening line
            within ``startup_timeout`` (default ``scaled(20)``) seconds; the message
            carries its stdout and stderr.
    """
    path = _write_config(config_toml_text, tmp_path)
    proc = BastionProcess(path, cwd=Path(tmp_path), env=env, extra_args=extra_args)
    proc.wait_until_listening(startup_timeout)
    return proc


def run_bastion_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    config_toml_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived ``python -m bastion ARGS`` command (e.g. an invalid config).

    If ``config_toml_text`` is given it is written under ``cwd`` and the literal
    argument ``{config}`` in ``args`` is replaced by its path.

    Raises:
        subprocess.TimeoutExpired: it ran longer than ``timeout`` (default ``scaled(30)``);
            the child is killed first.
    """
    argv = list(args)
    if config_toml_text is not None:
        path = _write_config(config_toml_text, cwd)
        argv = [str(path) if a == "{config}" else a for a in argv]
        hygiene.remember_config_file(path)
    result = subprocess.run(
        [sys.executable, "-m", "bastion", *argv],
        cwd=str(cwd),
        env=_child_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=scaled(30) if timeout is None else timeout,
        check=False,
    )
    hygiene.remember_text(f"bastion {' '.join(args[:1])} stderr", result.stderr)
    return result
