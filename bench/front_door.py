"""Front-door microbenchmark: the listener's cost per HTTP request, in-process.

No sockets and no second process: a :class:`~bastion.server.runtime.Node` is built
(not started) and one :class:`~bastion.server.http.HttpConnection` is fed whole
keep-alive requests through ``data_received`` with a transport that only counts
the bytes written. What is measured is therefore the Python a request costs from
its bytes to its answer's bytes: parsing, the client address, routing, the gates
and the handler (for a REST trigger: the signature, the replay guard, the app's
bucket and a publish to a channel nobody is subscribed to).

Cases (each a different request, repeated):

* ``trigger``: a signed ``POST /apps/1/events`` from a non-loopback address (each
  with its own body, so the replay guard never refuses one);
* ``trigger_loopback``: the same from 127.0.0.1 (inside ``never_block``);
* ``unsigned``: ``POST /apps/1/events`` without a signature (401, recorded);
* ``not_found``: ``GET /nope`` (the address bucket, then 404, recorded);
* ``healthz``, ``readyz``: the probes;
* ``admin``: an authorised ``GET /api/security/health`` from loopback.

Prints one JSON line: CPU microseconds per request for each case (the best of
``--repeat`` rounds of ``--requests`` requests; process CPU time, so other work on
the machine moves it less than the wall clock), and the Python version.

    python bench/front_door.py [--requests 5000] [--repeat 7] [--case trigger ...]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import uvloop

from bastion.config import settings_from_mapping
from bastion.server.http import HttpConnection
from bastion.server.runtime import Node

APP_ID = "1"
APP_KEY = "bench-key"
APP_SECRET = "bench-secret-0123456789abcdef"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdefghij"
CLIENT = "203.0.113.7"
LOOPBACK = "127.0.0.1"


class Sink:
    """A transport that keeps nothing: it counts the bytes written."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.written = 0
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _request(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:6001\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _signed_trigger(index: int) -> bytes:
    body = json.dumps(
        {"name": "bench-event", "channel": "bench", "data": f'{{"n":{index:012d}}}'},
        separators=(",", ":"),
    ).encode()
    query = {
        "auth_key": APP_KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    path = f"/apps/{APP_ID}/events"
    canonical = "&".join(f"{k}={query[k]}" for k in sorted(query))
    query["auth_signature"] = hmac.new(
        APP_SECRET.encode(), f"POST\n{path}\n{canonical}".encode(), hashlib.sha256
    ).hexdigest()
    return _request("POST", f"{path}?{urlencode(query)}", body)


def _settings() -> Any:
    return settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "security": {
                "rest_requests_per_ip": {"rate": 1e9, "burst": 10**9},
                "auth_failures_per_ip": {"rate": 1e9, "burst": 10**9},
            },
            "audit": {"enabled": False},
            "admin": {"token": ADMIN_TOKEN},
            "apps": [{"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET}],
        },
        environ={},
    )


CASES: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "trigger": (CLIENT, _signed_trigger),
    "trigger_loopback": (LOOPBACK, _signed_trigger),
    "unsigned": (CLIENT, lambda i: _request("POST", f"/apps/{APP_ID}/events", b"{}")),
    "not_found": (CLIENT, lambda i: _request("GET", "/nope")),
    "healthz": (CLIENT, lambda i: _request("GET", "/healthz")),
    "readyz": (CLIENT, lambda i: _request("GET", "/readyz")),
    "admin": (
        LOOPBACK,
        lambda i: _request(
            "GET", "/api/security/health", headers=f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
        ),
    ),
}


def measure(case: str, requests: int, repeat: int) -> float:
    """Best microseconds per request of ``case`` over ``repeat`` rounds."""
    peer, make = CASES[case]
    loop = uvloop.new_event_loop()
    try:
        node = Node(_settings(), loop)
        best = float("inf")
        for round_ in range(repeat):
            batch = [make(round_ * requests + i) for i in range(requests)]
            sink = Sink(peer)
            connection = HttpConnection(node.ctx)
            connection.connection_made(sink)  # type: ignore[arg-type]
            gc.collect()
            gc.disable()
            try:
                # CPU time of this process: steadier than the wall clock on a shared box.
                start = time.process_time()
                for raw in batch:
                    connection.data_received(raw)
                elapsed = time.process_time() - start
            finally:
                gc.enable()
            if sink.closed:
                raise SystemExit(f"{case}: the connection was closed")
            connection.connection_lost(None)
            best = min(best, elapsed / requests)
        return best * 1e6
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """Run the cases and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # refusals log; the bench measures the server
    cases = args.case or list(CASES)
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "requests": args.requests,
        "repeat": args.repeat,
        "us_per_request": {
            case: round(measure(case, args.requests, args.repeat), 2) for case in cases
        },
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
