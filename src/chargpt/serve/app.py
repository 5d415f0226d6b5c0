"""The web server behind `chargpt serve`: a Starlette app over one loaded `Run`.

It serves the single page in `static/` and a JSON API: streaming and non-streaming generation
(`/api/generate`, and `/v1/completions` in the OpenAI completions shape), attention maps
(`/api/attention`), model info and a health check. Requests are parsed in api.py; each
generation runs in its own thread (generation.py), a bounded number at once, and stops at its
token cap, its time limit, or as soon as its client goes away.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from chargpt.errors import ChargptError
from chargpt.runs.run import Run
from chargpt.runs.rundir import CHECKPOINTS
from chargpt.serve.api import (
    ApiError,
    GenRequest,
    Limits,
    parse_generate,
    read_json,
)
from chargpt.serve.attention import attention_ids, attention_json, max_tokens
from chargpt.serve.generation import ClientGone, Generation, Slots
from chargpt.serve.hosts import host_name, is_loopback

__all__ = ["Limits", "Server", "create_app", "model_name"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- the app --------------------------------------------------------------------------------


def model_name(run: Run) -> str:
    ckpt = run.checkpoint
    return ckpt.parent.name if ckpt.name in CHECKPOINTS else ckpt.name


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


class Server:
    """The request handlers, sharing one run, its limits and the generation slots."""

    def __init__(self, run: Run, limits: Limits, name: str | None = None,
                 weight_format: str = "float32") -> None:
        self.run = run
        self.limits = limits
        self.weight_format = weight_format  # of every generation's SamplingSettings
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
            "unit": run.tokenizer.unit,
            # a byte model's vocabulary is bytes, not the Latin-1 characters that hold them
            "vocab": ([ord(c) for c in run.tokenizer.chars] if run.tokenizer.unit == "byte"
                      else "".join(run.tokenizer.chars)),
            "step": run.step,
            "val_loss": val if math.isfinite(val) else None,
            "device": str(run.device),
            "has_attention": run.has_attention,
            "attention_max_tokens": max_tokens(run) if run.has_attention else 0,
            "limits": asdict(self.limits),
        }

    async def start_generation(self, request: Request, req: GenRequest) -> Generation:
        await self.slots.acquire(request)
        gen: Generation

        def on_exit() -> None:
            self.generations.discard(gen)
            self.slots.release()

        try:
            if self.weight_format != req.sampling.weight_format:
                req = replace(req, sampling=replace(req.sampling,
                                                    weight_format=self.weight_format))
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

    def shutdown(self) -> None:
        """Stop every generation and refuse new and queued ones: the server is exiting."""
        self.slots.closed = True
        for gen in list(self.generations):
            gen.cancel(shutdown=True)

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
                             openai=True, model=self.name)
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
        ids = attention_ids(self.run, await read_json(request, self.limits), self.limits)
        await self.slots.acquire(request)
        try:  # the maps and their JSON, megabytes of it, are made away from the event loop
            raw = await anyio.to_thread.run_sync(attention_json, self.run, ids)
        finally:
            self.slots.release()
        return Response(raw, media_type="application/json")


def _handle(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return e.response()
        except (ClientGone, ClientDisconnect):  # nobody is left to read an answer
            return Response(status_code=499)
        except ChargptError as e:
            return ApiError(400, str(e)).response()

    return endpoint


HTTP_ERROR_KINDS = {404: "not_found", 405: "method_not_allowed"}


class LoopbackHostOnly:
    """ASGI middleware: a 400 for a request whose Host header is not a loopback name, such as
    a page on another site that DNS rebinding pointed at 127.0.0.1."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if not is_loopback(host_name(host)):
                shown = json.dumps(host[:60]) if host else "none"
                error = ApiError(400, f"the Host header is {shown}; this server answers only "
                                 "requests for localhost, 127.0.0.1 or [::1]", kind="invalid_host")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (an unknown path, a wrong method) in the API's error shape."""
    assert isinstance(exc, HTTPException)
    kind = HTTP_ERROR_KINDS.get(exc.status_code, "invalid_request_error")
    return ApiError(exc.status_code, exc.detail, kind=kind,
                    headers=dict(exc.headers or {})).response()


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug's answer: the API's error shape; Starlette still logs the traceback."""
    return ApiError(500, "internal server error", kind="server_error").response()


def create_app(run: Run, limits: Limits | None = None, name: str | None = None,
               weight_format: str = "float32", loopback_only: bool = True) -> Starlette:
    """The ASGI app serving `run`, its weight matrices stored as `weight_format` for the native
    decode loop (SamplingSettings.weight_format); `loopback_only` answers only requests whose
    Host is a loopback name (for a server listening on one). `app.state.server` holds the
    handlers and live counters, and its `shutdown()` stops the generations (runner.Server
    calls it)."""
    server = Server(run, limits or Limits(), name, weight_format)

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.shutdown()  # in case the server running the app did not call it first

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
    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan),
                    exception_handlers={HTTPException: http_error, Exception: server_error},
                    middleware=[Middleware(LoopbackHostOnly)] if loopback_only else [])
    app.state.server = server
    return app
