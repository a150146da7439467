"""A webhook receiver on 127.0.0.1 for the tests: records every request, answers as told.

It runs :class:`http.server.ThreadingHTTPServer` on its own threads, so it works the
same for an in-process node (the event loop is never blocked by it) and for a
``bastion serve`` child process.

Usage::

    with WebhookReceiver() as receiver:            # port chosen by the OS
        receiver.url                               # "http://127.0.0.1:PORT/hook"
        receiver.fail_next(3, status=503)          # the next 3 requests get 503
        receiver.hang = True                       # requests wait until close()
        received = receiver.wait_for(lambda r: len(r) >= 2, timeout=scaled(5))

Each recorded :class:`Received` keeps the raw body bytes (signatures are over
them), the headers, the path and the status that was answered.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Received", "WebhookReceiver"]

#: A hanging request is released after this long even if nobody closes the receiver.
HANG_LIMIT_SECONDS = 60.0


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name."""
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class WebhookReceiver:
    """A loopback HTTP server that records webhook requests."""

    def __init__(self, path: str = "/hook") -> None:
        self.path = path
        self._lock = threading.Condition()
        self._received: list[Received] = []
        self._failures: list[int] = []
        self.hang = False
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if receiver.hang:
                    receiver._released.wait(HANG_LIMIT_SECONDS)
                status = receiver._next_status()
                receiver._record(Received(self.path, dict(self.headers.items()), body, status))
                payload = b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests assert on what was recorded

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-receiver", daemon=True
        )

    # --- control ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` requests with ``status`` (then 200 again)."""
        with self._lock:
            self._failures.extend([status] * count)

    def clear_failures(self) -> None:
        """Answer 200 from now on (drop any failures still queued by :meth:`fail_next`)."""
        with self._lock:
            self._failures.clear()

    def _next_status(self) -> int:
        with self._lock:
            return self._failures.pop(0) if self._failures else 200

    def _record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)
            self._lock.notify_all()

    # --- reading ----------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def delivered(self) -> list[Received]:
        """The requests answered with a 2xx."""
        return [r for r in self.received if 200 <= r.status < 300]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float
    ) -> list[Received]:
        """Block until ``predicate(received)`` holds; raise ``TimeoutError`` after ``timeout``."""
        with self._lock:
            if not self._lock.wait_for(lambda: predicate(list(self._received)), timeout):
                raise TimeoutError(f"webhook receiver: condition not met; got {self._received!r}")
            return list(self._received)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
