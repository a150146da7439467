"""A small raw Pusher-protocol WebSocket client (asyncio, ``websockets`` library).

For tests that need to see or send exact frames — what pusher-js hides or would never
send. Every received frame is kept; :meth:`PusherWsClient.expect` returns the earliest
not-yet-returned frame that matches and waits (bounded, scaled) for one otherwise.

    async with await PusherWsClient.connect(server.ws_url("app-key")) as client:
        await client.subscribe("my-channel")
        frame = await client.expect("my-event", channel="my-channel")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .timeouts import scaled

__all__ = ["Frame", "PusherWsClient"]


@dataclass
class Frame:
    """One received text frame.

    ``data`` is decoded once more when the wire value is a JSON string (the protocol's
    "double encoding"); ``raw_data`` is exactly what was on the wire.
    """

    raw: str
    event: str | None
    channel: str | None
    data: Any
    raw_data: Any
    user_id: Any
    message: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Frame:
        message = json.loads(text)
        if not isinstance(message, dict):
            raise ValueError(f"frame is not a JSON object: {text!r}")
        raw_data = message.get("data")
        data = raw_data
        if isinstance(raw_data, str):
            try:
                data = json.loads(raw_data)
            except ValueError:
                data = raw_data
        return cls(
            raw=text,
            event=message.get("event"),
            channel=message.get("channel"),
            data=data,
            raw_data=raw_data,
            user_id=message.get("user_id"),
            message=message,
        )


class PusherWsClient:
    """A connected raw client. Use :meth:`connect` to create one."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self.bad_frames: list[Any] = []
        self._returned: set[int] = set()
        self._changed = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.socket_id: str | None = None
        self.activity_timeout: int | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        within: float | None = None,
        wait_established: bool = True,
        **connect_kwargs: Any,
    ) -> PusherWsClient:
        """Open the WebSocket; by default also wait for ``pusher:connection_established``."""
        connect_kwargs.setdefault("ping_interval", None)  # tests control all traffic
        connect_kwargs.setdefault("open_timeout", scaled(10))
        connect_kwargs.setdefault("close_timeout", scaled(5))
        ws = await asyncio.wait_for(
            connect(url, **connect_kwargs), scaled(10) if within is None else within
        )
        client = cls(ws)
        if wait_established:
            frame = await client.expect("pusher:connection_established", within=within)
            client.socket_id = frame.data["socket_id"]
            client.activity_timeout = frame.data.get("activity_timeout")
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                try:
                    frame = Frame.parse(
                        message if isinstance(message, str) else message.decode("utf-8")
                    )
                except ValueError:
                    self.bad_frames.append(message)
                    continue
                async with self._changed:
                    self.frames.append(frame)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    # -- receiving ----------------------------------------------------------------

    def received(self, event: str | None = None, *, channel: str | None = None) -> list[Frame]:
        """All frames so far (returned or not) with that event/channel."""
        return [
            f
            for f in self.frames
            if (event is None or f.event == event) and (channel is None or f.channel == channel)
        ]

    async def expect(
        self,
        event: str | None = None,
        *,
        channel: str | None = None,
        where: Callable[[Frame], bool] | None = None,
        within: float | None = None,
    ) -> Frame:
        """Return the earliest not-yet-returned frame matching ``event``/``channel``/``where``.

        Raises:
            TimeoutError: none within ``within`` (default ``scaled(10)``) s, or the
                connection closed first.
        """

        def find() -> Frame | None:
            for index, frame in enumerate(self.frames):
                if index in self._returned:
                    continue
                if event is not None and frame.event != event:
                    continue
                if channel is not None and frame.channel != channel:
                    continue
                if where is not None and not where(frame):
                    continue
                self._returned.add(index)
                return frame
            return None

        async def wait() -> Frame:
            async with self._changed:
                while True:
                    found = find()
                    if found is not None:
                        return found
                    if self.closed.is_set():
                        raise TimeoutError(
                            f"connection closed ({self.close_code} {self.close_reason!r}) before "
                            f"{event!r} on {channel!r}; got {[f.raw for f in self.frames][-10:]}"
                        )
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(wait(), scaled(10) if within is None else within)
        except TimeoutError as exc:
            if isinstance(exc, TimeoutError) and str(exc):
                raise
            recent = [f.raw for f in self.frames][-10:]
            raise TimeoutError(f"no {event!r} frame on {channel!r} in time; got {recent}") from None

    async def wait_closed(self, within: float | None = None) -> tuple[int | None, str | None]:
        """Wait until the server closes the connection; return ``(code, reason)``."""
        await asyncio.wait_for(self.closed.wait(), scaled(10) if within is None else within)
        return self.close_code, self.close_reason

    # -- sending ------------------------------------------------------------------

    async def send_raw(self, text: str) -> None:
        await self.ws.send(text)

    async def send(self, event: str, data: Any = None, channel: str | None = None) -> None:
        message: dict[str, Any] = {"event": event}
        if data is not None:
            message["data"] = data
        if channel is not None:
            message["channel"] = channel
        await self.ws.send(json.dumps(message))

    async def subscribe(
        self,
        channel: str,
        auth: str | None = None,
        channel_data: str | None = None,
        *,
        within: float | None = None,
    ) -> Frame:
        """Send ``pusher:subscribe``; return the success *or* error frame for the channel."""
        data: dict[str, Any] = {"channel": channel, "auth": auth if auth is not None else ""}
        if channel_data is not None:
            data["channel_data"] = channel_data
        await self.send("pusher:subscribe", data)
        return await self.expect(
            channel=channel,
            where=lambda f: (
                f.event in ("pusher_internal:subscription_succeeded", "pusher:subscription_error")
                or (f.event == "pusher:error")
            ),
            within=within,
        )

    async def signin(self, auth: str, user_data: str) -> None:
        await self.send("pusher:signin", {"auth": auth, "user_data": user_data})

    async def ping(self, within: float | None = None) -> Frame:
        """``pusher:ping`` → wait for ``pusher:pong`` (a round-trip barrier)."""
        await self.send("pusher:ping", {})
        return await self.expect("pusher:pong", within=within)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), scaled(5))
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader

    async def __aenter__(self) -> PusherWsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
