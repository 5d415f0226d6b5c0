"""The web server behind `chargpt serve`: a Starlette app over one loaded `Run`.

It serves the single page in `static/` and a JSON API: streaming and non-streaming generation
(`/api/generate`, and `/v1/completions` in the OpenAI completions shape), attention maps
(`/api/attention`), model info and a health check. Sampling is CPU-bound PyTorch code, so each
generation runs in its own thread and hands text to the event loop through an asyncio queue;
the loop itself only parses requests and writes bytes, so `/health` answers while generations
run. A bounded number of generations run at once, a bounded number wait for a slot, and every
generation stops at its token cap, its time limit, or as soon as its client goes away.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ChargptError
from ..run import Run
from ..sampling import generate_tokens
from ..tokenizer import UNKNOWN_POLICIES, unknown_chars_message

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_SEED = 2**63 - 1
FLUSH_SECONDS = 0.03  # a worker batches characters for this long; the page still looks live
MAX_STOP_STRINGS = 4
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Limits:
    """Caps that keep one client from taking the whole machine (each is a `serve` flag)."""

    max_prompt_chars: int = 4000
    max_new_tokens: int = 2000
    max_body_bytes: int = 64 * 1024
    max_concurrent: int = 2
    max_queue: int = 16
    queue_timeout: float = 30.0
    request_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name.endswith("_timeout"):
                if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                    raise ChargptError(f"serve limit {name} must be > 0 seconds, got {value!r}")
                continue
            low = 0 if name == "max_queue" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ChargptError(f"serve limit {name} must be an integer >= {low}, "
                                   f"got {value!r}")


class ApiError(Exception):
    """A request the server refuses; rendered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected while its request waited for a generation slot."""


# --- request parsing ----------------------------------------------------------------------


@dataclass
class GenRequest:
    """A validated generation request."""

    prompt: str
    ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    echo: bool = False


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over the size cap before reading."""
    too_big = ApiError(413, f"request body is larger than {limits.max_body_bytes} bytes",
                       kind="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    size, parts = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:  # a chunked body has no Content-Length to check
            raise too_big
        parts.append(chunk)
    try:
        body = json.loads(b"".join(parts) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _number(body: dict[str, Any], key: str, default: Any, *, integer: bool = False,
            low: float | None = None, high: float | None = None, low_open: bool = False,
            nullable: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        if nullable:
            return None
        raise ApiError(400, f"{key} must be a number", param=key)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {kind}, got {json.dumps(value)}", param=key)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"{key} must be {'>' if low_open else '>='} {low}, got {value}",
                       param=key)
    if high is not None and value > high:
        raise ApiError(400, f"{key} must be <= {high}, got {value}", param=key)
    return value


def encode_prompt(run: Run, prompt: Any, limits: Limits, unknown: Any = "error",
                  max_chars: int | None = None) -> tuple[str, list[int]]:
    """A prompt's token ids; unknown characters are a 400 that names them."""
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", param="prompt")
    cap = limits.max_prompt_chars if max_chars is None else max_chars
    if len(prompt) > cap:
        raise ApiError(400, f"prompt has {len(prompt)} characters; the limit is {cap}",
                       param="prompt")
    if unknown not in UNKNOWN_POLICIES:
        raise ApiError(400, f"unknown must be one of {', '.join(UNKNOWN_POLICIES)}",
                       param="unknown")
    tok = run.tokenizer
    missing = [c for c in dict.fromkeys(prompt) if c not in tok]
    if missing and unknown == "error":
        hint = 'send "unknown": "skip" or "replace" to drop or replace them'
        raise ApiError(400, unknown_chars_message("prompt", missing, hint=hint), param="prompt",
                       kind="unknown_characters", extra={"unknown_chars": missing})
    text = prompt or run.default_prompt()
    ids = tok.encode(text, unknown=unknown, what="prompt")
    if not ids:
        raise ApiError(400, "the prompt has no characters left after skipping unknown ones",
                       param="prompt")
    return text, ids


def parse_generate(run: Run, body: dict[str, Any], limits: Limits, *, openai: bool) -> GenRequest:
    """Validate a generation request; `openai` selects the /v1/completions field names."""
    if openai:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt must be a string or a list of exactly one string",
                               param="prompt")
            prompt = prompt[0]
        if _number(body, "n", 1, integer=True, low=1) != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        if _number(body, "best_of", 1, integer=True, low=1) != 1:
            raise ApiError(400, "only best_of = 1 is supported", param="best_of")
        if body.get("logprobs") is not None:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        tokens_key, default_tokens = "max_tokens", 16  # OpenAI's default
    else:
        allowed = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                   "stream", "stop", "unknown"}
        unknown_keys = sorted(set(body) - allowed)
        if unknown_keys:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown_keys)}",
                           param=unknown_keys[0])
        prompt = body.get("prompt", "")
        tokens_key, default_tokens = "max_new_tokens", min(200, limits.max_new_tokens)
    _, ids = encode_prompt(run, prompt, limits, body.get("unknown", "error"))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} "
                       "non-empty strings of at most 64 characters", param="stop")
    for flag in ("stream", "echo") if openai else ("stream",):
        if not isinstance(body.get(flag, False), bool):
            raise ApiError(400, f"{flag} must be true or false", param=flag)
    return GenRequest(
        prompt=prompt,
        ids=ids,
        max_new_tokens=_number(body, tokens_key, default_tokens, integer=True, low=0,
                               high=limits.max_new_tokens),
        temperature=float(_number(body, "temperature", 1.0, low=0, high=100)),
        top_k=_number(body, "top_k", None, integer=True, low=1, nullable=True),
        top_p=_number(body, "top_p", None, low=0, low_open=True, high=1, nullable=True),
        seed=_number(body, "seed", None, integer=True, low=0, high=MAX_SEED, nullable=True),
        stream=body.get("stream", False),
        stop=stop,
        echo=bool(openai and body.get("echo", False)),
    )


# --- concurrency ----------------------------------------------------------------------------


class Slots:
    """At most `max_concurrent` generations run; up to `max_queue` more wait `queue_timeout`.

    A slot is given back when the generation's thread ends, not when its response ends, so
    the count is the real number of threads using the CPU.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.active = 0
        self.waiting = 0
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
        sem = self._semaphore()
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
                    # A client that gave up while queued must not get a slot afterwards.
                    if await request.is_disconnected():
                        raise ClientGone() from None
        finally:
            self.waiting -= 1
        self.active += 1

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
        self.on_exit = on_exit
        self.tokens = 0
        self.finish_reason: str | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._work, name="chargpt-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
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
        decode = self.run.tokenizer.decode
        pending: list[str] = []
        last_flush = 0.0
        tokens = None
        try:
            generator = torch.Generator(device=self.run.device)
            generator.manual_seed(req.seed if req.seed is not None else secrets.randbits(63))
            idx = torch.tensor([req.ids], dtype=torch.long, device=self.run.device)
            tokens = generate_tokens(self.run.model, idx, req.max_new_tokens,
                                     temperature=req.temperature, top_k=req.top_k,
                                     top_p=req.top_p, generator=generator)
            for token in tokens:
                self.tokens += 1
                text, hit = matcher.feed(decode([int(token[0])]))
                pending.append(text)
                if hit:
                    reason = "stop"
                    break
                if self.cancelled.is_set():
                    reason = "cancelled"
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
            if tokens is not None:
                tokens.close()
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
            elif kind == "end":
                self.finish_reason = value
                return
            else:
                raise ApiError(500, value, kind="server_error")


# --- the app --------------------------------------------------------------------------------


def model_name(run: Run) -> str:
    ckpt = run.checkpoint
    return ckpt.parent.name if ckpt.name in ("best", "last") else ckpt.name


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


class Server:
    """The request handlers, sharing one run, its limits and the generation slots."""

    def __init__(self, run: Run, limits: Limits, name: str | None = None) -> None:
        self.run = run
        self.limits = limits
        self.name = name or model_name(run)
        self.slots = Slots(limits)
        self.generations: set[Generation] = set()
        self.started = time.time()

    # -- helpers

    def info(self) -> dict[str, Any]:
        run, mc = self.run, self.run.config.model
        val = run.val_loss
        return {
            "name": self.name,
            "checkpoint": run.checkpoint.name,
            "arch": mc.arch,
            "parameters": int(run.model.num_params()),
            "n_layer": mc.n_layer,
            "n_head": mc.n_head,
            "n_embd": mc.n_embd,
            "block_size": mc.block_size,
            "vocab_size": run.tokenizer.vocab_size,
            "vocab": "".join(run.tokenizer.chars),
            "step": run.step,
            "val_loss": val if math.isfinite(val) else None,
            "device": str(run.device),
            "has_attention": hasattr(run.model, "attention_maps"),
            "limits": asdict(self.limits),
        }

    async def start_generation(self, request: Request, req: GenRequest) -> Generation:
        await self.slots.acquire(request)
        gen: Generation

        def on_exit() -> None:
            self.generations.discard(gen)
            self.slots.release()

        try:
            gen = Generation(self.run, req, self.limits.request_timeout, on_exit)
            gen.start()
        except BaseException:
            self.slots.release()
            raise
        self.generations.add(gen)
        return gen

    async def collect(self, request: Request, gen: Generation) -> str:
        """All of a generation's text; stops it if the client disconnects while waiting."""
        parts: list[str] = []

        async def consume() -> None:
            async for text in gen.texts():
                parts.append(text)

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    raise ClientGone()
            task.result()  # re-raises a generation error
        finally:
            gen.cancel()
            if not task.done():
                task.cancel()
        return "".join(parts)

    # -- endpoints

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "active": self.slots.active,
                             "waiting": self.slots.waiting,
                             "uptime": round(time.time() - self.started, 3)})

    async def api_info(self, request: Request) -> Response:
        return JSONResponse(self.info())

    async def v1_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": int(self.started),
             "owned_by": "chargpt"}]})

    async def api_generate(self, request: Request) -> Response:
        req = parse_generate(self.run, await read_json(request, self.limits), self.limits,
                             openai=False)
        gen = await self.start_generation(request, req)
        if not req.stream:
            text = await self.collect(request, gen)
            return JSONResponse({"text": text, "finish_reason": gen.finish_reason,
                                 "tokens": gen.tokens, "seconds": round(gen.seconds, 4),
                                 "prompt": req.prompt})

        async def events() -> AsyncIterator[str]:
            try:
                async for text in gen.texts():
                    yield sse({"text": text})
                yield sse({"finish_reason": gen.finish_reason, "tokens": gen.tokens,
                           "seconds": round(gen.seconds, 4)}, event="done")
            except ApiError as e:
                yield sse(e.body(), event="error")
            finally:
                gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(gen.cancel))

    async def v1_completions(self, request: Request) -> Response:
        req = parse_generate(self.run, await read_json(request, self.limits), self.limits,
                             openai=True)
        gen = await self.start_generation(request, req)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: str | None, **more: Any) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": self.name, "choices": [{"text": text, "index": 0,
                                                     "logprobs": None, "finish_reason": finish}],
                    **more}

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(req.ids), "completion_tokens": gen.tokens,
                    "total_tokens": len(req.ids) + gen.tokens}

        if not req.stream:
            text = await self.collect(request, gen)
            return JSONResponse(chunk((req.prompt if req.echo else "") + text,
                                      gen.finish_reason, usage=usage()))

        async def events() -> AsyncIterator[str]:
            try:
                if req.echo and req.prompt:
                    yield sse(chunk(req.prompt, None))
                async for text in gen.texts():
                    yield sse(chunk(text, None))
                yield sse(chunk("", gen.finish_reason, usage=usage()))
                yield sse("[DONE]")
            except ApiError as e:
                yield sse(e.body())
            finally:
                gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(gen.cancel))

    async def api_attention(self, request: Request) -> Response:
        body = await read_json(request, self.limits)
        unknown_keys = sorted(set(body) - {"prompt", "unknown"})
        if unknown_keys:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown_keys)}",
                           param=unknown_keys[0])
        if not hasattr(self.run.model, "attention_maps"):
            arch = self.run.config.model.arch
            raise ApiError(400, f"this model (arch {arch}) has no attention to show")
        block = self.run.config.model.block_size
        prompt = body.get("prompt")
        if not prompt:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        _, ids = encode_prompt(self.run, prompt, self.limits, body.get("unknown", "error"),
                               max_chars=block)
        await self.slots.acquire(request)
        try:
            maps = await anyio.to_thread.run_sync(self._attention, ids)
        finally:
            self.slots.release()
        n_layer, n_head = len(maps), len(maps[0]) if maps else 0
        return JSONResponse({"tokens": [self.run.tokenizer.chars[i] for i in ids],
                             "n_layer": n_layer, "n_head": n_head, "weights": maps})

    def _attention(self, ids: list[int]) -> list[list[list[list[float]]]]:
        idx = torch.tensor([ids], dtype=torch.long, device=self.run.device)
        with torch.inference_mode():
            maps = self.run.model.attention_maps(idx)[:, 0].cpu()  # (n_layer, n_head, T, T)
        # Rows are causal: only the first i + 1 weights of row i can be non-zero, so only
        # those are sent (a ragged lower triangle), rounded to keep the JSON small.
        rounded = torch.round(maps.double(), decimals=4).tolist()
        return [[[row[: i + 1] for i, row in enumerate(head)] for head in layer]
                for layer in rounded]


def _handle(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return e.response()
        except ClientGone:
            return Response(status_code=499)
        except ChargptError as e:
            return ApiError(400, str(e)).response()

    return endpoint


def create_app(run: Run, limits: Limits | None = None, name: str | None = None) -> Starlette:
    """The ASGI app serving `run`; `app.state.server` holds the handlers and live counters."""
    server = Server(run, limits or Limits(), name)

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for gen in list(server.generations):  # shutting down: stop every sampling thread
            gen.cancel()

    routes = [
        Route("/", _handle(server.index), methods=["GET"]),
        Route("/health", _handle(server.health), methods=["GET"]),
        Route("/api/info", _handle(server.api_info), methods=["GET"]),
        Route("/api/generate", _handle(server.api_generate), methods=["POST"]),
        Route("/api/attention", _handle(server.api_attention), methods=["POST"]),
        Route("/v1/models", _handle(server.v1_models), methods=["GET"]),
        Route("/v1/completions", _handle(server.v1_completions), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan))
    app.state.server = server
    return app
