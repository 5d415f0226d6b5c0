"""Experiment trackers: TensorBoard and Weights & Biases mirrors of metrics.jsonl.

`--log-to tensorboard,wandb` (train.log_to) sends every row the trainer writes to metrics.jsonl
to each tracker as it is written, on rank 0 only. metrics.jsonl stays the source of truth: a
tracker sees the same rows and nothing else, apart from the end-of-training sample, which the
`train` command prints and `log_sample` hands to the trackers as text. A row
`{"kind": "train", "step": 40, "loss": 2.1, "lr": 0.001, ...}` becomes the values `train/loss`,
`train/lr`, ... at step 40 (numbers as scalars, strings as text), so new fields reach the
trackers without a change here. A resumed run continues the same series: TensorBoard writes
to RUN/tensorboard and tells its reader to drop what an interrupted process logged after the
checkpoint (those steps are trained again); W&B resumes the run whose id RUN/wandb-run-id
keeps, with its files in RUN/wandb, and logs offline (for `wandb sync` later) when no API key
is set up and WANDB_MODE does not say otherwise. Each tracker is an optional extra; asking for
one that is not installed is a one-line error naming the extra. A tracker that fails during
training is switched off with a warning: training and metrics.jsonl carry on.
"""

from __future__ import annotations

import html
import importlib.util
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from chargpt.config.values import TRACKERS, parse_log_to
from chargpt.errors import ChargptError, warn
from chargpt.fileio import atomic_write_text

if TYPE_CHECKING:
    from chargpt.config.schema import Config

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"
DEFAULT_WANDB_PROJECT = "chargpt"


def require_trackers(value: str) -> None:
    """Raise a one-line error, before anything is written, if a named tracker's extra is
    missing."""
    for name in parse_log_to(value):
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ChargptError(f"--log-to {name} needs the {name} extra: "
                               f"pip install 'chargpt[{name}]'")


def _fields(row: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """(kind, step, {kind/field: value}) for the row's numbers and strings."""
    kind = str(row.get("kind", "metrics"))
    values = {f"{kind}/{k}": v for k, v in row.items()
              if k not in ("kind", "step") and isinstance(v, (int, float, str))}
    return kind, int(row["step"]), values


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _wait_past_event_files(log_dir: Path) -> None:
    """Return once this second is later than every existing event file's creation second.

    TensorBoard reads a run's event files in name order and a name starts with the second the
    file was opened, then host and pid. A resumed process that opened its file within the same
    second as the interrupted one could sort first, and its purge would then be read before the
    events it is meant to drop. Waiting (at most a second) makes the new file sort last.
    """
    stamps = []
    for path in log_dir.glob("events.out.tfevents.*"):
        parts = path.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    if stamps:
        delay = max(stamps) + 1 - time.time()
        if delay > 0:
            time.sleep(min(delay, 1.0))


class TensorBoardTracker:
    """Scalars and text in RUN/tensorboard, read by `tensorboard --logdir RUN`."""

    def __init__(self, run_dir: Path, start_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the reader drops earlier events at or after it, i.e. whatever an
        # interrupted process logged after the checkpoint this process resumes from.
        purge = start_step + 1 if start_step else None
        log_dir = run_dir / TENSORBOARD_DIR
        _wait_past_event_files(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, row: dict[str, Any]) -> None:
        _, step, values = _fields(row)
        for tag, value in values.items():
            if isinstance(value, str):
                # TensorBoard renders text as Markdown; four spaces keep it verbatim
                self.writer.add_text(tag, "    " + value.replace("\n", "\n    "), step)
            else:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per chargpt run, resumed by the id kept in the run directory."""

    def __init__(self, run_dir: Path, cfg: Config, log: Callable[[str], None]) -> None:
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids are short strings of [a-z0-9]
            atomic_write_text(id_file, run_id + "\n")
        mode = None  # wandb's own choice: WANDB_MODE, `wandb offline`, or online
        if not os.environ.get("WANDB_MODE") and not wandb.login(prompt=False, verify=False):
            mode = "offline"
            log(f"wandb: no API key set up; logging offline to {run_dir / 'wandb'} "
                "(upload later with `wandb sync`)")
        project = None if os.environ.get("WANDB_PROJECT") else DEFAULT_WANDB_PROJECT
        try:
            self.run = wandb.init(
                project=project, name=run_dir.resolve().name, id=run_id, resume="allow",
                dir=str(run_dir), config=cfg.to_dict(), mode=mode,
                # console capture would wrap chargpt's own output
                settings=wandb.Settings(console="off", quiet=True),
            )
        except Exception as e:  # wandb raises many error types (network, auth, usage)
            raise ChargptError(f"wandb could not start: {' '.join(str(e).split())}") from None
        self._wandb = wandb

    def log(self, row: dict[str, Any]) -> None:
        kind, step, values = _fields(row)
        data: dict[str, Any] = {}
        for tag, value in values.items():
            if isinstance(value, str):
                data[tag] = self._wandb.Html(f"<pre>{html.escape(value)}</pre>", inject=False)
            else:
                data[tag] = value
        # W&B ignores steps below the current one; a resumed online run starts past its last
        # step, so a row at exactly that step (the final sample) goes in at the next one.
        self.run.log(data, step=max(step, self.run.step if kind == "sample" else step))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers a run logs to; `log` and `close` never raise once training is under way."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self._trackers = trackers

    def __bool__(self) -> bool:
        return bool(self._trackers)

    def _guard(self, name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as e:  # a mirror failing must not stop training
            self._trackers.pop(name, None)
            warn(f"{name} logging failed ({' '.join(str(e).split())}); continuing with "
                 "metrics.jsonl only")

    def log(self, row: dict[str, Any]) -> None:
        for name, tracker in list(self._trackers.items()):
            self._guard(name, lambda t=tracker: t.log(row))

    def close(self) -> None:
        for name, tracker in list(self._trackers.items()):
            self._guard(name, tracker.close)
        self._trackers = {}


def open_trackers(cfg: Config, run_dir: str | Path, start_step: int | None,
                  enabled: bool = True, log: Callable[[str], None] = print) -> Trackers:
    """The trackers `cfg.train.log_to` names, for a run starting (or resuming) at
    `start_step` (None: add to the series without purging anything). `enabled=False` (ranks
    other than 0) gives an empty set."""
    names = parse_log_to(cfg.train.log_to) if enabled else []
    require_trackers(",".join(names))
    opened: dict[str, Tracker] = {}
    try:
        for name in names:
            if name == "tensorboard":
                opened[name] = TensorBoardTracker(Path(run_dir), start_step)
            else:
                opened[name] = WandbTracker(Path(run_dir), cfg, log)
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


def log_sample(cfg: Config, run_dir: str | Path, step: int, text: str,
               log: Callable[[str], None] = print) -> None:
    """Add the end-of-training sample to the run's trackers as text at `step` (rank 0)."""
    from chargpt.distributed import DistEnv

    trackers = open_trackers(cfg, run_dir, start_step=None, enabled=DistEnv.from_env().is_main,
                             log=log)
    if trackers:
        trackers.log({"kind": "sample", "step": step, "text": text})
        trackers.close()
