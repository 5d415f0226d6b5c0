"""What a training run tells: console lines, the progress bar, metrics rows and the loss curve.

`TrainLog` is the trainer's one voice, and only rank 0 speaks: `log` prints a line (through
the progress bar while one is drawn; nothing when quiet), `record` appends one row to
metrics.jsonl and mirrors it to the experiment trackers (trackers.py; hook a new one there),
`plot` redraws the loss curve (a curve that cannot be written costs a warning, not the run),
and `write_failed` is the one line for a file training could not write, naming the last good
checkpoint and how to resume from it. `describe` is the line a run opens with. `SinceLog` sums
the training losses between two log steps on the device, so that a log step reads them once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chargpt.config.schema import Config
from chargpt.data.prepared import PreparedData
from chargpt.distributed import DistEnv
from chargpt.errors import TrainingError, warn
from chargpt.fileio import os_reason
from chargpt.progress import progress_bar, wanted
from chargpt.runs.rundir import RunDir
from chargpt.training.trackers import Trackers, open_trackers

__all__ = ["SinceLog", "TrainLog", "describe"]


@dataclass
class SinceLog:
    """Training losses since the last log step, summed on the device (no host sync)."""

    total: torch.Tensor
    steps: int = 0
    losses: int = 0  # steps with a loss: the 'skip' policy drops some
    t0: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor | None) -> None:
        self.steps += 1
        if loss is not None:
            self.total += loss
            self.losses += 1

    def reset(self, now: float) -> None:
        self.total.zero_()
        self.steps, self.losses, self.t0 = 0, 0, now


class TrainLog:
    """Console, progress bar, metrics rows and loss curve of one run (all silent off rank 0)."""

    def __init__(self, rundir: RunDir, is_main: bool, quiet: bool = False):
        self.rundir, self.is_main, self.quiet = rundir, is_main, quiet
        self.bar: Any = None
        self.trackers = Trackers({})
        self._plot_failed = False

    def log(self, message: str) -> None:
        if not self.is_main or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    # a run's lifetime: trackers first (a missing extra fails before anything is printed)

    def open_trackers(self, cfg: Config, step: int) -> None:
        self.trackers = open_trackers(cfg, self.rundir.path, step, self.is_main, self.log)

    def open_bar(self, total: int, step: int, enabled: bool) -> None:
        if wanted(enabled and self.is_main and not self.quiet):
            self.bar = progress_bar(total, unit="step", initial=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.trackers.close()

    # the progress bar, when one is drawn

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def set_total(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.total = steps
            self.bar.refresh()

    def show(self, status: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(status)

    # files

    def record(self, row: dict[str, Any]) -> None:
        """Record one metrics row (rank 0): every log step's and every evaluation's numbers."""
        if self.is_main:
            try:
                self.rundir.append_metrics(row)
            except OSError as e:
                raise self.write_failed(self.rundir.metrics_file, os_reason(e)) from None
            self.trackers.log(row)

    def plot(self) -> None:
        """Redraw the loss curve; one that cannot be written costs a warning, not the run."""
        if not self.is_main:
            return
        from chargpt.plots import plot_loss_curve

        try:
            plot_loss_curve(self.rundir.read_metrics(), self.rundir.plot_file)
        except OSError as e:
            if not self._plot_failed:
                warn(f"could not write {self.rundir.plot_file}: {os_reason(e)}; training goes "
                     "on (metrics.jsonl keeps every number; the next curve that can be "
                     "written replaces it)")
            self._plot_failed = True

    def write_failed(self, what: Path | str, reason: str) -> TrainingError:
        """The one line for a file training could not write (a full disk, mostly)."""
        once = "once there is space" if "space" in reason else "once that is fixed"
        return TrainingError(f"could not write {what}: {reason}; {self.rundir.how_to_go_on(once)}")


def describe(model: Any, data: PreparedData, device: torch.device,
             amp_dtype: torch.dtype | None, env: DistEnv, run_dir: Path) -> str:
    """The line a run opens with: size, vocabulary, data, device, precision, run directory."""
    world = f" x {env.world_size} processes" if env.enabled else ""
    test = "" if data.test is None else f" / {len(data.test):,} test"
    unit = " bytes" if data.tokenizer.unit == "byte" else ""
    return (
        f"{model.num_params() / 1e6:.2f} M parameters | vocab "
        f"{data.tokenizer.vocab_size}{unit} | "
        f"{len(data.train):,} train / {len(data.val):,} val{test} tokens | "
        f"{device.type}{world}, "
        f"{str(amp_dtype or torch.float32).removeprefix('torch.')} | "
        f"run dir {run_dir}"
    )
