"""``pusher_internal:subscription_count`` as pusher-js consumes it (app setting on)."""

from __future__ import annotations

from support.server import app_spec

from .node_driver import NodeDriver


def _count_event(driver: NodeDriver, client: str, channel: str, count: int) -> dict:
    return driver.wait_event(
        kind="channel",
        client=client,
        channel=channel,
        event="pusher:subscription_count",
        where=lambda e: e["data"]["subscription_count"] == count,
    )


def test_subscription_count_follows_subscribers(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.connect("b")

    driver.subscribe("a", "counted")
    _count_event(driver, "a", "counted", 1)

    driver.subscribe("b", "counted")
    _count_event(driver, "a", "counted", 2)
    _count_event(driver, "b", "counted", 2)
    assert driver.request("channel_info", client="a", channel="counted")["subscriptionCount"] == 2

    driver.request("unsubscribe", client="b", channel="counted")
    _count_event(driver, "a", "counted", 1)
    assert driver.request("channel_info", client="a", channel="counted")["subscriptionCount"] == 1


def test_subscription_count_also_on_private_channels(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.connect("b")
    driver.subscribe("a", "private-counted")
    driver.subscribe("b", "private-counted")

    _count_event(driver, "a", "private-counted", 2)


def test_no_subscription_count_when_the_app_disables_it(make_bastion, make_driver) -> None:
    server = make_bastion(apps=[app_spec(enable_subscription_count=False)])
    driver = make_driver(server)
    driver.connect("a")
    driver.connect("b")
    driver.subscribe("a", "counted")
    driver.subscribe("b", "counted")

    driver.sdk("trigger", "counted", "barrier", {})
    driver.channel_event("a", "counted", "barrier")

    assert not driver.events(kind="channel", event="pusher:subscription_count")
