"""Tests for training to a time budget: durations, the plan's arithmetic, and a planned run
checked against a plain run of the planned length (same weights) and against its own resume."""

from __future__ import annotations

import json
import re

import pytest
from conftest import cli, ctrl_c_after, one_line_error, same_weights, tiny_config, tiny_flags

import chargpt.training.budget as budget_module
from chargpt.cli.commands import main
from chargpt.config.resolve import resolve_config
from chargpt.config.values import parse_duration
from chargpt.errors import ConfigError
from chargpt.training.budget import (
    EVAL_SHARE,
    MARGIN,
    MIN_EVAL_ITERS,
    Plan,
    Planner,
    StepClock,
    covering_iters,
    plan_steps,
)
from chargpt.training.launch import train
from chargpt.training.trainer import Trainer


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
    assert StepClock.of(cfg.train).first_plan_after == 10


def test_cli_bad_time_is_one_line(capsys, tmp_path):
    code = main(["train", "--time", "ten minutes", "--out", str(tmp_path / "r")])
    assert "time budget must be a positive duration" in one_line_error(capsys, code)
    assert not (tmp_path / "r").exists()


def test_the_step_time_planned_with_is_the_recent_one(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: now[0])
    clock = StepClock(budget=60.0, first_plan_after=10)
    clock.tick()  # the first step only starts the clock
    for window in range(16):  # a machine that is twice as slow from the 11th window on
        for _ in range(10):
            now[0] += 0.05 if window < 10 else 0.10
            clock.tick()
        if window == 1:
            assert clock.step_seconds() == pytest.approx(0.05)  # 2 windows: the mean
        if window == 11:  # the last three windows: one fast, two slow
            assert clock.step_seconds() == pytest.approx((0.05 + 0.10 + 0.10) / 3)
    assert clock.step_seconds() == pytest.approx(0.10)  # only the slow speed is recent
    clock.exclude(5.0)  # an evaluation: not a step's time
    now[0] += 5.0 + 0.05
    clock.tick()
    assert clock.busy() == pytest.approx(100 * 0.05 + 60 * 0.10 + 0.05)


def test_plan_fits_steps_evaluations_and_the_final_checkpoint():
    plan = plan_steps(budget=100.0, elapsed=10.0, step=10, step_seconds=0.05,
                      eval_seconds=2.0, eval_iters=100, eval_interval=250)
    more = plan.steps - 10
    spent = more * 0.05 + plan.evals * 2.0
    assert spent <= 90.0 * (1 - MARGIN) + 1e-9
    assert spent + 0.05 + 2.0 > 90.0 * (1 - MARGIN)  # and not much less: one more step overruns
    i = plan.eval_interval
    assert plan.evals == plan.steps // i + (plan.steps % i != 0)
    assert plan.evals * 2.0 <= EVAL_SHARE * 100.0  # evaluations spaced to fit their share
    assert i >= 250 and plan.eval_iters == 100
    assert "steps planned" in plan.describe(9)
    late = plan_steps(budget=10.0, elapsed=12.0, step=10, step_seconds=0.05, eval_seconds=2.0,
                      eval_iters=100, eval_interval=250)
    assert late.steps == 11  # spent already: one step, so the run still ends with a model


def test_a_short_budget_shortens_and_spaces_its_evaluations():
    # one full evaluation would take 5 s of a 30 s budget: it is cut to 1.5 s (30 batches)
    plan = plan_steps(budget=30.0, elapsed=2.0, step=10, step_seconds=0.1, eval_seconds=5.0,
                      eval_iters=100, eval_interval=250)
    assert plan.eval_iters == 30 and plan.eval_seconds == pytest.approx(1.5)
    assert plan.evals == 1 and plan.eval_interval >= plan.steps  # the final one only
    assert plan.steps == 10 + int((28.0 * (1 - MARGIN) - 1.5) / (0.1 + 1.5 / plan.eval_interval))
    # never fewer than MIN_EVAL_ITERS batches, however slow an evaluation
    slow = plan_steps(budget=30.0, elapsed=2.0, step=10, step_seconds=0.1, eval_seconds=100.0,
                      eval_iters=100, eval_interval=250)
    assert slow.eval_iters == MIN_EVAL_ITERS
    # a long budget keeps full evaluations, at the configured interval when they are cheap
    long = plan_steps(budget=7200.0, elapsed=2.0, step=10, step_seconds=0.1, eval_seconds=0.5,
                      eval_iters=100, eval_interval=250)
    assert long.eval_iters == 100 and long.eval_interval == 250
    dear = plan_steps(budget=7200.0, elapsed=2.0, step=10, step_seconds=0.1, eval_seconds=5.0,
                      eval_iters=100, eval_interval=250)
    assert dear.eval_iters == 100 and dear.evals * 5.0 <= EVAL_SHARE * 7200.0 + 5.0


def test_a_revised_plan_never_changes_a_rate_already_used():
    from chargpt.training.optim import lr_at

    train = resolve_config(overrides={"train": {
        "schedule": "wsd", "cooldown_frac": 0.5, "warmup_steps": 5, "max_steps": 200}}).train
    short = plan_steps(budget=10.0, elapsed=8.0, step=80, step_seconds=0.1, eval_seconds=0.1,
                       eval_iters=100, eval_interval=250)
    assert short.steps < 160  # taken as it is, its cooldown would have started behind step 80
    new = short.apply(train, 80)
    assert new.max_steps == short.steps  # the run still ends on time: the cooldown starts now
    assert new.cooldown_plan == f"80:{short.steps}"
    assert [lr_at(s, new) for s in range(81)] == [lr_at(s, train) for s in range(81)]
    assert lr_at(81, new) < train.lr and lr_at(new.max_steps - 1, new) > train.min_lr
    assert lr_at(new.max_steps, new) == train.min_lr


def test_a_cooldown_re_aimed_again_and_again_keeps_every_rate_it_used():
    from chargpt.training.optim import lr_at

    train = resolve_config(overrides={"train": {
        "schedule": "wsd", "cooldown_frac": 0.5, "warmup_steps": 5, "max_steps": 200}}).train
    taken = [lr_at(s, train) for s in range(131)]  # the cooldown began at step 100
    for step, end in ((130, 260), (170, 230), (200, 250)):  # a slower, faster, slower machine
        train = Plan(end, 10.0, 0.1, 0.1, 1000, 10, 1, 0.0).apply(train, step)
        assert train.max_steps == end
        assert [lr_at(s, train) for s in range(step + 1)] == taken[: step + 1]
        taken = [lr_at(s, train) for s in range(end + 1)]
    assert train.cooldown_plan == "100:200,130:260,170:230,200:250"
    rates = taken[100:]
    assert all(b < a for a, b in zip(rates, rates[1:-1], strict=False))  # falls all the way
    assert taken[250] == train.min_lr


def test_the_planner_revises_the_config_and_tells_the_log_only_of_large_moves():
    train = resolve_config(overrides={"train": {"time_budget": "100s", "warmup_steps": 20}}).train
    planner = Planner.of(train, 10**6)
    assert planner is not None and Planner.of(resolve_config().train, 10**6) is None  # no budget
    planner.evaluated(per_batch=0.01, fixed=0.2, total=2.2)
    first, message = planner.revise(train, 10, 2.0, [0.1, 0.01, 0.2])
    assert first is not None and first.max_steps == first.planned_steps > 500
    assert message is not None and " steps planned (" in message
    # the same measurements again: the plan stands, nothing to log
    assert planner.revise(first, 20, 3.0, [0.1, 0.01, 0.2]) == (None, None)
    # 1% slower steps: a new step count, but too small a move to log
    small, quiet = planner.revise(first, 20, 3.0, [0.101, 0.01, 0.2])
    assert small is not None and small.max_steps != first.max_steps and quiet is None
    # 20% slower: logged
    slow, said = planner.revise(small, 30, 4.0, [0.12, 0.01, 0.2])
    assert slow.max_steps < 0.9 * first.max_steps and "plan revised to" in said


def test_a_small_val_split_is_evaluated_in_fewer_batches_and_more_often():
    """An evaluation draws at most twice the val split's tokens: on a small corpus the
    evaluations are cheaper, so the budget affords more of them, and best/ catches the val
    loss before the corpus is learnt by heart."""
    assert covering_iters(6_000, 16 * 64) == 12  # twice 6,000 tokens, in batches of 1,024
    assert covering_iters(100, 16 * 64) == MIN_EVAL_ITERS
    assert covering_iters(111_540, 16 * 64) == 218  # Tiny Shakespeare's val: the 100 stand
    train = resolve_config(overrides={"train": {"time_budget": "100s", "warmup_steps": 20}}).train
    measured = [0.01, 0.01, 0.05]  # seconds a step, an evaluation batch, its checkpoints
    large, _ = Planner.of(train, covering_iters(111_540, 1024)).revise(train, 10, 1.0, measured)
    small, _ = Planner.of(train, covering_iters(6_000, 1024)).revise(train, 10, 1.0, measured)
    assert large.eval_iters == train.eval_iters == 100 and small.eval_iters == 12
    assert small.eval_interval < large.eval_interval / 4
    assert small.max_steps > large.max_steps  # and each costs less


def fixed_rehearsal(monkeypatch) -> None:
    """An evaluation (rehearsed for real) is said to cost 0.01 s a batch and 0.1 s for its
    checkpoints and plot. (The real checkpoint and plot took over a second on a loaded
    machine, and up to 2 s, which cut a 6 s plan to 45 steps.)"""
    rehearse = Trainer._rehearse_evaluation

    def rehearsed(self):
        rehearse(self)
        return 0.01, 0.1

    monkeypatch.setattr(Trainer, "_rehearse_evaluation", rehearsed)


@pytest.fixture
def fixed_step_time(monkeypatch):
    """Every step is said to take 0.1 s, the run's clock to read 0.1 s a step taken, and an
    evaluation `fixed_rehearsal`, so a 6 s budget plans about 56 steps, and plans the same
    again when it plans again."""
    monkeypatch.setattr(StepClock, "step_seconds", lambda self: 0.1)
    monkeypatch.setattr(Trainer, "elapsed", lambda self: 0.1 * self.step)
    fixed_rehearsal(monkeypatch)


def test_a_planned_run_is_a_plain_run_of_the_planned_length(corpus, tmp_path, capsys,
                                                            fixed_step_time):
    # evaluations only at the end: their real cost would change the plan the fixture fixes
    budget = tiny_config(corpus, tmp_path / "budget", time_budget="6s", max_steps=1000,
                         eval_interval=1000)
    result = train(budget)
    saved = json.loads((tmp_path / "budget" / "config.json").read_text())["train"]
    planned = saved["planned_steps"]
    assert 50 < planned <= 60  # 6 s less the reserve, of 0.1 s steps
    assert saved["max_steps"] == planned == result.step
    assert saved["time_budget"] == "6s"
    assert " steps planned (" in capsys.readouterr().out
    # the timed steps are warmup steps, whose rates do not depend on the run's length
    plain = train(tiny_config(corpus, tmp_path / "plain", max_steps=planned, eval_interval=20))
    assert plain.step == planned
    assert same_weights(tmp_path / "budget", tmp_path / "plain")


def test_a_resumed_budget_run_keeps_its_plan(corpus, tmp_path, capsys, fixed_step_time):
    cfg = tiny_config(corpus, tmp_path / "run", time_budget="6s", max_steps=1000,
                      eval_interval=1000)
    with ctrl_c_after(15):
        first = train(cfg)
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
    flags = [*tiny_flags(max_steps=None, eval_interval=1000, sample_chars=0), "--time", "6s",
             "--input", str(corpus), "--out", str(out)]
    assert main(["train", *flags]) == 0
    planned = json.loads((out / "config.json").read_text())["train"]["planned_steps"]
    assert " steps planned (" in capsys.readouterr().out
    # the same command again continues the finished run instead of planning anew
    assert main(["train", *flags, "--auto-resume"]) == 0
    assert f"done: {planned} steps" in capsys.readouterr().out


def test_a_budget_run_replans_from_its_measured_steps(corpus, tmp_path, capsys, monkeypatch):
    """Steps measured slower at first (0.1 s) than later (0.05 s): the plan grows, and
    config.json keeps the last plan, the re-aimed cooldown included."""
    monkeypatch.setattr(StepClock, "step_seconds",
                        lambda self: 0.1 if self.ticks < 9 else 0.05)
    monkeypatch.setattr(Trainer, "elapsed", lambda self: 0.1 * self.step)
    fixed_rehearsal(monkeypatch)  # the real one's cost depends on the machine's load
    wsd = {"schedule": "wsd", "cooldown_frac": 0.5, "warmup_steps": 5, "eval_interval": 1000}
    result = train(tiny_config(corpus, tmp_path / "run", time_budget="6s", max_steps=1000,
                               **wsd))
    out = capsys.readouterr().out
    first = int(out.split(" steps planned")[0].split()[-1])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert first < 60 < saved["planned_steps"] == saved["max_steps"] == result.step
    assert "plan revised to" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if r["kind"] == "eval"]
    assert evals == [result.step]  # no step-0 evaluation; the final one
    # every rate the run used is the one a plain run of the recorded plan uses
    plain = train(tiny_config(corpus, tmp_path / "plain", max_steps=result.step,
                              cooldown_plan=saved["cooldown_plan"], **wsd))
    assert plain.step == result.step
    assert same_weights(tmp_path / "run", tmp_path / "plain")


def test_a_step_cap_bounds_every_plan_and_wants_a_budget(corpus, tmp_path, fixed_step_time):
    """A cap (what --size auto sets when more passes would be learnt by heart) is the end of a
    budget that would buy more, and the evaluations are spaced over the capped run; below
    what the budget buys it changes nothing. Without a budget it is an error, not ignored."""
    free = plan_steps(budget=100.0, elapsed=10.0, step=10, step_seconds=0.05,
                      eval_seconds=0.2, eval_iters=100, eval_interval=10)
    capped = plan_steps(budget=100.0, elapsed=10.0, step=10, step_seconds=0.05,
                        eval_seconds=0.2, eval_iters=100, eval_interval=10, most_steps=400)
    assert free.steps > 1000 and capped.steps == 400
    assert capped.eval_interval < free.eval_interval and capped.evals > 1
    loose = plan_steps(budget=100.0, elapsed=10.0, step=10, step_seconds=0.05,
                       eval_seconds=0.2, eval_iters=100, eval_interval=10, most_steps=10**6)
    assert loose == free
    assert plan_steps(budget=100.0, elapsed=10.0, step=10, step_seconds=0.05, eval_seconds=0.2,
                      eval_iters=100, eval_interval=10, most_steps=5).steps == 11
    result = train(tiny_config(corpus, tmp_path / "run", time_budget="6s", max_steps=1000,
                               eval_interval=1000, step_cap=30, schedule="wsd",
                               warmup_steps=5))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert result.step == saved["planned_steps"] == 30  # the 6 s alone buy about 56
    with pytest.raises(ConfigError, match="keeps them"):  # the cap is part of the plan
        train(resume=tmp_path / "run", overrides={"train": {"step_cap": 60}})
    with pytest.raises(ConfigError, match="step_cap caps a time budget"):
        tiny_config(corpus, tmp_path / "other", max_steps=100, step_cap=30)


@pytest.mark.parametrize("slower", [2.0, 0.5])
def test_a_budget_is_kept_when_the_machine_changes_speed_halfway(corpus, tmp_path, monkeypatch,
                                                                 slower):
    """A synthetic clock: a step takes 0.05 s until 40% of the budget, then `slower` times
    that (the machine slows down, or speeds up, in the middle of the WSD cooldown); an
    evaluation batch takes 0.01 s. The run must end within 3% of its 12 s budget."""
    now = [0.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: now[0])
    step, evaluate = Trainer.train_step, Trainer.evaluate

    def timed_step(self):
        loss = step(self)
        now[0] += 0.05 * (slower if now[0] > 0.4 * 12 else 1.0)
        return loss

    def timed_evaluate(self, iters=None):
        losses = evaluate(self, iters)
        now[0] += 0.01 * 2 * (iters or self.cfg.train.eval_iters)
        return losses

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(Trainer, "evaluate", timed_evaluate)
    result = train(tiny_config(corpus, tmp_path / "run", time_budget="12s", max_steps=10_000,
                               schedule="wsd", cooldown_frac=0.5, warmup_steps=5,
                               eval_interval=100))
    assert 0.97 * 12 <= result.elapsed <= 1.03 * 12, result.elapsed
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["max_steps"] == result.step and saved["cooldown_plan"]  # re-aimed on the way


def test_a_real_budget_run_ends_within_its_budget(corpus, tmp_path):
    """`chargpt train --time 20s` on the real clock: no step time, evaluation or clock mocked.

    The bound is wider than the 3% the synthetic clock holds the planner to, because this
    2-core machine is shared (the rest of the suite, other jobs): a step's time can double
    from one moment to the next. The run plans again every 10 steps to its end from the
    recent step time, so a constant error in its measurements corrects itself; what a change
    of load can add is the steps after the last plan (at most 10, under 0.5 s at the 40 ms a
    step of this model takes on a loaded machine) and the finish (the final evaluation, its
    checkpoints and the loss curve) taking longer than it was priced at, once, by a rehearsal
    (0.5 s idle, 2 s under a load of 8 on the 2 cores): twice as long is 2 s more. Hence 15%
    (3 s) over. Ending early costs the reserve the plan keeps (MARGIN, 4% of the time left)
    and a machine that speeds up after the last plan: 15% under."""
    out = tmp_path / "run"
    proc = cli("train", "--input", str(corpus), "--out", str(out), "--time", "20s",
               *tiny_flags(max_steps=None, eval_interval=100, sample_chars=0))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    done = re.search(r"done: (\d+) steps in ([\d.]+)s", stdout)
    assert done, stdout
    steps, elapsed = int(done.group(1)), float(done.group(2))
    assert 0.85 * 20 <= elapsed <= 1.15 * 20, stdout
    print(f"--time 20s: {steps} steps in {elapsed:.1f} s")
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["planned_steps"] == saved["max_steps"] == steps
    assert json.loads((out / "last" / "state.json").read_text())["step"] == steps
