"""Python side of ``js/driver.js``: pusher-js and the Node ``pusher`` SDK under pytest.

One Node process hosts any number of named pusher-js clients plus the Node SDK. Commands
go out as JSON lines on stdin; replies and events come back as JSON lines on stdout,
read by a background thread. Every wait is bounded by :func:`support.timeouts.scaled`.

Events are matched with :meth:`NodeDriver.wait_event`, which returns the earliest
*unconsumed* matching event and marks it consumed, so a test can wait for the same kind
of event twice. Negative assertions use :meth:`NodeDriver.events` (everything seen) after
a *barrier*: an event that the server must deliver after the one that must not arrive.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from support.timeouts import scaled

__all__ = ["DRIVER_JS", "INTEROP_DIR", "DriverError", "NodeDriver"]

INTEROP_DIR = Path(__file__).resolve().parent
DRIVER_JS = INTEROP_DIR / "js" / "driver.js"

Event = dict[str, Any]


class DriverError(RuntimeError):
    """A command failed inside Node (``error`` carries name/message/status/body)."""

    def __init__(self, cmd: str, error: Mapping[str, Any]) -> None:
        super().__init__(
            f"{cmd}: {error.get('name')}: {error.get('message')} "
            f"(status={error.get('status')}, body={error.get('body')!r})"
        )
        self.error = dict(error)
        self.status = error.get("status")
        self.body = error.get("body")
        self.name = error.get("name")


class NodeDriver:
    """A running ``node js/driver.js`` process."""

    def __init__(
        self, node: str, *, max_seconds: float | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        child_env = dict(os.environ)
        child_env["BASTION_DRIVER_MAX_SECONDS"] = str(int(max_seconds or scaled(300)))
        if env:
            child_env.update(env)
        self.process = subprocess.Popen(
            [node, str(DRIVER_JS)],
            cwd=str(INTEROP_DIR),
            env=child_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.process.pid
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._replies: dict[int, Event] = {}
        self._events: list[Event] = []
        self._consumed: set[int] = set()
        self._noise: list[str] = []
        self._stderr: list[str] = []
        self._eof = False
        self._ready = False
        self._write_lock = threading.Lock()
        self._stdout_thread = threading.Thread(
            target=self._read_stdout, name="node-driver-stdout", daemon=True
        )
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, name="node-driver-stderr", daemon=True
        )
        self._stdout_thread.start()
        self._stderr_thread.start()
        self._wait_ready(scaled(30))

    # -- reading ------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        try:
            for raw in iter(self.process.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    with self._cond:
                        self._noise.append(line)
                    continue
                with self._cond:
                    kind = msg.get("type")
                    if kind == "reply" and isinstance(msg.get("id"), int):
                        self._replies[msg["id"]] = msg
                    elif kind == "event":
                        msg["seq"] = len(self._events)
                        msg["t"] = time.monotonic()
                        self._events.append(msg)
                    elif kind == "ready":
                        self._ready = True
                    else:
                        self._noise.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        try:
            for raw in iter(self.process.stderr.readline, b""):
                with self._cond:
                    self._stderr.append(raw.decode("utf-8", errors="replace"))
        except (OSError, ValueError):
            pass

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._cond.wait(remaining)
            ready = self._ready
        if not ready:
            self.stop()
            raise RuntimeError(f"node driver did not start:\n{self.stderr_text[-4000:]}")

    @property
    def stderr_text(self) -> str:
        with self._cond:
            return "".join(self._stderr)

    def describe(self) -> str:
        """Everything seen so far, for failure messages."""
        with self._cond:
            events = "\n".join(json.dumps(e, sort_keys=True) for e in self._events[-80:])
            noise = "\n".join(self._noise[-20:])
        return (
            f"--- driver events (last 80) ---\n{events}\n--- noise ---\n{noise}\n"
            f"--- stderr ---\n{self.stderr_text[-3000:]}"
        )

    # -- commands -----------------------------------------------------------------

    def request(self, cmd: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Send one command and wait (bounded) for its reply; return ``result``.

        Raises:
            DriverError: Node answered ``ok: false``.
            TimeoutError: no reply in time (default ``scaled(15)`` s).
        """
        msg_id = next(self._ids)
        line = json.dumps({"id": msg_id, "cmd": cmd, **args}) + "\n"
        assert self.process.stdin is not None
        with self._write_lock:
            try:
                self.process.stdin.write(line.encode("utf-8"))
                self.process.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise RuntimeError(f"node driver is gone ({exc}):\n{self.describe()}") from exc
        deadline = time.monotonic() + (scaled(15) if timeout is None else timeout)
        with self._cond:
            while msg_id not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no reply to {cmd} {args!r} within the time-out\n{self.describe()}"
                    )
                if self._eof:
                    raise RuntimeError(
                        f"node driver exited while waiting for {cmd}\n{self.describe()}"
                    )
                self._cond.wait(remaining)
            reply = self._replies.pop(msg_id)
        if not reply.get("ok"):
            raise DriverError(cmd, reply.get("error") or {})
        return reply.get("result")

    # -- events -------------------------------------------------------------------

    @staticmethod
    def _matches(
        event: Event, filters: Mapping[str, Any], where: Callable[[Event], bool] | None
    ) -> bool:
        for key, value in filters.items():
            if event.get(key) != value:
                return False
        return where is None or bool(where(event))

    def wait_event(
        self,
        *,
        timeout: float | None = None,
        where: Callable[[Event], bool] | None = None,
        consume: bool = True,
        **filters: Any,
    ) -> Event:
        """Wait for the earliest unconsumed event whose fields equal ``filters``.

        Example: ``wait_event(kind="channel", client="a", channel="c", event="e")``.

        Raises:
            TimeoutError: none arrived within ``timeout`` (default ``scaled(10)``).
        """
        deadline = time.monotonic() + (scaled(10) if timeout is None else timeout)
        with self._cond:
            while True:
                for event in self._events:
                    if event["seq"] in self._consumed:
                        continue
                    if self._matches(event, filters, where):
                        if consume:
                            self._consumed.add(event["seq"])
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    why = "driver exited" if self._eof else "timed out"
                    raise TimeoutError(f"{why} waiting for event {filters!r}\n{self.describe()}")
                self._cond.wait(remaining)

    def events(self, where: Callable[[Event], bool] | None = None, **filters: Any) -> list[Event]:
        """Every event seen so far (consumed or not) that matches."""
        with self._cond:
            return [e for e in self._events if self._matches(e, filters, where)]

    # -- conveniences -------------------------------------------------------------

    def init(
        self, *, port: int, app_id: str, key: str, secret: str, master_key_b64: str | None
    ) -> Any:
        return self.request(
            "init",
            port=port,
            appId=app_id,
            key=key,
            secret=secret,
            masterKeyBase64=master_key_b64,
            timeoutMs=int(scaled(10) * 1000),
        )

    def connect(self, client: str, *, timeout: float | None = None, **opts: Any) -> str:
        """Create a pusher-js client and wait until it is connected; return its socket id."""
        result = self.request(
            "connect", client=client, timeout=scaled(15) if timeout is None else timeout, **opts
        )
        return str(result["socketId"])

    def subscribe(
        self, client: str, channel: str, *, wait: bool = True, timeout: float | None = None
    ) -> Event | None:
        """Subscribe; if ``wait``, wait for ``pusher:subscription_succeeded`` and return it.

        A ``pusher:subscription_error`` arriving instead fails fast with its data.
        """
        self.request("subscribe", client=client, channel=channel)
        if not wait:
            return None
        event = self.wait_event(
            kind="channel",
            client=client,
            channel=channel,
            timeout=timeout,
            where=lambda e: (
                e["event"] in ("pusher:subscription_succeeded", "pusher:subscription_error")
            ),
        )
        if event["event"] != "pusher:subscription_succeeded":
            raise AssertionError(
                f"{client} could not subscribe to {channel}: {event['data']!r}\n{self.describe()}"
            )
        return event

    def channel_event(
        self, client: str, channel: str, event: str, *, timeout: float | None = None
    ) -> Event:
        return self.wait_event(
            kind="channel", client=client, channel=channel, event=event, timeout=timeout
        )

    def sdk(
        self,
        method: str,
        *args: Any,
        sdk: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call a Node ``pusher`` SDK method; promises are awaited → ``{status, body}``."""
        return self.request(
            "sdk", method=method, args=list(args), sdk=dict(sdk or {}), timeout=timeout
        )

    # -- teardown -----------------------------------------------------------------

    def stop(self) -> int | None:
        """Ask the driver to quit, then SIGTERM / SIGKILL it by PID."""
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                with self._write_lock:
                    self.process.stdin.write(b'{"id": 0, "cmd": "quit"}\n')
                    self.process.stdin.flush()
                    self.process.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self.process.wait(scaled(5))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGTERM)
                    self.process.wait(scaled(5))
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    self.process.wait(scaled(5))
        self._stdout_thread.join(scaled(5))
        self._stderr_thread.join(scaled(5))
        for pipe in (self.process.stdout, self.process.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        return self.process.returncode
