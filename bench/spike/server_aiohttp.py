"""Spike candidate 1: aiohttp ``web.Application`` with ``WebSocketResponse``.

* ``GET /app/x``: WebSocket; the connection joins one subscriber set.
* ``POST /trigger``: fan the body out, answer ``200 {}``.

``--fanout raw`` (default) frames the body ONCE with ``websockets.frames.Frame`` and
writes the same bytes with ``request.transport.write`` -- the asyncio transport that
aiohttp exposes publicly on the request and keeps using after the upgrade. That is
the fastest path aiohttp allows; it bypasses aiohttp's writer (no compression, no
limit checks), which is fine for a spike. ``--fanout send_str`` uses the supported
API instead: ``WebSocketResponse.send_str`` per subscriber (aiohttp frames the
message per subscriber; the returned coroutine is scheduled, not awaited inline).

The process stops by itself after ``--max-seconds`` or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal

from aiohttp import web
from websockets.frames import Frame, Opcode

SUBSCRIBERS: dict[web.WebSocketResponse, asyncio.Transport] = {}
FANOUT_MODE = "raw"
_PENDING: set[asyncio.Task[None]] = set()


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    SUBSCRIBERS[ws] = transport  # type: ignore[assignment]
    try:
        async for _msg in ws:
            pass  # clients only receive in this spike
    finally:
        SUBSCRIBERS.pop(ws, None)
    return ws


async def trigger(request: web.Request) -> web.Response:
    payload = await request.read()
    if FANOUT_MODE == "raw":
        frame = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
        for transport in SUBSCRIBERS.values():
            transport.write(frame)
    else:
        text = payload.decode()
        loop = asyncio.get_running_loop()
        for ws in SUBSCRIBERS:
            # send_str is a coroutine; scheduling it keeps the handler from awaiting
            # every subscriber. With no compression it writes synchronously on its
            # first step, so the task finishes at once.
            task = loop.create_task(ws.send_str(text))
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)
    return web.Response(body=b"{}", content_type="application/json")


async def serve(port: int, max_seconds: float) -> None:
    app = web.Application()
    app.router.add_get("/app/x", ws_handler)
    app.router.add_post("/trigger", trigger)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    server = site._server  # only to learn the bound port when --port 0
    assert server is not None
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    await runner.cleanup()


def main() -> None:
    global FANOUT_MODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--fanout", choices=["raw", "send_str"], default="raw")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()
    FANOUT_MODE = args.fanout
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port, args.max_seconds))
    else:
        asyncio.run(serve(args.port, args.max_seconds))


if __name__ == "__main__":
    main()
