"""A private ``redis-server`` for tests: loopback, a free port, no persistence.

Outage tests stop (or kill) it and start it again **on the same port**, so nodes
pointed at its URL must reconnect on their own; :meth:`RedisServer.pause` freezes
it instead (a hung server: connections stay open, nothing answers). The process
is always ended by its own PID (SIGTERM, then SIGKILL after a scaled grace
period), never by name.

Typical use::

    with RedisServer() as server:
        url = server.url          # redis://127.0.0.1:PORT/0
        server.stop()             # Redis is gone
        server.start()            # back on the same port
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from types import TracebackType
from urllib.parse import quote, urlencode

from .pki import Pki
from .timeouts import scaled

__all__ = ["RedisServer", "free_port"]

#: Seconds a start waits for the server to answer, and a stop for it to exit.
WAIT_SECONDS = 10.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 (started by :meth:`start`)."""

    def __init__(
        self, port: int | None = None, *, password: str | None = None, tls: Pki | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.port = port if port is not None else free_port()
        self.password = password
        #: TLS only (``rediss://``), with this certificate; clients trust its CA.
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, or ``rediss://`` (verifying the test CA)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        query = urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": str(self.tls.ca)})
        return f"rediss://{auth}127.0.0.1:{self.port}/0?{query}"

    def _listen_args(self) -> list[str]:
        args = ["--requirepass", self.password] if self.password else []
        if self.tls is None:
            return [*args, "--port", str(self.port)]
        return [
            *args,
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.tls.cert),
            "--tls-key-file",
            str(self.tls.key),
            "--tls-ca-cert-file",
            str(self.tls.ca),
            "--tls-auth-clients",
            "no",
        ]

    def start(self) -> None:
        """Start (again) on :attr:`port`; returns once it accepts connections."""
        if self.process is not None:
            raise RuntimeError("already running")
        self.process = subprocess.Popen(
            [
                self.binary,
                *self._listen_args(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + scaled(WAIT_SECONDS)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"redis-server exited at start with {code}")
            if self._answers():
                return
            time.sleep(0.02)  # polling readiness, not synchronising with the code under test
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                conn = raw
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=str(self.tls.ca))
                    conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
                conn.sendall(b"PING\r\n")
                # Up, whether or not it wants a password first.
                return conn.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        """End the process by its PID (SIGTERM, then SIGKILL); a no-op when stopped."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a paused server cannot exit
            process.terminate()
            try:
                process.wait(scaled(WAIT_SECONDS))
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(scaled(WAIT_SECONDS))

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused process run again (SIGCONT)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """End the process abruptly by its PID (SIGKILL): a crash, not a shutdown."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(scaled(WAIT_SECONDS))

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
