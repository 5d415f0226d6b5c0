"""The run directory: every path of a run known in one place, the metrics file, and turning
what a user typed into a verified checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config

from chargpt.config.schema import Config, apply_overrides
from chargpt.errors import CheckpointError, ConfigError
from chargpt.runs.rundir import CHECKPOINTS, RunDir, find_checkpoint
from chargpt.training.launch import train


def test_layout(tmp_path):
    run = RunDir(tmp_path / "run")
    assert (run.config_file.name, run.metrics_file.name, run.plot_file.name) == \
        ("config.json", "metrics.jsonl", "loss_curve.png")
    assert [run.checkpoint(n).name for n in CHECKPOINTS] == ["best", "last"]
    own = Config()
    assert run.data_dir(own) == tmp_path / "run" / "data"
    elsewhere = apply_overrides(own, {"data": {"data_dir": "/data/x"}}, "test")
    assert run.data_dir(elsewhere) == Path("/data/x")
    assert RunDir.default().path.parent == Path("runs")


def test_a_run_is_created_once(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.holds_run()
    run.create()
    run.write_config(Config())
    assert run.holds_run() and run.read_config() == Config()
    with pytest.raises(ConfigError, match="already holds a run"):
        run.create()
    run.forget()
    assert not run.holds_run()
    with pytest.raises(CheckpointError, match="config.json missing"):
        run.read_config()
    with pytest.raises(CheckpointError, match="does not exist"):
        RunDir(tmp_path / "nope").read_config()


def test_metrics_rows_survive_torn_lines_and_can_be_cut_back(tmp_path):
    run = RunDir(tmp_path)
    for step in (5, 10, 15):
        run.append_metrics({"kind": "train", "step": step, "loss": 1.0})
    with open(run.metrics_file, "ab") as f:
        f.write(b'{"kind": "train", "st')  # a kill in the middle of a line
    assert [r["step"] for r in run.read_metrics()] == [5, 10, 15]
    run.truncate_metrics(10)
    assert [json.loads(line)["step"] for line in run.metrics_file.read_text().splitlines()] \
        == [5, 10]


def test_find_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=4, eval_interval=2), quiet=True)
    assert find_checkpoint(out).path == out / "best"
    assert find_checkpoint(out, "last").path == out / "last"
    assert find_checkpoint(out / "last").path == out / "last"  # a checkpoint directory itself
    shutil.rmtree(out / "best")
    assert find_checkpoint(out).path == out / "last"  # a run without best uses last
    with pytest.raises(ConfigError, match="best, last"):
        find_checkpoint(out, "first")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path)
