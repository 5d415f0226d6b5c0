"""Faults are injected only by the tests: production code offers hooks where faults must land and
reads no variable or flag for them; tests/faulty_cli.py installs them in processes a test cannot
reach."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import metrics, tiny_config
from faulty_cli import chosen_faults

from chargpt import faults
from chargpt.cli.commands import main
from chargpt.faults import Faults
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.trainstate import TrainState
from chargpt.training.launch import train


def test_off_by_default():
    assert faults.active() == Faults() and Faults().exit_at_step is None
    assert Faults().interrupt_at_step is None and Faults().kill_at is None
    assert chosen_faults([], {}) == Faults()


def test_faults_are_narrowed_to_one_rank_and_the_first_attempt():
    opts = ["--exit-at-step", "27", "--interrupt-at-step", "9", "--kill-at", "evaluate",
            "--rank", "1"]
    assert chosen_faults(opts, {"RANK": "1"}) == Faults(exit_at_step=27, interrupt_at_step=9,
                                                       kill_at="evaluate")
    assert chosen_faults(opts, {"RANK": "0"}) == Faults()
    restarted = {"RANK": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert chosen_faults(opts, restarted) == Faults()
    assert chosen_faults(["--exit-at-step", "3"], {}).exit_at_step == 3  # rank 0
    chosen = chosen_faults(["--kill-at", "checkpoint.old", "--nth", "2", "--marker", "m"], {})
    assert (chosen.kill_at, chosen.kill_nth, chosen.marker) == ("checkpoint.old", 2, "m")
    with pytest.raises(SystemExit):  # a phase chargpt does not have is a mistake in the test
        chosen_faults(["--kill-at", "nowhere"], {})


@pytest.mark.parametrize("name", ["CHARGPT_TEST_SAVE_DELAY", "CHARGPT_FAULT_EXIT_AT_STEP",
                                  "CHARGPT_KILL_AT"])
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


class Recording(Faults):
    """Records every named point reached, with what is on the disk there."""

    def __init__(self, run_dir: Path | None = None) -> None:
        super().__init__()
        self.run_dir, self.phases, self.steps, self.disk = run_dir, [], [], []

    def after_step(self, step: int) -> None:
        self.steps.append(step)
        super().after_step(step)

    def reached(self, phase: str) -> None:
        self.phases.append(phase)
        if self.run_dir is not None:
            self.disk.append(sorted(p.name for p in self.run_dir.iterdir() if p.is_dir()))


def test_checkpoint_save_reaches_each_step_of_the_swap(tmp_path, monkeypatch):
    recording = Recording(tmp_path)
    monkeypatch.setattr(faults, "_active", recording)
    ckpt.save(tmp_path, "last", _Tiny(), _data(1))
    # files written, manifest written (nothing to move aside yet), renamed into place
    assert recording.phases == ["checkpoint.files", "checkpoint.manifest", "checkpoint.swapped"]
    assert recording.disk == [["last.tmp"], ["last.tmp"], ["last"]]
    ckpt.save(tmp_path, "last", _Tiny(), _data(2))
    assert recording.phases[3:] == ["checkpoint.files", "checkpoint.manifest", "checkpoint.old",
                                    "checkpoint.swapped"]
    assert recording.disk[3:] == [["last", "last.tmp"], ["last", "last.tmp"],
                                  ["last.old", "last.tmp"], ["last", "last.old"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert ckpt.load_train_state(ckpt.resolve(tmp_path, "last")).step == 2


def test_the_training_loop_reaches_every_phase(corpus, tmp_path, monkeypatch):
    recording = Recording()
    monkeypatch.setattr(faults, "_active", recording)
    train(tiny_config(corpus, tmp_path / "run", max_steps=6, eval_interval=3), quiet=True)
    assert recording.steps == [1, 2, 3, 4, 5, 6]
    assert set(recording.phases) == set(faults.PHASES)
    assert recording.phases[0] == "prepare" and recording.phases.count("step") == 6
    # last at steps 0, 3 and 6, best at 0 and at each improvement; every save is sealed
    saves = recording.phases.count("checkpoint.files")
    assert saves >= 4 and recording.phases.count("checkpoint.manifest") == saves
    # a batch of each split for each of the 2 eval_iters, at steps 0, 3 and 6
    assert recording.phases.count("evaluate") == 3 * 2 * 2
    assert recording.phases.count("metrics") == len(metrics(tmp_path / "run"))
