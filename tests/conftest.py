"""Shared test helpers: the corpus, tiny runs, the CLI in a subprocess, weights and metrics.

Fixtures here are found by pytest; the plain helpers are imported by the test modules
(`from conftest import corpus_text, tiny_config`), so that a fact such as where Tiny
Shakespeare lives or what a tiny model is exists once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import chargpt
from chargpt import faults
from chargpt.cli.commands import main
from chargpt.config.schema import Config, apply_overrides
from chargpt.data.datasets import DATASETS, Dataset, cache_dir, fetch
from chargpt.data.preparation import prepare
from chargpt.data.prepared import PreparedData
from chargpt.fileio import sha256_file
from chargpt.generation import decode
from chargpt.generation.native import build as native_build
from chargpt.runs.rundir import RunDir

# Tiny Shakespeare: chargpt's dataset cache (where `chargpt train` downloads it), else the copy
# in ../shared beside the clone; see `shakespeare()`.
SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = DATASETS["shakespeare"].sha256
# Its 65 characters: the stand-in text uses exactly these.
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# A model and budget that train in a second or two; tests override what they need.
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}
TINY_TRAIN = {"batch_size": 4, "max_steps": 30, "eval_interval": 10, "eval_iters": 2,
              "log_interval": 5}


def _is_shakespeare(path: Path) -> bool:
    ds = DATASETS["shakespeare"]
    return path.is_file() and path.stat().st_size == ds.size and sha256_file(path) == ds.sha256


@functools.cache
def shakespeare() -> Path | None:
    """A verified copy of Tiny Shakespeare on this machine, or None."""
    cached = cache_dir() / DATASETS["shakespeare"].filename
    return next((p for p in (cached, SHARED_SHAKESPEARE) if _is_shakespeare(p)), None)


def shakespeare_wanted() -> str:
    """Where a test that needs the real corpus looks for it: the skip reason's advice."""
    ds = DATASETS["shakespeare"]
    return (f"Tiny Shakespeare ({ds.size:,} bytes, sha256 {ds.sha256[:12]}...) is not on this "
            f"machine: put it at {cache_dir() / ds.filename} (`chargpt train` downloads it "
            f"there) or at {SHARED_SHAKESPEARE}")


def require_shakespeare() -> Path:
    """The real corpus, for a test whose assertions are about it; else a skip saying where to
    put it."""
    found = shakespeare()
    if found is None:
        pytest.skip(shakespeare_wanted())
    return found


_SPEAKERS = ("ROMEO", "JULIET", "FIRST CITIZEN", "MENENIUS", "KING RICHARD III", "QUEEN",
             "DUKE VINCENTIO", "LADY CAPULET", "GLOUCESTER", "BUCKINGHAM", "PETRUCHIO")
_WORDS = ("the and I to of you my a that in is not me it with be his your this but he have as "
          "thou so him will what thy all her no by do shall if are we thee on lord our king "
          "good now sir from come at they or well would was love night man sweet death fair "
          "heaven grace blood tongue quick zeal jest wax vex fox joy Jove York Zounds Queen "
          "Kate Xantippe Verona")


def stand_in_text(n_chars: int) -> str:
    """Play-shaped text over Tiny Shakespeare's 65 characters (all within the first 200), for
    tests that need some text where the corpus is missing; the same for every call."""
    rng = random.Random(1337)
    parts = ["ALL:\nTHE QUICK BROWN FOX JUMPS OVER THE LAZY DOG! The quick brown fox jumps "
             "over the lazy dog, 'tis 3 $ & -- said; and why? Aye: so.\n\n"]
    total = len(parts[0])
    while total < n_chars:
        lines = []
        for _ in range(rng.randint(1, 3)):
            words = rng.choices(_WORDS.split(), k=rng.randint(4, 10))
            line = " ".join(words)
            lines.append(line[0].upper() + line[1:] + rng.choice(",.;:?!") + rng.choice(
                ("", "", "", " -- 'tis so.", " & more")))
        part = f"{rng.choice(_SPEAKERS)}:\n" + "\n".join(lines) + "\n\n"
        parts.append(part)
        total += len(part)
    return "".join(parts)[:n_chars]


class _OneFile(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass


@contextlib.contextmanager
def serving(body: bytes) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET with `body`; yields a URL for it."""
    handler = type("Handler", (_OneFile,), {"body": body})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/input.txt"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                   "ALL_PROXY")


@pytest.fixture(scope="session")
def shakespeare_file(tmp_path_factory) -> Path:
    """Tiny Shakespeare for a test that needs the dataset rather than its exact text: the real
    corpus where this machine has it (`shakespeare()`); otherwise the stand-in text fetched
    through chargpt's own downloader (`datasets.fetch`) from a server on 127.0.0.1, with the
    dataset's URL, size and checksum pointed at it for that download only."""
    found = shakespeare()
    if found is not None:
        return found
    body = stand_in_text(DATASETS["shakespeare"].size).encode("utf-8")
    ds = DATASETS["shakespeare"]
    with serving(body) as url, pytest.MonkeyPatch.context() as mp:
        mp.setitem(DATASETS, "shakespeare", dataclasses.replace(
            ds, url=url, size=len(body), sha256=hashlib.sha256(body).hexdigest()))
        mp.setenv("CHARGPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        for var in PROXY_VARIABLES:  # a proxy would route the loopback request elsewhere
            mp.delenv(var, raising=False)
        return fetch("shakespeare")


def corpus_text(n_chars: int, *, fallback: bool = True) -> str:
    """The first `n_chars` of Tiny Shakespeare. Where it is missing: the stand-in text (with
    "ROMEO" and "JULIET", for prompts), or a skip for tests that need the real corpus."""
    found = shakespeare()
    if found is not None:
        return found.read_text(encoding="utf-8")[:n_chars]
    if not fallback:
        pytest.skip(shakespeare_wanted())
    return stand_in_text(n_chars)


def write_corpus(directory: Path, n_chars: int = 40_000) -> Path:
    path = directory / "corpus.txt"
    path.write_text(corpus_text(n_chars), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A 40,000-character corpus file, shared by one test module."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def write(path: Path, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8) to `path`, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    """A small prepared-data directory (468 train and 52 val tokens)."""
    prepare(write(tmp_path / "in.txt", "hello world, hello there! " * 20), tmp_path / "data")
    return tmp_path / "data"


def all_text(d: PreparedData) -> str:
    """Both splits of prepared data, decoded: the whole corpus."""
    return d.tokenizer.decode(np.concatenate([d.train, d.val]))


def tiny_config(corpus: Path, out: Path, model: dict[str, Any] | None = None,
                **train: Any) -> Config:
    """The tiny model training on `corpus` into `out`, without progress bar or sample."""
    return apply_overrides(Config(), {
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"input": str(corpus)},
        "train": {**TINY_TRAIN, "sample_chars": 0, "progress": False, "out_dir": str(out),
                  **train},
    }, "test")


def tiny_flags(**values: Any) -> list[str]:
    """The tiny model and budget as `chargpt train` flags; `values` (field=value) override,
    and a value None leaves the flag out (max_steps=None beside --time, which plans it)."""
    merged = {**TINY_MODEL, **TINY_TRAIN, **values}
    return [arg for key, value in merged.items() if value is not None
            for arg in (f"--{key.replace('_', '-')}", str(value))]


# What the served model learns: two speakers, so prompts such as "ROMEO:" and "JULIET" work.
SERVE_CORPUS = "ROMEO: to be or not to be, that is the question.\nJULIET: ay me!\n" * 400


def train_serve_run(root: Path) -> Path:
    """The tiny model (with a 32-character context) trained for 20 steps on SERVE_CORPUS."""
    corpus = write(root / "corpus.txt", SERVE_CORPUS)
    out = root / "run"
    flags = tiny_flags(block_size=32, max_steps=20, log_interval=10, warmup_steps=2,
                       sample_chars=0)
    assert main(["train", "--input", str(corpus), "--out", str(out), *flags]) == 0
    return out


FAULTY_CLI = Path(__file__).with_name("faulty_cli.py")


def cli_command(*args: str, faults: list[str] | None = None) -> list[str]:
    """The command line for `chargpt ARGS`, through tests/faulty_cli.py when faults are asked
    for (its options, e.g. ["--exit-at-step", "17"])."""
    if faults is None:
        return [sys.executable, "-m", "chargpt.cli.commands", *args]
    return [sys.executable, str(FAULTY_CLI), *faults, "--", *args]


def cli(*args: str, faults: list[str] | None = None,
        stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
    """`chargpt ARGS` in a subprocess (unbuffered, one thread), text streams; `faults` as in
    `cli_command`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cli_command(*args, faults=faults), env=env,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def ctrl_c_after(step: int) -> Iterator[None]:
    """Inside, a training run in this process is stopped the way a user stops one: SIGINT
    (Ctrl-C) right after `step` (faults.Faults.interrupt_at_step)."""
    previous = faults.active()
    faults.install(faults.Faults(interrupt_at_step=step))
    try:
        yield
    finally:
        faults.install(previous)


def one_line_error(capsys, code: int, expected_code: int = 1) -> str:
    """The one `chargpt: error: ...` line a failed command printed, checking its exit code."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chargpt: error: "), err
    return lines[0]


def weights(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / name / "model.safetensors"))


def same_weights(a: Path, b: Path, name: str = "last") -> bool:
    wa, wb = weights(a, name), weights(b, name)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's metrics rows, optionally only those of one kind ("train" or "eval")."""
    rows = RunDir(Path(run_dir)).read_metrics()
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]


@pytest.fixture
def item_calls(monkeypatch):
    """Count Tensor.item() calls made from chargpt's own code (host-device syncs it asks for).

    torch's CPU AdamW reads its step counters with .item() internally (the fused CUDA optimizer
    does not), so only calls whose caller lives in chargpt are counted."""
    calls = {"n": 0}
    real_item = torch.Tensor.item
    # the package's own directory: a clone's folder may well be called chargpt too, and then
    # holds torch's files in its .venv
    package = str(Path(chargpt.__file__).parent) + os.sep

    def counting_item(self):
        if sys._getframe(1).f_code.co_filename.startswith(package):
            calls["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    return calls


# --- named datasets, served from 127.0.0.1 (never the internet) -----------------------------


class FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves `files` (URL path -> bytes) and records every requested path in `requests`."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        type(self).requests.append(self.path)
        body = type(self).files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture()
def file_server() -> Iterator[tuple[str, type[FileHandler]]]:
    """(base URL, handler class): put bytes in handler.files["/name"], read handler.requests."""
    handler = type("Handler", (FileHandler,), {"files": {}, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture()
def dataset_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty download cache of the test's own, and no proxy in the way of 127.0.0.1."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHARGPT_CACHE", str(cache))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    return cache


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A deflated zip archive holding `members` (name -> content)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def register_dataset(monkeypatch: pytest.MonkeyPatch, name: str, **fields: Any) -> Dataset:
    """Replace the table entry `name` with one whose `fields` (url, checksums...) a test set."""
    ds = Dataset(name, **fields)
    monkeypatch.setitem(DATASETS, name, ds)
    return ds
def reseal(ckpt_dir: Path) -> Path:
    """Rewrite a checkpoint's manifest to match its files, as the author of a hostile run
    directory would: every file then verifies, and only chargpt's other checks remain."""
    manifest_path = Path(ckpt_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(Path(ckpt_dir).iterdir()) if p.name != "manifest.json"}
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    return Path(ckpt_dir)


def edit_json(path: Path, change) -> None:
    """Apply `change(obj)` to a JSON file in place."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny model trained for 20 steps (best/ and last/ at step 20); copy it to change it."""
    root = tmp_path_factory.mktemp("tiny-run")
    corpus = write_corpus(root, 30_000)
    out = root / "run"
    assert main(["train", "--input", str(corpus), "--out", str(out),
                 *tiny_flags(max_steps=20, eval_interval=10, sample_chars=0)]) == 0
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of `tiny_run` this test may damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A build module that has not loaded its library yet, whose cache directory is `tmp_path`
    (private to the user); yields where its libraries are kept."""
    monkeypatch.setenv("CHARGPT_CACHE", str(tmp_path))
    native_build._load.cache_clear()
    monkeypatch.setattr(decode, "_REPORTED", set())
    yield tmp_path.resolve() / "native"
    native_build._load.cache_clear()



# --- no silent skips in CI ----------------------------------------------------------------------
# A skip names what is missing (a C compiler, a dev extra, Chromium, root for a tmpfs, Tiny
# Shakespeare). On a contributor's machine it stays a skip; in CI (`CI` set, as .ci/run runs),
# where everything is installed, a skip would hide an untested feature behind a green run, so it
# fails with that same line.


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be missing: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


# --- slow tests run in CI -----------------------------------------------------------------------
# A test marked `slow` repeats a promise a faster test already guards, at a length that finds
# what the short one cannot (a longer kill series, a longer decode). CI (`CI` set) runs them;
# a contributor's plain `pytest` leaves them out, one line says how many, and `-m` (any marker
# expression, e.g. `-m slow` or `-m "slow or not slow"`) or a test's id chooses for itself.

_SLOW_LEFT_OUT = pytest.StashKey[int]()


def pytest_collection_modifyitems(config, items):
    named = any("::" in arg for arg in config.args)  # a test asked for by its id runs
    if in_ci() or config.getoption("markexpr") or named:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        config.stash[_SLOW_LEFT_OUT] = len(slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left_out = config.stash.get(_SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(
            f"{left_out} slow test(s) left out, as outside CI always: CI=true pytest runs "
            "them too, pytest -m slow runs them alone")
