"""Fault injection lives in one module, read once at start-up: production code never reads the
environment for tests, and the hooks it offers are called where faults must land."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_config

from chargpt import checkpoint as ckpt
from chargpt import faults
from chargpt.cli import main
from chargpt.errors import ConfigError
from chargpt.faults import Faults
from chargpt.launch import train


def test_off_by_default():
    assert Faults.from_env({}) == Faults() and Faults().exit_at_step is None


def test_exit_is_narrowed_to_one_rank_and_the_first_attempt():
    env = {"CHARGPT_FAULT_EXIT_AT_STEP": "27", "CHARGPT_FAULT_RANK": "1"}
    assert Faults.from_env({**env, "RANK": "1"}).exit_at_step == 27
    assert Faults.from_env({**env, "RANK": "0"}).exit_at_step is None
    restarted = {**env, "RANK": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert Faults.from_env(restarted).exit_at_step is None
    assert Faults.from_env({"CHARGPT_FAULT_EXIT_AT_STEP": "3"}).exit_at_step == 3  # rank 0
    assert Faults.from_env({"CHARGPT_TEST_SAVE_DELAY": "0.5"}).save_delay == 0.5
    with pytest.raises(ConfigError, match="fault-injection"):
        Faults.from_env({"CHARGPT_FAULT_EXIT_AT_STEP": "soon"})


def test_the_cli_reads_the_variables_once_at_start_up(monkeypatch):
    monkeypatch.setattr(faults, "_active", Faults())  # restored after the test
    monkeypatch.setenv("CHARGPT_TEST_SAVE_DELAY", "0.25")
    assert faults.active().save_delay == 0.0  # importing and using chargpt reads nothing
    assert main(["presets"]) == 0
    assert faults.active() == Faults(save_delay=0.25)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)


def _data(step: int) -> ckpt.CheckpointData:
    return ckpt.CheckpointData(config={}, vocab={}, state=ckpt.TrainState(step=step))


def test_checkpoint_save_pauses_where_a_kill_matters_and_reads_no_environment(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("CHARGPT_TEST_SAVE_DELAY", "30")  # would make each save take 1.5 min
    pauses = []
    t0 = time.perf_counter()
    ckpt.save(tmp_path, "last", _Tiny(), _data(1), pause=lambda: pauses.append(1))
    assert len(pauses) == 2  # files written, manifest written (nothing to rename away yet)
    ckpt.save(tmp_path, "last", _Tiny(), _data(2), pause=lambda: pauses.append(2))
    assert pauses[2:] == [2, 2, 2]  # ... and between the two renames
    assert time.perf_counter() - t0 < 10
    assert ckpt.load_train_state(ckpt.resolve(tmp_path, "last")).step == 2


def test_the_training_loop_offers_every_step_and_every_save_to_the_faults(corpus, tmp_path,
                                                                          monkeypatch):
    seen = {"steps": [], "pauses": 0}

    class Recording(Faults):
        def after_step(self, step: int) -> None:
            seen["steps"].append(step)

        def pause(self) -> None:
            seen["pauses"] += 1

    monkeypatch.setattr(faults, "_active", Recording())
    train(tiny_config(corpus, tmp_path / "run", max_steps=6, eval_interval=3), quiet=True)
    assert seen["steps"] == [1, 2, 3, 4, 5, 6]
    assert seen["pauses"] >= 2 * 3  # every checkpoint write (best and last at 0, 3 and 6)
