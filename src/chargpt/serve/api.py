"""What a client may send to `chargpt serve`: the limits, request parsing, and API errors.

Every request body is read under a size cap and checked field by field, so a bad request is a
400 whose one-line message names the field (`param`), never a server error: whatever the JSON
parser refuses (a number past Python's int-string limit, nesting past the recursion limit), a
lone surrogate, and numbers of any size (compared as integers, never overflowing a float or a
decode loop's int32). A generation request becomes a `GenRequest` holding the prompt's token
ids and its `SamplingSettings`; the `/v1/completions` flavour accepts OpenAI's field names and
refuses what chargpt cannot do.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from chargpt.config.values import MAX_SEED
from chargpt.errors import ChargptError
from chargpt.generation.loop import MAX_NEW_TOKENS
from chargpt.generation.settings import SamplingSettings
from chargpt.runs.run import Run
from chargpt.text.tokenizer import UNKNOWN_POLICIES, CharTokenizer, unknown_chars_message

BODY_TIMEOUT = 10.0  # seconds for a whole request body (at most --max-body-bytes) to arrive
MAX_STOP_STRINGS = 4
GENERATE_FIELDS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                   "stream", "stop", "unknown"}  # /api/generate's
# /v1/completions: OpenAI's fields (user and stream_options change nothing here, and clients
# send them), and chargpt's extensions top_k and unknown.
OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
                 "stream_options", "logprobs", "echo", "stop", "presence_penalty",
                 "frequency_penalty", "best_of", "logit_bias", "user", "suffix", "seed",
                 "top_k", "unknown"}
# OpenAI's fields that change the answer in ways chargpt cannot, accepted at these values only
NEUTRAL_VALUES = {"suffix": ('""', lambda v: v == ""),
                  "logit_bias": ("{}", lambda v: v == {}),
                  "presence_penalty": ("0", lambda v: type(v) in (int, float) and v == 0),
                  "frequency_penalty": ("0", lambda v: type(v) in (int, float) and v == 0)}


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
            if name == "max_new_tokens" and value > MAX_NEW_TOKENS:  # the loop's own bound
                raise ChargptError(f"serve limit max_new_tokens must be at most "
                                   f"{MAX_NEW_TOKENS:,}, got {value:,}")


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


# --- request parsing ----------------------------------------------------------------------


@dataclass
class GenRequest:
    """A validated generation request."""

    prompt: str
    ids: list[int]
    max_new_tokens: int
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    echo: bool = False


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request body as a JSON object, refusing one that is not declared as JSON (a web
    page can make a browser send a form or text/plain to any site without asking), bodies over
    the size cap before reading, and bodies that trickle in for longer than `BODY_TIMEOUT`."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":  # a form or text/plain: another site's page can send
        raise ApiError(415, "a request body must be JSON, sent with Content-Type: "
                       f"application/json, not {_show(media_type) if media_type else 'none'}",
                       kind="unsupported_media_type")
    too_big = ApiError(413, f"request body is larger than {limits.max_body_bytes} bytes",
                       kind="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    parts: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:  # a chunked body has no Content-Length to check
                raise too_big
            parts.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT)
    except asyncio.TimeoutError:  # not the builtin TimeoutError on 3.10
        # The rest of the body may still be on its way: the connection cannot be reused.
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s",
                       kind="request_timeout", headers={"Connection": "close"}) from None
    return parse_json(b"".join(parts))


def parse_json(raw: bytes) -> dict[str, Any]:
    """A body's JSON object. Whatever the parser refuses is a 400: bad syntax, an integer past
    Python's int-string limit (a ValueError), nesting past the recursion limit; so is a string
    with a lone surrogate, which no response could echo back as UTF-8."""
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        reason = "nested too deeply" if isinstance(e, RecursionError) else _clip(str(e))
        raise ApiError(400, f"request body is not valid JSON ({reason})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "request body holds a lone surrogate (\\ud800-\\udfff), which "
                       "is not text") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON (nested too deeply)") from None
    return body


def _clip(text: str, limit: int = 120) -> str:
    """`text` on one line, cut to `limit` characters: a message must not echo a 64 KiB value."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A client's value in a message: a scalar as JSON, cut short; a container by its kind."""
    if isinstance(value, list | dict):
        return "an array" if isinstance(value, list) else "an object"
    return _clip(json.dumps(value), 40)


def _number(body: dict[str, Any], key: str, default: Any, *, integer: bool = False,
            low: float | None = None, high: float | None = None, low_open: bool = False,
            nullable: bool = False) -> Any:
    """`body[key]` checked as a number in [low, high]. Integers are compared as integers,
    never converted to float, so one of 400 digits is out of range, not an overflow."""
    value = body.get(key, default)
    if value is None:
        if nullable:
            return None
        raise ApiError(400, f"{key} must be a number", param=key)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if (isinstance(value, bool) or not ok_type
            or (isinstance(value, float) and not math.isfinite(value))):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {kind}, got {_show(value)}", param=key)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"{key} must be {'>' if low_open else '>='} {low}, got "
                       f"{_show(value)}", param=key)
    if high is not None and value > high:
        raise ApiError(400, f"{key} must be <= {high}, got {_show(value)}", param=key)
    return value


def encode_prompt(run: Run, prompt: Any, limits: Limits, unknown: Any = "error",
                  max_chars: int | None = None) -> list[int]:
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
    if unknown == "error":
        _refuse_unknown_units(run.tokenizer, prompt)
    try:
        return run.encode_prompt(prompt, unknown)
    except ChargptError as e:
        raise ApiError(400, str(e), param="prompt") from None


def _refuse_unknown_units(tokenizer: CharTokenizer, prompt: str) -> None:
    """A 400 naming the prompt's characters the model cannot read: for a byte model, those
    with a UTF-8 byte outside its vocabulary (listed in `unknown_bytes` too)."""
    missing = [c for c in dict.fromkeys(prompt)
               if any(u not in tokenizer for u in tokenizer.units_of(c))]
    if not missing:
        return
    hint = 'send "unknown": "skip" or "replace" to drop or replace them'
    extra: dict[str, Any] = {"unknown_chars": missing}
    if tokenizer.unit == "byte":
        unknown_bytes = sorted({ord(u) for c in missing for u in tokenizer.units_of(c)
                                if u not in tokenizer})
        extra["unknown_bytes"] = unknown_bytes
        shown = ", ".join(f"0x{b:02X}" for b in unknown_bytes[:10])
        more = " ..." if len(unknown_bytes) > 10 else ""
        hint = (f"the model reads UTF-8 bytes, and {shown}{more} are not in its vocabulary; "
                f"{hint}, byte by byte")
    raise ApiError(400, unknown_chars_message("prompt", missing, hint=hint), param="prompt",
                   kind="unknown_characters", extra=extra)


def parse_generate(run: Run, body: dict[str, Any], limits: Limits, *, openai: bool,
                   model: str = "") -> GenRequest:
    """Validate a generation request; `openai` selects the /v1/completions field names, where
    `model` is the one name the request may give."""
    if openai:
        body = _openai_body(body, model)
        prompt = _openai_prompt(body)
        tokens_key, default_tokens = "max_tokens", min(16, limits.max_new_tokens)  # OpenAI's
    else:
        refuse_unknown_fields(body, GENERATE_FIELDS)
        prompt = body.get("prompt", "")
        tokens_key, default_tokens = "max_new_tokens", min(200, limits.max_new_tokens)
    ids = encode_prompt(run, prompt, limits, body.get("unknown", "error"))
    stop = _stop_strings(body.get("stop"))
    for flag in ("stream", "echo") if openai else ("stream",):
        if not isinstance(body.get(flag, False), bool):
            raise ApiError(400, f"{flag} must be true or false", param=flag)
    return GenRequest(
        prompt=prompt,
        ids=ids,
        max_new_tokens=_number(body, tokens_key, default_tokens, integer=True, low=0,
                               high=limits.max_new_tokens),
        sampling=_sampling(body, run.tokenizer.vocab_size),
        stream=body.get("stream", False),
        stop=stop,
        echo=bool(openai and body.get("echo", False)),
    )


def refuse_unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    """A 400 naming the fields of `body` outside `allowed` (quoted when not plain words)."""
    names = [k if k.isprintable() and k.strip() == k and k else json.dumps(k)
             for k in sorted(set(body) - allowed)]
    if names:
        raise ApiError(400, f"unknown field(s): {_clip(', '.join(names))}",
                       param=_clip(names[0], 40))


def _openai_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A /v1/completions body without its nulls (null is a field's default in OpenAI's API),
    refusing unknown fields, another model (a 404, as OpenAI answers) and what would change
    the answer in a way chargpt cannot (a suffix, logit biases, penalties)."""
    body = {k: v for k, v in body.items() if v is not None}
    refuse_unknown_fields(body, OPENAI_FIELDS)
    if body.get("model", model) != model:
        raise ApiError(404, f"the model {_show(body['model'])} does not exist; this server has "
                       f"one model, {json.dumps(model)}", param="model",
                       extra={"code": "model_not_found"})
    for key, (neutral, ok) in NEUTRAL_VALUES.items():
        if key in body and not ok(body[key]):
            raise ApiError(400, f"{key} is not supported: only {neutral} or null, got "
                           f"{_show(body[key])}", param=key)
    return body


def _openai_prompt(body: dict[str, Any]) -> Any:
    """The prompt of a /v1/completions request, refusing what chargpt cannot do (several
    choices, log probabilities)."""
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
    return prompt


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stops)):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} "
                       "non-empty strings of at most 64 characters", param="stop")
    return stops


def _sampling(body: dict[str, Any], vocab_size: int) -> SamplingSettings:
    """The request's sampling fields. A top_k of the vocabulary's size or more keeps every
    token, exactly what no top_k does, and is passed on as None: the decode loops need not
    hold a number of any size."""
    top_k = _number(body, "top_k", None, integer=True, low=1, nullable=True)
    return SamplingSettings(
        temperature=float(_number(body, "temperature", 1.0, low=0, high=100)),
        top_k=None if top_k is not None and top_k >= vocab_size else top_k,
        top_p=_number(body, "top_p", None, low=0, low_open=True, high=1, nullable=True),
        seed=_number(body, "seed", None, integer=True, low=0, high=MAX_SEED, nullable=True),
    )
