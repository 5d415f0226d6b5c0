"""Running generations: the slots that bound them, and each one in its own worker thread.

Sampling is CPU-bound PyTorch code, so each generation runs in a thread (`Generation`) and
hands its text to the event loop through an asyncio queue; the loop itself only parses
requests and writes bytes, so `/health` answers while generations run. `Slots` lets a bounded
number run at once and a bounded number wait; `StopMatcher` cuts the text at a stop string.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

from starlette.requests import Request

from chargpt.runs.run import Run
from chargpt.serve.api import ApiError, GenRequest, Limits

FLUSH_SECONDS = 0.03  # a worker batches characters for this long; the page still looks live


class ClientGone(Exception):
    """The client disconnected while its request waited for a generation slot."""


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", kind="server_shutting_down")


class Slots:
    """At most `max_concurrent` generations run; up to `max_queue` more wait `queue_timeout`.

    A slot is given back when the generation's thread ends, not when its response ends, so
    the count is the real number of threads using the CPU.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.active = 0
        self.waiting = 0
        self.closed = False  # the server is shutting down: no new generation starts
        self._sem: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # created on first use, inside the server's event loop
            self._sem = asyncio.Semaphore(self.limits.max_concurrent)
        return self._sem

    def _busy(self) -> ApiError:
        retry = max(1, min(30, math.ceil(self.limits.queue_timeout / 4)))
        return ApiError(429, f"the server is busy ({self.active} generations running, "
                        f"{self.waiting} waiting); retry in {retry} s",
                        kind="rate_limit_error", headers={"Retry-After": str(retry)})

    async def acquire(self, request: Request) -> None:
        await self._wait(request)
        if self.closed:  # shut down while this request waited: the slot is not used
            self._semaphore().release()
            raise shutting_down()
        self.active += 1

    async def _wait(self, request: Request) -> None:
        sem = self._semaphore()
        if self.closed:
            raise shutting_down()
        if sem.locked() and self.waiting >= self.limits.max_queue:
            raise self._busy()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.queue_timeout
        self.waiting += 1
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._busy()
                try:
                    await asyncio.wait_for(sem.acquire(), timeout=min(0.25, remaining))
                    break
                except asyncio.TimeoutError:  # not the builtin TimeoutError on 3.10
                    if self.closed:
                        raise shutting_down() from None
                    # A client that gave up while queued must not get a slot afterwards.
                    if await request.is_disconnected():
                        raise ClientGone() from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self.active -= 1
        self._semaphore().release()


# --- generation in a worker thread ---------------------------------------------------------


class StopMatcher:
    """Cuts generated text at the first stop string, holding back a possible partial match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop string was found."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Generation:
    """One generation in its own thread; its text reaches the event loop through a queue.

    `cancel()` sets an event the thread checks after every token, so a client that goes away
    stops the sampling loop within one forward pass.
    """

    def __init__(self, run: Run, req: GenRequest, timeout: float,
                 on_exit: Callable[[], None]) -> None:
        self.run, self.req, self.timeout = run, req, timeout
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.shutdown = False
        self.on_exit = on_exit
        self.tokens = 0
        self.finish_reason: str | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._work, name="chargpt-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self, shutdown: bool = False) -> None:
        """Stop sampling; with `shutdown`, the request ends with a 503 instead of its text."""
        if shutdown:
            self.shutdown = True
        self.cancelled.set()

    def _send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def _work(self) -> None:
        req = self.req
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        reason = "length"
        matcher = StopMatcher(req.stop)
        pending: list[str] = []
        last_flush = 0.0
        texts = None
        try:
            texts = self.run.stream_ids(req.ids, req.max_new_tokens, req.sampling)
            for text in texts:
                self.tokens += 1
                text, hit = matcher.feed(text)
                pending.append(text)
                if hit:
                    reason = "stop"
                    break
                if self.cancelled.is_set():
                    reason = "shutdown" if self.shutdown else "cancelled"
                    break
                now = time.monotonic()
                if now > deadline:
                    reason = "time_limit"
                    break
                if now - last_flush >= FLUSH_SECONDS:
                    self._send("text", "".join(pending))
                    pending.clear()
                    last_flush = now
            if reason != "stop":
                pending.append(matcher.flush())
            if pending:
                self._send("text", "".join(pending))
            self.seconds = time.monotonic() - t0
            self._send("end", reason)
        except Exception as e:  # reported to the client; the server keeps running
            self._send("error", f"generation failed: {type(e).__name__}: {e}")
        finally:
            if texts is not None:
                texts.close()
            with suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.on_exit)

    async def texts(self) -> AsyncIterator[str]:
        """Generated text as it arrives, in pieces; `finish_reason` is set at the end."""
        while True:
            kind, value = await self.queue.get()
            while kind == "text" and not self.queue.empty():  # coalesce what has piled up
                nxt_kind, nxt = self.queue.get_nowait()
                if nxt_kind != "text":
                    if value:
                        yield value
                    kind, value = nxt_kind, nxt
                    break
                value += nxt
            if kind == "text":
                if value:
                    yield value
            elif kind == "end" and value == "shutdown":
                raise shutting_down()
            elif kind == "end":
                self.finish_reason = value
                return
            else:
                raise ApiError(500, value, kind="server_error")
