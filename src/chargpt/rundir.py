"""The run directory: where a training run keeps its files, known in one place.

    RUN/config.json     the run's resolved config (vocab_size filled in, data_dir absolute)
    RUN/metrics.jsonl   one JSON row per log step ("train") and per evaluation ("eval")
    RUN/loss_curve.png  drawn from metrics.jsonl after every evaluation
    RUN/data/           the prepared data, unless the config's data.data_dir names another
    RUN/best/ RUN/last/ checkpoints (see checkpoint.py): the best val loss, and the latest
                        complete state, which is what a resume continues from

`RunDir` answers every question about these paths, and reads and writes the run-level files;
`find_checkpoint` turns what a user typed (a run directory or a checkpoint directory) into a
verified checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import Config
from .errors import CheckpointError, ConfigError
from .io import atomic_write_text
from .prepared import PreparedData, load_prepared

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

    def create(self) -> None:
        """Make the directory for a new run, refusing one that already holds a run."""
        if self.holds_run():
            raise ConfigError(
                f"{self.path} already holds a run; continue it with --resume {self.path} "
                "or choose another --out"
            )
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)

    def forget(self) -> None:
        """Remove the run's config and metrics, so the directory can start a new run."""
        for path in (self.config_file, self.metrics_file):
            path.unlink(missing_ok=True)

    def read_config(self) -> Config:
        if not self.path.is_dir():
            raise CheckpointError(f"run directory {self.path} does not exist")
        if not self.config_file.is_file():
            raise CheckpointError(
                f"{self.path} is not a chargpt run directory ({CONFIG_FILE} missing)"
            )
        return Config.from_dict(ckpt.read_json(self.config_file), source=str(self.config_file))

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config_file, json.dumps(cfg.to_dict(), indent=2) + "\n")

    def last_checkpoint(self) -> Path | None:
        """The complete checkpoint a resume continues from, if there is one."""
        return ckpt.resolve(self.path, LAST)

    # -- metrics

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; lines torn by a kill or otherwise unreadable are skipped."""
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # includes undecodable bytes
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop rows after `step` (logged after the checkpoint a resume starts from)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))


def find_checkpoint(path: str | Path, which: str = BEST) -> Path:
    """A verified checkpoint directory: `path` itself, or `path/which` (best falls back to last)."""
    path = Path(path)
    if which not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / ckpt.MANIFEST).is_file():
        ckpt.verify(path)
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a chargpt run directory or checkpoint")
    for name in (which, LAST) if which == BEST else (which,):
        found = ckpt.resolve(path, name)
        if found is not None:
            return found
    # Nothing verified: explain the first problem found, or that this is not a run at all.
    for candidate in ckpt.candidates(path, which):
        if candidate.is_dir():
            ckpt.verify(candidate)
    raise CheckpointError(f"{path} has no checkpoint (is it a chargpt run directory?)")
