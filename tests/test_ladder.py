"""The ladder end to end on a small budget, its rung definitions and recipes, the report, and
attention plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_text, ctrl_c_after, one_line_error

from chargpt.cli.commands import main
from chargpt.config.schema import ModelConfig
from chargpt.errors import ConfigError
from chargpt.ladder import rungs as ladder
from chargpt.ladder.report import format_json, format_markdown, write_report
from chargpt.ladder.results import RungResult, SeedResult
from chargpt.ladder.runner import run_ladder
from chargpt.plots import attention_label, plot_attention_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# At 400 steps of 32 the LayerNorm rung is well ahead of the bigram on Shakespeare (measured),
# far more than seed-to-seed noise, while the rungs train in seconds.
SMALL_BUDGET = ["--max-steps", "400", "--batch-size", "32", "--evals", "3", "--seeds", "2"]
# Past the lecture the models are 20 times larger: a few steps show the report's shape.
TINY_BUDGET = ["--max-steps", "15", "--evals", "1", "--seeds", "1"]


@pytest.fixture(scope="module")
def ladder_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ladder")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(300_000), encoding="utf-8")
    out = root / "out"
    # Models this small gain nothing from a second thread, and on a busy machine the threads'
    # synchronisation can make each step several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["ladder", "--rungs", "layernorm,bigram", *SMALL_BUDGET,
                     "--input", str(corpus), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "ladder.csv", encoding="utf-8", newline="") as f:
        return {row["rung"]: row for row in csv.DictReader(f)}


def run_dir(out: Path, rung: str, seed: int = 1337) -> Path:
    return out / rung / f"seed-{seed}"


def test_ladder_writes_tables_curves_and_samples(ladder_out):
    for name in ("ladder.md", "ladder.csv", "ladder.json", "samples.md"):
        assert (ladder_out / name).stat().st_size > 0
    assert (ladder_out / "ladder.png").read_bytes()[:8] == PNG_MAGIC
    rows = read_rows(ladder_out)
    assert list(rows) == ["bigram", "layernorm"]  # ladder order, not the order asked
    table = (ladder_out / "ladder.md").read_text(encoding="utf-8")
    assert "## The lecture" in table and "## Past the lecture" not in table
    assert "| layernorm |" in table and "2.06 (commit)" in table and "2.059" in table
    assert "Budget overridden: 400 steps for every rung" in table
    samples = (ladder_out / "samples.md").read_text(encoding="utf-8")
    assert "### bigram" in samples and "### layernorm" in samples
    for name in rows:
        row = rows[name]
        assert row["status"] == "done" and row["seeds"] == "2" and row["steps"] == "400"
        for seed in (1337, 1338):
            assert (run_dir(ladder_out, name, seed) / "metrics.jsonl").exists()
        val, bpc = float(row["val_loss"]), float(row["bits_per_char"])
        assert math.isclose(bpc, val / math.log(2), rel_tol=1e-3)
    doc = json.loads((ladder_out / "ladder.json").read_text(encoding="utf-8"))
    layernorm = next(r for r in doc["rungs"] if r["rung"] == "layernorm")
    seeds = [run["val_loss"] for run in layernorm["runs"]]
    assert len(seeds) == 2 and seeds[0] != seeds[1]  # two seeds, two different runs
    assert layernorm["val_loss"] == pytest.approx(sum(seeds) / 2)


def test_rungs_past_the_lecture_get_their_own_table(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(100_000), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["ladder", "--rungs", "laptop,gpt2", *TINY_BUDGET, "--input", str(corpus),
                     "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    table = (tmp_path / "out" / "ladder.md").read_text(encoding="utf-8")
    assert "## Past the lecture" in table and "## The lecture" not in table
    rows = read_rows(tmp_path / "out")
    delta = float(rows["gpt2"]["val_loss"]) - float(rows["laptop"]["val_loss"])
    assert f"{delta:+.4f} (laptop)" in table
    assert (tmp_path / "out" / "ladder_modern.png").read_bytes()[:8] == PNG_MAGIC


def test_the_bigram_context_and_its_measures(ladder_out):
    rows = read_rows(ladder_out)
    # a bigram sees one character whatever the window: both measures agree exactly
    assert rows["bigram"]["val_loss"] == rows["bigram"]["val_loss_tiled"]
    # attention models predict better with more history: the full-context number is lower
    assert float(rows["layernorm"]["val_loss"]) < float(rows["layernorm"]["val_loss_tiled"])


def test_attention_beats_the_bigram_on_the_whole_val_split(ladder_out):
    rows = read_rows(ladder_out)
    assert float(rows["layernorm"]["val_loss"]) < float(rows["bigram"]["val_loss"]) - 0.05


def test_ladder_refuses_to_overwrite_runs(ladder_out, capsys):
    code = main(["ladder", "--rungs", "bigram", "--max-steps", "5", "--out", str(ladder_out)])
    assert "already holds ladder runs (bigram)" in one_line_error(capsys, code)


def test_list_prints_every_rung_with_its_size(capsys):
    assert main(["ladder", "--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(lines) == list(ladder.RUNG_NAMES)
    assert "4,225" in lines["bigram"]  # a 65 x 65 table
    assert "10,788,929" in lines["scaled-up"]  # the lecture's "10.788929 M parameters"


@pytest.mark.parametrize("spec", ["bigram,nope", "transformer", " , "])
def test_bad_rung_names_are_one_line_errors(spec, tmp_path, capsys):
    code = main(["ladder", "--rungs", spec, "--max-steps", "5", "--out", str(tmp_path / "o")])
    line = one_line_error(capsys, code)
    assert "bigram" in line  # the message lists the available rungs
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--seconds", "-1"], "--seconds must be a finite number > 0"),
    (["--evals", "0"], "--evals must be >= 1"),
])
def test_bad_budgets_are_one_line_errors(args, message, tmp_path, capsys):
    code = main(["ladder", "--rungs", "bigram", *args, "--out", str(tmp_path / "o")])
    assert message in one_line_error(capsys, code)
    assert not (tmp_path / "o").exists()


def test_budget_flags_exclude_each_other(tmp_path, capsys):
    code = main(["ladder", "--max-steps", "5", "--seconds", "3", "--out", str(tmp_path)])
    one_line_error(capsys, code, expected_code=2)
    code = main(["ladder", "--recipe", "nope", "--out", str(tmp_path)])
    one_line_error(capsys, code, expected_code=2)


def test_parse_rungs_keeps_ladder_order_and_knows_the_parts():
    names = [r.name for r in ladder.parse_rungs("residual, bigram,residual")]
    assert names == ["bigram", "residual"]
    assert len(ladder.parse_rungs("all")) == len(ladder.RUNGS)
    lecture = [r.name for r in ladder.parse_rungs("lecture")]
    assert lecture[0] == "bigram" and lecture[-1] == "scaled-up"
    modern = ladder.parse_rungs("modern")
    assert modern[0].name == "laptop" and {r.part for r in modern} == {"modern"}
    with pytest.raises(ConfigError):
        ladder.parse_rungs("Bigram")


def configs(recipe: str, **budget) -> dict[str, object]:
    b = ladder.Budget(recipe=recipe, **budget)
    return {r.name: ladder.rung_config(r, b) for r in ladder.RUNGS}


def test_the_lecture_recipe_uses_the_lectures_hyperparameters():
    cfgs = configs("lecture", cuda=True)
    bigram, head = cfgs["bigram"].train, cfgs["one-head"].train
    assert (bigram.lr, bigram.max_steps, bigram.batch_size) == (1e-2, 3000, 32)
    assert (head.lr, head.max_steps, head.batch_size, head.schedule) == (
        1e-3, 5000, 32, "constant")
    # AdamW as PyTorch defines it, no warmup, no clipping: the lecture's optimizer
    assert (head.weight_decay, head.beta1, head.beta2, head.grad_clip, head.warmup_steps) == (
        0.01, 0.9, 0.999, 0.0, 0)
    big = cfgs["scaled-up"]
    assert (big.train.lr, big.train.batch_size, big.train.max_steps) == (3e-4, 64, 5000)
    m = big.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (6, 6, 384, 256, 0.2)
    one = cfgs["one-head"].model
    assert (one.init, one.attn_proj, one.mlp, one.qkv_bias, one.head_bias, one.attn_scale) == (
        "torch", False, False, False, True, "embd")
    ff = cfgs["feed-forward"].model
    assert ff.mlp and not ff.mlp_proj and ff.mlp_ratio == 1 and ff.activation == "relu"
    res = cfgs["residual"].model
    assert res.residual and res.attn_proj and res.mlp_proj and res.mlp_ratio == 4
    assert res.norm == "none" and cfgs["layernorm"].model.norm == "pre"


def test_the_fair_recipe_trains_every_lecture_rung_alike():
    cfgs = configs("fair", cuda=True)
    lecture = [r.name for r in ladder.RUNGS if r.part == "lecture"]
    budgets = {(c.train.max_steps, c.train.batch_size, c.train.schedule, c.train.seed,
                c.train.warmup_steps, c.train.grad_clip)
               for n, c in cfgs.items() if n in lecture}
    assert budgets == {(5000, 32, "cosine", 1337, 100, 1.0)}
    # the one stated exception: a lookup table needs a higher rate
    assert {cfgs[n].train.lr for n in lecture} == {1e-2, 1e-3}
    assert cfgs["bigram"].train.lr == 1e-2


def test_rungs_past_the_lecture_are_one_idea_each_and_recipe_independent():
    lecture, fair = configs("lecture"), configs("fair")
    modern = [r for r in ladder.RUNGS if r.part == "modern"]
    for r in modern:
        assert lecture[r.name] == fair[r.name]
    assert {(lecture[r.name].train.max_steps, lecture[r.name].train.batch_size)
            for r in modern} == {(2000, 16)}
    last = lecture["softcap"]
    assert (last.model.pos_emb, last.model.norm_type, last.model.activation) == (
        "rope", "rmsnorm", "relu2")
    assert last.model.qk_norm and last.model.zero_init_proj and last.model.value_embeds
    assert not last.model.bias and not last.model.tie_weights
    assert (last.train.optimizer, last.train.schedule) == ("muon", "wsd")
    for r in modern[1:]:  # each rung differs from its parent in its own switches only
        parent, child = lecture[r.parent], lecture[r.name]
        changed = {f"{sec}.{k}" for sec in ("model", "train")
                   for k, v in vars(getattr(child, sec)).items()
                   if getattr(getattr(parent, sec), k) != v}
        declared = {f"{sec}.{k}" for sec, vals in r.changes.items() for k in vals}
        assert changed and changed <= declared, r.name


def test_the_scaled_up_rung_is_cut_short_only_on_a_cpu():
    rung = ladder.get_rung("scaled-up")
    cpu, gpu = ladder.Budget(cuda=False), ladder.Budget(cuda=True)
    assert cpu.reduced(rung) and not gpu.reduced(rung)
    assert ladder.rung_config(rung, cpu).train.max_steps == rung.cpu_max_steps
    assert ladder.rung_config(rung, gpu).train.max_steps == 5000
    assert cpu.seeds_for(rung) == [1337] and gpu.seeds_for(rung) == [1337, 1338, 1339]
    mine = ladder.Budget(cuda=False, max_steps=7)
    assert not mine.reduced(rung) and ladder.rung_config(rung, mine).train.max_steps == 7
    assert ladder.Budget().seeds_for(ladder.get_rung("laptop")) == [1337]


def test_every_rung_builds_one_of_the_two_model_classes():
    cfgs = configs("lecture")
    assert cfgs["bigram"].model.arch == "bigram"
    assert {c.model.arch for n, c in cfgs.items() if n != "bigram"} == {"gpt"}
    assert all(isinstance(c.model, ModelConfig) for c in cfgs.values())


def test_seconds_budget_stops_on_time(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(50_000), encoding="utf-8")
    budget = ladder.Budget(seconds=1.5, seeds=1, sample_chars=20)
    (r,) = run_ladder(ladder.parse_rungs("bigram"), tmp_path / "out", budget, input=corpus,
                      log=lambda s: None)
    assert r.ran and 0 < r.runs[0].steps < ladder.SECONDS_MODE_MAX_STEPS
    assert r.runs[0].seconds < 15 and math.isfinite(r.mean("val_loss"))
    assert len(r.sample) == 20


def test_json_report_turns_unmeasured_numbers_into_null_and_leaves_text_alone(tmp_path):
    rung = ladder.get_rung("one-head")
    done = RungResult(rung, 7553, runs=[SeedResult(1, 10, 1.0, 2.5, 2.4, 2.45, "x")],
                      sample="NaN and Infinity are words here")
    skipped = RungResult(ladder.get_rung("blocks"), 16865, status="interrupted (seed 1)")
    doc = json.loads(format_json([done, skipped], ladder.Budget()))
    assert doc["rungs"][0]["sample"] == "NaN and Infinity are words here"
    assert doc["rungs"][1]["val_loss"] is None and doc["rungs"][1]["runs"] == []
    assert doc["budget"]["seconds"] is None
    write_report([done, skipped], tmp_path, budget=ladder.Budget(), source="x")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ladder.csv", "ladder.json", "ladder.md", "ladder.png", "samples.md"]


def test_the_report_says_which_rung_was_cut_short_and_why(tmp_path):
    run = [SeedResult(1337, 40, 900.0, 2.57, 2.57, 2.57, "x")]
    scaled = RungResult(ladder.get_rung("scaled-up"), 10_788_929, runs=run, reduced=True)
    full = RungResult(ladder.get_rung("scaled-up"), 10_788_929, runs=run)
    bigram = RungResult(ladder.get_rung("bigram"), 4225, runs=run)
    text = format_markdown([bigram, scaled], ladder.Budget(), "x")
    assert "40 (reduced)" in text and f"- scaled-up: {scaled.rung.note}" in text
    assert f"- bigram: {bigram.rung.note}" in text  # the recipe exception is said too
    assert "scaled-up:" not in format_markdown([full], ladder.Budget(cuda=True), "x")


def test_an_interrupted_rung_stops_the_ladder(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(20_000), encoding="utf-8")
    with ctrl_c_after(3):  # during the first rung
        results = run_ladder(ladder.parse_rungs("bigram,one-head"), tmp_path / "out",
                             ladder.Budget(max_steps=50), input=corpus, log=lambda s: None)
    assert [r.rung.name for r in results] == ["bigram"]
    assert results[0].status == "interrupted (seed 1337)"
    assert "interrupted (seed 1337)" in (tmp_path / "out" / "ladder.csv").read_text()
    assert not (tmp_path / "out" / "one-head").exists()


# --- attention ----------------------------------------------------------------------------------


def test_attention_command_writes_a_png(ladder_out, tmp_path, capsys):
    png = tmp_path / "att.png"
    assert main(["attention", str(run_dir(ladder_out, "layernorm")), "--prompt", "ROMEO: o",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "3 layers x 4 heads over 8 characters" in capsys.readouterr().out


def test_attention_command_crops_a_long_prompt(ladder_out, tmp_path, capsys):
    png = tmp_path / "long.png"
    assert main(["attention", str(run_dir(ladder_out, "layernorm")), "--prompt",
                 "ROMEO: what light", "--out", str(png)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("chargpt: warning: the prompt has 17 characters; drawing its last 8 "
                            "(the model's block_size)\n")
    assert "over 8 characters" in captured.out


def test_attention_command_errors(ladder_out, tmp_path, capsys):
    png = str(tmp_path / "x.png")
    code = main(["attention", str(run_dir(ladder_out, "bigram")), "--prompt", "ROMEO",
                 "--out", png])
    assert "no attention" in one_line_error(capsys, code)
    code = main(["attention", str(run_dir(ladder_out, "layernorm")), "--prompt", "\u00e9t\u00e9",
                 "--out", png])
    one_line_error(capsys, code)
    code = main(["attention", str(run_dir(ladder_out, "layernorm")), "--prompt", "", "--out", png])
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
    from chargpt.model.gpt import GPT

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
    with pytest.raises(ConfigError, match=match):
        plot_attention_grid(np.zeros(shape), ["x"] * labels, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_attention_labels_make_whitespace_visible():
    assert [attention_label(c) for c in "a \n"] == ["a", "\u2423", "\u21b5"]
