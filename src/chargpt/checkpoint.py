"""Checkpoints as plain data, written so that a crash can never destroy the previous one.

A checkpoint is a directory (`RUN/last/`, `RUN/best/`) holding the raw model weights and the
optimizer tensors as safetensors, the random-number states as safetensors, and everything else
(step, losses, optimizer hyper-parameters, sampler position, the config and the vocabulary) as
JSON. `manifest.json` is written last and records the sha256 of every other file, so a loader
can tell a complete checkpoint from a torn or tampered one. A save builds `NAME.tmp/`, then
swaps it in with two renames (`NAME -> NAME.old`, `NAME.tmp -> NAME`); whatever moment a crash
hits, one complete checkpoint is left among those three names and `resolve()` finds it. Nothing
is ever unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import CheckpointError

FORMAT = "chargpt-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames durable; not every platform allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


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


# --- save -------------------------------------------------------------------------------------


@dataclass
class CheckpointData:
    """Everything needed to rebuild a model, and optionally to resume its training exactly."""

    state: dict[str, Any]  # step, losses, sampler position: JSON
    config: dict[str, Any]
    vocab: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] | None = None


def save(run_dir: str | Path, name: str, model: torch.nn.Module, data: CheckpointData) -> Path:
    """Write checkpoint `run_dir/name` atomically; the previous one survives any failure."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / name, run_dir / f"{name}.tmp", run_dir / f"{name}.old"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        state = dict(data.state)
        if data.optimizer is not None:
            tensors, rest = split_optimizer_state(data.optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": FORMAT})
            state["optimizer"] = rest
        if data.rng is not None:
            save_file({k: v.contiguous() for k, v in data.rng.items()}, str(tmp / RNG_FILE))
        _write_json(tmp / STATE_FILE, state)
        _write_json(tmp / CONFIG_FILE, data.config)
        _write_json(tmp / VOCAB_FILE, data.vocab)
        _test_delay()
        files = {}
        for path in sorted(tmp.iterdir()):
            _fsync_file(path)
            files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        _test_delay()
        _swap_in(final, tmp, old)
        _fsync_dir(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if e.errno == errno.ENOSPC else str(e)
        kept = " (the previous checkpoint is intact)" if resolve(run_dir, name) else ""
        raise CheckpointError(f"could not write checkpoint {final}: {reason}{kept}") from None
    return final


def _test_delay() -> None:
    # Test-only: CHARGPT_TEST_SAVE_DELAY widens the window in which a kill lands mid-save.
    delay = os.environ.get("CHARGPT_TEST_SAVE_DELAY")
    if delay:
        time.sleep(float(delay))


def _swap_in(final: Path, tmp: Path, old: Path) -> None:
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
        _test_delay()
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- verify and load --------------------------------------------------------------------------


def verify(ckpt_dir: str | Path) -> dict[str, Any]:
    """Check the manifest and every file's sha256; return the manifest or raise."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is incomplete: {MANIFEST} is missing") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir} is not a chargpt checkpoint")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{ckpt_dir} has checkpoint version {manifest.get('version')}; "
            f"this chargpt reads version {VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{manifest_path} lists no model weights")
    for name, entry in files.items():
        path = ckpt_dir / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{ckpt_dir} is incomplete: {name} is missing")
        if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} is corrupted (its sha256 does not match the manifest)")
    return manifest


def resolve(run_dir: str | Path, name: str) -> Path | None:
    """The complete checkpoint called `name` in `run_dir`, recovering from an interrupted swap."""
    run_dir = Path(run_dir)
    # Order matters: a verified NAME.tmp is newer than NAME.old (a crash hit between renames).
    for candidate in (run_dir / name, run_dir / f"{name}.tmp", run_dir / f"{name}.old"):
        if candidate.is_dir():
            try:
                verify(candidate)
            except CheckpointError:
                continue
            return candidate
    return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load model.safetensors into `model`, which must have exactly the same shapes."""
    try:
        load_model(model, str(ckpt_dir / MODEL_FILE), strict=True, device="cpu")
    except (SafetensorError, RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{ckpt_dir / MODEL_FILE} does not fit the model in its config: {first}"
        ) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
