"""How uvicorn runs the serve app: a deadline for idle connections and a prompt shutdown.

uvicorn waits forever for a connection's first request, and its `limit_concurrency` counts
idle connections, so a few dozen sockets that never send a byte would turn every request into a
503. Here no connection limit is set (the app bounds the work itself: slots, a queue, 429s);
instead a connection that has not sent a complete request head `HEAD_TIMEOUT` seconds after it
opened, or after its last response, is closed. `Server` tells the app to stop as soon as
uvicorn starts shutting down, before uvicorn's graceful wait, so Ctrl-C ends running and queued
requests at once with an answer instead of cancelling them with a traceback.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette

__all__ = ["HEAD_TIMEOUT", "Server", "uvicorn_config"]

HEAD_TIMEOUT = 10.0  # seconds; a browser or a client sends a request head in milliseconds


class HeadDeadline:
    """Mixed into uvicorn's HTTP protocol: close a connection whose request head is overdue.

    The timer starts when the connection opens and again when a response is complete; it only
    closes the connection if no new request has begun since (uvicorn makes a new `cycle` for
    each request once its head is parsed, and marks it `response_complete` at the end)."""

    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_overdue, self.cycle)

    def _head_overdue(self, cycle_then: Any) -> None:
        idle = self.cycle is cycle_then and (cycle_then is None or cycle_then.response_complete)
        if idle and not self.transport.is_closing():
            self.transport.close()


def _protocol() -> type[asyncio.Protocol]:
    """uvicorn's own choice of HTTP protocol (httptools if installed, else h11), with the
    head deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type(f"HeadDeadline{AutoHTTPProtocol.__name__}", (HeadDeadline, AutoHTTPProtocol), {})


def uvicorn_config(app: Starlette, **options: Any) -> uvicorn.Config:
    """uvicorn's config for `app`: `options` as uvicorn.Config takes them, with the HTTP
    protocol that closes idle connections and no connection limit."""
    return uvicorn.Config(app, http=_protocol(), limit_concurrency=None, **options)


class Server(uvicorn.Server):
    """A uvicorn server that calls `on_shutdown` (the app's stop) as soon as it starts shutting
    down: before connections are drained, not after uvicorn's graceful period."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)
