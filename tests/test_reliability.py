"""Nothing lost, nothing executed: NaN policies, planted pickles, the config space, a kill -9
series (including inside checkpoint writes) and elastic restarts under torchrun."""

import json
import pickle
import random
import shutil
import signal
import subprocess
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
from chargpt.model.build import build_model
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


# --- kill -9 at many points -------------------------------------------------------------------


def reference(root: Path, corpus: Path, steps: int) -> Path:
    ref = root / "ref"
    proc = cli("train", "--input", str(corpus), "--out", str(ref), *TINY, "--max-steps",
               str(steps), stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    return ref


def kill_series(corpus, ref, run, steps, delays) -> int:
    """Run the same `--auto-resume` command again and again, killing it after each delay; then
    let it finish and compare with the undisturbed run. Returns how many kills landed."""
    cmd = ["train", "--input", str(corpus), "--out", str(run), "--auto-resume", *TINY,
           "--max-steps", str(steps)]
    slow_saves = ["--save-delay", "0.05"]  # kills land inside writes more often
    kills = 0
    for delay in delays:
        proc = cli(*cmd, faults=slow_saves, stdout=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            break  # finished before the kill: later kills have nothing left to hit
    proc = cli(*cmd, stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    assert same_weights(ref, run)
    return kills


def test_kill_series_short(corpus, tmp_path):
    ref = reference(tmp_path, corpus, 80)
    assert kill_series(corpus, ref, tmp_path / "run", 80, [2.5, 3.5, 4.5]) >= 2


@pytest.mark.slow
def test_kill_series_long(corpus, tmp_path):
    # Enough steps that no restart can finish inside its delay, loaded machine or not.
    ref = reference(tmp_path, corpus, 1500)
    rng = random.Random(0)
    delays = [rng.uniform(1.0, 3.5) for _ in range(24)]
    assert kill_series(corpus, ref, tmp_path / "run", 1500, delays) >= 20
