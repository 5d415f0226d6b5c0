"""The run directory: where a training run keeps its files, known in one place.

    RUN/config.json     the run's resolved config (vocab_size filled in, data_dir absolute)
    RUN/metrics.jsonl   one JSON row per log step ("train") and per evaluation ("eval")
    RUN/loss_curve.png  drawn from metrics.jsonl after every evaluation
    RUN/data/           the prepared data, unless the config's data.data_dir names another
    RUN/best/ RUN/last/ checkpoints (see checkpoint.py): the best val loss, and the latest
                        complete state, which is what a resume continues from

`RunDir` answers every question about these paths, and reads and writes the run-level files
(a metrics row that is not one is an error; a line torn by a kill is skipped). Which checkpoint
a command uses is decided here, once: `find_checkpoint` for what a user typed (a run directory
or a checkpoint directory, and --checkpoint if given) and `RunDir.resume_checkpoint` for a
resume. A checkpoint the user named that fails a check (safety.check_checkpoint) is refused; one
they did not name is passed over for the next with a one-line warning: never in silence.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chargpt import errors, faults
from chargpt.config.schema import Config
from chargpt.data.prepared import PreparedData, load_prepared
from chargpt.errors import ChargptError, CheckpointError, ConfigError
from chargpt.fileio import atomic_write_text, os_reason, read_error, utf8_path
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.safety import (
    LOAD_FACTOR,
    TRAIN_FACTOR,
    CheckedCheckpoint,
    check_bounds,
    check_checkpoint,
)

__all__ = ["BEST", "CHECKPOINTS", "LAST", "RunDir", "find_checkpoint"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
DATA_SUBDIR = "data"
BEST, LAST = "best", "last"
CHECKPOINTS = (BEST, LAST)


@dataclass(frozen=True)
class RunDir:
    """One run directory (it need not exist yet)."""

    path: Path

    @classmethod
    def default(cls) -> RunDir:
        """runs/<date>-<time>, for a run started without --out."""
        return cls(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def plot_file(self) -> Path:
        return self.path / PLOT_FILE

    def checkpoint(self, name: str) -> Path:
        """Where checkpoint `name` ("best" or "last") is written."""
        return self.path / name

    def data_dir(self, cfg: Config) -> Path:
        """The prepared data the run trains on: its own data/, or the config's data_dir."""
        return Path(cfg.data.data_dir) if cfg.data.data_dir else self.path / DATA_SUBDIR

    def load_data(self, cfg: Config) -> PreparedData:
        return load_prepared(self.data_dir(cfg))

    # -- the run itself

    def holds_run(self) -> bool:
        """Whether a run was started here (its config is written once its data is ready)."""
        return self.config_file.exists()

    def create(self) -> bool:
        """Make the directory for a new run, refusing one that already holds a run, one that
        holds files of the user's own, and a path its checkpoints could not be written to and
        read back from (utf8_path); whether the directory was made here (the caller removes it
        if the run fails before it is written)."""
        utf8_path(self.path, "the run directory")
        if self.holds_run():
            raise ConfigError(
                f"{self.path} already holds a run; continue it with --resume {self.path} "
                "or choose another --out"
            )
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a directory")
        foreign = sorted(p.name for p in self.path.iterdir()
                         if not _run_entry(p.name)) if self.path.is_dir() else []
        if foreign:
            raise ConfigError(f"{self.path} is not empty and holds no chargpt run ({foreign[0]} "
                              "is not a run's file); give a new or empty --out")
        made = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        return made

    def forget(self) -> None:
        """Remove the run's config and metrics, so the directory can start a new run."""
        for path in (self.config_file, self.metrics_file):
            path.unlink(missing_ok=True)

    def read_config(self) -> Config:
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file, not a run directory")
        if not self.path.is_dir():
            raise CheckpointError(f"run directory {self.path} does not exist")
        if not self.config_file.is_file():
            kept = [c for c in (ckpt.resolve(self.path, name) for name in CHECKPOINTS) if c]
            if kept:  # sample and eval read a checkpoint's own config; a run needs its own
                raise CheckpointError(
                    f"{self.path} has lost its {CONFIG_FILE}, though its checkpoints remain "
                    f"({', '.join(c.name for c in kept)}); copy {kept[-1] / ckpt.CONFIG_FILE} "
                    f"to {self.config_file} to continue the run"
                )
            raise CheckpointError(
                f"{self.path} is not a chargpt run directory ({CONFIG_FILE} missing)"
            )
        cfg = ckpt.read_config(self.config_file)
        check_bounds(cfg.model, self.config_file)
        return cfg

    def check_resumable(self) -> None:
        """Refuse a checkpoint directory given where its run is meant (--resume RUN/best)."""
        if is_checkpoint_dir(self.path):
            raise CheckpointError(f"{self.path} is a checkpoint directory; a resume continues "
                                  f"its run: --resume {self.path.parent}")

    def write_config(self, cfg: Config) -> None:
        self._replace(self.config_file, json.dumps(cfg.to_dict(), indent=2) + "\n")

    def _replace(self, path: Path, text: str) -> None:
        """Replace a run-level file atomically: on any failure (a full disk) the old one stays,
        and the error is one line."""
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise CheckpointError(f"could not write {path}: {os_reason(e)}; the file is as it "
                                  "was") from None

    def has_checkpoint(self) -> bool:
        """Whether a resume has something to continue from: a `last/` (complete or not, a
        damaged one must be reported, never trained over), or what a crash left of it."""
        return self.checkpoint(LAST).is_dir() or ckpt.resolve(self.path, LAST) is not None

    def how_to_go_on(self, once: str = "once there is space") -> str:
        """For an error that stopped training: the last good checkpoint (read from the disk,
        so it is the one a resume finds) and the command that continues from it `once`."""
        last = ckpt.resolve(self.path, LAST)
        try:
            step = None if last is None else ckpt.load_train_state(last).step
        except ChargptError:
            step = None
        if step is None:
            return f"no checkpoint to resume from has been written yet; start the run again {once}"
        return (f"the last good checkpoint is {last} (step {step}), intact; {once}, "
                f"`chargpt train --resume {self.path}` continues from step {step}")

    def resume_checkpoint(self, warn: Callable[[str], None] = errors.warn) -> CheckedCheckpoint:
        """The checkpoint a resume continues from: `last/`, or what a crash left of it; a
        damaged `last/` is passed over with `warn` for an intact leftover, else refused."""
        utf8_path(self.path, "the run directory", CheckpointError)
        if not any(c.is_dir() for c in ckpt.candidates(self.path, LAST)):
            raise CheckpointError(f"{self.path} has no complete checkpoint to resume from")
        try:
            return _first_usable(self.path, (LAST,), named=False, factor=TRAIN_FACTOR,
                                 warn=warn)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume {self.path}: {e}") from None

    # -- metrics

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl. A line that is not JSON was torn by a kill and is skipped;
        a JSON line that is not a metrics row means the file was damaged or edited: that is a
        one-line CheckpointError naming the line."""
        return self._metrics_rows()[0]

    def _metrics_rows(self) -> tuple[list[dict[str, Any]], int]:
        """The rows of metrics.jsonl and how many torn lines were skipped."""
        if not self.metrics_file.exists():
            return [], 0
        rows, torn = [], 0
        try:
            with open(self.metrics_file, "rb") as f:
                # readline's limit bounds the memory a line without newlines could take
                for number, line in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES + 1), b""),
                                              1):
                    if len(line) > MAX_ROW_BYTES:
                        raise CheckpointError(f"{self.metrics_file} line {number} is longer "
                                              "than any metrics row; remove or fix it")
                    row = _metrics_row(line, f"{self.metrics_file} line {number}")
                    if row is not None:
                        rows.append(row)
                    torn += row is None and bool(line.strip())
        except OSError as e:
            raise read_error(self.metrics_file, e, what="metrics file",
                             error=CheckpointError) from None
        return rows, torn

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            faults.active().reached("metrics")  # written, not yet flushed

    def truncate_metrics(self, step: int) -> None:
        """Drop rows after `step` (logged after the checkpoint a resume starts from), and lines
        a kill tore in the middle of a write, saying how many."""
        rows, torn = self._metrics_rows()
        if torn:
            errors.warn(f"{self.metrics_file}: dropped {torn} torn line(s), written when a run "
                        "was killed in the middle of a write")
        rows = [r for r in rows if r.get("step", 0) <= step]
        self._replace(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))


# A metrics row is a few hundred bytes; these are the numbers rows carry, and those each kind
# must have (the loss curve reads them).
MAX_ROW_BYTES = 1 << 16
_ROW_NUMBERS = ("loss", "lr", "tok_per_s", "elapsed", "mfu", "skipped", "train_loss",
                "val_loss", "val_bpc")
_ROW_NEEDS = {"train": ("loss",), "eval": ("train_loss", "val_loss")}


def _run_entry(name: str) -> bool:
    """Whether `name` is a file or folder a run writes: a run killed before its first
    checkpoint leaves some (and `forget` keeps its data/ to start again), with the hidden
    temporaries of atomic writes and a checkpoint's NAME.tmp and NAME.old."""
    bare = name[1:] if name.startswith(".") else name
    return any(bare == entry or bare.startswith(f"{entry}.") for entry in
               (CONFIG_FILE, METRICS_FILE, PLOT_FILE, DATA_SUBDIR, *CHECKPOINTS))


def _metrics_row(line: bytes, where: str) -> dict[str, Any] | None:
    """One line of metrics.jsonl as a row; None for a line torn by a kill (or empty)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # ValueError includes undecodable bytes
        return None
    problem = None
    if not isinstance(row, dict):
        problem = "is not a JSON object"
    elif not (type(row.get("step")) is int and row["step"] >= 0):
        problem = "has no step number"
    elif not isinstance(row.get("kind", ""), str):
        problem = "has a kind that is not a string"
    else:
        needs = _ROW_NEEDS.get(row.get("kind", ""), ())
        bad = [k for k in _ROW_NUMBERS if (k in row or k in needs)
               and not (isinstance(row.get(k), (int, float)) and type(row.get(k)) is not bool)]
        if bad:
            problem = f"has no number for {bad[0]!r}"
    if problem:
        raise CheckpointError(f"{where} {problem}, so it is not a metrics row; remove or fix "
                              "that line")
    return row


def _first_usable(path: Path, names: Sequence[str], *, named: bool, factor: int,
                  warn: Callable[[str], None]) -> CheckedCheckpoint:
    """The first checkpoint of `names` (each with its crash leftovers NAME.tmp, NAME.old) that
    passes every check. A damaged one is refused when `named`, else passed over with `warn`."""
    damaged: list[str] = []  # what was wrong with each damaged checkpoint passed over
    leftovers: list[str] = []  # why crash leftovers could not be used
    for name in names:
        primary, *recovered = ckpt.candidates(path, name)
        if primary.is_dir():
            try:
                return _used(check_checkpoint(primary, factor), damaged, warn)
            except ChargptError as e:
                if named:
                    raise
                damaged.append(str(e))
        for candidate in recovered:  # a crash between save's two renames leaves these
            if candidate.is_dir():
                try:
                    return _used(check_checkpoint(candidate, factor), damaged, warn)
                except ChargptError as e:
                    leftovers.append(str(e))
    if damaged:
        raise CheckpointError("; ".join(damaged) + f"; {path} has no other complete checkpoint")
    which = f"{names[0]} checkpoint" if named else "checkpoint"
    if leftovers:
        raise CheckpointError(f"{path} has no complete {which} ({leftovers[0]})")
    hint = "" if named else " (is it a chargpt run directory?)"
    raise CheckpointError(f"{path} has no {which}{hint}")


def _used(found: CheckedCheckpoint, damaged: list[str], warn: Callable[[str], None]
          ) -> CheckedCheckpoint:
    if damaged:
        warn(f"{'; '.join(damaged)}; using {found.path} instead")
    return found


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` is one checkpoint's directory (RUN/best), not a run directory."""
    return (path / ckpt.MANIFEST).is_file() or (path / ckpt.MODEL_FILE).is_file()


def find_checkpoint(path: str | Path, which: str | None = None, *,
                    warn: Callable[[str], None] = errors.warn) -> CheckedCheckpoint:
    """The checkpoint a command uses, checked before its model is built (safety.py).

    `path` is a run directory or a checkpoint directory. `which` is the checkpoint the user
    named (best or last), None when they named none. A named checkpoint, or a checkpoint
    directory given itself, that fails a check is refused. Without a name, best is used, or
    last when the run has no best; a damaged best is passed over with a one-line warning that
    says what is wrong and what is used instead. Either way a checkpoint a crash left between
    its save's two renames is found (checkpoint.candidates)."""
    path = Path(path)
    utf8_path(path, "the run directory", CheckpointError)  # one line, not one per checkpoint
    if which is not None and which not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_checkpoint_dir(path):
        if which is not None and path.name != which:
            raise ConfigError(f"{path} is a checkpoint directory, not a run directory; drop "
                              f"--checkpoint {which} or give the run directory")
        return check_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a chargpt run directory or checkpoint")
    names = CHECKPOINTS if which is None else (which,)
    return _first_usable(path, names, named=which is not None, factor=LOAD_FACTOR, warn=warn)
