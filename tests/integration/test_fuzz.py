"""Hypothesis fuzzing of the WebSocket message path of a live node.

A fuzzing connection sends arbitrary text frames, arbitrary JSON objects built
around the protocol's own vocabulary (events, channel prefixes, ``data`` shapes),
and correctly signed subscribes and sign-ins (so that client events, presence and
sign-in code paths are reached with random payloads). An observer connection sits
on the channels the fuzzer is likely to reach and receives whatever is relayed.

After every example both connections are synchronised with a ping/pong, and:

* every frame the server sent is strict JSON (no NaN/Infinity), an object with a
  string ``event``;
* a close happened only with a documented code for what was sent;
* nothing was logged above WARNING or with a stack trace.

At the end a fresh client must still get a pong: the node survived.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.clients import APP_KEY, APP_SECRET, PusherClient, hmac_hex, open_client
from support.timeouts import DEFAULT_WAIT, within
from websockets.exceptions import ConnectionClosed

from bastion.server.runtime import Node

from .conftest import MakeNode

#: Close codes a text frame of valid UTF-8 may legitimately earn: a failed sign-in, and
#: the refusal budget (``refusal_limit``) spent by a connection whose frames keep being
#: refused, as the fuzzer's are (the connection lives over many examples).
ALLOWED_CLOSE_CODES = {4009, 4100}

OBSERVED_CHANNELS = ("fuzz", "cache-fuzz", "private-fuzz", "presence-fuzz", "private-cache-fuzz")

EVENT_NAMES = st.one_of(
    st.sampled_from(
        [
            "pusher:subscribe",
            "pusher:unsubscribe",
            "pusher:ping",
            "pusher:pong",
            "pusher:signin",
            "pusher:error",
            "pusher_internal:subscription_succeeded",
            "client-fuzz",
            "client-",
            "client-" + "x" * 200,
        ]
    ),
    st.text(max_size=24),
    st.builds(lambda suffix: "client-" + suffix, st.text(max_size=12)),
)

CHANNEL_NAMES = st.one_of(
    st.sampled_from(OBSERVED_CHANNELS),
    st.builds(
        lambda prefix, suffix: prefix + suffix,
        st.sampled_from(
            [
                "",
                "private-",
                "presence-",
                "cache-",
                "private-cache-",
                "presence-cache-",
                "private-encrypted-",
                "#server-to-user-",
            ]
        ),
        st.text(max_size=20),
    ),
)

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=16,
)

DATA_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "channel": st.one_of(CHANNEL_NAMES, JSON_SCALARS),
        "auth": st.one_of(st.text(max_size=80), JSON_SCALARS),
        "channel_data": st.one_of(
            st.builds(json.dumps, st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)),
            JSON_SCALARS,
        ),
        "user_data": st.one_of(st.text(max_size=40), JSON_SCALARS),
    },
)

MESSAGES = st.fixed_dictionaries(
    {},
    optional={
        "event": st.one_of(EVENT_NAMES, JSON_SCALARS),
        "channel": st.one_of(CHANNEL_NAMES, JSON_SCALARS),
        "data": st.one_of(DATA_OBJECTS, JSON_VALUES, st.builds(json.dumps, DATA_OBJECTS)),
        "user_id": JSON_SCALARS,
    },
)

USER_IDS = st.one_of(st.sampled_from(["u1", "u2", "fuzzer"]), st.text(max_size=10))

ACTIONS = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=300)),
    st.tuples(st.just("json"), MESSAGES),
    st.tuples(
        st.just("signed-subscribe"),
        st.sampled_from((*OBSERVED_CHANNELS[2:], "presence-cache-fuzz", "private-encrypted-f")),
        st.one_of(
            st.none(),
            st.builds(
                lambda user_id, info: json.dumps({"user_id": user_id, "user_info": info}),
                USER_IDS,
                JSON_VALUES,
            ),
        ),
    ),
    st.tuples(
        st.just("signed-signin"),
        st.one_of(
            st.builds(lambda user_id: json.dumps({"id": user_id}), USER_IDS),
            st.builds(json.dumps, JSON_VALUES),
        ),
    ),
    st.tuples(
        st.just("client-event"),
        st.sampled_from(OBSERVED_CHANNELS),
        EVENT_NAMES,
        JSON_VALUES,
    ),
)


def strict_json(text: str) -> Any:
    """Parse a server frame, refusing the constants JSON does not have."""

    def reject(constant: str) -> None:
        raise AssertionError(f"server sent non-standard JSON constant {constant}: {text[:200]}")

    return json.loads(text, parse_constant=reject)


def check_frame(raw: str | bytes) -> dict[str, Any]:
    """Every server frame: text, strict JSON, an object with a string event."""
    assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
    message = strict_json(raw)
    assert isinstance(message, dict), raw
    assert isinstance(message.get("event"), str), raw
    data = message.get("data")
    internal = message["event"].startswith(("pusher:", "pusher_internal:"))
    if internal and isinstance(data, str) and data.startswith(("{", "[")):
        strict_json(data)  # double-encoded protocol data must be strict JSON too
    return message


async def sync(client: PusherClient) -> int | None:
    """Ping and read until the pong, checking every frame; the close code if closed."""
    try:
        await client.send({"event": "pusher:ping", "data": {}})
        while True:
            message = check_frame(await within(client.ws.recv(), DEFAULT_WAIT))
            if message["event"] == "pusher:pong":
                return None
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else 1006


class Fuzzer:
    """The fuzzing connection and the observer, reopened when the server closes them."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.client: PusherClient | None = None
        self.observer: PusherClient | None = None
        self.closes: list[int] = []

    async def ensure(self) -> tuple[PusherClient, PusherClient]:
        if self.observer is None:
            self.observer = await open_client(self.node.port)
            for channel in OBSERVED_CHANNELS:
                auth = hmac_hex(APP_SECRET, f"{self.observer.socket_id}:{channel}")
                channel_data = '{"user_id":"observer"}' if channel.startswith("presence-") else None
                if channel_data:
                    auth = hmac_hex(
                        APP_SECRET, f"{self.observer.socket_id}:{channel}:{channel_data}"
                    )
                await self.observer.subscribe(channel, f"{APP_KEY}:{auth}", channel_data)
            assert await sync(self.observer) is None
        if self.client is None:
            self.client = await open_client(self.node.port)
        return self.client, self.observer

    async def send(self, client: PusherClient, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "text":
            await client.send(action[1])
        elif kind == "json":
            await client.send(json.dumps(action[1]))
        elif kind == "signed-subscribe":
            _, channel, channel_data = action
            signed = f"{client.socket_id}:{channel}"
            if channel_data is not None:
                signed += f":{channel_data}"
            data = {"channel": channel, "auth": f"{APP_KEY}:{hmac_hex(APP_SECRET, signed)}"}
            if channel_data is not None:
                data["channel_data"] = channel_data
            await client.send({"event": "pusher:subscribe", "data": data})
        elif kind == "signed-signin":
            user_data = action[1]
            signature = hmac_hex(APP_SECRET, f"{client.socket_id}::user::{user_data}")
            await client.send(
                {
                    "event": "pusher:signin",
                    "data": {"auth": f"{APP_KEY}:{signature}", "user_data": user_data},
                }
            )
        else:
            _, channel, event, data = action
            await client.send(json.dumps({"event": event, "channel": channel, "data": data}))

    async def run(self, actions: list[tuple[Any, ...]]) -> None:
        client, observer = await self.ensure()
        try:
            for action in actions:
                await self.send(client, action)
        except ConnectionClosed:
            pass  # the server may close mid-example (a failed sign-in); sync() reports how
        code = await sync(client)
        if code is not None:
            self.client = None
            assert code in ALLOWED_CLOSE_CODES, f"closed with {code} after {actions!r}"
            self.closes.append(code)
        observer_code = await sync(observer)
        if observer_code is not None:
            self.observer = None
            raise AssertionError(f"observer closed with {observer_code} after {actions!r}")

    async def close(self) -> None:
        """Close both connections; the next example starts with fresh ones."""
        client, observer, self.client, self.observer = self.client, self.observer, None, None
        for connection in (client, observer):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()


@pytest.fixture
async def node(make_node: MakeNode) -> Node:
    """A default node whose per-connection message budget is out of the way.

    Each example sends its frames and a ping on connections that live across
    examples, hundreds of frames a second on a fast run: past the default budget
    (50 a second) a ping is answered 4301 instead of a pong, and what is fuzzed
    here is every other answer. The budget's own answers are held by
    test_refusal_budgets.py.
    """
    return await make_node(app={"max_messages_per_second": {"rate": 100_000, "burst": 100_000}})


@pytest.fixture
async def fuzzer(node: Node, caplog: pytest.LogCaptureFixture):
    """The fuzzer; at teardown, after every example, a fresh client must get a pong."""
    fuzzer = Fuzzer(node)
    yield fuzzer
    await fuzzer.close()
    fresh = await open_client(node.port)
    assert await sync(fresh) is None, "the node stopped answering after the fuzzing run"
    await fresh.close()
    assert_no_bad_records(caplog.get_records("call") + caplog.records)


def assert_no_bad_records(records: list[logging.LogRecord]) -> None:
    bad = [
        (record.name, record.levelname, record.getMessage())
        for record in records
        if record.levelno > logging.WARNING or record.exc_info
    ]
    assert not bad, bad


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)
@given(actions=st.lists(ACTIONS, min_size=1, max_size=6))
async def test_random_frames_never_break_the_server(
    node: Node, fuzzer: Fuzzer, caplog: pytest.LogCaptureFixture, actions
) -> None:
    caplog.set_level(logging.INFO, logger="bastion")
    # Connections live across examples (state matters), but each example is judged
    # on what it caused, and a failing one leaves nothing stale for the shrinker.
    records_before = len(caplog.records)
    internal_before = node.metrics.refusal_count("internal_error")
    try:
        await fuzzer.run(actions)
        assert_no_bad_records(caplog.records[records_before:])
        assert node.metrics.refusal_count("internal_error") == internal_before
    except BaseException:
        await fuzzer.close()
        raise
