"""Hostile run directories: every file consistent with its manifest (as a stranger could make
it), yet describing a model too large to build, weights that do not fit their config, lying
vocabularies, metrics or prepared data. Each is one line on stderr, before any tensor of the
model is allocated, and a resume it stops leaves the run directory as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import edit_json, one_line_error, reseal, tiny_config
from numpy.lib import format as npy_format
from safetensors.torch import load_file, save_file

import chargpt.model.gpt as model_mod
import chargpt.runs.run as run_mod
from chargpt.cli.commands import main
from chargpt.config.schema import ModelConfig
from chargpt.data import prepared as prepared_mod
from chargpt.data.prepared import load_prepared
from chargpt.errors import CheckpointError, DataError
from chargpt.interop.imported import ImportedModel
from chargpt.interop.importer import write_run
from chargpt.model.build import build_model
from chargpt.runs import checkpoint as ckpt
from chargpt.runs import safety
from chargpt.runs.run import load_run
from chargpt.text.tokenizer import CharTokenizer
from chargpt.training.launch import train

SAMPLE = ["--max-new-tokens", "5", "--seed", "0"]


@pytest.fixture
def no_huge_models(monkeypatch):
    """Fail the test if a model larger than the bounds is built, even on the meta device."""
    real = model_mod.GPT

    def guarded(config):
        assert config.n_layer <= 1024 and config.n_embd <= 4096, "built a hostile model"
        return real(config)

    monkeypatch.setattr(model_mod, "GPT", guarded)


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fail the test if the model is built for real (not on the meta device)."""
    def refuse(config):
        raise AssertionError("the model was allocated before the checks refused it")

    monkeypatch.setattr(run_mod, "build_model", refuse)


def with_config(ckpt_dir: Path, **model) -> Path:
    edit_json(ckpt_dir / "config.json", lambda cfg: cfg["model"].update(model))
    return reseal(ckpt_dir)


def with_tensors(ckpt_dir: Path, change, name: str = "model.safetensors") -> Path:
    """`change` the tensors of a checkpoint's file `name`, then reseal its manifest."""
    path = ckpt_dir / name
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "chargpt-checkpoint"})
    return reseal(ckpt_dir)


def refused(capsys, *argv: str) -> str:
    return one_line_error(capsys, main(list(argv)))


# --- the model a config describes -----------------------------------------------------------


def test_a_million_layers_is_refused_before_anything_is_built(run_copy, capsys, no_huge_models):
    best = with_config(run_copy / "best", n_layer=1_000_000)
    line = refused(capsys, "sample", str(best), *SAMPLE)
    assert line == (f"chargpt: error: {best / 'config.json'}: model.n_layer is 1,000,000, more "
                    "than chargpt loads (at most 1,024); the file is damaged or hostile")


def test_a_model_larger_than_the_machine_is_refused(run_copy, capsys, no_huge_models):
    # within every bound, but 3.3 T parameters
    best = with_config(run_copy / "best", n_layer=1024, n_embd=16384, n_head=16)
    line = refused(capsys, "sample", str(best), *SAMPLE)
    assert f"{best / 'config.json'} describes a model of 3,298," in line
    assert "of memory; this machine has" in line and line.endswith("available")


def test_the_memory_check_uses_what_the_machine_has(run_copy, capsys, monkeypatch):
    have = safety.available_memory()
    assert have is not None and 0 < have <= os.sysconf("SC_PHYS_PAGES") * os.sysconf(
        "SC_PAGE_SIZE")
    monkeypatch.setattr(safety, "available_memory", lambda: 100_000)
    line = refused(capsys, "sample", str(run_copy), *SAMPLE, "--checkpoint", "last")
    assert "needs about 0.0 GB of memory; this machine has 0.0 GB available" in line


@pytest.mark.parametrize("config", [
    dict(arch="gpt"), dict(tie_weights=True), dict(value_embeds=True), dict(pos_emb="rope"),
    dict(mlp=False), dict(attn_proj=False, mlp_proj=False, mlp_ratio=1), dict(arch="bigram"),
    dict(n_layer=6, n_head=6, n_embd=384, block_size=256)])
def test_the_memory_estimate_counts_what_the_model_builds(config):
    model_config = ModelConfig(vocab_size=65, **config)
    with torch.device("meta"):
        built = sum(p.numel() for p in build_model(model_config).parameters())
    assert 0.98 * built <= safety.estimate_params(model_config) <= built


# --- weights that do not fit their config ---------------------------------------------------

ATTN = "transformer.h.0.attn.c_attn.weight"


def transpose(t):
    t[ATTN] = t[ATTN].t().contiguous()


def as_int32(t):
    t[ATTN] = t[ATTN].view(torch.int32)  # the same bytes, a lying dtype


def add_layer(t):
    t["transformer.h.9.attn.c_attn.weight"] = t[ATTN].clone()


def drop_head(t):
    del t["lm_head.weight"]


@pytest.mark.parametrize("change, says", [
    (transpose, f"{ATTN} has shape (32, 96) but the model in"),
    (as_int32, f"{ATTN} is stored as I32 but the model needs F32"),
    (add_layer, "holds 'transformer.h.9.attn.c_attn.weight', which the model in"),
    (drop_head, "has no 'lm_head.weight', which the model in"),
], ids=["swapped shapes", "lying dtype", "extra tensor", "missing tensor"])
def test_weights_are_checked_against_the_config_from_the_header(
        run_copy, capsys, nothing_allocated, change, says):
    best = with_tensors(run_copy / "best", change)
    line = refused(capsys, "sample", str(best), *SAMPLE)
    assert line.startswith(f"chargpt: error: {best / 'model.safetensors'}") and says in line


def test_a_truncated_header_is_one_line(run_copy, capsys, nothing_allocated):
    best = run_copy / "best"
    weights = best / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    line = refused(capsys, "sample", str(reseal(best)), *SAMPLE)
    assert f"{weights} is not a readable safetensors file: " in line


def test_a_hostile_best_is_passed_over_like_a_damaged_one(run_copy, capsys, no_huge_models):
    with_config(run_copy / "best", n_layer=1_000_000)
    assert main(["sample", str(run_copy), *SAMPLE]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("chargpt: warning: ") and "model.n_layer is 1,000,000" in err
    assert err.endswith(f"using {run_copy / 'last'} instead") and "\n" not in err


# --- vocabularies and the JSON files of a checkpoint ----------------------------------------


def many_chars(n: int) -> list[str]:
    return [chr(c) for c in range(0x4E00, 0x4E00 + n)]


@pytest.mark.parametrize("change, says", [
    (lambda d: with_config(d, vocab_size=10**9), "model.vocab_size is 1,000,000,000"),
    (lambda d: (edit_json(d / "vocab.json", lambda v: v.update(chars=many_chars(20_000))),
                with_config(d, vocab_size=20_000)),
     "config.json needs (20000, 32)"),
    (lambda d: (edit_json(d / "vocab.json", lambda v: v.update(chars=many_chars(100))),
                reseal(d)),
     "the vocabulary and the model in the config do not match"),
    (lambda d: (edit_json(d / "vocab.json", lambda v: v.update(chars=["ab", "c"])), reseal(d)),
     "each entry must be exactly one character"),
    (lambda d: ((d / "vocab.json").write_text("[" * 100_000), reseal(d)), "nested too deeply"),
    (lambda d: ((d / "config.json").write_text("[" * 100_000), reseal(d)), "nested too deeply"),
    (lambda d: ((d / "config.json").write_text("[1, 2]"), reseal(d)),
     "config.json is not a chargpt config (not a JSON object of sections)"),
    (lambda d: (edit_json(d / "state.json", lambda s: s.update(step="many")), reseal(d)),
     "the saved training state is invalid"),
    (lambda d: edit_json(d / "manifest.json", lambda m: m["files"].update(
        {"model.safetensors": 5})), "the entry of model.safetensors has no sha256 and size"),
    (lambda d: edit_json(d / "manifest.json", lambda m: m["files"].pop("config.json")),
     "does not list config.json"),
], ids=["huge vocab_size", "huge vocabulary", "vocabulary of another size", "not characters",
        "deep vocab JSON", "deep config JSON", "config list", "state", "manifest entry",
        "manifest list"])
def test_hostile_checkpoint_files(run_copy, capsys, nothing_allocated, change, says):
    change(run_copy / "best")
    assert says in refused(capsys, "sample", str(run_copy / "best"), *SAMPLE)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", [("sample", *SAMPLE), ("eval",)])
def test_weights_that_are_not_finite_are_refused(run_copy, capsys, command, value):
    def poison(tensors):
        for t in tensors.values():
            if t.is_floating_point():
                t[...] = value

    with_tensors(run_copy / "best", poison)
    line = refused(capsys, command[0], str(run_copy / "best"), *command[1:])
    assert "model.safetensors holds values that are not finite numbers (NaN or infinity) in " \
        in line and "the model cannot be used" in line
    with_tensors(run_copy / "last", lambda t: next(iter(t.values())).view(-1).__setitem__(
        0, value))  # one value is enough
    line = refused(capsys, "train", "--resume", str(run_copy), "--max-steps", "30")
    assert re.search(r"not finite numbers \(NaN or infinity\) in [\w.]+; the model", line)


def test_an_oversized_json_file_is_not_read(run_copy, capsys, monkeypatch):
    monkeypatch.setattr(ckpt, "MAX_JSON_BYTES", 1000)
    line = refused(capsys, "sample", str(run_copy / "best"), *SAMPLE)
    assert "config.json is too large for a file (more than 1,000 bytes)" in line


# --- resuming a hostile run -----------------------------------------------------------------


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


def with_optimizer(last: Path, change) -> None:
    with_tensors(last, change, "optimizer.safetensors")


def with_rng(last: Path, change) -> None:
    tensors = load_file(str(last / "rng.safetensors"))
    change(tensors)
    save_file(tensors, str(last / "rng.safetensors"))
    reseal(last)


def metrics_line(run: Path, line: str) -> None:
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(line)


@pytest.mark.parametrize("change, says", [
    (lambda r: edit_json(r / "config.json", lambda c: c["model"].update(n_layer=1_000_000)),
     "config.json: model.n_layer is 1,000,000"),
    (lambda r: edit_json(r / "config.json", lambda c: c["model"].update(n_layer=3)),
     "describe different models"),
    (lambda r: (r / "config.json").write_text('["model"]'),
     "config.json is not a chargpt config (not a JSON object of sections)"),
    (lambda r: with_optimizer(r / "last", lambda t: t.update(
        {"state.0.exp_avg": torch.zeros(3, 3)})), "the optimizer's exp_avg has shape (3, 3)"),
    (lambda r: with_rng(r / "last", lambda t: t.update(
        torch_cpu=torch.zeros(7, dtype=torch.uint8))), "the training state cannot be restored"),
    (lambda r: metrics_line(r, '{"kind": "train", "step": 5, "loss": "low"}\n'),
     "has no number for 'loss', so it is not a metrics row"),
    (lambda r: metrics_line(r, '[1, 2]\n'), "is not a JSON object, so it is not a metrics row"),
    (lambda r: metrics_line(r, "{" + " " * 70_000), "is longer than any metrics row"),
], ids=["a million layers", "another model", "config list", "optimizer shapes", "rng state",
        "metrics value", "metrics row", "metrics line"])
def test_a_hostile_run_is_not_resumed_and_not_changed(run_copy, capsys, no_huge_models,
                                                      change, says):
    change(run_copy)
    before = snapshot(run_copy)
    line = refused(capsys, "train", "--resume", str(run_copy), "--max-steps", "30")
    assert says in line
    assert snapshot(run_copy) == before


def test_a_torn_last_metrics_line_is_no_damage(run_copy, capsys):
    rows = (run_copy / "metrics.jsonl").read_text().splitlines()
    metrics_line(run_copy, '{"kind": "train", "st')  # a kill in the middle of a write
    assert main(["train", "--resume", str(run_copy), "--max-steps", "25"]) == 0
    assert "dropped 1 torn line(s)" in capsys.readouterr().err
    after = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert after[: len(rows)] == rows  # every whole row kept, the torn one gone
    assert all(json.loads(line)["step"] > 20 for line in after[len(rows):])


# --- prepared data --------------------------------------------------------------------------


def npy_with_shape(path: Path, shape: tuple[int, ...]) -> None:
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(
            f, {"descr": "<u2", "fortran_order": False, "shape": shape})
        f.write(b"\0" * 64)


@pytest.mark.parametrize("change, says", [
    (lambda d: npy_with_shape(d / "train.npy", (2**62,)),
     "train.npy has 4611686018427387904 tokens but meta.json says 468"),
    (lambda d: npy_with_shape(d / "val.npy", (52,)),
     "val.npy has 192 bytes, not the 52 tokens its header promises"),
    (lambda d: npy_with_shape(d / "val.npy", (4, 4)), "val.npy is not a 1-D token array"),
    (lambda d: (d / "meta.json").write_text("[" * 100_000), "meta.json cannot be read"),
    (lambda d: edit_json(d / "meta.json", lambda m: m.update(train_tokens=-1)),
     "train.npy has 468 tokens but meta.json says -1"),
    (lambda d: edit_json(d / "meta.json", lambda m: m.update(vocab_size=10**12)),
     "size does not match meta.json"),
    (lambda d: (d / "vocab.json").write_text("[" * 100_000), "nested too deeply"),
], ids=["huge shape", "shape past the file", "2-D", "deep meta JSON", "token count",
        "vocab size", "deep vocab JSON"])
def test_hostile_prepared_data_is_one_line(prepared, change, says):
    change(prepared)
    with pytest.raises(DataError, match="^[^\n]*$") as e:
        load_prepared(prepared)
    assert says in str(e.value)


def test_an_oversized_meta_json_is_not_read(prepared, monkeypatch):
    monkeypatch.setattr(prepared_mod, "MAX_META_BYTES", 100)
    with pytest.raises(DataError, match="larger than any chargpt metadata"):
        load_prepared(prepared)


def test_hostile_data_of_a_run_is_one_line_for_eval_and_resume(run_copy, capsys):
    data = run_copy / "data"
    npy_with_shape(data / "val.npy", (2**62,))
    says = "val.npy has 4611686018427387904 tokens but meta.json says"
    assert says in refused(capsys, "eval", str(run_copy))
    assert says in refused(capsys, "train", "--resume", str(run_copy), "--max-steps", "25")
    shutil.rmtree(data)
    assert "data directory not found" in refused(capsys, "eval", str(run_copy))



def test_an_imported_model_is_bounded_before_it_is_built(tmp_path, no_huge_models):
    hostile = ImportedModel(ModelConfig(vocab_size=3, n_layer=1_000_000), CharTokenizer("abc"),
                            {}, source={"format": "nanogpt", "path": "ckpt.pt"})
    with pytest.raises(CheckpointError, match=r"ckpt.pt: model.n_layer is 1,000,000"):
        write_run(hostile, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", [
    {"tie_weights": True}, {"arch": "bigram"}, {"value_embeds": True, "pos_emb": "rope"},
    {"attn_proj": False, "mlp_proj": False, "mlp_ratio": 1, "head_bias": True},
], ids=["tied head", "bigram", "value embeddings, rotary", "lecture heads"])
def test_every_kind_of_model_passes_the_gate(corpus, tmp_path, model):
    train(tiny_config(corpus, tmp_path / "run", model=model, max_steps=2, eval_interval=2),
          quiet=True)
    checked = safety.check_checkpoint(tmp_path / "run" / "best")
    assert load_run(tmp_path / "run").checkpoint == checked.path
