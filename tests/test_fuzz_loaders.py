"""Damaged files fed to every loader: each case ends in one ChargptError line, or loads.

A seeded random loop flips bytes in, truncates, splices pieces into, or replaces a JSON value
(with a number of 400 digits, a wrong type, nesting 50,000 deep...) of one file of a real
checkpoint (`chargpt.load_run`; the manifest is resealed in most cases, as a hostile author
would, so the damage reaches the parsers behind it), of nanoGPT's ckpt.pt and meta.pkl
(`chargpt import`'s reader and the plain pickle reader), and of a Hugging Face folder written
by `chargpt export` (`read_hf` and `write_run`). Any other exception, a message of more than
one line, or a case slower than its bound fails the test, naming the seed and the case so that
it can be replayed. Flips land in a file's first kilobyte half of the time, where the headers
and the JSON are.
"""

from __future__ import annotations

import contextlib
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import reseal

import chargpt
from chargpt.cli.commands import main
from chargpt.config.schema import ModelConfig
from chargpt.errors import ChargptError
from chargpt.interop.importer import import_model
from chargpt.interop.nanogpt import read_meta, read_plain_pickle, tokenizer_from_meta
from chargpt.model.build import build_model

pytestmark = pytest.mark.timeout(300)

SEED = 23
CASE_SECONDS = 10.0  # the bound on one case; most take milliseconds


# What a hostile author puts where a JSON (or pickle-text) value was: numbers of every size,
# other types, nesting deeper than a parser recurses, a lone surrogate.
HOSTILE_VALUES = [b"1" * 400, b"1" * 5000, b"-1", b"0", b"1e999", b"-1e999", b"1e-400", b"NaN",
                  b"99999999999", b"1114112", b"1048577", b"4294967296", b"2.5", b"true",
                  b"null", b'""', b'"x"', b'"\\ud800"', b"[]", b"{}", b"[" * 50_000,
                  b'{"a":' * 3000 + b"1" + b"}" * 3000, b"[1, 2, 3]", b'{"a": 1}']
TOKEN = re.compile(rb'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|"(?:[^"\\]|\\.)*"|true|false|null')


def mutate(data: bytes, rng: random.Random, donor: bytes) -> tuple[str, bytes]:
    """`data` with a few bytes flipped, cut short, a piece of `donor` spliced in, or one of
    its JSON values (numbers, strings, literals) replaced by a hostile one."""
    kind = rng.choice(("flip", "truncate", "splice", "value"))
    if kind == "truncate" or not data:
        return kind, data[: rng.randrange(len(data) + 1)]
    if kind == "value":
        tokens = list(TOKEN.finditer(data[:65536]))
        if tokens:
            t = rng.choice(tokens)
            return kind, data[: t.start()] + rng.choice(HOSTILE_VALUES) + data[t.end():]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(out), 1024) if rng.random() < 0.5 else len(out))
            out[i] = rng.randrange(256) if rng.random() < 0.5 else out[i] ^ (1 << rng.randrange(8))
        return kind, bytes(out)
    i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
    k = rng.randrange(len(donor) + 1)
    piece = donor[k: k + rng.randint(1, 64)]
    return kind, data[:i] + piece + data[j:]


def expect_one_line_or_success(case: str, load: Callable[[], Any]) -> str:
    """Run `load`; 'ok' if it works, 'refused' if it raises a one-line ChargptError."""
    t0 = time.monotonic()
    try:
        load()
        outcome = "ok"
    except ChargptError as e:
        message = str(e)
        assert message and "\n" not in message, f"{case}: {message!r}"
        outcome = "refused"
    except Exception as e:  # noqa: BLE001 (what the test is looking for)
        pytest.fail(f"{case}: {type(e).__name__}: {e}")
    assert time.monotonic() - t0 < CASE_SECONDS, f"{case} took {time.monotonic() - t0:.1f} s"
    return outcome


def fuzz(name: str, files: dict[str, bytes], cases: int,
         run_case: Callable[[str, bytes], Callable[[], Any]]) -> dict[str, int]:
    """`cases` mutations of the named files, each given to `run_case(file, bytes)`, which
    writes the damaged file and returns the load to try; the outcomes counted."""
    rng = random.Random(f"{SEED}-{name}")
    donor = b"".join(files.values())
    counts = {"ok": 0, "refused": 0}
    for case in range(cases):
        file = rng.choice(sorted(files))
        kind, data = mutate(files[file], rng, donor)
        label = f"{name} case {case} (seed {SEED}): {kind} of {file}"
        counts[expect_one_line_or_success(label, run_case(file, data))] += 1
    return counts


# --- a chargpt checkpoint -------------------------------------------------------------------


def test_a_damaged_checkpoint_is_one_line_or_loads(tiny_run, tmp_path):
    best = tiny_run / "best"
    files = {p.name: p.read_bytes() for p in best.iterdir() if p.is_file()}
    rng = random.Random(SEED)

    def run_case(file: str, data: bytes) -> Callable[[], Any]:
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(best, case)
        (case / file).write_bytes(data)
        if file != "manifest.json" and rng.random() < 0.7:
            with contextlib.suppress(Exception):  # a manifest that no longer parses: as it is
                reseal(case)
        return lambda: chargpt.load_run(case, device="cpu")

    counts = fuzz("checkpoint", files, 150, run_case)
    assert counts["refused"] > 50, counts  # the damage was found, not only passed over


# --- nanoGPT's ckpt.pt and meta.pkl ---------------------------------------------------------


CHARS = sorted(set("ROMEO: to be or not to be, that is the question.\nJULIET: ay me!"))


def nanogpt_files(root: Path) -> Path:
    cfg = ModelConfig(vocab_size=len(CHARS), block_size=8, n_layer=1, n_head=2, n_embd=8,
                      activation="gelu", tie_weights=True)
    model = build_model(cfg)
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, bias=True,
                vocab_size=len(CHARS), dropout=0.0)
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 7,
                "best_val_loss": torch.tensor(2.5), "config": {"dataset": "x"}},
               root / "ckpt.pt")
    meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
            "stoi": {c: i for i, c in enumerate(CHARS)}}
    (root / "meta.pkl").write_bytes(pickle.dumps(meta))
    return root


def test_a_damaged_meta_pkl_is_one_line_or_reads(tmp_path):
    meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
            "stoi": {c: i for i, c in enumerate(CHARS)}}
    files = {f"protocol {p}": pickle.dumps(meta, protocol=p)
             for p in range(pickle.HIGHEST_PROTOCOL + 1)}
    path = tmp_path / "meta.pkl"

    def run_case(file: str, data: bytes) -> Callable[[], Any]:
        path.write_bytes(data)
        return lambda: (read_plain_pickle(data), tokenizer_from_meta(read_meta(path), path))

    counts = fuzz("meta.pkl", files, 2000, run_case)
    assert counts["refused"] > 500, counts


def test_a_damaged_nanogpt_checkpoint_is_one_line_or_imports(tmp_path):
    (tmp_path / "src").mkdir()
    src = nanogpt_files(tmp_path / "src")
    files = {name: (src / name).read_bytes() for name in ("ckpt.pt", "meta.pkl")}

    def run_case(file: str, data: bytes) -> Callable[[], Any]:
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(src, case)
        (case / file).write_bytes(data)
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        return lambda: import_model(case / "ckpt.pt", out)

    counts = fuzz("nanogpt", files, 120, run_case)
    assert counts["refused"] > 40 and counts["ok"] > 0, counts


# --- a Hugging Face folder ------------------------------------------------------------------


def test_a_damaged_hf_folder_is_one_line_or_imports(tiny_run, tmp_path):
    pytest.importorskip("transformers", reason="the hf extra is part of dev")
    pytest.importorskip("tokenizers", reason="the hf extra is part of dev")
    src = tmp_path / "hf"
    assert main(["export", str(tiny_run), "--to", "hf", str(src)]) == 0
    names = ("config.json", "model.safetensors", "tokenizer.json")
    files = {name: (src / name).read_bytes() for name in names}

    def run_case(file: str, data: bytes) -> Callable[[], Any]:
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(src, case)
        (case / file).write_bytes(data)
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        return lambda: import_model(case, out)

    counts = fuzz("hf", files, 150, run_case)
    assert counts["refused"] > 50 and counts["ok"] > 0, counts
