"""Hostile request bodies against `chargpt serve`: every body gets a 2xx or a 4xx.

A tiny model is served in a background thread with small caps (a few tokens a request), and
hypothesis sends it arbitrary bodies (huge and tiny numbers written as JSON text, deep
nesting, wrong types, odd Unicode with lone surrogates, missing and extra fields, bytes that
are not JSON) at every endpoint. No answer may be a 5xx, no streamed answer may carry a
server error, nothing may be logged with a traceback, and the server answers as before at the
end. Seeded (derandomised) and bounded in examples, so it runs in CI.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import train_serve_run

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chargpt.runs.run import load_run  # noqa: E402
from chargpt.serve.app import Limits, create_app  # noqa: E402
from chargpt.serve.background import BackgroundServer  # noqa: E402

pytestmark = pytest.mark.timeout(300)

POSTS = ("/api/generate", "/v1/completions", "/api/attention")
GETS = ("/health", "/api/info", "/v1/models", "/", "/static/index.html")
FIELDS = ("prompt", "max_new_tokens", "max_tokens", "temperature", "top_k", "top_p", "seed",
          "stream", "stop", "unknown", "echo", "n", "best_of", "logprobs", "model", "suffix")


@dataclass(frozen=True)
class Raw:
    """A JSON literal written as is: numbers json.dumps cannot write, nesting too deep for it."""

    text: str


def encode(value: Any) -> str:
    """`value` as JSON text, with `Raw` pieces written verbatim (lone surrogates escaped)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)


RAW_NUMBERS = [Raw("1" * 400), Raw("1" * 400 + ".5"), Raw("1" * 5000), Raw("-" + "9" * 4301),
               Raw("0." + "0" * 400 + "1"), Raw("1e999"), Raw("-1e999"), Raw("1e-400"),
               Raw("-0"), Raw("-0.0"), Raw("99999999999"), Raw("2147483648"),
               Raw("9223372036854775808"), Raw("18446744073709551616"), Raw("NaN"),
               Raw("Infinity"), Raw("-Infinity"), Raw("4.9e-324"), Raw("1.7976931348623157e308")]
DEEP = [Raw("[" * n + "]" * n) for n in (900, 3000, 20000)] + [
    Raw('{"a":' * n + "1" + "}" * n) for n in (900, 3000)]

odd_text = st.text(st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
    st.sampled_from("\x00\u200b\u202e\ufeff\uffff\U0010ffff\U0001f642É\n\r\t\\\"")),
    max_size=12)
numbers = st.one_of(st.integers(), st.integers(-3, 300), st.floats(), st.sampled_from(RAW_NUMBERS))
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
values = st.recursive(scalars | st.sampled_from(DEEP),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(odd_text, inner, max_size=3), max_leaves=8)


def bodies(vocab: str) -> st.SearchStrategy[bytes]:
    """Request bodies: mostly objects with chargpt's and OpenAI's fields (prompts often made of
    the model's characters, so many requests do generate), sometimes anything at all."""
    prompts = st.text(st.sampled_from(vocab), max_size=40) | odd_text
    field_values = {"prompt": prompts | values | st.lists(prompts, max_size=2),
                    "stop": st.lists(odd_text, max_size=5) | values,
                    "stream": st.booleans() | values, "echo": st.booleans() | values,
                    "unknown": st.sampled_from(["error", "skip", "replace"]) | values}
    field = st.sampled_from(FIELDS).flatmap(
        lambda k: st.tuples(st.just(k), field_values.get(k, values)))
    objects = st.lists(field | st.tuples(odd_text, values), max_size=8).map(dict)
    prompt_only = st.fixed_dictionaries({"prompt": prompts},  # the shape /api/attention takes
                                        optional={"unknown": field_values["unknown"]})
    return st.one_of(objects.map(encode), objects.map(encode), prompt_only.map(encode),
                     values.map(encode),
                     st.binary(max_size=64).map(lambda b: b.decode("latin-1"))
                     ).map(lambda text: text.encode("utf-8", "surrogatepass"))


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def server_log(monkeypatch):
    """Every log record of the server (uvicorn's loggers do not propagate to the root) and
    every exception that ends a thread."""
    handler = Collected()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    thread_errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    yield handler.records, thread_errors
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Any:
    return load_run(train_serve_run(tmp_path_factory.mktemp("fuzz")), device="cpu")


def send(srv: BackgroundServer, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        c.close()


def check_answer(status: int, kind: str, raw: bytes, where: str) -> None:
    assert status < 500, (where, status, raw[:300])
    if kind.startswith("text/event-stream"):
        assert b"server_error" not in raw and b"generation failed" not in raw, (where, raw[:300])
    elif kind.startswith("application/json") and status >= 400:
        message = json.loads(raw)["error"]["message"]
        assert message and "\n" not in message and len(message) < 1000, (where, message)


def test_the_named_bodies_are_400_not_500(run):
    """The three bodies that were server errors: a temperature of 400 digits, a top_k past
    Python's int-string limit, and a top_k past int32 (equal to keeping every token)."""
    with BackgroundServer(create_app(run, Limits(max_new_tokens=4))) as srv:
        for text, needle in ((f'{{"prompt":"R","temperature":{"1" * 400}}}', b"temperature"),
                             (f'{{"prompt":"R","top_k":{"1" * 5000}}}', b"not valid JSON")):
            status, _, raw = send(srv, "POST", "/v1/completions", text.encode())
            assert status == 400 and needle in raw, raw
        status, _, raw = send(srv, "POST", "/v1/completions",
                              b'{"prompt":"R","top_k":99999999999,"max_tokens":3,"seed":1}')
        assert status == 200, raw
        same = send(srv, "POST", "/v1/completions", b'{"prompt":"R","max_tokens":3,"seed":1}')
        assert json.loads(raw)["choices"][0]["text"] == json.loads(same[2])["choices"][0]["text"]


def test_hostile_bodies_get_a_2xx_or_a_4xx_and_leave_the_server_healthy(run, server_log, capfd):
    records, thread_errors = server_log
    limits = Limits(max_prompt_chars=200, max_new_tokens=4, max_concurrent=2, max_queue=8,
                    queue_timeout=10, request_timeout=10)
    vocab = "".join(run.tokenizer.chars)
    statuses: dict[str, set[int]] = {path: set() for path in POSTS + GETS}

    with BackgroundServer(create_app(run, limits)) as srv:

        @settings(max_examples=400, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(body=bodies(vocab), get=st.sampled_from(GETS))
        def hostile(body: bytes, get: str) -> None:
            for method, path in [*(("POST", p) for p in POSTS), ("GET", get), ("POST", get)]:
                status, kind, raw = send(srv, method, path, body)
                check_answer(status, kind, raw, f"{method} {path} {body[:200]!r}")
                statuses[path].add(status)

        hostile()
        status, _, raw = send(srv, "GET", "/health", b"")
        assert status == 200 and json.loads(raw)["status"] == "ok", raw
        status, _, raw = send(srv, "POST", "/api/generate",
                              b'{"prompt":"ROMEO:","max_new_tokens":4,"seed":3}')
        assert status == 200 and json.loads(raw)["tokens"] == 4, raw

    assert all(statuses.values()), statuses  # every endpoint was reached
    assert all(200 in statuses[p] for p in POSTS), statuses  # and some bodies were good
    assert not thread_errors
    tracebacks = [r for r in records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks[:3]]
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_gone_while_sending_its_body_is_not_a_traceback(run, server_log, capfd):
    records, thread_errors = server_log
    with BackgroundServer(create_app(run, Limits(max_new_tokens=4))) as srv:
        for path in POSTS:
            with socket.create_connection((srv.host, srv.port)) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                             '{"prompt": "RO'.encode())
                time.sleep(0.1)  # the server is waiting for the rest of the body
        time.sleep(0.3)  # and has seen each connection close
        status, _, raw = send(srv, "GET", "/health", b"")
        assert status == 200 and json.loads(raw)["active"] == 0
    assert not thread_errors
    tracebacks = [r for r in records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks[:3]]
    assert "Traceback" not in capfd.readouterr().err
