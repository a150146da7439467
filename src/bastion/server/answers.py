"""One HTTP connection's answers, written in request order.

A plain request is answered at once unless something is ahead of it: an earlier
answer still pending (a cluster-wide query completes later), or deliveries the
node's outbox has queued in this loop iteration (a publish). Then the answer waits
for the flush, so a publisher cannot outrun the fan-out it caused, and pipelined
answers keep their order. A ``HEAD`` gets a ``GET``'s headers and no body
(RFC 9110 9.3.2), so keep-alive stays in step. A routed request's answer is
timed when it is written, by route template (never the path): for a publish that
is after its local fan-out (``bastion_rest_request_duration_seconds``,
``bastion_publish_fanout_seconds``).

The queue holds the transport, not the listener's protocol: the protocol holds
the queue, and the pair must not form a reference cycle (see
``tests/integration/test_no_cycles.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from bastion.api.http import Answer, HttpResponse, error_response
from bastion.api.templates import request_route
from bastion.protocol.refusals import Reason
from bastion.server.context import ServerContext

__all__ = ["AnswerQueue"]

# The listener's logger: an internal error of a request is logged under one name.
log = logging.getLogger("bastion.http")

#: A routed request's path and when it was read (``time.perf_counter``), or nothing.
Timing = tuple[str, float] | None
#: An answer not written yet (a task while a cluster-wide query runs), with its
#: keep-alive, whether it answers a ``HEAD``, and its timing.
_Pending = tuple[HttpResponse | asyncio.Task[HttpResponse], bool, bool, Timing]


class AnswerQueue:
    """Writes one connection's answers to its transport, in request order."""

    __slots__ = ("_ctx", "_pending", "_transport")

    def __init__(self, ctx: ServerContext, transport: asyncio.Transport) -> None:
        self._ctx = ctx
        self._transport = transport
        self._pending: list[_Pending] = []

    def put(
        self,
        answer: Answer,
        keep_alive: bool,
        head: bool,
        ip: str | None,
        timing: Timing = None,
    ) -> None:
        """Write ``answer`` now, or once what is ahead of it is written.

        Args:
            answer: the route table's answer, or an awaitable of it.
            keep_alive: whether the connection stays open after it.
            head: whether it answers a ``HEAD`` (headers only).
            ip: the client's address, for the refusal record if the awaitable fails.
            timing: the request's path and when it was read, to time the answer.
        """
        outbox = self._ctx.outbox
        if not isinstance(answer, HttpResponse):
            # A cluster-wide query: answered when it completes, still in order.
            task = asyncio.ensure_future(self._finish(answer, ip))
            self._pending.append((task, keep_alive, head, timing))
            task.add_done_callback(self._ready)
        elif self._pending or outbox.busy:
            # Answer once the deliveries this request queued are written: a publisher
            # cannot outrun the fan-out, and pipelined answers keep their order.
            self._pending.append((answer, keep_alive, head, timing))
            if len(self._pending) == 1:
                outbox.after_flush(self._write_ready)
        else:
            self.write(answer, keep_alive, head, timing)

    def write(
        self, response: HttpResponse, keep_alive: bool, head: bool = False, timing: Timing = None
    ) -> None:
        """Write one answer now (a ``HEAD``'s headers only), then close unless kept alive."""
        transport = self._transport
        if not transport.is_closing():
            transport.write(response.encode(keep_alive=keep_alive, head=head))
        if not keep_alive:
            transport.close()
        if timing is not None:
            route, app_id = request_route(timing[0])
            seconds = time.perf_counter() - timing[1]
            self._ctx.metrics.request_answered(route, app_id, response.status, seconds)

    def _write_ready(self) -> None:
        """Write the answers that are ready, in order, up to the first pending one."""
        pending = self._pending
        while pending:
            response, keep_alive, head, timing = pending[0]
            if isinstance(response, asyncio.Task):
                if not response.done():
                    return
                response = response.result()
            del pending[0]
            self.write(response, keep_alive, head, timing)

    def _ready(self, task: asyncio.Task[HttpResponse]) -> None:
        outbox = self._ctx.outbox
        if outbox.busy:
            outbox.after_flush(self._write_ready)
        else:
            self._write_ready()

    async def _finish(self, pending: Awaitable[HttpResponse], ip: str | None) -> HttpResponse:
        try:
            return await pending
        except Exception:
            # A defect of ours: the caller gets a generic 500, the trace stays in our log.
            log.exception("internal error handling an HTTP request")
            self._ctx.refusals.record(Reason.HTTP_INTERNAL_ERROR, ip=ip)
            return error_response(Reason.HTTP_INTERNAL_ERROR)
