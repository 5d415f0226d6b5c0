"""Checkpoints as plain data, written so that a crash can never destroy the previous one.

A checkpoint is a directory (`RUN/last/`, `RUN/best/`) holding the model weights
(`model.safetensors`), the config and the vocabulary it was trained with (JSON), and a
`TrainState`: everything besides the weights that a run needs to continue exactly. The state's
numbers go to `state.json`; for a resumable checkpoint (`last/`) the optimizer's tensors go to
`optimizer.safetensors` and every rank's random-number states and the batch sampler's stream
to `rng.safetensors`. `manifest.json` is written last and records the sha256 of every other
file, so a loader can tell a complete checkpoint from a torn or tampered one.

A save builds `NAME.tmp/`, then swaps it in with two renames (`NAME -> NAME.old`, `NAME.tmp ->
NAME`); whatever moment a crash hits, one complete checkpoint is left among those three names
and `resolve()` finds it. Nothing is ever unpickled. The manifest's `version` is the version of
this whole layout; `TrainState.from_saved` is the one place that reads older variants of it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from chargpt.config.schema import Config
from chargpt.errors import CheckpointError
from chargpt.fileio import fsync_dir, fsync_file, os_reason, read_error, sha256_file
from chargpt.fileio import read_json as io_read_json
from chargpt.text.tokenizer import CharTokenizer

FORMAT = "chargpt-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


def _write_json(path: Path, obj: Any) -> None:
    # Not atomic on its own: the whole directory is swapped in once complete.
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# The JSON files of a run are a few kB (a vocabulary of every Unicode character is ~5 MB); a
# larger one is refused before it is read.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint or run directory; a missing or broken one is a user error."""
    return io_read_json(path, error=CheckpointError, max_bytes=MAX_JSON_BYTES)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


# --- optimizer state <-> (tensors, JSON) -----------------------------------------------------


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Separate an optimizer state_dict into named tensors and a JSON-safe remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict[str, Any]:
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        per_param.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        per_param.setdefault(int(idx), {}).update(values)
    return {"state": per_param, "param_groups": rest["param_groups"]}


# --- the training state --------------------------------------------------------------------


def _per_rank(tensors: dict[str, torch.Tensor], name: str) -> list[torch.Tensor] | None:
    """[rank 0's, rank 1's, ...] saved as `name`, `name.1`, ... (rank 0 has no suffix)."""
    if name not in tensors:
        return None
    out = [tensors[name]]
    while f"{name}.{len(out)}" in tensors:
        out.append(tensors[f"{name}.{len(out)}"])
    return out


@dataclass
class TrainState:
    """What a run needs besides its weights to continue exactly where it stopped.

    A `best/` checkpoint keeps only the numbers (step, losses, elapsed time); `last/` is
    resumable and also keeps the optimizer, every rank's RNG states and the sampler's stream.
    """

    step: int = 0
    best_val_loss: float = math.inf
    val_loss: float = math.inf
    elapsed: float = 0.0  # seconds of training before this checkpoint, all sessions
    world_size: int = 1  # processes of the run that wrote it
    sampler: dict[str, Any] = field(default_factory=dict)  # BatchSampler.state_dict()
    torch_version: str = field(default_factory=lambda: torch.__version__)
    cpu_rng: list[torch.Tensor] | None = None  # torch.get_rng_state() of each rank
    cuda_rng: list[torch.Tensor] | None = None  # torch.cuda.get_rng_state() of each rank
    optimizer: dict[str, Any] | None = None  # optimizer.state_dict()
    imported_from: dict[str, Any] | None = None  # provenance of a model `chargpt import` made

    @property
    def resumable(self) -> bool:
        return self.optimizer is not None and self.cpu_rng is not None

    def rng_of(self, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(CPU, CUDA) RNG states saved by `rank`; None where the run had fewer ranks."""

        def pick(states: list[torch.Tensor] | None) -> torch.Tensor | None:
            return states[rank] if states is not None and rank < len(states) else None

        return pick(self.cpu_rng), pick(self.cuda_rng)

    def to_saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """(state.json content, rng.safetensors content or None for a weights-only state)."""
        numbers = {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "val_loss": self.val_loss,
            "elapsed": self.elapsed,
            "world_size": self.world_size,
            "sampler": {k: v for k, v in self.sampler.items()
                        if not isinstance(v, torch.Tensor)},
            "torch_version": self.torch_version,
        }
        if self.imported_from is not None:
            numbers["imported_from"] = self.imported_from
        if self.cpu_rng is None:
            return numbers, None
        rng: dict[str, torch.Tensor] = {}
        for name, states in (("torch_cpu", self.cpu_rng), ("torch_cuda", self.cuda_rng or [])):
            for r, t in enumerate(states):
                rng[name if r == 0 else f"{name}.{r}"] = t.contiguous()
        for k, v in self.sampler.items():
            if isinstance(v, torch.Tensor):
                rng[f"sampler.{k}"] = v.contiguous()
        return numbers, rng

    @classmethod
    def from_saved(cls, numbers: dict[str, Any], rng: dict[str, torch.Tensor] | None,
                   optimizer: dict[str, Any] | None) -> TrainState:
        """The inverse of `to_saved`, reading every layout version 1 has had."""
        if not isinstance(numbers, dict) or not isinstance(numbers.get("sampler", {}), dict):
            raise CheckpointError("the saved training state is not a JSON object")
        sampler = dict(numbers.get("sampler", {}))
        rng = rng or {}
        sampler.update({k.removeprefix("sampler."): v for k, v in rng.items()
                        if k.startswith("sampler.")})
        if "sampler" in rng:  # the key the first layout used for the sampler's generator
            sampler["generator"] = rng["sampler"]
        try:
            return cls(
                step=int(numbers["step"]),
                best_val_loss=float(numbers.get("best_val_loss", math.inf)),
                val_loss=float(numbers.get("val_loss", math.inf)),
                elapsed=float(numbers.get("elapsed", 0.0)),
                world_size=int(numbers.get("world_size", 1)),
                sampler=sampler,
                torch_version=str(numbers.get("torch_version", "")),
                cpu_rng=_per_rank(rng, "torch_cpu"),
                cuda_rng=_per_rank(rng, "torch_cuda"),
                optimizer=optimizer,
                imported_from=numbers.get("imported_from"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the saved training state is invalid ({e})") from None


# --- save -------------------------------------------------------------------------------------


@dataclass
class CheckpointData:
    """Everything needed to rebuild a model, and (if `state` is resumable) to resume it."""

    config: dict[str, Any]  # Config.to_dict()
    vocab: dict[str, Any]  # CharTokenizer.to_dict()
    state: TrainState


class SaveError(CheckpointError):
    """A checkpoint could not be written; the previous one under its name was kept."""

    def __init__(self, target: Path, reason: str, kept: bool):
        self.target, self.reason, self.kept = target, reason, kept
        intact = " (the previous checkpoint is intact)" if kept else ""
        super().__init__(f"could not write checkpoint {target}: {reason}{intact}")


def _no_pause() -> None:
    pass


def save(run_dir: str | Path, name: str, model: torch.nn.Module, data: CheckpointData, *,
         pause: Callable[[], None] = _no_pause) -> Path:
    """Write checkpoint `run_dir/name` atomically; the previous one survives any failure.

    `pause` is called after the files are written, after the manifest and between the two
    renames: the moments a crash is most interesting (fault injection, see faults.py)."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / name, run_dir / f"{name}.tmp", run_dir / f"{name}.old"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_files(tmp, model, data)
        pause()
        _write_manifest(tmp)
        pause()
        _swap_in(final, tmp, old, pause)
        fsync_dir(run_dir)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports its own I/O errors as SafetensorErrors
        raise SaveError(final, os_reason(e), kept=resolve(run_dir, name) is not None) from None
    return final


def _write_files(tmp: Path, model: torch.nn.Module, data: CheckpointData) -> None:
    save_model(model, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
    numbers, rng = data.state.to_saved()
    if data.state.optimizer is not None:
        tensors, rest = split_optimizer_state(data.state.optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": FORMAT})
        numbers["optimizer"] = rest
    if rng is not None:
        save_file(rng, str(tmp / RNG_FILE))
    _write_json(tmp / STATE_FILE, numbers)
    _write_json(tmp / CONFIG_FILE, data.config)
    _write_json(tmp / VOCAB_FILE, data.vocab)


def _write_manifest(tmp: Path) -> None:
    files = {}
    for path in sorted(tmp.iterdir()):
        fsync_file(path)
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})
    fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)


def _swap_in(final: Path, tmp: Path, old: Path, pause: Callable[[], None]) -> None:
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
        pause()
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- verify and load --------------------------------------------------------------------------


REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, STATE_FILE)


def _read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest's header and file list, checked for shape (not yet against the files)."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is incomplete: {MANIFEST} is missing")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir} is not a chargpt checkpoint")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{ckpt_dir} has checkpoint version {manifest.get('version')}; "
            f"this chargpt reads version {VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path} has no list of files")
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{path} does not list {name}")
    for name, entry in files.items():
        if name in ("", ".", "..", MANIFEST) or Path(name).name != name:
            raise CheckpointError(f"{path} lists {name!r}, which is not a file of a checkpoint")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and type(entry.get("bytes")) is int):
            raise CheckpointError(f"{path}: the entry of {name} has no sha256 and size")
    return manifest


def _check_file(path: Path, entry: dict[str, Any]) -> None:
    """`path` is exactly the file the manifest describes; else one line saying what differs."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (its manifest lists it)")
    size, expected = path.stat().st_size, entry["bytes"]
    if size < expected:
        raise CheckpointError(f"{path} is truncated: {size:,} bytes where its manifest says "
                              f"{expected:,}")
    if size > expected:
        raise CheckpointError(f"{path} has {size:,} bytes where its manifest says {expected:,} "
                              "(it was changed after it was written)")
    if sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{path} does not match its manifest (sha256 mismatch: the file "
                              "was corrupted or changed after it was written)")


def verify(ckpt_dir: str | Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest or raise a
    one-line CheckpointError naming the file and the check that failed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}")
    manifest = _read_manifest(ckpt_dir)
    try:
        for name, entry in manifest["files"].items():
            _check_file(ckpt_dir / name, entry)
    except OSError as e:
        raise read_error(e.filename or ckpt_dir, e, error=CheckpointError) from None
    return manifest


def candidates(run_dir: str | Path, name: str) -> tuple[Path, Path, Path]:
    """Where checkpoint `name` may be after a crash, newest first: NAME, NAME.tmp, NAME.old.

    A verified NAME.tmp is newer than NAME.old: the crash hit between the two renames."""
    run_dir = Path(run_dir)
    return run_dir / name, run_dir / f"{name}.tmp", run_dir / f"{name}.old"


def resolve(run_dir: str | Path, name: str) -> Path | None:
    """The complete checkpoint called `name` in `run_dir`, recovering from an interrupted swap."""
    for candidate in candidates(run_dir, name):
        if candidate.is_dir():
            try:
                verify(candidate)
            except CheckpointError:
                continue
            return candidate
    return None


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load model.safetensors into `model`, which must have exactly the same shapes."""
    try:
        load_model(model, str(ckpt_dir / MODEL_FILE), strict=True, device="cpu")
    except (SafetensorError, RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{ckpt_dir / MODEL_FILE} does not fit the model in its config: {first}"
        ) from None


def load_config(ckpt_dir: Path) -> Config:
    """The config the checkpoint's model was built from."""
    path = ckpt_dir / CONFIG_FILE
    return Config.from_dict(read_json(path), source=str(path))


def load_vocab(ckpt_dir: Path) -> CharTokenizer:
    """The vocabulary the checkpoint's model was trained on."""
    path = ckpt_dir / VOCAB_FILE
    return CharTokenizer.from_dict(read_json(path), source=str(path))


def load_train_state(ckpt_dir: Path, *, resumable: bool = False) -> TrainState:
    """The checkpoint's `TrainState`: its numbers only, or with `resumable` everything needed
    to continue training (a weights-only checkpoint is then refused)."""
    numbers = read_json(ckpt_dir / STATE_FILE)
    if not resumable:
        return TrainState.from_saved(numbers, None, None)
    if not (isinstance(numbers, dict) and "optimizer" in numbers
            and (ckpt_dir / RNG_FILE).exists()):
        raise CheckpointError(f"{ckpt_dir} holds weights only and cannot be resumed")
    tensors = load_tensors(ckpt_dir / OPTIMIZER_FILE)
    try:
        optimizer = join_optimizer_state(tensors, numbers["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{ckpt_dir}: the optimizer state is invalid ({e})") from None
    state = TrainState.from_saved(numbers, load_tensors(ckpt_dir / RNG_FILE), optimizer)
    if state.cpu_rng is None:
        raise CheckpointError(f"{ckpt_dir}: {RNG_FILE} holds no CPU random-number state")
    return state
