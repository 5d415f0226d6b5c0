"""Nothing lost, nothing executed: NaN policies, planted pickles, the config space, and kill -9
series landing at named points of a run (inside prepare, each step of a checkpoint swap, between
steps, inside an evaluation and a metrics write)."""

import itertools
import json
import pickle
import random
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, ctrl_c_after, metrics, same_weights, tiny_config, tiny_flags, weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chargpt.training.trainer as trainer_mod
from chargpt.cli.commands import main
from chargpt.config.schema import ConfigError, ModelConfig, TrainConfig
from chargpt.errors import ChargptError
from chargpt.model.build import build_model
from chargpt.runs import checkpoint as ckpt
from chargpt.training.launch import train
from chargpt.training.optim import make_optimizer
from chargpt.training.trainer import TrainingError

# The CLI runs of this module: the tiny model with dropout, evaluated every 20 steps.
TINY = tiny_flags(dropout=0.1, eval_interval=20, sample_chars=0, warmup_steps=5)


# --- non-finite losses ------------------------------------------------------------------------


def poison_at(monkeypatch, bad_calls):
    """Make the model's training loss NaN on the given forward calls (counted from 1)."""
    real = trainer_mod.build_model

    def build(cfg):
        model = real(cfg)
        calls = {"n": 0}

        def hook(module, args, output):
            if not module.training:
                return output
            calls["n"] += 1
            logits, loss = output
            if calls["n"] in bad_calls:
                return logits, loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer_mod, "build_model", build)


def test_nan_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    poison_at(monkeypatch, {13})
    with pytest.raises(TrainingError, match="last good checkpoint"):
        train(tiny_config(corpus, tmp_path / "run"), quiet=True)
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["step"] == 10  # the eval checkpoint before the NaN, not a poisoned one
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


def test_nan_when_interrupted_never_replaces_last(corpus, tmp_path, monkeypatch):
    poison_at(monkeypatch, {12})
    with pytest.raises(TrainingError, match="before step 13"), ctrl_c_after(13):
        train(tiny_config(corpus, tmp_path / "run"), quiet=True)
    assert json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"] == 10


def test_nan_skip_policy_goes_on(corpus, tmp_path, monkeypatch):
    poison_at(monkeypatch, {13, 17})
    result = train(tiny_config(corpus, tmp_path / "run", nonfinite="skip"), quiet=True)
    assert result.step == 30
    rows = metrics(tmp_path / "run", "train")
    assert rows[-1]["skipped"] == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


# --- no pickle is ever read -------------------------------------------------------------------


class Exploit:
    """Unpickling this creates the marker file; nothing chargpt reads may ever do that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", "--input", str(corpus), "--out", str(run), *TINY,
                 "--max-steps", "20"]) == 0
    return run


def planted_files(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if p.is_file() and p.suffix != ".png")


def test_planted_pickles_never_run(good_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker))
    rel_paths = [p.relative_to(good_run) for p in planted_files(good_run)]
    assert len(rel_paths) >= 15  # config, metrics, data/*, best/*, last/*
    for rel in rel_paths:
        run = tmp_path / f"run-{rel.as_posix().replace('/', '_')}"
        shutil.copytree(good_run, run)
        target = run / rel
        if target.suffix == ".npy":  # an object array is numpy's way to smuggle a pickle
            np.save(target, np.array([Exploit(marker)], dtype=object), allow_pickle=True)
        else:
            target.write_bytes(payload)
        for argv in (["sample", str(run), "--max-new-tokens", "5", "--seed", "0"],
                     ["sample", str(run), "--checkpoint", "last", "--max-new-tokens", "5"],
                     ["eval", str(run)],
                     ["train", "--resume", str(run), "--max-steps", "22"]):
            code = main(argv)
            assert not marker.exists(), f"{rel}: {argv[0]} unpickled a planted file"
            err = capsys.readouterr().err
            assert "Traceback" not in err
            if code != 0:
                assert err.startswith("chargpt: error: ") and err.count("\n") == 1, err


# --- the config space -------------------------------------------------------------------------

model_space = st.fixed_dictionaries({
    "n_layer": st.integers(-1, 3),
    "n_head": st.integers(0, 4),
    "n_embd": st.integers(0, 24),
    "block_size": st.integers(-1, 12),
    "dropout": st.floats(-0.2, 1.2, allow_nan=False),
    "norm": st.sampled_from(["pre", "post", "none"]),
    "residual": st.booleans(),
    "mlp": st.booleans(),
    "mlp_ratio": st.integers(0, 4),
    "activation": st.sampled_from(["gelu", "relu"]),
    "tie_weights": st.booleans(),
    "bias": st.booleans(),
    "arch": st.sampled_from(["gpt", "bigram"]),
})


def is_valid(d) -> bool:
    if d["block_size"] < 1 or not 0 <= d["dropout"] < 1:
        return False
    if d["arch"] == "bigram":
        return True
    return (d["n_layer"] >= 1 and d["n_head"] >= 1 and d["n_embd"] >= 1
            and d["n_embd"] % d["n_head"] == 0 and d["mlp_ratio"] >= 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_space, st.integers(0, 2**16))
def test_valid_configs_train_a_step_and_invalid_ones_say_why(d, seed):
    if not is_valid(d):
        with pytest.raises(ConfigError) as e:
            ModelConfig(vocab_size=11, **d)
        assert "\n" not in str(e.value)
        return
    cfg = ModelConfig(vocab_size=11, **d)
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    x = torch.randint(0, 11, (2, cfg.block_size))
    _, loss = model(x, torch.roll(x, -1, dims=1))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- kill -9 at named points ------------------------------------------------------------------
# Each kill lands at a named point of the run (faults.PHASES, through tests/faulty_cli.py): the
# process writes a marker naming the phase and its last step, then sends itself SIGKILL. Nothing
# is left to timing, so a kill that does not land where it was sent fails the series.


def reference(root: Path, corpus: Path, steps: int) -> Path:
    ref = root / "ref"
    proc = cli("train", "--input", str(corpus), "--out", str(ref), *TINY, "--max-steps",
               str(steps), stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    return ref


@dataclass(frozen=True)
class Kill:
    phase: str
    nth: int  # the nth time the killed process reaches the phase
    # when known: the last step it took and the step it resumed from (None: none, a new run)
    where: tuple[int | None, int | None] | None = None


def complete(path: Path) -> bool:
    try:
        ckpt.verify(path)
    except ChargptError:
        return False
    return True


def on_disk(run: Path, phase: str) -> bool:
    """Whether the run directory is in the state a kill at `phase` leaves."""
    def some(test) -> bool:
        return any(test(run / name, run / f"{name}.tmp", run / f"{name}.old")
                   for name in ("best", "last"))
    if phase == "prepare":  # staged token files, nothing published, no run yet
        return (not (run / "config.json").exists() and not (run / "data").exists()
                and any((p / "train.npy").exists() for p in run.glob(".data.*.prepare")))
    if phase == "checkpoint.files":
        return some(lambda _, tmp, __: tmp.is_dir() and not (tmp / ckpt.MANIFEST).exists())
    if phase == "checkpoint.manifest":
        return some(lambda _, tmp, __: complete(tmp))
    if phase == "checkpoint.old":
        return some(lambda final, tmp, old: not final.exists() and complete(tmp)
                    and complete(old))
    if phase == "checkpoint.swapped":
        return some(lambda final, tmp, old: complete(final) and not tmp.exists()
                    and (not old.exists() or complete(old)))
    return True  # between steps, in an evaluation, in a metrics write: nothing to see


def comparable(rows: list[dict]) -> list[tuple]:
    """Metrics rows without their timings: what a resumed run must reproduce exactly."""
    return [tuple((k, v) for k, v in sorted(r.items()) if k not in ("elapsed", "tok_per_s"))
            for r in rows]


def kill_series(corpus: Path, ref: Path, run: Path, steps: int, kills: list[Kill]) -> str:
    """Run the same `--auto-resume` command once per kill, each killed at its named point;
    then let it finish and compare weights and metrics with the undisturbed run. Returns what
    the last run printed."""
    cmd = ["train", "--input", str(corpus), "--out", str(run), "--auto-resume", *TINY,
           "--max-steps", str(steps)]
    marker = run.parent / "killed-at.json"
    kept = False  # whether a complete last/ was written: from then on one must always be found
    for i, kill in enumerate(kills):
        marker.unlink(missing_ok=True)
        proc = cli(*cmd, faults=["--kill-at", kill.phase, "--nth", str(kill.nth), "--marker",
                                 str(marker)])
        out, err = proc.communicate(timeout=600)
        where = f"kill {i} ({kill.phase} #{kill.nth})"
        assert proc.returncode == -signal.SIGKILL, f"{where} did not land: {err[-2000:]}"
        landed = json.loads(marker.read_text())
        assert landed["phase"] == kill.phase and landed["nth"] == kill.nth, where
        resumed = [int(s) for s in re.findall(r"resuming from step (\d+)", out)] or [None]
        if kill.where is not None:
            assert (landed["step"], *resumed) == kill.where, where
        assert on_disk(run, kill.phase), f"{where}: {sorted(p.name for p in run.iterdir())}"
        kept = kept or ckpt.resolve(run, "last") is not None
        assert not kept or ckpt.resolve(run, "last") is not None, where
    proc = cli(*cmd)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert same_weights(ref, run)
    assert comparable(metrics(run)) == comparable(metrics(ref))
    return out


# Evaluations (and saves of best/ and last/) at steps 0, 20, 40, 60 and 80.
SHORT_SERIES = [
    Kill("prepare", 1, (None, None)),
    Kill("checkpoint.manifest", 2, (None, None)),  # last.tmp sealed at step 0, no last/ yet
    Kill("step", 27, (27, 0)),  # resumed from last.tmp
    Kill("metrics", 2, (30, 20)),  # the row of step 30, written but not flushed
    Kill("evaluate", 1, (40, 20)),
    Kill("checkpoint.old", 2, (40, 20)),  # last/ moved aside (best/'s swap came first)
    Kill("checkpoint.swapped", 1, (60, 40)),  # resumed from last.tmp; best/ swapped in
    # the save of last/ removes the last.tmp it resumed from first: last.old (20) remains
    Kill("checkpoint.files", 2, (60, 40)),
]


def test_kill_series_short(corpus, tmp_path):
    ref = reference(tmp_path, corpus, 80)
    evals = [r["val_loss"] for r in metrics(ref, "eval") if r["step"] <= 60]
    # SHORT_SERIES counts checkpoint saves: best/ is saved at each evaluation up to step 60.
    assert all(b < a for a, b in itertools.pairwise(evals)), evals
    out = kill_series(corpus, ref, tmp_path / "run", 80, SHORT_SERIES)
    assert "resuming from step 20" in out  # from last.old: a crash's oldest leftover


@pytest.mark.slow
def test_kill_series_long(corpus, tmp_path):
    # 12 kills at seeded phases and occurrences of a longer run; each must land in its phase.
    # (A killed process costs a few seconds of start-up: more kills would buy little.)
    rng = random.Random(0)
    nth = {"step": 25, "evaluate": 8, "metrics": 8, "checkpoint.files": 4,
           "checkpoint.manifest": 4, "checkpoint.old": 3, "checkpoint.swapped": 3}
    phases = sorted(nth)
    kills = [Kill("prepare", 1)] + [Kill(p, rng.randint(1, nth[p]))
                                     for p in (rng.choice(phases) for _ in range(11))]
    ref = reference(tmp_path, corpus, 300)
    kill_series(corpus, ref, tmp_path / "run", 300, kills)
