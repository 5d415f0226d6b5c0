"""`chargpt train --init-from SOURCE`: a new run from a trained model (chargpt, Hugging Face,
nanoGPT), the union vocabulary (old ids unchanged, new characters appended, new rows the mean
of the old), the shape fixed by the source, the source never modified, hostile sources refused
before anything is built."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_MODEL,
    ctrl_c_after,
    metrics,
    one_line_error,
    same_weights,
    tiny_flags,
    weights,
    write,
)
from test_hostile import with_config

import chargpt.model.build as build_mod
from chargpt.cli.commands import main
from chargpt.config.resolve import resolve_config
from chargpt.runs.rundir import find_checkpoint
from chargpt.training import finetune
from chargpt.training.launch import new_trainer, train

OLD_TEXT = "the quick brown fox jumps over the lazy dog.\n" * 300
NEW_TEXT = "Grüße, Straße: größer als ein Fuß. ÄÖÜ ß!\n" * 300
QUICK = tiny_flags(max_steps=6, eval_interval=3, warmup_steps=2, sample_chars=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    corpus = write(root / "old.txt", OLD_TEXT)
    assert main(["train", "--input", str(corpus), "--out", str(root / "run"), *QUICK]) == 0
    return root / "run"


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def finetune_cfg(source: Path, tmp_path: Path, out: str = "ft", **train_values):
    """The config `chargpt train --init-from SOURCE --input new.txt` resolves to."""
    corpus = write(tmp_path / "new.txt", NEW_TEXT)
    overrides = {"train": {"init_from": str(source), "out_dir": str(tmp_path / out),
                           "progress": False, "sample_chars": 0, **train_values},
                 "data": {"input": str(corpus)}}
    cfg = resolve_config(None, None, overrides)
    with finetune.source(source) as src:
        return finetune.finetune_config(cfg, src.config, source, overrides)


def finetune_trainer(source: Path, tmp_path: Path):
    """The Trainer of a fine-tune of `source` on NEW_TEXT, before its first step."""
    return new_trainer(finetune_cfg(source, tmp_path), quiet=True)


def test_old_ids_keep_their_rows_and_new_rows_start_at_the_mean(source, tmp_path):
    old = find_checkpoint(source)
    trainer = finetune_trainer(source, tmp_path)
    tok, n_old = trainer.data.tokenizer, old.tokenizer.vocab_size
    assert tok.chars[:n_old] == old.tokenizer.chars  # every old id unchanged
    assert set(tok.chars[n_old:]) == set(NEW_TEXT) - set(OLD_TEXT)  # ß, ü, ... appended
    before = weights(source, "best")
    after = trainer.model.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(after[name][:n_old], before[name])
        mean = before[name].mean(dim=0)
        assert all(torch.equal(row, mean) for row in after[name][n_old:])
    for name, tensor in before.items():  # everything else is the source's, exactly
        if tensor.shape == after[name].shape:
            assert torch.equal(after[name], tensor), name


def test_a_finetune_trains_samples_new_characters_and_leaves_the_source_alone(
        source, tmp_path, capsys):
    digest = tree_digest(source)
    corpus = write(tmp_path / "new.txt", NEW_TEXT)
    out = tmp_path / "ft"
    code = main(["train", "--init-from", str(source), "--input", str(corpus), "--out", str(out),
                 *tiny_flags(max_steps=40, eval_interval=20, warmup_steps=2, sample_chars=200)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"fine-tuning from {source / 'best'}" in printed and "new: " in printed
    sample = printed.split("---\n", 1)[1]
    assert set(sample) & set("ßüöäÄÖÜ"), sample  # the model writes characters it never saw
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["init_from"] == str(source.resolve())
    src_cfg = json.loads((source / "config.json").read_text())
    assert cfg["train"]["lr"] == pytest.approx(src_cfg["train"]["lr"] * finetune.LR_SCALE)
    assert tree_digest(source) == digest  # the source is only read


def test_the_source_fixes_the_shape(source, tmp_path, capsys):
    corpus = write(tmp_path / "new.txt", NEW_TEXT)
    code = main(["train", "--init-from", str(source), "--input", str(corpus),
                 "--out", str(tmp_path / "ft"), "--n-embd", "64"])
    line = one_line_error(capsys, code)
    assert line == (f"chargpt: error: --init-from {source}: model.n_embd is fixed by the "
                    f"source: {TINY_MODEL['n_embd']}, not 64")
    assert not (tmp_path / "ft").exists()


def test_free_fields_may_change(source, tmp_path):
    corpus = write(tmp_path / "new.txt", NEW_TEXT)
    assert main(["train", "--init-from", str(source), "--input", str(corpus),
                 "--out", str(tmp_path / "ft"), "--dropout", "0.1", *QUICK]) == 0
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["model"]["dropout"] == 0.1 and cfg["model"]["n_embd"] == TINY_MODEL["n_embd"]


def test_init_from_and_resume_cannot_be_combined(source, tmp_path, capsys):
    code = main(["train", "--resume", str(source), "--init-from", str(source)])
    assert one_line_error(capsys, code) == ("chargpt: error: --init-from starts a new run and "
                                            "--resume continues one; give one")


def test_a_byte_source_and_a_character_corpus_cannot_be_mixed(source, tmp_path, capsys):
    corpus = write(tmp_path / "new.txt", NEW_TEXT)
    code = main(["train", "--init-from", str(source), "--input", str(corpus),
                 "--out", str(tmp_path / "ft"), "--unit", "byte"])
    line = one_line_error(capsys, code)
    assert "a byte-level model and a code-point corpus cannot be mixed" in line


def test_a_hostile_source_is_refused_before_anything_is_built(source, tmp_path, capsys,
                                                               monkeypatch):
    import shutil

    hostile = Path(shutil.copytree(source, tmp_path / "hostile"))
    for name in ("best", "last"):
        with_config(hostile / name, n_layer=1_000_000)

    def refuse(config):
        raise AssertionError("a model was built before the checks refused the source")

    monkeypatch.setattr(build_mod, "build_model", refuse)
    monkeypatch.setattr(finetune, "build_model", refuse)
    corpus = write(tmp_path / "new.txt", NEW_TEXT)
    code = main(["train", "--init-from", str(hostile), "--input", str(corpus),
                 "--out", str(tmp_path / "ft")])
    line = one_line_error(capsys, code)
    assert "model.n_layer is 1,000,000, more than chargpt loads" in line
    assert not (tmp_path / "ft").exists()


def test_a_missing_source_is_one_line(tmp_path, capsys):
    code = main(["train", "--init-from", str(tmp_path / "nope"), "--input", __file__])
    assert one_line_error(capsys, code) == (f"chargpt: error: --init-from {tmp_path / 'nope'}: "
                                            "no such file or directory")


def test_a_nanogpt_checkpoint_is_a_source(tmp_path, capsys):
    from test_nanogpt import nanogpt_repo

    model, out, chars = nanogpt_repo(tmp_path)
    corpus = write(tmp_path / "new.txt", NEW_TEXT)
    code = main(["train", "--init-from", str(out / "ckpt.pt"), "--input", str(corpus),
                 "--out", str(tmp_path / "ft"), "--max-steps", "4", "--eval-interval", "2",
                 "--eval-iters", "2", "--batch-size", "4", "--warmup-steps", "2",
                 "--sample-chars", "0"])
    assert code == 0
    tok = json.loads((tmp_path / "ft" / "data" / "vocab.json").read_text())["chars"]
    assert tok[: len(chars)] == chars
    ft = weights(tmp_path / "ft", "best")  # nanoGPT ties the head to the embedding
    assert ft["lm_head.weight"].shape[0] == len(tok)
    assert "fine-tuning from " + str(out / "ckpt.pt") in capsys.readouterr().out


def test_a_hugging_face_export_is_a_source(source, tmp_path, capsys):
    pytest.importorskip("transformers", reason="needs the hf extra: pip install 'chargpt[hf]'")
    hf = tmp_path / "hf"
    assert main(["export", str(source), "--to", "hf", str(hf)]) == 0, capsys.readouterr().err
    trainer = finetune_trainer(hf, tmp_path)
    before = weights(source, "best")
    n_old = before["transformer.wte.weight"].shape[0]
    after = trainer.model.state_dict()
    assert torch.allclose(after["transformer.wte.weight"][:n_old],
                          before["transformer.wte.weight"])
    assert not list(tmp_path.glob("chargpt-init-from-*"))  # the scratch import is gone


def test_a_resumed_finetune_is_bit_identical_to_an_uninterrupted_one(source, tmp_path):
    budget = {"max_steps": 16, "eval_interval": 4, "eval_iters": 2, "batch_size": 4,
              "warmup_steps": 2}
    train(finetune_cfg(source, tmp_path, "ref", **budget), quiet=True)
    with ctrl_c_after(7):
        first = train(finetune_cfg(source, tmp_path, "split", **budget), quiet=True)
    assert first.step == 7
    second = train(resume=tmp_path / "split", quiet=True)  # from its own checkpoint, not SOURCE
    assert second.step == 16
    assert same_weights(tmp_path / "ref", tmp_path / "split")
    evals = [[(r["step"], r["val_loss"]) for r in metrics(tmp_path / d, "eval")]
             for d in ("ref", "split")]
    assert evals[0] == evals[1] and len(evals[0]) == 5
