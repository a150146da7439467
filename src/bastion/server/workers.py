"""Several worker processes on one port: ``bastion serve --workers N``.

Process model. The parent (the *supervisor*) validates the configuration, picks
the port, and starts N children by re-executing the same interpreter::

    python -m bastion serve --worker-of PARENT_PID --worker-index I --log-level L
        --log-format F [--log-level-for NAME=LEVEL ...]

Re-executing (rather than ``fork`` or a ``multiprocessing`` spawn) gives each worker
a fresh interpreter with no inherited event loop, threads or open SQLite handles,
and a child that is an ordinary ``bastion serve`` process an operator recognises in
``ps``. The settings the parent validated travel to the child as one JSON line on
its stdin, never on the command line or in the environment, so every worker (and
every restarted worker) runs exactly the same configuration as its siblings (the
same ``--dev`` app, the same concrete port) even if the file changed since start.
The child keeps that pipe open: end of file means the supervisor is gone (even by
SIGKILL), and the worker drains and exits instead of serving on as an orphan.

Each worker binds its own listening socket with ``SO_REUSEPORT`` and the kernel
spreads accepted connections over them. The node code binds with
``loop.create_server``; a worker runs it on :class:`ReusePortLoop`, a uvloop loop
whose ``create_server`` always asks for ``reuse_port``, so the node needs no
worker-specific option. With ``port = 0`` the supervisor binds one
``SO_REUSEPORT`` socket itself (never listening: the kernel only hands connections
to listening sockets) to reserve a concrete free port for every worker, and keeps
it until it exits.

A worker reports readiness with one line on its stdout (a pipe to the
supervisor); once all N are ready the supervisor prints the one
``bastion listening on http://HOST:PORT`` line. Other stdout lines are relayed;
stderr (the logs, in the supervisor's format and levels, each line carrying the
worker index: ``[worker I]`` or ``"worker": I``) is inherited.

Signals. Workers run in their own session, so a terminal's Ctrl-C reaches only the
supervisor, which forwards SIGINT or SIGTERM to every worker: each drains as a
single node does (close code 4200, flush the audit log and webhook queue). The
supervisor exits once every worker has stopped, killing any still running after
:data:`STOP_SECONDS`.

Reload. On SIGHUP the supervisor reads the configuration again (``--config``
and ``BASTION_*``, as at start), checks it (an invalid file, or a change that needs
a restart, is logged naming the fields, and nothing changes), and writes it as one
more JSON line to every worker's stdin pipe; the worker's pipe reader hands it to
its event loop (it raises SIGHUP on itself), which applies it live
(:mod:`bastion.server.reload`). A worker started or restarted later gets the new
settings too. Sending the workers SIGHUP directly, rather than the new settings,
would not do: they have no file to read, and they must all run the same settings.

Restarts. A worker that exits while no stop was asked for is restarted with the
same index after a back-off (:func:`restart_delay`: 0.5 s doubling to 10 s); more
than :data:`MAX_RESTARTS_PER_WINDOW` restarts of one worker within
:data:`RESTART_WINDOW_SECONDS` mean it cannot run, so the supervisor stops the
others and exits 1 for the outer process manager to act on. A worker that fails
before the first listening line (port in use, unreadable audit log) stops the
whole start with that worker's exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import uvloop
from pydantic import SecretStr

from bastion import logs
from bastion.config import Settings, settings_from_mapping
from bastion.errors import ConfigError
from bastion.server.tls import TlsError
from bastion.store.audit import AuditLogError
from bastion.store.blocks import BlockStoreError
from bastion.store.webhook_queue import WebhookQueueError

__all__ = [
    "MAX_RESTARTS_PER_WINDOW",
    "MAX_WORKERS",
    "READY_RE",
    "RESTART_BACKOFF_FIRST_SECONDS",
    "RESTART_BACKOFF_MAX_SECONDS",
    "RESTART_WINDOW_SECONDS",
    "STARTUP_SECONDS",
    "STOP_SECONDS",
    "ReusePortLoop",
    "Supervisor",
    "reserve_port",
    "restart_delay",
    "run_worker",
    "settings_payload",
    "supervise",
]

log = logging.getLogger("bastion.workers")

#: Most workers ``--workers`` accepts: each is a whole interpreter and node.
MAX_WORKERS = 64
#: Seconds over which the restarts of one worker are counted.
RESTART_WINDOW_SECONDS = 60.0
#: Restarts of one worker allowed within the window before the supervisor gives up.
MAX_RESTARTS_PER_WINDOW = 5
#: First restart delay, doubled for each recent restart, capped at the maximum.
RESTART_BACKOFF_FIRST_SECONDS = 0.5
RESTART_BACKOFF_MAX_SECONDS = 10.0
#: Seconds every worker gets to print its ready line at start-up.
STARTUP_SECONDS = 60.0
#: Seconds the workers get to drain after a stop signal before they are killed (a
#: worker's own drain, webhook stop and audit flush are bounded well below this).
STOP_SECONDS = 30.0
#: Largest settings line a worker accepts from its supervisor.
_MAX_SETTINGS_BYTES = 16 * 1024 * 1024

#: The line a worker prints on its stdout (a pipe to the supervisor) once it listens.
READY_RE = re.compile(r"^bastion worker (?P<index>\d+) ready on http://(?P<addr>\S+)\s*$")


def restart_delay(recent_restarts: int) -> float:
    """Seconds to wait before restarting a worker that already restarted this often.

    Args:
        recent_restarts: restarts of this worker within :data:`RESTART_WINDOW_SECONDS`.
    """
    delay = RESTART_BACKOFF_FIRST_SECONDS * 2 ** min(recent_restarts, 16)
    return float(min(delay, RESTART_BACKOFF_MAX_SECONDS))


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _reveal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reveal(item) for item in value]
    return value


def settings_payload(settings: Settings) -> dict[str, Any]:
    """The settings as a plain JSON-ready mapping, secrets included.

    Only ever written to a worker's stdin pipe: it holds every secret in clear.
    :func:`bastion.config.settings_from_mapping` turns it back into equal settings.
    """
    payload: dict[str, Any] = _reveal(settings.model_dump(mode="python"))
    return payload


def reserve_port(host: str) -> socket.socket:
    """Bind (never listen) an ``SO_REUSEPORT`` socket on a free port of ``host``.

    Held by the supervisor so that the port stays theirs while the workers, which
    also set ``SO_REUSEPORT``, bind the same port and listen on it.

    Raises:
        OSError: the address cannot be bound.
    """
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # The same options as the workers' listeners, or their bind would be refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class _Worker:
    """One worker slot: its index survives restarts, its process does not."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        #: Monotonic times of this slot's restarts, within the window.
        self.restarts: deque[float] = deque()
        self.relay: asyncio.Task[None] | None = None


class Supervisor:
    """Start, watch, restart and stop N worker processes sharing one port.

    Args:
        settings: the validated settings; every worker runs exactly these.
        workers: how many worker processes (2 or more).
        on_ready: called once with ``(host, port)`` when every worker listens.
        log_level: the workers' ``--log-level``.
        log_format: the workers' ``--log-format`` (``console`` or ``json``).
        log_levels: the workers' ``--log-level-for`` (logger name to level).
        reload: reads the settings again on SIGHUP (``None``: nothing to reload);
            raises ConfigError when they are invalid.
    """

    def __init__(
        self,
        settings: Settings,
        workers: int,
        on_ready: Callable[[str, int], None],
        *,
        log_level: str = "info",
        log_format: logs.LogFormat = "console",
        log_levels: Mapping[str, str] | None = None,
        reload: Callable[[], Settings] | None = None,
    ) -> None:
        self._settings = settings
        self._reload = reload
        self._payload = settings_payload(settings)
        self.host = settings.server.host
        self.port = settings.server.port
        self._count = workers
        self._on_ready = on_ready
        self._log_level = log_level
        self._log_format = log_format
        self._log_levels = dict(log_levels or {})
        self._workers = [_Worker(index) for index in range(workers)]
        self._watchers: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._signal = signal.SIGTERM
        self._started = False
        self._exit_code = 0

    @property
    def pids(self) -> list[int]:
        """PIDs of the worker processes currently running."""
        return [
            w.process.pid
            for w in self._workers
            if w.process is not None and w.process.returncode is None
        ]

    async def wait_ready(self, index: int) -> int:
        """Wait until worker ``index`` (as started or restarted) listens; return its PID."""
        worker = self._workers[index]
        await worker.ready.wait()
        assert worker.process is not None
        return worker.process.pid

    async def run(self) -> int:
        """Run until a stop signal (or a worker that cannot run); return the exit status.

        Raises:
            OSError: the port could not be reserved (``port = 0``).
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        reserved: socket.socket | None = None
        try:
            if self.port == 0:
                reserved = reserve_port(self.host)
                self.port = int(reserved.getsockname()[1])
            self._payload["server"]["port"] = self.port
            for worker in self._workers:
                await self._spawn(worker)
            self._watchers = [asyncio.create_task(self._watch(w)) for w in self._workers]
            if await self._wait_started():
                self._started = True
                self._on_ready(self.host, self.port)
                await self._stop.wait()
            await self._stop_all()
        finally:
            # Cancelled or failed half-way: no worker may outlive its supervisor.
            self._signal_all(signal.SIGTERM)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if reserved is not None:
                reserved.close()
        return self._exit_code

    def _on_signal(self, signum: int) -> None:
        if self._stop.is_set():
            # A second signal is forwarded too (the workers' drain is idempotent).
            self._signal_all(signal.Signals(signum))
            return
        log.info("stopping %d workers on %s", self._count, signal.Signals(signum).name)
        self._signal = signal.Signals(signum)
        self._stop.set()

    def _on_reload(self) -> None:
        """SIGHUP: read the settings again and hand them to every worker."""
        if self._reload is None:
            log.warning("SIGHUP: nothing to reload (started without --config)")
            return
        try:
            settings = self._reload()
        except ConfigError as exc:  # names fields, never values (bastion.config)
            log.error("configuration not reloaded: %s", exc)
            return
        from bastion.server.reload import changed_fields, restart_fields

        changed = changed_fields(self._settings, settings)
        if not changed:
            log.info("configuration reloaded: unchanged")
            return
        restart = restart_fields(self._settings, changed)
        if restart:
            log.error("configuration not reloaded: needs a restart: %s", ", ".join(restart))
            return
        payload = settings_payload(settings)
        payload["server"]["port"] = self.port
        self._settings, self._payload = settings, payload
        line = json.dumps(payload).encode() + b"\n"
        sent = 0
        for worker in self._workers:
            process = worker.process
            if process is None or process.returncode is not None or process.stdin is None:
                continue
            if process.stdin.is_closing():
                continue
            process.stdin.write(line)
            sent += 1
        log.warning("configuration reloaded, sent to %d workers: %s", sent, ", ".join(changed))

    def _fail(self, code: int) -> None:
        if not self._stop.is_set():
            self._exit_code = code
            self._stop.set()

    def _signal_all(self, signum: signal.Signals) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    async def _spawn(self, worker: _Worker) -> None:
        worker.ready.clear()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bastion",
            "serve",
            "--worker-of",
            str(os.getpid()),
            "--worker-index",
            str(worker.index),
            "--log-level",
            self._log_level,
            "--log-format",
            self._log_format,
            *(
                arg
                for name, level in self._log_levels.items()
                for arg in ("--log-level-for", f"{name}={level}")
            ),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Own session: a terminal's Ctrl-C goes to the supervisor only, which
            # forwards it, so a worker still starting up is not interrupted mid-import.
            start_new_session=True,
        )
        worker.process = process
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        assert process.stdin is not None
        # The pipe stays open for the worker's life: its end of file tells the worker
        # that the supervisor is gone.
        process.stdin.write(json.dumps(self._payload).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        worker.relay = asyncio.create_task(self._relay(worker, process))
        if self._stop.is_set():  # a stop arrived while this one was being started
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self._signal)

    async def _relay(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        """Read the worker's stdout: its ready line, and anything else to our stdout."""
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # an over-long line is dropped, not fatal
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace")
            if not worker.ready.is_set() and READY_RE.match(text):
                worker.ready.set()
                log.info("worker %d listening (pid %d)", worker.index, process.pid)
                continue
            with contextlib.suppress(OSError):  # our own stdout gone: keep draining
                sys.stdout.write(text)
                sys.stdout.flush()

    async def _wait_started(self) -> bool:
        """Wait until every worker is ready (True), or a stop or failure (False)."""
        all_ready: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(w.ready.wait() for w in self._workers))
        )
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {all_ready, stopped}, timeout=STARTUP_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            all_ready.cancel()
            stopped.cancel()
        if not done:
            log.error("not every worker was listening within %.0f s", STARTUP_SECONDS)
            self._fail(1)
            return False
        return not self._stop.is_set()

    async def _watch(self, worker: _Worker) -> None:
        """Wait for the worker to exit; restart it unless stopping."""
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            worker.ready.clear()
            if worker.relay is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(worker.relay), 1.0)
            if self._stop.is_set():
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    log.warning("worker %d exited with %d while stopping", worker.index, code)
                    if self._exit_code == 0:
                        self._exit_code = 1
                return
            if not self._started:
                log.error(
                    "worker %d (pid %d) exited with %d before it was listening",
                    worker.index,
                    process.pid,
                    code,
                )
                self._fail(code if code > 0 else 1)
                return
            now = time.monotonic()
            while worker.restarts and now - worker.restarts[0] > RESTART_WINDOW_SECONDS:
                worker.restarts.popleft()
            if len(worker.restarts) >= MAX_RESTARTS_PER_WINDOW:
                log.error(
                    "worker %d exited with %d after %d restarts within %.0f s: stopping",
                    worker.index,
                    code,
                    len(worker.restarts),
                    RESTART_WINDOW_SECONDS,
                )
                self._fail(1)
                return
            delay = restart_delay(len(worker.restarts))
            log.warning(
                "worker %d (pid %d) exited with %d; restarting in %.1f s",
                worker.index,
                process.pid,
                code,
                delay,
            )
            worker.restarts.append(now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                await self._spawn(worker)
            except OSError as exc:  # no process could be started (fork, fd limits)
                log.error("worker %d could not be restarted: %s", worker.index, exc)
                self._fail(1)
                return

    async def _stop_all(self) -> None:
        self._stop.set()
        self._signal_all(self._signal)
        if not self._watchers:
            return
        _done, pending = await asyncio.wait(self._watchers, timeout=STOP_SECONDS)
        if pending:
            log.error("workers still running %.0f s after the stop signal: killing", STOP_SECONDS)
            self._exit_code = 1
            self._signal_all(signal.SIGKILL)
            _done, pending = await asyncio.wait(pending, timeout=5.0)
            for task in pending:
                task.cancel()
        for worker in self._workers:
            if worker.relay is not None:
                worker.relay.cancel()


def supervise(
    settings: Settings,
    workers: int,
    on_ready: Callable[[str, int], None],
    *,
    log_level: str = "info",
    log_format: logs.LogFormat = "console",
    log_levels: Mapping[str, str] | None = None,
    reload: Callable[[], Settings] | None = None,
) -> int:
    """Run ``workers`` worker processes until SIGINT or SIGTERM; return the exit status.

    The logging options are handed to every worker, and SIGHUP reloads with
    ``reload`` (see :class:`Supervisor`).

    Raises:
        OSError: the port could not be reserved (``port = 0``).
    """
    supervisor = Supervisor(
        settings,
        workers,
        on_ready,
        log_level=log_level,
        log_format=log_format,
        log_levels=log_levels,
        reload=reload,
    )
    return asyncio.run(supervisor.run())


# --- the worker side ---------------------------------------------------------------


class ReusePortLoop(uvloop.Loop):
    """A uvloop loop whose listening sockets join the port's ``SO_REUSEPORT`` group.

    Every worker binds the same port; the kernel refuses the second bind unless each
    socket sets ``SO_REUSEPORT``. A worker's only server is its node's listener.
    """

    async def create_server(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> asyncio.AbstractServer:
        kwargs["reuse_port"] = True
        return await super().create_server(*args, **kwargs)


def _read_line(fd: int, limit: int) -> tuple[bytes, bytes]:
    """Read the supervisor's first line from ``fd``; also return what followed it."""
    data = bytearray()
    while len(data) < limit and b"\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    line, newline, rest = bytes(data).partition(b"\n")
    return line + newline, rest


class _LatestSettings:
    """The last settings the supervisor sent, for the worker's SIGHUP handler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self) -> Settings:
        return self.settings


def _exit_with_supervisor(fd: int, rest: bytes, latest: _LatestSettings, index: int) -> None:
    """Read reloads from the supervisor's pipe; when it closes, drain like on SIGTERM."""
    # Raw os.read, not sys.stdin: a thread blocked inside a buffered reader aborts
    # the interpreter at shutdown.
    pending = bytearray(rest)
    with contextlib.suppress(OSError):
        while True:
            while b"\n" in pending:
                line, _, tail = bytes(pending).partition(b"\n")
                pending = bytearray(tail)
                _take_reload(line, latest, index)
            if len(pending) > _MAX_SETTINGS_BYTES:
                pending.clear()  # never a settings line: drop it
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
    os.kill(os.getpid(), signal.SIGTERM)


def _take_reload(line: bytes, latest: _LatestSettings, index: int) -> None:
    """A new settings line from the supervisor: keep it, and let the loop apply it."""
    try:
        latest.settings = settings_from_mapping(json.loads(line), environ={})
    except (ValueError, TypeError, ConfigError) as exc:
        log.error("worker %d: bad settings from the supervisor: %s", index, exc)
        return
    # The loop applies it from its SIGHUP handler (signals are its thread-safe door).
    os.kill(os.getpid(), signal.SIGHUP)


def run_worker(
    parent_pid: int,
    index: int,
    log_level: str,
    log_format: logs.LogFormat = "console",
    log_levels: Mapping[str, str] | None = None,
) -> int:
    """Be worker ``index`` of the supervisor ``parent_pid``; return the exit status.

    Reads the settings from stdin, serves on :class:`ReusePortLoop` until SIGINT or
    SIGTERM (or until the supervisor goes away), and prints one ready line. Logs as
    :func:`bastion.logs.configure` with the supervisor's format and levels.
    """
    # The index in every line, so that N interleaved logs can be told apart.
    logs.configure(log_level, log_format, log_levels or {}, worker=index)
    if os.getppid() != parent_pid:
        # Internal option: only a supervisor starts workers (it would wait on stdin).
        print("bastion: --worker-of is set only by `bastion serve --workers`", file=sys.stderr)
        return 2
    stdin = sys.stdin.fileno()
    line, rest = _read_line(stdin, _MAX_SETTINGS_BYTES)
    try:
        settings = settings_from_mapping(json.loads(line), environ={})
    except (ValueError, TypeError, ConfigError) as exc:
        print(f"bastion: worker {index}: bad settings from the supervisor: {exc}", file=sys.stderr)
        return 2
    latest = _LatestSettings(settings)
    threading.Thread(
        target=_exit_with_supervisor,
        args=(stdin, rest, latest, index),
        name="supervisor-watch",
        daemon=True,
    ).start()

    from bastion.server.runtime import run

    def on_ready(host: str, port: int) -> None:
        print(f"bastion worker {index} ready on http://{host}:{port}", flush=True)

    try:
        uvloop.run(
            run(settings, on_ready, reload=latest, reload_source="supervisor"),
            loop_factory=ReusePortLoop,
        )
    except OSError as exc:
        print(f"bastion: worker {index}: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1
    except (AuditLogError, BlockStoreError, WebhookQueueError, TlsError) as exc:
        print(f"bastion: worker {index}: {exc}", file=sys.stderr)
        return 1
    return 0
