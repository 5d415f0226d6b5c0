"""`chargpt serve` over real HTTP on 127.0.0.1: the JSON API, limits, disconnects and load.

A tiny model is trained once per module; each server runs in a background thread (uvicorn on
a pre-bound free port) with the limits its test needs, and one test starts the real CLI in a
subprocess. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SERVE_CORPUS, tiny_flags, train_serve_run, write

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from chargpt.cli.commands import main  # noqa: E402
from chargpt.generation.loop import MAX_NEW_TOKENS as LONGEST  # noqa: E402
from chargpt.generation.native import build, layout  # noqa: E402
from chargpt.runs.run import load_run  # noqa: E402
from chargpt.serve import api, runner  # noqa: E402
from chargpt.serve.app import Limits, create_app  # noqa: E402
from chargpt.serve.background import BackgroundServer  # noqa: E402
from chargpt.serve.generation import StopMatcher  # noqa: E402

pytestmark = pytest.mark.timeout(120)



@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread, as `chargpt serve` sets per generation on a small machine: with
    several sampling threads (and other work) on two cores, more only makes them spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_torch_thread) -> Path:
    return train_serve_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory, one_torch_thread):
    """A byte-level model whose corpus has 'é' and 'è' (bytes C3 A9, C3 A8) but no '€' (E2 82
    AC) and no byte 0x83 (the second byte of 'Ã')."""
    root = tmp_path_factory.mktemp("serve-bytes")
    corpus = write(root / "corpus.txt", SERVE_CORPUS[:4000] + "café crème\n" * 100)
    flags = tiny_flags(block_size=32, max_steps=5, log_interval=5, warmup_steps=1,
                       sample_chars=0, unit="byte")
    assert main(["train", "--input", str(corpus), "--out", str(root / "run"), *flags]) == 0
    return load_run(root / "run", device="cpu")


@pytest.fixture(scope="module")
def byte_server(byte_run):
    limits = Limits(max_prompt_chars=200, max_new_tokens=1000)
    with BackgroundServer(create_app(byte_run, limits)) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(run):
    """A server with roomy limits, shared by the tests that do not need special ones."""
    limits = Limits(max_prompt_chars=200, max_new_tokens=100_000, max_body_bytes=4096,
                    max_concurrent=2, max_queue=4, queue_timeout=5, request_timeout=30)
    with BackgroundServer(create_app(run, limits)) as srv:
        yield srv


# --- a small HTTP client -----------------------------------------------------------------


def conn(srv: BackgroundServer, timeout: float = 30) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)


def request(srv: BackgroundServer, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    c = conn(srv)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                    **(headers or {})})
        resp = c.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        c.close()


def get_json(srv: BackgroundServer, path: str) -> Any:
    status, _, raw = request(srv, "GET", path)
    assert status == 200, raw
    return json.loads(raw)


def post_json(srv: BackgroundServer, path: str, body: Any) -> tuple[int, Any]:
    status, _, raw = request(srv, "POST", path, body)
    return status, json.loads(raw)


def read_events(resp: http.client.HTTPResponse) -> list[tuple[str, str]]:
    """(event, data) pairs of a server-sent-events response, read to its end."""
    events, event, data = [], "message", []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            events.append((event, "\n".join(data)))
            event, data = "message", []
    return events


def stream(srv: BackgroundServer, path: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    c = conn(srv)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        return read_events(resp)
    finally:
        c.close()


def wait_idle(srv: BackgroundServer, within: float = 5.0) -> float:
    """Seconds until the server reports no running generation; fails after `within`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if get_json(srv, "/health")["active"] == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    pytest.fail(f"a generation was still running {within} s later")


# --- info, page, health ------------------------------------------------------------------


def test_health_info_and_models(server, run):
    health = get_json(server, "/health")
    assert health["status"] == "ok" and health["active"] == 0
    info = get_json(server, "/api/info")
    assert info["name"] == "run" and info["checkpoint"] == "best"
    assert info["parameters"] == run.model.num_params()
    assert info["step"] == run.step == 20
    assert info["val_loss"] == pytest.approx(run.val_loss)
    assert info["block_size"] == 32 and info["n_layer"] == 2 and info["n_head"] == 2
    assert info["vocab"] == "".join(run.tokenizer.chars) and info["has_attention"]
    assert info["unit"] == "char"
    assert info["limits"]["max_new_tokens"] == 100_000
    models = get_json(server, "/v1/models")
    assert models["data"][0]["id"] == "run"


def test_page_and_static_files(server):
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    for needed in ('id="prompt"', 'id="generate"', 'id="stop"', 'id="temperature"',
                   'id="top-k"', 'id="top-p"', 'id="max-new-tokens"', 'id="seed"',
                   "/static/app.js", "/static/style.css"):
        assert needed in page
    assert "http://" not in page and "https://" not in page  # no CDN: everything is local
    status, headers, js = request(server, "GET", "/static/app.js")
    assert status == 200 and "javascript" in headers["content-type"]
    assert b"innerHTML" not in js and b"insertAdjacentHTML" not in js
    assert request(server, "GET", "/static/style.css")[0] == 200


def test_unknown_paths_and_methods_get_json_errors(server):
    for method, path, status, kind in [("GET", "/nope", 404, "not_found"),
                                       ("GET", "/static/nope.js", 404, "not_found"),
                                       ("POST", "/api/nope", 404, "not_found"),
                                       ("GET", "/api/generate", 405, "method_not_allowed"),
                                       ("POST", "/health", 405, "method_not_allowed")]:
        got, headers, raw = request(server, method, path)
        assert got == status and headers["content-type"] == "application/json", (path, raw)
        error = json.loads(raw)["error"]
        assert error["type"] == kind and error["message"] and error["param"] is None
        if status == 405:
            assert "POST" in headers["allow"] or "GET" in headers["allow"]


def test_a_server_bug_is_a_json_500(run, monkeypatch):
    from chargpt.serve.app import Server

    def broken(self, request):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Server, "health", broken)
    with BackgroundServer(create_app(run)) as srv:
        status, headers, raw = request(srv, "GET", "/health")
        assert status == 500 and headers["content-type"] == "application/json"
        assert json.loads(raw)["error"] == {"message": "internal server error",
                                            "type": "server_error", "param": None}
        assert request(srv, "GET", "/api/info")[0] == 200


# --- generation --------------------------------------------------------------------------


def test_generate_matches_the_run_api(server, run):
    params = {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 3}
    status, body = post_json(server, "/api/generate",
                             {"prompt": "ROMEO:", "max_new_tokens": 40, **params})
    assert status == 200, body
    assert body["text"] == run.generate("ROMEO:", 40, **params)
    assert body["finish_reason"] == "length" and body["tokens"] == 40
    events = stream(server, "/api/generate",
                    {"prompt": "ROMEO:", "max_new_tokens": 40, "stream": True, **params})
    *texts, (last_event, last) = events
    assert all(e == "message" for e, _ in texts) and last_event == "done"
    assert "".join(json.loads(d)["text"] for _, d in texts) == body["text"]
    assert json.loads(last)["finish_reason"] == "length" and json.loads(last)["tokens"] == 40
    greedy = post_json(server, "/api/generate", {"prompt": "JULIET", "temperature": 0,
                                                 "max_new_tokens": 10})[1]
    assert greedy["text"] == run.generate("JULIET", 10, temperature=0)
    empty = post_json(server, "/api/generate", {"max_new_tokens": 5})[1]
    assert len(empty["text"]) == 5  # an empty prompt starts from a newline, like the CLI


@pytest.mark.skipif(not build.available()[0], reason="no native decode loop here (install a "
                    "C compiler, gcc or clang, to test serving with narrower weights)")
def test_a_server_with_narrower_weights_samples_what_the_run_api_samples_with_them(
        run, monkeypatch):
    kinds = []
    prepare = layout._prepare
    monkeypatch.setattr(layout, "_prepare", lambda *a: kinds.append(a[1]) or prepare(*a))
    monkeypatch.setattr(layout, "_PREPARED", weakref.WeakKeyDictionary())  # none made yet
    params = {"temperature": 0.8, "top_k": 5, "seed": 3}
    with BackgroundServer(create_app(run, weight_format="int8")) as srv:
        status, body = post_json(srv, "/api/generate",
                                 {"prompt": "ROMEO:", "max_new_tokens": 60, **params})
    assert status == 200, body
    assert kinds == ["int8"]  # the generation's weights were stored as int8
    assert body["text"] == run.generate("ROMEO:", 60, weight_format="int8", **params)


def test_openai_completions(server, run):
    status, body = post_json(server, "/v1/completions",
                             {"model": "run", "prompt": "ROMEO:", "max_tokens": 12,
                              "seed": 5, "temperature": 0.7, "user": "ignored"})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == run.generate("ROMEO:", 12, seed=5, temperature=0.7)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
    events = stream(server, "/v1/completions", {"prompt": ["ROMEO:"], "max_tokens": 12,
                                                 "seed": 5, "temperature": 0.7,
                                                 "stream": True})
    assert events[-1] == ("message", "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    echoed = post_json(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 12,
                                                   "seed": 5, "temperature": 0.7,
                                                   "echo": True})[1]
    assert echoed["choices"][0]["text"] == "ROMEO:" + choice["text"]
    default = post_json(server, "/v1/completions", {"prompt": "ROMEO:"})[1]
    assert default["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens


def test_openai_refuses_what_would_change_the_answer(server, run):
    for body, status, param in [({"model": "gpt-4"}, 404, "model"),
                                ({"model": 3}, 404, "model"),
                                ({"suffix": "END"}, 400, "suffix"),
                                ({"logit_bias": {"50256": -100}}, 400, "logit_bias"),
                                ({"presence_penalty": 0.5}, 400, "presence_penalty"),
                                ({"frequency_penalty": -1}, 400, "frequency_penalty"),
                                ({"frequency_penalty": False}, 400, "frequency_penalty"),
                                ({"max_new_tokens": 5}, 400, "max_new_tokens"),
                                ({"max_tokens": 5, "temprature": 0}, 400, "temprature")]:
        got, answer = post_json(server, "/v1/completions", {"prompt": "ROMEO:", **body})
        assert got == status and answer["error"]["param"] == param, (body, answer)
        assert param in answer["error"]["message"] or status == 404
    status, answer = post_json(server, "/v1/completions", {"model": "gpt-4"})
    assert answer["error"]["code"] == "model_not_found" and '"run"' in answer["error"]["message"]
    # neutral values, nulls (a field's default, as in OpenAI's API) and the fields clients send
    # that change nothing: the same answer as without them
    want = run.generate("ROMEO:", 16, seed=4)
    for extra in ({}, {"model": "run", "suffix": "", "logit_bias": {}, "presence_penalty": 0,
                       "frequency_penalty": 0.0, "user": "u1",
                       "stream_options": {"include_usage": True}},
                  {"model": None, "suffix": None, "logit_bias": None, "presence_penalty": None,
                   "n": None, "best_of": None, "max_tokens": None, "temperature": None,
                   "top_p": None, "top_k": None, "stop": None, "echo": None, "stream": None,
                   "logprobs": None, "unknown": None, "user": None}):
        status, answer = post_json(server, "/v1/completions",
                                   {"prompt": "ROMEO:", "seed": 4, **extra})
        assert status == 200, (extra, answer)
        assert answer["choices"][0]["text"] == want and answer["model"] == "run"


def test_stop_strings(server, run):
    full = run.generate("ROMEO:", 200, seed=2)
    stop = full[10:12]
    cut = full[: full.index(stop)]
    body = post_json(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 200,
                                                 "seed": 2, "stop": [stop, "\x00"]})[1]
    assert body["choices"][0]["text"] == cut and body["choices"][0]["finish_reason"] == "stop"
    events = stream(server, "/api/generate", {"prompt": "ROMEO:", "max_new_tokens": 200,
                                              "seed": 2, "stop": stop, "stream": True})
    assert "".join(json.loads(d).get("text", "") for _, d in events) == cut
    assert json.loads(events[-1][1])["finish_reason"] == "stop"


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END"])
    assert m.feed("abcE") == ("ab", False)
    assert m.feed("N") == ("c", False)
    assert m.feed("Dxyz") == ("", True)
    m = StopMatcher(["zz"])
    out = [m.feed(c)[0] for c in "abz"]
    assert "".join(out) + m.flush() == "abz"


# --- bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "needle"), [
    ({"prompt": "thé €"}, "'é' (U+00E9), '€' (U+20AC)"),
    ({"prompt": "x" * 201}, "201 characters; the limit is 200"),
    ({"prompt": 3}, "prompt must be a string"),
    ({"max_new_tokens": 100_001}, "max_new_tokens must be <= 100000"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": 1.5}, "max_new_tokens must be an integer"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_p": 0}, "top_p must be > 0"),
    ({"top_p": 1.5}, "top_p must be <= 1"),
    ({"seed": -2}, "seed must be >= 0"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"stop": ""}, "stop must be"),
    ({"unknown": "ignore"}, "unknown must be one of"),
    ({"tempreature": 1}, "unknown field(s): tempreature"),
])
def test_bad_generate_requests_are_400(server, body, needle):
    status, answer = post_json(server, "/api/generate", body)
    assert status == 400, answer
    message = answer["error"]["message"]
    assert needle in message and "\n" not in message


def test_unknown_characters_are_named_and_can_be_skipped(server):
    status, body = post_json(server, "/api/generate", {"prompt": "ROMÉO 🙂", "max_new_tokens": 3})
    assert status == 400 and body["error"]["unknown_chars"] == ["É", "🙂"]
    assert body["error"]["type"] == "unknown_characters"
    status, body = post_json(server, "/api/generate", {"prompt": "ROMÉO 🙂", "max_new_tokens": 3,
                                                       "unknown": "skip"})
    assert status == 200 and body["tokens"] == 3
    status, body = post_json(server, "/v1/completions", {"prompt": "é"})
    assert status == 400 and "'é' (U+00E9)" in body["error"]["message"]


def test_byte_models_read_the_utf8_bytes_of_a_prompt(byte_server, byte_run):
    """'café' is four characters and five bytes, all in the vocabulary: accepted, as
    `chargpt sample` accepts it. 'Ã' is the code point 0xC3, a byte the vocabulary has, but its
    UTF-8 bytes are C3 83, and 0x83 is not in it: refused, by character and by byte."""
    status, body = post_json(byte_server, "/api/generate",
                             {"prompt": "café", "max_new_tokens": 8, "seed": 1})
    assert status == 200, body
    assert body["text"] == byte_run.generate("café", 8, seed=1)
    status, body = post_json(byte_server, "/v1/completions", {"prompt": "café", "max_tokens": 3})
    assert status == 200 and body["usage"]["prompt_tokens"] == 5  # tokens are bytes
    status, body = post_json(byte_server, "/api/generate", {"prompt": "Ãb €", "max_new_tokens": 3})
    assert status == 400 and body["error"]["type"] == "unknown_characters"
    assert body["error"]["unknown_chars"] == ["Ã", "€"]
    assert body["error"]["unknown_bytes"] == [0x82, 0x83, 0xAC, 0xE2]
    message = body["error"]["message"]
    assert "'Ã' (U+00C3), '€' (U+20AC)" in message and "0x82, 0x83, 0xAC, 0xE2" in message
    assert "--unknown" not in message and '"unknown": "skip"' in message
    # skip drops the unknown bytes, as `chargpt sample --unknown skip` does; replace puts a
    # space in for each
    for policy in ("skip", "replace"):
        status, body = post_json(byte_server, "/api/generate",
                                 {"prompt": "Ãb €", "max_new_tokens": 4, "seed": 2,
                                  "unknown": policy})
        assert status == 200, body
        assert body["text"] == byte_run.generate("Ãb €", 4, seed=2, unknown=policy)
    info = get_json(byte_server, "/api/info")
    assert info["unit"] == "byte" and info["vocab_size"] == len(info["vocab"])
    assert info["vocab"] == [ord(c) for c in byte_run.tokenizer.chars]
    assert 0xC3 in info["vocab"] and 0xE2 not in info["vocab"]


def test_openai_only_supports_one_choice(server):
    for body in ({"n": 2}, {"best_of": 3}, {"logprobs": 2}, {"prompt": ["a", "b"]}):
        status, answer = post_json(server, "/v1/completions", body)
        assert status == 400, (body, answer)


def test_malformed_and_oversized_bodies(server):
    status, _, raw = request(server, "POST", "/api/generate", b"{not json")
    assert status == 400 and b"not valid JSON" in raw
    status, _, raw = request(server, "POST", "/api/generate", b"[1, 2]")
    assert status == 400 and b"JSON object" in raw
    big = json.dumps({"prompt": "a" * 5000}).encode()
    status, _, raw = request(server, "POST", "/api/generate", big)
    assert status == 413 and b"larger than 4096 bytes" in raw
    # Without a Content-Length the cap is enforced while the body is read.
    c = conn(server)
    try:
        c.putrequest("POST", "/api/generate")
        c.putheader("Transfer-Encoding", "chunked")
        c.putheader("Content-Type", "application/json")
        c.endheaders()
        for _ in range(3):
            c.send(b"800\r\n" + b" " * 0x800 + b"\r\n")
        c.send(b"0\r\n\r\n")
        assert c.getresponse().status == 413
    finally:
        c.close()


def raw_request(srv: BackgroundServer, method: str, path: str, headers: dict[str, str],
                body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """A request with exactly `headers` (http.client adds only Host, unless given, and
    Content-Length), and its JSON answer."""
    c = conn(srv)
    try:
        c.request(method, path, body=body, headers=headers)
        resp = c.getresponse()
        raw = resp.read()
        is_json = resp.getheader("Content-Type") == "application/json"
        return resp.status, json.loads(raw) if is_json else {"raw": raw}
    finally:
        c.close()


def test_post_bodies_must_be_declared_json(server):
    """A page on another site can make a browser POST a form or text/plain without asking
    first; only application/json is read."""
    body = json.dumps({"max_new_tokens": 2}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 None, "application/jsonx"):
        for path in ("/api/generate", "/v1/completions", "/api/attention"):
            headers = {} if kind is None else {"Content-Type": kind}
            status, answer = raw_request(server, "POST", path, headers, body)
            assert status == 415 and answer["error"]["type"] == "unsupported_media_type", kind
    status, answer = raw_request(server, "POST", "/api/generate",
                                 {"Content-Type": "Application/JSON; charset=utf-8"}, body)
    assert status == 200 and answer["tokens"] == 2


@pytest.mark.parametrize(("host", "status"), [
    ("127.0.0.1:8000", 200), ("localhost", 200), ("LOCALHOST:1", 200), ("[::1]:8000", 200),
    ("127.0.0.2", 200), ("evil.example", 400), ("evil.example:8000", 400),
    ("127.0.0.1.evil.example", 400), ("localhost.evil.example:80", 400), ("[::2]:80", 400),
    ("0.0.0.0:8000", 400), ("", 400)])
def test_only_loopback_host_headers_are_answered(server, host, status):
    """DNS rebinding points another site's name at 127.0.0.1; its requests carry that name."""
    for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/api/generate")):
        got, answer = raw_request(server, method, path, {
            "Host": host, "Content-Type": "application/json"}, b'{"max_new_tokens": 1}')
        assert got == status, (path, answer)
        if status == 400:
            assert answer["error"]["type"] == "invalid_host"


def test_a_server_opened_to_the_network_answers_any_host(run):
    with BackgroundServer(create_app(run, loopback_only=False)) as srv:
        status, answer = raw_request(srv, "GET", "/health", {"Host": "my-box.lan:8000"})
        assert status == 200 and answer["status"] == "ok"


# --- attention ---------------------------------------------------------------------------


def test_attention_maps(server, run):
    status, body = post_json(server, "/api/attention", {"prompt": "ROMEO: to"})
    assert status == 200, body
    assert body["tokens"] == list("ROMEO: to") and body["n_layer"] == 2 and body["n_head"] == 2
    assert body["scale"] == 1000
    # the reference: the run's own maps, in whole thousandths, lower triangles only
    want = torch.round(run.attention_maps(run.encode_prompt("ROMEO: to")).double() * 1000)
    w = body["weights"]
    assert len(w) == 2 and all(len(layer) == 2 for layer in w)
    for layer, want_layer in zip(w, want.tolist(), strict=True):
        for head, want_head in zip(layer, want_layer, strict=True):
            assert [len(row) for row in head] == list(range(1, 10))  # causal: lower triangle
            assert head == [[int(x) for x in row[: i + 1]] for i, row in enumerate(want_head)]
            for row in head:
                assert abs(sum(row) - 1000) <= len(row) / 2 and all(0 <= x <= 1000 for x in row)
    # longer than the context: the last 32 characters are shown, as generation keeps them
    long = "ROMEO: to be or not to be, that is the question."
    status, body = post_json(server, "/api/attention", {"prompt": long})
    assert status == 200 and body["tokens"] == list(long[-32:])
    too_long = post_json(server, "/api/attention", {"prompt": "a" * 201})
    assert too_long[0] == 400 and "the limit is 200" in too_long[1]["error"]["message"]
    assert post_json(server, "/api/attention", {"prompt": ""})[0] == 400
    bad = post_json(server, "/api/attention", {"prompt": "x€"})
    assert bad[0] == 400 and "'€' (U+20AC)" in bad[1]["error"]["message"]


def test_attention_answers_are_bounded_and_built_off_the_event_loop(run, monkeypatch):
    """With room for 2 layers x 2 heads x 10 x 11 / 2 weights, a prompt is cropped to its last
    10 characters, and the JSON is made in a worker thread, not the server's."""
    from chargpt.serve import app as app_module
    from chargpt.serve import attention

    monkeypatch.setattr(attention, "MAX_CELLS", 2 * 2 * 10 * 11 // 2 + 5)
    threads = []

    def recorded(*args):
        threads.append(threading.current_thread().name)
        return attention.attention_json(*args)

    monkeypatch.setattr(app_module, "attention_json", recorded)
    with BackgroundServer(create_app(run)) as srv:
        assert get_json(srv, "/api/info")["attention_max_tokens"] == 10
        status, body = post_json(srv, "/api/attention", {"prompt": "ROMEO: to be or not"})
        assert status == 200 and body["tokens"] == list("ROMEO: to be or not"[-10:])
        assert sum(len(row) for layer in body["weights"] for head in layer for row in head) \
            == 2 * 2 * 10 * 11 // 2
    assert threads and srv.thread.name not in threads


def test_byte_model_attention_shows_bytes_and_skips_what_is_not_utf8(byte_server, byte_run):
    status, body = post_json(byte_server, "/api/attention", {"prompt": "café"})
    assert status == 200, body
    assert body["tokens"] == ["c", "a", "f", "\\xc3", "\\xa9"]
    # generated text holds U+FFFD for bytes that were not UTF-8: the page asks to skip them
    status, body = post_json(byte_server, "/api/attention",
                             {"prompt": "caf\ufffd", "unknown": "skip"})
    assert status == 200 and body["tokens"] == ["c", "a", "f"]  # EF BF BD are not in it


# --- limits, disconnects, time limit -----------------------------------------------------


def open_stream(srv: BackgroundServer, body: dict[str, Any]) -> tuple[Any, Any]:
    c = conn(srv)
    c.request("POST", "/api/generate", body=json.dumps({"stream": True, **body}),
              headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the generation is under way
    return c, resp


def test_disconnected_stream_stops_its_generation(server):
    c, _ = open_stream(server, {"prompt": "ROMEO:", "max_new_tokens": 100_000})
    assert get_json(server, "/health")["active"] == 1
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    assert wait_idle(server, within=3.0) < 3.0


def test_disconnected_plain_request_stops_its_generation(server):
    c = conn(server)
    c.request("POST", "/api/generate", body=json.dumps({"max_new_tokens": 100_000}),
              headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 5
    while get_json(server, "/health")["active"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    assert wait_idle(server, within=3.0) < 3.0


def test_busy_server_answers_429_with_retry_after(run):
    limits = Limits(max_new_tokens=100_000, max_concurrent=1, max_queue=0)
    with BackgroundServer(create_app(run, limits)) as srv:
        c, _ = open_stream(srv, {"max_new_tokens": 100_000})
        try:
            status, headers, raw = request(srv, "POST", "/api/generate", {"max_new_tokens": 2})
            assert status == 429 and int(headers["retry-after"]) >= 1
            assert b"busy" in raw
            assert request(srv, "GET", "/health")[0] == 200
        finally:
            c.close()
        wait_idle(srv)
        assert post_json(srv, "/api/generate", {"max_new_tokens": 2})[0] == 200


def test_queued_request_waits_then_gives_up(run):
    limits = Limits(max_new_tokens=100_000, max_concurrent=1, max_queue=1, queue_timeout=0.5)
    with BackgroundServer(create_app(run, limits)) as srv:
        c, _ = open_stream(srv, {"max_new_tokens": 100_000})
        try:
            t0 = time.monotonic()
            status, headers, _ = request(srv, "POST", "/v1/completions", {"max_tokens": 2})
            waited = time.monotonic() - t0
            assert status == 429 and "retry-after" in headers
            # it waited for its queue timeout (0.5 s), then gave up: the 429 says it was not
            # admitted when the first stream ended. Up to 15 s, for a loaded machine.
            assert 0.4 < waited < 15
        finally:
            c.close()
        wait_idle(srv)
    # A short generation queued behind another one runs once that one ends (a queue timeout
    # far above the first one's time, which on a slow machine passes 0.5 s).
    limits = Limits(max_new_tokens=100_000, max_concurrent=1, max_queue=1, queue_timeout=30.0)
    with BackgroundServer(create_app(run, limits)) as srv:
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(
            post_json(srv, "/api/generate", {"max_new_tokens": 2000})[0]))
        first.start()
        deadline = time.monotonic() + 10  # the first one admitted before the second arrives
        while get_json(srv, "/health")["active"] == 0 and not results:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        results.append(post_json(srv, "/api/generate", {"max_new_tokens": 5})[0])
        first.join(60)
        assert results == [200, 200]


def test_request_time_limit(run):
    limits = Limits(max_new_tokens=1_000_000, request_timeout=0.3)
    with BackgroundServer(create_app(run, limits)) as srv:
        t0 = time.monotonic()
        status, body = post_json(srv, "/api/generate", {"max_new_tokens": 1_000_000})
        assert status == 200 and body["finish_reason"] == "time_limit"
        # stopped by its 0.3 s limit, not by running out of tokens (which takes minutes); the
        # bound leaves a loaded machine room to answer
        assert 0 < body["tokens"] < 1_000_000 and time.monotonic() - t0 < 15
        events = stream(srv, "/api/generate", {"max_new_tokens": 1_000_000, "stream": True})
        assert json.loads(events[-1][1])["finish_reason"] == "time_limit"
        wait_idle(srv)


def test_bad_limits_are_one_line_errors(run_dir, capsys):
    assert main(["serve", str(run_dir), "--max-concurrent", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chargpt: error: ") and "max_concurrent must be an integer >= 1" in err
    assert "\n" not in err
    assert main(["serve", str(run_dir), "--weights", "fp4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "chargpt: error: weights must be one of float32, bfloat16, int8, got 'fp4'"


def test_missing_extra_is_a_one_line_error(run_dir, capsys, monkeypatch):
    import chargpt.serve

    monkeypatch.setattr(chargpt.serve, "REQUIRED", ("starlette", "no_such_module_for_chargpt"))
    assert main(["serve", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chargpt: error: ") and "pip install 'chargpt[serve]'" in err
    assert "\n" not in err


def test_port_in_use_is_a_one_line_error(run_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"chargpt: error: cannot listen on 127.0.0.1:{port}: Address already in use"


# --- idle and slow connections ------------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (reading drains anything it sent first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_without_a_request_head_are_closed(run, monkeypatch):
    monkeypatch.setattr(runner, "HEAD_TIMEOUT", 0.5)
    with BackgroundServer(create_app(run)) as srv:
        silent = socket.create_connection((srv.host, srv.port))
        partial = socket.create_connection((srv.host, srv.port))
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        # A keep-alive connection after its response: a byte of the next head, then nothing.
        reused = socket.create_connection((srv.host, srv.port))
        reused.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert reused.recv(4096).startswith(b"HTTP/1.1 200")
        reused.sendall(b"G")
        t0 = time.monotonic()
        for sock in (silent, partial, reused):
            with sock:
                assert closed_within(sock, 5.0)
        assert time.monotonic() - t0 < 4.0
        # A request that is still being answered is not cut at the deadline.
        status, body = post_json(srv, "/api/generate", {"max_new_tokens": 5})
        assert status == 200 and body["tokens"] == 5


def test_a_body_slower_than_its_deadline_gets_a_json_408(run, monkeypatch):
    monkeypatch.setattr(api, "BODY_TIMEOUT", 0.5)
    with BackgroundServer(create_app(run)) as srv:
        with socket.create_connection((srv.host, srv.port)) as sock:
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            sock.settimeout(5.0)
            answer = b""
            while chunk := sock.recv(4096):  # the server closes the connection after it
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["type"] == "request_timeout" and "0.5 s" in error["message"]
        assert get_json(srv, "/health")["active"] == 0


# --- the real CLI ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str] | None:
    """IPv4 addresses with a socket listening on `port`, from /proc (None off Linux)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        return None
    found = set()
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(hex_addr)[::-1]))
    return found


def start_cli(run_dir: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """`chargpt serve RUN_DIR FLAGS` in a subprocess on a free port, once /health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "chargpt", "serve", str(run_dir), "--port",
                             str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"chargpt serve exited: {proc.communicate()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                assert json.loads(r.read())["status"] == "ok"
                return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the server did not come up in 30 s")
            time.sleep(0.1)


def test_cli_serves_on_loopback_and_stops_on_ctrl_c(run_dir):
    proc, port = start_cli(run_dir, "--max-new-tokens", "50", "--log-level", "warning")
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/info")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["limits"]["max_new_tokens"] == 50
        assert listening_addresses(port) in ({"127.0.0.1"}, None)  # loopback only
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert out.startswith("serving run (") and f"http://127.0.0.1:{port}/" in out


def test_ctrl_c_ends_running_and_queued_requests_at_once_with_answers(run_dir):
    """SIGINT while a plain request and a stream generate and another request waits for a
    slot: each gets an answer (JSON 503s, an error event ending the stream), the log has no
    traceback, and the server exits well within uvicorn's 3 s graceful period."""
    proc, port = start_cli(run_dir, "--max-concurrent", "2", "--max-new-tokens", str(LONGEST),
                           "--request-timeout", "120")
    answers: dict[str, Any] = {}
    try:
        clients = [threading.Thread(target=long_generation, args=(port, answers, "running")),
                   threading.Thread(target=long_generation, args=(port, answers, "stream"))]
        for t in clients:
            t.start()
        wait_for_health(port, "active", 2)
        clients.append(threading.Thread(target=long_generation,
                                        args=(port, answers, "queued")))
        clients[-1].start()
        wait_for_health(port, "waiting", 1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        took = time.monotonic() - t0
        for t in clients:
            t.join(10)
    finally:
        proc.kill()
    print(f"\nexit {took:.2f} s after SIGINT")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "CancelledError" not in err, err
    for name in ("running", "queued"):
        status, kind, raw = answers[name]
        assert status == 503 and kind == "application/json", (name, raw)
        assert json.loads(raw)["error"]["type"] == "server_shutting_down"
    last_event, last = answers["stream"][-1]
    assert last_event == "error" and "shutting down" in json.loads(last)["error"]["message"]
    assert took < 2.5  # before: uvicorn's 3 s graceful period, then cancelled tasks


def long_generation(port: int, answers: dict[str, Any], name: str) -> None:
    """A generation of the most characters one request may ask for (seconds of decoding):
    its answer goes to `answers[name]`, as events for the one named "stream", else as
    (status, Content-Type, body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"max_new_tokens": LONGEST, "stream": name == "stream"}
    c.request("POST", "/api/generate", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    if name == "stream":
        answers[name] = read_events(resp)
    else:
        answers[name] = (resp.status, resp.getheader("Content-Type"), resp.read())


def wait_for_health(port: int, key: str, at_least: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if json.loads(r.read())[key] >= at_least:
                return
        assert time.monotonic() < deadline, f"/health's {key} stayed below {at_least}"
        time.sleep(0.05)


def test_idle_sockets_do_not_lock_the_cli_server_out(run_dir):
    """100 connections that never send a byte, against `chargpt serve` with room for one
    generation and no queue (uvicorn's connection limit was 1 + 0 + 64): /health and a
    generation are still answered, at once."""
    proc, port = start_cli(run_dir, "--max-concurrent", "1", "--max-queue", "0",
                           "--log-level", "warning")
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        time.sleep(0.2)  # every one accepted by the server
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        latency = time.monotonic() - t0
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate",
                                     data=b'{"max_new_tokens": 5}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["tokens"] == 5
        assert latency < 2.0
        print(f"\n/health with 100 idle sockets open: {latency * 1000:.1f} ms")
    finally:
        for sock in idle:
            sock.close()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)


# --- load --------------------------------------------------------------------------------


def test_32_concurrent_streams_all_complete_while_health_answers(run):
    n_clients, n_tokens = 32, 100
    limits = Limits(max_new_tokens=1000, max_concurrent=2, max_queue=n_clients,
                    queue_timeout=60, request_timeout=60)
    results: list[str | None] = [None] * n_clients
    errors: list[str] = []
    health_latency: list[float] = []
    done = threading.Event()
    barrier = threading.Barrier(n_clients)

    with BackgroundServer(create_app(run, limits)) as srv:

        def client(i: int) -> None:
            try:
                barrier.wait(timeout=10)
                events = stream(srv, "/api/generate", {"prompt": "ROMEO:", "seed": i,
                                                       "max_new_tokens": n_tokens,
                                                       "stream": True})
                final = json.loads(events[-1][1])
                assert events[-1][0] == "done" and final["finish_reason"] == "length"
                results[i] = "".join(json.loads(d)["text"] for _, d in events[:-1])
            except Exception as e:  # collected: an assertion in a thread would be lost
                errors.append(f"client {i}: {type(e).__name__}: {e}")

        def poll_health() -> None:
            while not done.is_set():
                t = time.monotonic()
                try:
                    assert get_json(srv, "/health")["status"] == "ok"
                except Exception as e:
                    errors.append(f"health: {e}")
                health_latency.append(time.monotonic() - t)
                time.sleep(0.05)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, 60 - (time.monotonic() - t0)))
        elapsed = time.monotonic() - t0
        done.set()
        poller.join(5)
        assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
        assert errors == []
        assert all(r is not None and len(r) == n_tokens for r in results)
        assert len(set(results)) > 1  # different seeds, different texts
        # /health is answered while the streams run, never queued behind them: its slowest
        # answer took under half the time the 32 streams took. A bound relative to that time
        # holds on a loaded machine (load slows both alike), where a fixed one (1 s) does not
        # (32 client threads and 2 generating ones share the GIL and 2 cores with the rest of
        # the machine). How fast /health answers under load is for benchmarks/bench_serve.py.
        assert len(health_latency) >= 3 and max(health_latency) < elapsed / 2
        wait_idle(srv)
        print(f"\n32 streams x {n_tokens} tokens: {elapsed:.2f} s; /health "
              f"{len(health_latency)} checks, max {max(health_latency) * 1000:.0f} ms, "
              f"median {sorted(health_latency)[len(health_latency) // 2] * 1000:.0f} ms")
