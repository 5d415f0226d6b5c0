"""Checkpoints as plain data, written so that a crash can never destroy the previous one.

A checkpoint is a directory (`RUN/last/`, `RUN/best/`) holding the model's tensors
(`model.safetensors`), the config and the vocabulary it was trained with (JSON), and a
`trainstate.TrainState`: everything besides the model that a run needs to continue exactly.
The state's numbers go to `state.json`; for a resumable checkpoint (`last/`) the optimizer's
tensors go to `optimizer.safetensors` and every rank's random-number states and the batch
sampler's stream to `rng.safetensors`. `manifest.json` is written last and records the sha256
of every other file, so a loader can tell a complete checkpoint from a torn or tampered one.

A save builds `NAME.tmp/`, then swaps it in with two renames (`NAME -> NAME.old`, `NAME.tmp ->
NAME`); whatever moment a crash hits, one complete checkpoint is left among those three names
and `resolve()` finds it. Nothing is ever unpickled. The manifest's `version` is the version of
this whole layout; `TrainState.from_saved` is the one place that reads older variants of it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from chargpt import faults
from chargpt.config.schema import Config
from chargpt.errors import CheckpointError
from chargpt.fileio import (
    fsync_dir,
    fsync_file,
    json_text,
    os_reason,
    read_error,
    sha256_file,
    utf8_path,
)
from chargpt.fileio import read_json as io_read_json
from chargpt.runs.trainstate import TrainState, join_optimizer_state, split_optimizer_state
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
    # Not atomic on its own: the whole directory is swapped in once complete. json_text: a
    # config's data_dir may be a path whose bytes are not UTF-8.
    with open(path, "w", encoding="utf-8") as f:
        f.write(json_text(obj) + "\n")


# The JSON files of a run are a few kB (a vocabulary of every Unicode character is ~5 MB); a
# larger one is refused before it is read.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint or run directory; a missing or broken one is a user error."""
    return io_read_json(path, error=CheckpointError, max_bytes=MAX_JSON_BYTES)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(utf8_path(path, "the checkpoint file", CheckpointError), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


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


def save(run_dir: str | Path, name: str, model: torch.nn.Module, data: CheckpointData) -> Path:
    """Write checkpoint `run_dir/name` atomically; the previous one survives any failure.

    Each step of the swap is a named point where a test may kill the process (faults.PHASES):
    the moments a crash is most interesting."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / name, run_dir / f"{name}.tmp", run_dir / f"{name}.old"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_files(tmp, model, data)
        faults.active().reached("checkpoint.files")
        _write_manifest(tmp)
        faults.active().reached("checkpoint.manifest")
        _swap_in(final, tmp, old)
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


def _swap_in(final: Path, tmp: Path, old: Path) -> None:
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
        faults.active().reached("checkpoint.old")
    os.replace(tmp, final)
    faults.active().reached("checkpoint.swapped")
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


def load_model_tensors(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load model.safetensors (the model's parameters and buffers) into `model`, which must
    have exactly the same names and shapes, and hold only finite numbers."""
    try:
        load_model(model, utf8_path(ckpt_dir / MODEL_FILE, "the checkpoint file",
                                    CheckpointError), strict=True, device="cpu")
    except (SafetensorError, RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{ckpt_dir / MODEL_FILE} does not fit the model in its config: {first}"
        ) from None
    _check_finite(model, ckpt_dir / MODEL_FILE)


def _check_finite(model: torch.nn.Module, path: Path) -> None:
    """A NaN or an infinity in the weights makes every output NaN: sample would print
    nothing and eval 'loss nan', both without an error. One pass over the tensors."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} other tensor(s)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path} holds values that are not finite numbers (NaN or "
                              f"infinity) in {bad[0]}{more}; the model cannot be used")


def load_config(ckpt_dir: Path) -> Config:
    """The config the checkpoint's model was built from."""
    return read_config(ckpt_dir / CONFIG_FILE)


def read_config(path: Path) -> Config:
    """A config.json (a checkpoint's or a run's): a JSON object of sections, checked."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a chargpt config (not a JSON object of "
                              "sections)")
    return Config.from_dict(data, source=str(path))


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
