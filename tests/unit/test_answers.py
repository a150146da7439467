"""One HTTP connection's answers: in request order, each after the fan-out it queued.

:class:`~bastion.server.answers.AnswerQueue` on a transport that records what is
written, with the node's real :class:`~bastion.server.context.Outbox` on a real
loop: a subscriber marked dirty stands for the deliveries a publish queued.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from support.timeouts import until

from bastion.api.http import HttpResponse
from bastion.metrics import Metrics
from bastion.server.answers import AnswerQueue
from bastion.server.context import Outbox
from bastion.server.refusals import RefusalPath


class Transport:
    """Records writes (and a close) in the order they happen."""

    def __init__(self, log: list[Any]) -> None:
        self.log, self.closed = log, False

    def write(self, data: bytes) -> None:
        self.log.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True
        self.log.append("close")


class Subscriber:
    """A connection the outbox flushes: its deliveries land in the same log."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def flush_pending(self) -> None:
        self.log.append("delivery")


def _queue(log: list[Any]) -> tuple[AnswerQueue, Outbox, Metrics, Transport]:
    loop = asyncio.get_running_loop()
    outbox, metrics = Outbox(loop), Metrics()
    ctx = SimpleNamespace(outbox=outbox, refusals=RefusalPath(metrics))
    transport = Transport(log)
    queue = AnswerQueue(ctx, transport)  # type: ignore[arg-type]
    return queue, outbox, metrics, transport


def _answer(text: str, *, keep_alive: bool = True, head: bool = False) -> bytes:
    return HttpResponse(200, text.encode()).encode(keep_alive=keep_alive, head=head)


async def test_an_answer_with_nothing_ahead_is_written_at_once() -> None:
    log: list[Any] = []
    queue, _, _, _ = _queue(log)
    queue.put(HttpResponse(200, b"a"), True, False, "198.51.100.4")
    assert log == [_answer("a")]


async def test_an_answer_waits_for_the_deliveries_its_request_queued() -> None:
    log: list[Any] = []
    queue, outbox, _, _ = _queue(log)
    outbox.mark(Subscriber(log))  # a publish queued a delivery in this iteration
    queue.put(HttpResponse(200, b"published"), True, False, "198.51.100.4")
    assert log == []
    await until(lambda: len(log) == 2)
    assert log == ["delivery", _answer("published")]


async def test_answers_keep_request_order_behind_a_pending_query() -> None:
    log: list[Any] = []
    queue, _, _, _ = _queue(log)
    slow: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    queue.put(slow, True, False, "198.51.100.4")  # a cluster-wide query, answered later
    queue.put(HttpResponse(200, b"second"), True, False, "198.51.100.4")
    queue.put(HttpResponse(200, b"third"), False, True, "198.51.100.4")
    assert log == []
    slow.set_result(HttpResponse(200, b"first"))
    await until(lambda: "close" in log)
    # The last asked not to keep the connection alive, and was a HEAD: headers only.
    assert log == [
        _answer("first"),
        _answer("second"),
        _answer("third", keep_alive=False, head=True),
        "close",
    ]


async def test_a_flush_writes_up_to_the_first_query_still_pending() -> None:
    log: list[Any] = []
    queue, outbox, _, _ = _queue(log)
    outbox.mark(Subscriber(log))
    queue.put(HttpResponse(200, b"published"), True, False, "198.51.100.4")
    slow: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    queue.put(slow, True, False, "198.51.100.4")
    queue.put(HttpResponse(200, b"after"), True, False, "198.51.100.4")
    await until(lambda: len(log) == 2)
    assert log == ["delivery", _answer("published")]
    slow.set_result(HttpResponse(200, b"query"))
    await until(lambda: len(log) == 4)
    assert log[2:] == [_answer("query"), _answer("after")]


async def test_a_failed_query_is_answered_500_and_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[Any] = []
    queue, _, metrics, _ = _queue(log)

    async def broken() -> HttpResponse:
        raise RuntimeError("a defect")

    with caplog.at_level(logging.ERROR, logger="bastion.http"):
        queue.put(broken(), True, False, "198.51.100.4")
        queue.put(HttpResponse(200, b"next"), True, False, "198.51.100.5")
        await until(lambda: len(log) == 2)
    assert log[0].startswith(b"HTTP/1.1 500 ") and log[1] == _answer("next")
    assert metrics.refusal_count("internal_error") == 1
    assert "internal error handling an HTTP request" in caplog.text


async def test_nothing_is_written_to_a_closing_transport() -> None:
    log: list[Any] = []
    queue, _, _, transport = _queue(log)
    transport.closed = True
    queue.write(HttpResponse(200, b"late"), keep_alive=True)
    assert log == []
