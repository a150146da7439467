"""Run a coroutine eagerly: its answer in the same call when it never has to wait.

Reads of the cluster state are coroutines everywhere (one read style), but on
one node (or in the in-memory cluster of the tests) they never suspend: the
answer is in memory. Wrapping each in a task would cost a loop iteration and a
task per subscribe or REST request, and would reorder frames that used to be
written in the same call. :func:`drive` instead runs the coroutine's first step
at once; if it finishes there, the result is handed over synchronously, and only
a coroutine that really waits (a Redis round trip) continues as a task, from
where it stopped. This is what ``asyncio``'s eager task factory does on Python
3.12 and later; Python 3.11 is the floor here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["drive", "start"]

_T = TypeVar("_T")


def start(coroutine: Coroutine[Any, Any, _T]) -> _T | asyncio.Task[_T]:
    """Run ``coroutine`` until it first waits: its result, or a task finishing it.

    An exception raised before the first wait propagates to the caller, as a
    plain call's would. The task form needs a running event loop.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration as stop:
        result: _T = stop.value
        return result
    return asyncio.get_running_loop().create_task(_resume(coroutine, waiting_on))


def drive(coroutine: Coroutine[Any, Any, _T], done: Callable[[_T], None]) -> None:
    """Run ``coroutine`` eagerly and call ``done`` with its result (maybe later).

    When the coroutine suspends, ``done`` runs from its task once it finishes; an
    exception it raises then is left to the task (the loop's exception handler
    logs it), so a read that may fail must catch inside the coroutine.
    """
    outcome = start(coroutine)
    if isinstance(outcome, asyncio.Task):
        outcome.add_done_callback(lambda task: _deliver(task, done))
    else:
        done(outcome)


def _deliver(task: asyncio.Task[_T], done: Callable[[_T], None]) -> None:
    if not task.cancelled() and task.exception() is None:
        done(task.result())


async def _resume(coroutine: Coroutine[Any, Any, _T], waiting_on: Any) -> _T:
    result: _T = await _Continue(coroutine, waiting_on)
    return result


class _Continue:
    """Awaitable that resumes a started coroutine where it stopped (``yield from``)."""

    __slots__ = ("_coroutine", "_waiting_on")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, waiting_on = self._coroutine, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:  # cancellation and friends go in, as with await
                try:
                    waiting_on = coroutine.throw(error)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting_on = coroutine.send(sent)
                except StopIteration as stop:
                    return stop.value
