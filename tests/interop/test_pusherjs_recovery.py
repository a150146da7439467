"""Recovery with the real pusher-js and Bastion's add-on (clients/js), on one node.

pusher-js connects through a proxy (tests/support/proxy.py) that the test pauses,
cuts with a TCP reset, or points at another server, so it reconnects by itself
exactly when the test is ready; events are published meanwhile with the real
Node SDK. What is asserted is what the application sees: its handlers get every
event exactly once, in order, and ``bastion:recovery`` says whether that is so.

Also: a plain pusher-js (no add-on) and both official server SDKs on an app with
history see nothing but what they always did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.proxy import TcpProxy
from support.server import DEFAULT_APP, BastionProcess

from .conftest import make_py_pusher
from .node_driver import NodeDriver

HISTORY_APP: dict[str, Any] = {
    **DEFAULT_APP,
    "history": {"channel_prefixes": ["chat-", "private-chat-"], "max_events": 10},
}
CHANNEL = "chat-room"


@pytest.fixture
def history_server(make_bastion: Callable[..., BastionProcess]) -> BastionProcess:
    return make_bastion(apps=[HISTORY_APP])


@pytest.fixture
def proxy(history_server: BastionProcess) -> Any:
    with TcpProxy(history_server.port) as running:
        yield running


def recoveries(driver: NodeDriver, client: str, channel: str = CHANNEL) -> list[dict[str, Any]]:
    return [
        event["data"]
        for event in driver.events(kind="channel", client=client, channel=channel)
        if event["event"] == "bastion:recovery"
    ]


def numbers(driver: NodeDriver, client: str, channel: str = CHANNEL) -> list[int]:
    """The ``n`` of every ``message`` the app's handlers got, in order."""
    return [
        event["data"]["n"]
        for event in driver.events(kind="channel", client=client, channel=channel)
        if event["event"] == "message"
    ]


def publish(driver: NodeDriver, *ns: int, port: int | None = None, channel: str = CHANNEL) -> None:
    for n in ns:
        sdk = {"port": port} if port is not None else None
        response = driver.sdk("trigger", channel, "message", {"n": n}, sdk=sdk)
        assert response["status"] == 200, response


def wait_number(driver: NodeDriver, client: str, n: int, channel: str = CHANNEL) -> None:
    driver.wait_event(
        kind="channel",
        client=client,
        channel=channel,
        event="message",
        where=lambda e: e["data"] == {"n": n},
        consume=False,
    )


def wait_recovery(driver: NodeDriver, client: str, channel: str = CHANNEL) -> dict[str, Any]:
    event = driver.wait_event(
        kind="channel", client=client, channel=channel, event="bastion:recovery"
    )
    data: dict[str, Any] = event["data"]
    return data


def wait_left(driver: NodeDriver, client: str) -> None:
    """pusher-js noticed its connection is gone."""
    driver.wait_event(
        kind="state",
        client=client,
        previous="connected",
        where=lambda e: e["current"] != "connected",
    )


def connect_through(driver: NodeDriver, proxy: TcpProxy, client: str = "a") -> None:
    driver.connect(client, recovery=True, wsPort=proxy.port)
    driver.subscribe(client, CHANNEL)
    first = wait_recovery(driver, client)
    assert first["recovered"] is True and first["replayed"] == 0


def test_a_tcp_reset_loses_nothing(
    make_driver: Callable[..., NodeDriver], history_server: BastionProcess, proxy: TcpProxy
) -> None:
    driver = make_driver(history_server)
    connect_through(driver, proxy)
    publish(driver, 1, 2)
    wait_number(driver, "a", 2)
    proxy.pause()
    assert proxy.reset() == 1
    wait_left(driver, "a")
    publish(driver, 3, 4, 5)  # while pusher-js is away
    proxy.resume()
    answer = wait_recovery(driver, "a")
    assert answer["recovered"] is True
    assert answer["replayed"] == 3
    publish(driver, 6)
    wait_number(driver, "a", 6)
    # Exactly once each, in order, the missed ones before any newer one.
    assert numbers(driver, "a") == [1, 2, 3, 4, 5, 6]
    events = driver.events(kind="channel", client="a", channel=CHANNEL)
    order = [
        e["data"]["n"] if e["event"] == "message" else e["event"]
        for e in events
        if e["event"] in ("message", "bastion:recovery")
    ]
    answers = [index for index, item in enumerate(order) if item == "bastion:recovery"]
    assert len(answers) == 2
    assert order[answers[1] - 3 : answers[1] + 2] == [3, 4, 5, "bastion:recovery", 6]


def test_recovery_survives_several_reconnects_in_a_row(
    make_driver: Callable[..., NodeDriver], history_server: BastionProcess, proxy: TcpProxy
) -> None:
    driver = make_driver(history_server)
    connect_through(driver, proxy)
    publish(driver, 1)
    wait_number(driver, "a", 1)
    for round_, missed in enumerate(((2, 3), (), (4,))):
        proxy.pause()
        assert proxy.reset() == 1
        wait_left(driver, "a")
        publish(driver, *missed)
        proxy.resume()
        answer = wait_recovery(driver, "a")
        assert answer["recovered"] is True, (round_, answer)
        assert answer["replayed"] == len(missed)
    publish(driver, 5)
    wait_number(driver, "a", 5)
    assert numbers(driver, "a") == [1, 2, 3, 4, 5]


def test_a_private_channel_recovers_after_its_authorization(
    make_driver: Callable[..., NodeDriver], history_server: BastionProcess, proxy: TcpProxy
) -> None:
    channel = "private-chat-1"
    driver = make_driver(history_server)
    driver.connect("a", recovery=True, wsPort=proxy.port)
    driver.subscribe("a", channel)
    assert wait_recovery(driver, "a", channel)["recovered"] is True
    proxy.pause()
    proxy.reset()
    wait_left(driver, "a")
    publish(driver, 1, 2, channel=channel)
    proxy.resume()
    assert wait_recovery(driver, "a", channel)["recovered"] is True
    # The channel was authorised again on the new connection before anything was replayed.
    auths = driver.events(kind="auth", client="a", channel=channel)
    assert len(auths) == 2 and len({a["socketId"] for a in auths}) == 2
    assert numbers(driver, "a", channel) == [1, 2]


def test_a_gap_larger_than_the_history_is_false_and_replays_nothing(
    make_driver: Callable[..., NodeDriver], history_server: BastionProcess, proxy: TcpProxy
) -> None:
    driver = make_driver(history_server)
    connect_through(driver, proxy)
    publish(driver, 1)
    wait_number(driver, "a", 1)
    proxy.pause()
    proxy.reset()
    wait_left(driver, "a")
    publish(driver, *range(2, 14))  # 12 missed; the channel keeps 10
    proxy.resume()
    answer = wait_recovery(driver, "a")
    assert answer["recovered"] is False
    assert answer["reason"] == "too_old"
    publish(driver, 14)
    wait_number(driver, "a", 14)
    assert numbers(driver, "a") == [1, 14]
    # The add-on took the position it was given: the next gap recovers again.
    proxy.pause()
    proxy.reset()
    wait_left(driver, "a")
    publish(driver, 15)
    proxy.resume()
    assert wait_recovery(driver, "a")["recovered"] is True
    assert numbers(driver, "a") == [1, 14, 15]


def test_a_drained_node_restarted_in_memory_answers_epoch_changed(
    make_driver: Callable[..., NodeDriver],
    make_bastion: Callable[..., BastionProcess],
    history_server: BastionProcess,
    proxy: TcpProxy,
) -> None:
    driver = make_driver(history_server)
    connect_through(driver, proxy)
    publish(driver, 1)
    wait_number(driver, "a", 1)
    proxy.pause()
    history_server.stop()  # SIGTERM: the drain closes pusher-js with 4200
    closed = driver.wait_event(kind="conn_error", client="a")
    assert closed["error"]["data"]["code"] == 4200
    replacement = make_bastion(apps=[HISTORY_APP])
    proxy.retarget(replacement.port)
    publish(driver, 2, port=replacement.port)  # history in memory: the old one is gone
    proxy.resume()
    answer = wait_recovery(driver, "a")
    assert answer["recovered"] is False
    assert answer["reason"] == "epoch_changed"
    publish(driver, 3, port=replacement.port)
    wait_number(driver, "a", 3)
    assert numbers(driver, "a") == [1, 3]  # 2 is not replayed: the app refetches


# --- clients that know nothing of it ------------------------------------------------------


def test_plain_pusherjs_and_both_sdks_work_unchanged_on_a_history_app(
    make_driver: Callable[..., NodeDriver], history_server: BastionProcess
) -> None:
    driver = make_driver(history_server)
    driver.connect("plain")
    driver.subscribe("plain", CHANNEL)
    driver.subscribe("plain", "private-chat-2")
    publish(driver, 1)
    py_pusher = make_py_pusher(history_server)
    assert py_pusher.trigger(CHANNEL, "message", {"n": 2}) == {}
    assert (
        py_pusher.trigger_batch(
            [{"channel": "private-chat-2", "name": "message", "data": {"n": 3}}]
        )
        == {}
    )
    query = {"path": f"/channels/{CHANNEL}", "params": {"info": "subscription_count"}}
    info = driver.sdk("get", query)
    assert info["status"] == 200
    assert info["body"] == {"occupied": True, "subscription_count": 1}
    wait_number(driver, "plain", 3, channel="private-chat-2")
    wait_number(driver, "plain", 2)
    assert numbers(driver, "plain") == [1, 2]
    # What pusher-js decoded is exactly the published event: no extra field reaches the app.
    message = driver.wait_event(kind="message", client="plain", event="message", channel=CHANNEL)
    assert set(message) >= {"event", "channel", "data", "user_id"}
    assert message["data"] == {"n": 1} and message["user_id"] is None
    # And without the add-on nobody asks for recovery: no bastion:recovery.
    assert recoveries(driver, "plain") == []
    assert py_pusher.channel_info(CHANNEL, ["subscription_count"])["subscription_count"] == 1
