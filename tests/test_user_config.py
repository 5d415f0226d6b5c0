"""What a user's config file and flags may set: a time budget plans the step count, so it is
never given beside --max-steps, and a step cap is more than the steps timed before the first
plan; the fields a run sets itself (INTERNAL_FIELDS) are refused in a config file, never
silently replaced."""

from __future__ import annotations

import pytest
from conftest import corpus_text, one_line_error, tiny_flags

from chargpt.cli.commands import main


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(20_000), encoding="utf-8")
    return path


def test_a_time_budget_and_max_steps_together_are_refused(tmp_path, corpus, capsys):
    base = ["train", "--input", str(corpus), "--out", str(tmp_path / "run"),
            *tiny_flags(sample_chars=0)]  # tiny_flags gives --max-steps
    line = one_line_error(capsys, main([*base, "--time", "3s"]))
    assert "max_steps and the time budget (3s) both set the run's length" in line
    assert "--step-cap N caps" in line
    toml = tmp_path / "steps.toml"
    toml.write_text("[train]\nmax_steps = 5\n", encoding="utf-8")
    code = main(["train", "--config", str(toml), "--time", "3s", "--input", str(corpus),
                 "--out", str(tmp_path / "run")])
    assert f"{toml}: max_steps and the time budget" in one_line_error(capsys, code)
    assert not (tmp_path / "run").exists()


def test_a_step_cap_the_first_plan_would_pass_is_refused(tmp_path, corpus, capsys):
    code = main(["train", "--input", str(corpus), "--out", str(tmp_path / "run"),
                 "--time", "3s", "--step-cap", "5", "--n-layer", "1"])
    line = one_line_error(capsys, code)
    assert "step_cap 5 is not more than the 10 steps a time budget times" in line


# --- what a config file may set ---------------------------------------------------------------


@pytest.mark.parametrize("table, key", [("model", "vocab_size"), ("train", "planned_steps"),
                                        ("train", "plateau_step"), ("train", "size_choice"),
                                        ("train", "cooldown_plan")])
def test_a_config_file_may_not_set_what_the_run_sets(tmp_path, corpus, capsys, table, key):
    toml = tmp_path / "c.toml"
    value = '"x"' if key == "size_choice" else '"10:20"' if key == "cooldown_plan" else "5"
    toml.write_text(f"[{table}]\n{key} = {value}\n", encoding="utf-8")
    code = main(["train", "--config", str(toml), "--input", str(corpus),
                 "--out", str(tmp_path / "run")])
    line = one_line_error(capsys, code)
    assert f"{toml}: {table}.{key} is set by the run itself, not by hand" in line
