"""The plateau rule (training/plateau.py): a run whose val loss stops improving ends early, a WSD
run after a short cooldown begun at once, keeping every rate it used; the end is logged and
recorded in config.json, a resumed run ends where the uninterrupted one does, and patience 0
trains exactly as a run without the rule."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
from conftest import corpus_text, ctrl_c_after, metrics, same_weights, tiny_config, write

from chargpt.config.resolve import resolve_config
from chargpt.training.launch import train
from chargpt.training.optim import lr_at
from chargpt.training.plateau import MARGIN, counted, end_early, final_word


def schedule(name: str = "wsd", **train):
    return resolve_config(overrides={"train": {
        "schedule": name, "cooldown_frac": 0.5, "warmup_steps": 5, "max_steps": 200,
        "patience": 2, **train}}).train


def rates(train, upto: int) -> list[float]:
    return [lr_at(s, train) for s in range(upto + 1)]


# --- the rule ---------------------------------------------------------------------------------


def test_only_a_clear_improvement_starts_the_count_again():
    assert counted(3, 2.5, math.inf) == 0  # the first evaluation
    assert counted(0, 1.80, 1.90) == 0
    assert counted(0, 1.90 * (1 - MARGIN / 2), 1.90) == 1  # better, but within the margin
    assert counted(1, 1.95, 1.90) == 2


def test_a_stalled_wsd_run_cools_down_from_the_plateau_keeping_every_rate_it_used():
    train = schedule()
    assert end_early(train, 60, 1, 2.0, 1.9) is None  # patience not yet run out
    new, line = end_early(train, 60, 2, 2.0, 1.9)
    assert new.max_steps == new.planned_steps == 72  # a fifth of the 60 steps taken
    assert new.plateau_step == 60 and new.cooldown_plan == "60:72"
    assert rates(new, 60) == rates(train, 60) and lr_at(60, new) == train.lr
    cooldown = [lr_at(s, new) for s in range(60, 73)]
    assert all(b < a for a, b in zip(cooldown, cooldown[1:], strict=False))
    assert cooldown[-1] == train.min_lr
    assert line.startswith("plateau at step 60: val loss 2.0000; 2 evaluation(s) in a row have "
                           "not beaten the best, 1.9000") and "step 72 instead of 200" in line
    assert end_early(new, 70, 5, 2.1, 1.9) is None  # the end is chosen once


def test_a_plateau_inside_the_cooldown_shortens_it_from_where_its_rate_is():
    train = schedule()  # the cooldown runs from step 100 to 200
    new, _ = end_early(train, 150, 2, 2.0, 1.9)
    assert (new.max_steps, new.cooldown_plan) == (180, "100:200,150:180")
    assert rates(new, 150) == rates(train, 150)
    assert lr_at(180, new) == train.min_lr < lr_at(179, new) < lr_at(150, new)
    late, line = end_early(train, 190, 2, 2.0, 1.9)  # its own end comes sooner than a fifth
    assert (late.max_steps, late.cooldown_plan, late.plateau_step) == (200, "", 190)
    assert line.endswith("the run's own end, step 200, comes as soon, so it stands")


@pytest.mark.parametrize("name", ["cosine", "constant"])
def test_other_schedules_stop_at_once_keeping_every_rate_they_used(name):
    train = schedule(name)
    new, line = end_early(train, 60, 2, 2.0, 1.9)
    assert new.max_steps == new.planned_steps == new.plateau_step == 60
    assert rates(new, 60) == rates(train, 60)
    assert "stops here instead of at step 200" in line


def test_no_plateau_inside_the_warmup_nor_at_the_last_step_nor_without_patience():
    assert end_early(schedule(warmup_steps=50), 40, 5, 2.0, 1.9) is None
    assert end_early(schedule(), 200, 5, 2.0, 1.9) is None
    assert end_early(schedule(patience=0), 60, 50, 2.0, 1.9) is None


def test_the_final_word_speaks_only_of_a_clearly_worse_end():
    assert final_word(1.9, 1.9) is None and final_word(1.9 * (1 + MARGIN / 2), 1.9) is None
    said = final_word(1.95, 1.90)
    assert said is not None and "1.9500, is 2.6% above the best, 1.9000" in said


# --- runs on a corpus small enough to learn by heart ------------------------------------------

# A model wide enough to learn a few KB by heart within a hundred steps or two, with the fast
# recipe's optimizer and schedule (the default's): its val loss stalls by step ~100 (~150 on
# the stand-in text used where Tiny Shakespeare is missing).
OVERFIT_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}
OVERFIT_TRAIN = {"max_steps": 400, "eval_interval": 10, "eval_iters": 4, "log_interval": 10,
                 "warmup_steps": 10, "optimizer": "muon", "lr": 3e-3, "min_lr": 1e-4,
                 "schedule": "wsd", "cooldown_frac": 0.5, "batch_size": 8, "patience": 3,
                 # the same run on every CPU: 'auto' is bfloat16 on some, and there the
                 # stand-in corpus's plateau came after the schedule's own cooldown began
                 "dtype": "float32"}


def overfit(corpus, out, **train):
    return tiny_config(corpus, out, OVERFIT_MODEL, **{**OVERFIT_TRAIN, **train})


def evals_of(run):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in metrics(run, "eval")]


def settings(run):
    saved = json.loads((run / "config.json").read_text())["train"]
    return {k: v for k, v in saved.items() if k != "out_dir"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4,000 characters of Tiny Shakespeare (or its stand-in): 3,600 to learn by heart."""
    return write(tmp_path_factory.mktemp("small") / "small.txt", corpus_text(4000))


@pytest.fixture(scope="module")
def ended(small, tmp_path_factory):
    """(run directory, result, what it printed) of a run with patience 3 on `small`."""
    out = tmp_path_factory.mktemp("ended") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(overfit(small, out))
    return out, result, printed.getvalue()


def test_a_run_that_overfits_ends_early_says_why_and_records_the_end(ended):
    out, result, printed = ended
    saved = settings(out)
    assert 0 < saved["plateau_step"] < result.step == saved["max_steps"] < 400
    assert saved["planned_steps"] == result.step
    assert saved["cooldown_plan"] == f"{saved['plateau_step']}:{result.step}"
    lines = [s for s in printed.splitlines() if s.startswith("plateau at step")]
    assert len(lines) == 1 and f"step {result.step} instead of 400" in lines[0]
    evals = metrics(out, "eval")
    assert evals[-1]["step"] == result.step  # the end is evaluated
    best = min(r["val_loss"] for r in evals)
    assert result.best_val_loss == best
    assert evals[-1]["val_loss"] <= best + 0.05  # the short cooldown ends near the best
    best_state = json.loads((out / "best" / "state.json").read_text())
    assert best_state["val_loss"] == best
    said = final_word(evals[-1]["val_loss"], best)
    assert said is None or said in printed


@pytest.mark.parametrize("when", ["before the plateau", "in the cooldown"])
def test_an_early_ending_run_resumed_is_bit_identical(small, ended, tmp_path, when):
    ref, done, _ = ended
    plateau = settings(ref)["plateau_step"]
    stop_at = plateau // 2 if when == "before the plateau" else (plateau + done.step) // 2
    assert 0 < stop_at < done.step and stop_at != plateau
    split = tmp_path / "split"
    with ctrl_c_after(stop_at):
        first = train(overfit(small, split), quiet=True)
    assert first.step == stop_at
    second = train(resume=split, quiet=True)
    assert second.step == done.step
    assert same_weights(ref, split) and same_weights(ref, split, "best")
    assert evals_of(ref) == evals_of(split)
    assert settings(ref) == settings(split)


def test_patience_zero_trains_exactly_as_a_run_without_the_rule(small, tmp_path, capsys):
    off, never = tmp_path / "off", tmp_path / "never"
    result = train(overfit(small, off, patience=0, max_steps=150))
    printed = capsys.readouterr().out
    train(overfit(small, never, patience=10**6, max_steps=150), quiet=True)
    assert result.step == 150 and "plateau" not in printed
    assert same_weights(off, never) and same_weights(off, never, "best")
    assert evals_of(off) == evals_of(never)
    saved = settings(off)
    assert (saved["plateau_step"], saved["planned_steps"], saved["cooldown_plan"]) == (0, 0, "")
    said = final_word(metrics(off, "eval")[-1]["val_loss"], result.best_val_loss)
    assert said is None or said in printed  # a worse end is never silent


def test_a_budget_run_that_stalls_ends_early_and_plans_no_more(small, tmp_path, capsys,
                                                               monkeypatch):
    """Steps said to take 0.1 s and every evaluation 0.01 s a batch (+0.1 s for its checkpoints
    and plot): a 60 s budget plans ~550 steps, an evaluation every 28; the plateau ends the run
    well before, and the budget's plans leave it there."""
    from chargpt.training.budget import Planner, StepClock
    from chargpt.training.trainer import Trainer

    rehearse = Trainer._rehearse_evaluation
    monkeypatch.setattr(Trainer, "_rehearse_evaluation",
                        lambda self: (rehearse(self), 0.01, 0.1)[1:])
    monkeypatch.setattr(Planner, "evaluated",
                        lambda self, *measured: setattr(self, "eval_cost", (0.01, 0.1)))
    monkeypatch.setattr(StepClock, "step_seconds", lambda self: 0.1)
    monkeypatch.setattr(Trainer, "elapsed", lambda self: 0.1 * self.step)
    out = tmp_path / "run"
    result = train(overfit(small, out, time_budget="60s", max_steps=10**5))
    printed = capsys.readouterr().out
    planned = int(printed.split(" steps planned")[0].split()[-1])
    saved = settings(out)
    assert 0 < saved["plateau_step"] < result.step == saved["max_steps"] == \
        saved["planned_steps"] < planned
    assert "plan revised" not in printed.split("plateau at step")[1]
