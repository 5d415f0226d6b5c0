"""The lecture ladder end to end on a small budget, its step definitions, and attention plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_text, one_line_error

from chargpt import ladder
from chargpt.cli import main
from chargpt.config import ModelConfig
from chargpt.errors import ConfigError
from chargpt.plots import attention_label, plot_attention_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# At 300 steps of batch 32 the pre-LN GPT is ~0.35 nats ahead of the bigram on Shakespeare
# (measured), far more than seed-to-seed noise, while the two steps train in seconds.
SMALL_BUDGET = ["--max-steps", "300", "--batch-size", "32", "--evals", "3"]


def shakespeare(n_chars: int) -> str:
    return corpus_text(n_chars, fallback=False)  # the margins below are Shakespeare's


@pytest.fixture(scope="module")
def ladder_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ladder")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare(300_000), encoding="utf-8")
    out = root / "out"
    # Models this small gain nothing from a second thread, and on a busy machine the threads'
    # synchronisation can make each step several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["ladder", "--steps", "gpu,pre-ln,bigram", *SMALL_BUDGET,
                     "--input", str(corpus), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "ladder.csv", encoding="utf-8", newline="") as f:
        return {row["step"]: row for row in csv.DictReader(f)}


def test_ladder_writes_table_plot_and_samples(ladder_out):
    for name in ("ladder.md", "ladder.csv", "ladder.json", "samples.md"):
        assert (ladder_out / name).stat().st_size > 0
    assert (ladder_out / "ladder.png").read_bytes()[:8] == PNG_MAGIC
    rows = read_rows(ladder_out)
    assert list(rows) == ["bigram", "pre-ln", "gpu"]  # ladder order, not the order asked
    table = (ladder_out / "ladder.md").read_text(encoding="utf-8")
    assert "| step | idea | parameters | train loss | val loss | bits/char | seconds |" in table
    samples = (ladder_out / "samples.md").read_text(encoding="utf-8")
    assert "### bigram" in samples and "### pre-ln" in samples
    for name in ("bigram", "pre-ln"):
        assert rows[name]["status"] == "done"
        assert int(rows[name]["steps"]) == 300
        assert (ladder_out / name / "metrics.jsonl").exists()
        val, bpc = float(rows[name]["val_loss"]), float(rows[name]["bits_per_char"])
        assert math.isclose(bpc, val / math.log(2), rel_tol=1e-3)


def test_gpt_beats_bigram_on_the_whole_val_split(ladder_out):
    rows = read_rows(ladder_out)
    assert float(rows["pre-ln"]["val_loss"]) < float(rows["bigram"]["val_loss"]) - 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_step_is_skipped_without_cuda_and_reports_no_number(ladder_out):
    row = read_rows(ladder_out)["gpu"]
    assert row["status"].startswith("skipped") and "CUDA" in row["status"]
    assert row["val_loss"] == row["train_loss"] == row["seconds"] == ""
    assert not (ladder_out / "gpu").exists()
    assert "not run" in (ladder_out / "ladder.md").read_text(encoding="utf-8")


def test_ladder_refuses_to_overwrite_runs(ladder_out, capsys):
    code = main(["ladder", "--steps", "bigram", "--max-steps", "5", "--out", str(ladder_out)])
    assert "already holds ladder runs (bigram)" in one_line_error(capsys, code)


def test_list_prints_every_step_with_its_size(capsys):
    assert main(["ladder", "--list"]) == 0
    out = capsys.readouterr().out
    for step in ladder.STEPS:
        assert step.name in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "4,225" in lines["bigram"]  # a 65 x 65 table
    assert "needs CUDA" in lines["gpu"]
    assert "needs CUDA" not in lines["bigger"]


@pytest.mark.parametrize("spec", ["bigram,nope", "transformer", " , "])
def test_bad_step_names_are_one_line_errors(spec, tmp_path, capsys):
    code = main(["ladder", "--steps", spec, "--max-steps", "5", "--out", str(tmp_path / "o")])
    line = one_line_error(capsys, code)
    assert "bigram" in line  # the message lists the available steps
    assert not (tmp_path / "o").exists()


def test_budget_flags_exclude_each_other(tmp_path, capsys):
    code = main(["ladder", "--max-steps", "5", "--seconds", "3", "--out", str(tmp_path)])
    one_line_error(capsys, code, expected_code=2)
    code = main(["ladder", "--steps", "bigram", "--max-steps", "0", "--out", str(tmp_path)])
    assert "--max-steps must be >= 1" in one_line_error(capsys, code)


def test_parse_steps_keeps_ladder_order_without_duplicates():
    names = [s.name for s in ladder.parse_steps("residual, bigram,residual")]
    assert names == ["bigram", "residual"]
    assert len(ladder.parse_steps("all")) == len(ladder.STEPS)
    with pytest.raises(ConfigError):
        ladder.parse_steps("Bigram")


def test_every_step_is_a_preset_of_the_same_two_model_classes():
    configs = {s.name: ladder.step_config(s, max_steps=100) for s in ladder.STEPS}
    assert configs["bigram"].model.arch == "bigram"
    assert {c.model.arch for n, c in configs.items() if n != "bigram"} == {"gpt"}
    one, multi = configs["one-head"].model, configs["multi-head"].model
    assert (one.n_head, multi.n_head, one.n_embd, multi.n_embd) == (1, 4, 32, 32)
    assert not one.mlp and not one.residual and one.norm == "none"
    residual = configs["residual"].model
    assert residual.residual and residual.n_layer == 3 and residual.mlp_ratio == 1
    assert configs["post-ln"].model.norm == "post" and configs["pre-ln"].model.norm == "pre"
    assert configs["dropout"].model.dropout == 0.2
    assert configs["gpu"].train.device == "cuda"
    # the budget is the ladder's, identical for every step
    assert {(c.train.max_steps, c.train.batch_size, c.train.seed)
            for c in configs.values()} == {(100, ladder.DEFAULT_BATCH_SIZE, ladder.DEFAULT_SEED)}


def test_seconds_budget_stops_on_time(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare(50_000), encoding="utf-8")
    results = ladder.run_ladder(ladder.parse_steps("bigram"), tmp_path / "out", input=corpus,
                                max_steps=None, seconds=1.5, sample_chars=20,
                                log=lambda s: None)
    (r,) = results
    assert r.ran and 0 < r.steps < ladder.SECONDS_MODE_MAX_STEPS
    assert r.seconds < 15 and math.isfinite(r.val_loss)
    assert len(r.sample) == 20


# --- attention ----------------------------------------------------------------------------------


def test_attention_command_writes_a_png(ladder_out, tmp_path, capsys):
    png = tmp_path / "att.png"
    assert main(["attention", str(ladder_out / "pre-ln"), "--prompt", "ROMEO: o",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "3 layers x 4 heads over 8 characters" in capsys.readouterr().out


def test_attention_command_crops_a_long_prompt(ladder_out, tmp_path, capsys):
    png = tmp_path / "long.png"
    assert main(["attention", str(ladder_out / "pre-ln"), "--prompt", "ROMEO: what light",
                 "--out", str(png)]) == 0
    captured = capsys.readouterr()
    assert "last 8" in captured.err and "over 8 characters" in captured.out


def test_attention_command_errors(ladder_out, tmp_path, capsys):
    png = str(tmp_path / "x.png")
    code = main(["attention", str(ladder_out / "bigram"), "--prompt", "ROMEO", "--out", png])
    assert "no attention" in one_line_error(capsys, code)
    code = main(["attention", str(ladder_out / "pre-ln"), "--prompt", "\u00e9t\u00e9",
                 "--out", png])
    one_line_error(capsys, code)
    code = main(["attention", str(ladder_out / "pre-ln"), "--prompt", "", "--out", png])
    one_line_error(capsys, code)
    code = main(["attention", str(tmp_path / "missing"), "--prompt", "hi", "--out", png])
    one_line_error(capsys, code)


def _causal_maps(*shape: int) -> np.ndarray:
    T = shape[-1]
    m = np.tril(np.ones((T, T), dtype=np.float32))
    return np.broadcast_to(m / m.sum(-1, keepdims=True), shape).copy()


@pytest.mark.parametrize("shape", [(2, 1, 3, 5, 5), (2, 3, 5, 5), (3, 5, 5), (5, 5)])
def test_plot_attention_grid_accepts_every_layout(shape, tmp_path):
    png = tmp_path / "grid.png"
    plot_attention_grid(_causal_maps(*shape), list("ab c\n"), png, title="t")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_attention_grid_takes_a_models_tensor(tmp_path):
    model_cfg = ModelConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=16)
    from chargpt.model import GPT

    torch.manual_seed(0)
    maps = GPT(model_cfg).attention_maps(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    plot_attention_grid(maps, list("abcdef"), tmp_path / "m.png")
    assert (tmp_path / "m.png").exists()


@pytest.mark.parametrize(
    ("shape", "labels", "match"),
    [
        ((2, 2, 3, 5, 5), 5, "one"),  # two sequences
        ((2, 3, 5, 4), 5, "square"),
        ((5,), 5, "dimensions"),
        ((1, 1, 1, 1, 1, 1), 1, "dimensions"),
        ((2, 3, 5, 5), 4, "4 token labels"),
    ],
)
def test_plot_attention_grid_rejects_bad_shapes(shape, labels, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        plot_attention_grid(np.zeros(shape), ["x"] * labels, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_attention_labels_make_whitespace_visible():
    assert [attention_label(c) for c in "a \n"] == ["a", "\u2423", "\u21b5"]


def test_an_interrupted_rung_stops_the_ladder(tmp_path, monkeypatch):
    from chargpt.trainer import Trainer

    original = Trainer.run

    def interrupted_run(self, stop_at_step=None, time_limit=None):
        result = original(self, stop_at_step=3)
        result.interrupted_by = 2  # as if Ctrl-C arrived during step 3
        return result

    monkeypatch.setattr(Trainer, "run", interrupted_run)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare(20_000), encoding="utf-8")
    results = ladder.run_ladder(ladder.parse_steps("bigram,one-head"), tmp_path / "out",
                                input=corpus, max_steps=50, log=lambda s: None)
    assert [r.name for r in results] == ["bigram"]
    assert results[0].status == "interrupted at step 3"
    assert "interrupted at step 3" in (tmp_path / "out" / "ladder.csv").read_text()
    assert not (tmp_path / "out" / "one-head").exists()
