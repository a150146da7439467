"""pusher-js as a slow consumer: it reads the 4100 close and takes its back-off path.

The real pusher-js (8.6, under Node) subscribes, then its TCP socket stops being
read (the driver pauses the net.Socket under pusher-js's WebSocket). REST events
go past ``max_write_buffer_kb``; the node cuts the connection (``slow_consumer``,
4100), dropping the frames it held. When the socket is read again pusher-js gets
what was already on its way, then ``pusher:error`` 4100 and the close frame 4100.

What pusher-js does with the close (``src/core/connection/protocol/protocol.ts``
and ``connection_manager.ts`` in its sources): a close code in 4100-4199 is the
``backoff`` action, which emits ``error`` as ``{type: "WebSocketError", error:
{type: "PusherError", data: {code, message}}}`` and retries after 1 s
(``connecting_in`` 1), staying in ``connected`` until the retry timer fires, then
``connecting`` and ``connected`` with a new socket id. A 1006 (no close frame, what
a client that missed the close sees) takes no action: only the ``error``
``{type: "PusherError", data: {code: 1006}}``, then the same 1 s retry from the
``closed`` handler. In pusher-js 8.6 the wait is the same 1 s either way; what only
the close frame gives is the reason (``WebSocketError`` with 4100) and the back-off
classification, so that is what is asserted, with the observable state sequence.
No wall-clock assertion.

One timing dependency, stated: the socket is resumed as soon as ``/metrics`` shows
the cut, well inside the node's 2 s close grace (a client that does not read for 2 s
after its cut is aborted: 1006, by design).
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from support.server import BastionProcess, config_toml
from support.timeouts import scaled

from .conftest import make_py_pusher
from .node_driver import NodeDriver

APP_ID = "12345"
CHANNEL = "firehose"
PAYLOAD = "x" * 8000


def counter(server: BastionProcess, name: str, **labels: str) -> float:
    """One sample of the node's ``/metrics`` (0 when absent)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=scaled(10))
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_pusherjs_that_stops_reading_reads_the_4100_close_and_backs_off(
    make_bastion: Callable[..., BastionProcess], make_driver: Callable[..., NodeDriver]
) -> None:
    server = make_bastion(config_toml(server={"max_write_buffer_kb": 128}))
    driver = make_driver(server)
    sdk = make_py_pusher(server)
    first_socket_id = driver.connect("slow")
    driver.subscribe("slow", CHANNEL)
    assert driver.request("pause_socket", client="slow") == {"paused": True}

    published = 0
    while not counter(server, "bastion_refusals_total", reason="slow_consumer", app=APP_ID):
        assert published < 20_000, "not cut"
        sdk.trigger_batch(
            [
                {"channel": CHANNEL, "name": "big", "data": f"{n:06d}:{PAYLOAD}"}
                for n in range(published, published + 10)
            ]
        )
        published += 10
    discarded = counter(server, "bastion_frames_discarded_total", app=APP_ID)
    assert discarded > 0
    driver.request("resume_socket", client="slow")

    # The close frame's code, through pusher-js's back-off action.
    def backoff_error(event: dict[str, Any]) -> bool:
        return event["error"].get("type") == "WebSocketError"

    backoff = driver.wait_event(kind="conn_error", client="slow", where=backoff_error)
    assert backoff["error"]["error"]["type"] == "PusherError"
    assert backoff["error"]["error"]["data"]["code"] == 4100
    # Then it reconnects by itself, after its back-off notice.
    reconnected = driver.wait_event(
        kind="state",
        client="slow",
        previous="connecting",
        current="connected",
        where=lambda e: e["seq"] > backoff["seq"],
        timeout=scaled(15),
    )
    assert reconnected["socketId"] != first_socket_id
    notices = driver.events(kind="connecting_in", client="slow")
    assert notices and notices[0]["delay"] == 1
    assert backoff["seq"] < notices[0]["seq"] < reconnected["seq"]
    states = [(e["previous"], e["current"]) for e in driver.events(kind="state", client="slow")]
    assert states == [
        ("connecting", "connected"),  # (initialized -> connecting came before the binding)
        ("connected", "connecting"),
        ("connecting", "connected"),
    ]
    # Never a 1006: the close frame reached it.
    codes = [
        e["error"]["data"]["code"]
        for e in driver.events(kind="conn_error", client="slow")
        if e["error"].get("type") == "PusherError"
    ]
    assert 1006 not in codes and 4100 in codes

    # What it read on the first connection: the events from the first, in order and
    # without a gap, then the reason; the rest was dropped on the node.
    first_connection = [
        e
        for e in driver.events(kind="message", client="slow")
        if e["seq"] < reconnected["seq"] and e["event"] in ("big", "pusher:error")
    ]
    *events, error = first_connection
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4100
    received = [int(e["data"][:6]) for e in events]
    assert received == list(range(len(received)))
    assert len(received) + discarded == published
