"""Faults are injected only by the tests: production code offers hooks where faults must land and
reads no variable or flag for them; tests/faulty_cli.py installs them in processes a test cannot
reach."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_config
from faulty_cli import chosen_faults

from chargpt import faults
from chargpt.cli.commands import main
from chargpt.faults import Faults
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.trainstate import TrainState
from chargpt.training.launch import train


def test_off_by_default():
    assert faults.active() == Faults() and Faults().exit_at_step is None
    assert Faults().interrupt_at_step is None
    assert chosen_faults([], {}) == Faults()


def test_exit_is_narrowed_to_one_rank_and_the_first_attempt():
    opts = ["--exit-at-step", "27", "--exit-rank", "1"]
    assert chosen_faults(opts, {"RANK": "1"}).exit_at_step == 27
    assert chosen_faults(opts, {"RANK": "0"}).exit_at_step is None
    restarted = {"RANK": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert chosen_faults(opts, restarted).exit_at_step is None
    assert chosen_faults(["--exit-at-step", "3"], {}).exit_at_step == 3  # rank 0
    assert chosen_faults(["--save-delay", "0.5"], {}).save_delay == 0.5


@pytest.mark.parametrize("name", ["CHARGPT_TEST_SAVE_DELAY", "CHARGPT_FAULT_EXIT_AT_STEP"])
def test_the_cli_reads_no_fault_from_the_environment(monkeypatch, name):
    monkeypatch.setattr(faults, "_active", Faults())  # restored after the test
    monkeypatch.setenv(name, "3")
    assert main(["presets"]) == 0
    assert faults.active() == Faults()


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)


def _data(step: int) -> ckpt.CheckpointData:
    return ckpt.CheckpointData(config={}, vocab={}, state=TrainState(step=step))


def test_checkpoint_save_pauses_where_a_kill_matters(tmp_path):
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
