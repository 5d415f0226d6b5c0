"""Tests for training to a time budget: durations, the plan's arithmetic, and a planned run
checked against a plain run of the planned length (same weights) and against its own resume."""

from __future__ import annotations

import json

import pytest
from conftest import one_line_error, same_weights, tiny_config, tiny_flags

from chargpt.budget import CALIBRATION_STEPS, MARGIN, Calibration, parse_duration, plan_steps
from chargpt.cli import main
from chargpt.config import resolve_config
from chargpt.errors import ConfigError
from chargpt.launch import train


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200),
                                           ("1.5h", 5400), ("45", 45), (" 3m ", 180)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "0s", "-3m", "10d", "m", "1e3s", "nan"])
def test_bad_durations_are_config_errors(text):
    with pytest.raises(ConfigError, match="time budget"):
        parse_duration(text)


def test_time_budget_is_checked_when_the_config_is_made():
    with pytest.raises(ConfigError, match="time budget"):
        resolve_config(overrides={"train": {"time_budget": "soon"}})
    with pytest.raises(ConfigError, match="warmup_steps >= 3"):
        resolve_config(overrides={"train": {"time_budget": "30s", "warmup_steps": 1}})
    # a constant schedule does not depend on the run's length: no warmup needed
    cfg = resolve_config(overrides={"train": {"time_budget": "30s", "warmup_steps": 0,
                                              "schedule": "constant"}})
    assert Calibration.of(cfg.train).steps == 10


def test_cli_bad_time_is_one_line(capsys, tmp_path):
    code = main(["train", "--time", "ten minutes", "--out", str(tmp_path / "r")])
    assert "time budget must be a positive duration" in one_line_error(capsys, code)
    assert not (tmp_path / "r").exists()


def test_plan_fits_steps_evaluations_and_the_final_checkpoint():
    plan = plan_steps(budget=100.0, elapsed=10.0, step=10, step_seconds=0.05,
                      eval_seconds=2.0, eval_interval=250)
    more = plan.steps - 10
    spent = more * 0.05 + plan.evals * 2.0
    assert spent <= 90.0 * (1 - MARGIN) + 1e-9
    assert spent + 0.05 + 2.0 > 90.0 * (1 - MARGIN)  # and not much less: one more step overruns
    assert plan.evals == plan.steps // 250 + (plan.steps % 250 != 0)
    assert "steps planned" in plan.describe()
    late = plan_steps(budget=10.0, elapsed=12.0, step=10, step_seconds=0.05, eval_seconds=2.0,
                      eval_interval=250)
    assert late.steps == 11  # spent already: one step, so the run still ends with a model


@pytest.fixture
def fixed_step_time(monkeypatch):
    """Every timed step is said to take 0.1 s, so a 6 s budget plans a few dozen steps."""
    monkeypatch.setattr(Calibration, "step_seconds", lambda self: 0.1)


def test_a_planned_run_is_a_plain_run_of_the_planned_length(corpus, tmp_path, capsys,
                                                            fixed_step_time):
    budget = tiny_config(corpus, tmp_path / "budget", time_budget="6s", max_steps=1000,
                         eval_interval=20)
    result = train(budget)
    saved = json.loads((tmp_path / "budget" / "config.json").read_text())["train"]
    planned = saved["planned_steps"]
    # the timed steps really take less than the 0.1 s said, so the plan can pass 60 steps, but
    # never the timed steps plus 6 s of 0.1 s steps
    assert 10 < planned <= CALIBRATION_STEPS + 60
    assert saved["max_steps"] == planned == result.step
    assert saved["time_budget"] == "6s"
    assert f"{planned} steps planned" in capsys.readouterr().out
    # the timed steps are warmup steps, whose rates do not depend on the run's length
    plain = train(tiny_config(corpus, tmp_path / "plain", max_steps=planned, eval_interval=20))
    assert plain.step == planned
    assert same_weights(tmp_path / "budget", tmp_path / "plain")


def test_a_resumed_budget_run_keeps_its_plan(corpus, tmp_path, capsys, fixed_step_time):
    cfg = tiny_config(corpus, tmp_path / "run", time_budget="6s", max_steps=1000,
                      eval_interval=20)
    first = train(cfg, stop_at_step=15)
    planned = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["max_steps"]
    assert first.step == 15 < planned
    capsys.readouterr()
    resumed = train(resume=tmp_path / "run")
    assert resumed.step == planned
    assert "planned" not in capsys.readouterr().out
    plain = train(tiny_config(corpus, tmp_path / "plain", max_steps=planned, eval_interval=20))
    assert same_weights(tmp_path / "run", tmp_path / "plain")
    assert plain.step == planned
    with pytest.raises(ConfigError, match="keeps them"):
        train(resume=tmp_path / "run", overrides={"train": {"time_budget": "1h"}})


def test_cli_time_flag_plans_and_auto_resume_keeps_the_plan(corpus, tmp_path, capsys,
                                                            fixed_step_time):
    out = tmp_path / "run"
    flags = [*tiny_flags(max_steps=1000, eval_interval=20, sample_chars=0), "--time", "6s",
             "--input", str(corpus), "--out", str(out)]
    assert main(["train", *flags]) == 0
    planned = json.loads((out / "config.json").read_text())["train"]["planned_steps"]
    assert f"{planned} steps planned" in capsys.readouterr().out
    # the same command again continues the finished run instead of planning anew
    assert main(["train", *flags, "--auto-resume"]) == 0
    assert f"done: {planned} steps" in capsys.readouterr().out
