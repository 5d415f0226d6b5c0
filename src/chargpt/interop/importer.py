"""Models from elsewhere into chargpt run directories: `chargpt import SRC --out RUN_DIR`.

A reader (hf_import.py for Hugging Face folders, nanogpt.py for nanoGPT's ckpt.pt + meta.pkl)
turns a source into an `ImportedModel`: a chargpt `ModelConfig`, a `CharTokenizer` and a
state_dict with chargpt's parameter names. `write_run` checks that the weights fit the model
exactly and writes a normal run directory with chargpt's own checkpoint writer (a weights-only
`last/` checkpoint, which `sample`, `eval`, `serve` and `export` use like any other). Nothing a
source holds is ever executed: tensors come from safetensors or `torch.load(weights_only=True)`
(`load_plain_torch`), and other metadata from JSON or a pickle reader that refuses every
object (nanogpt.py).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chargpt.config.schema import Config, ModelConfig
from chargpt.errors import CheckpointError, ConfigError
from chargpt.fileio import temp_path_for
from chargpt.text.tokenizer import CharTokenizer

CHECKPOINT_NAME = "last"


@dataclass
class ImportedModel:
    """A foreign model translated into chargpt's terms, ready for `write_run`."""

    config: ModelConfig
    tokenizer: CharTokenizer
    state_dict: dict[str, Tensor]
    source: dict[str, Any] = field(default_factory=dict)  # format, path and what else is known
    step: int = 0
    val_loss: float | None = None


def load_plain_torch(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a pickled object is refused
    before it is built, so loading can never run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a hostile or broken file: torch.load raises many error types
        message = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found:
            raise CheckpointError(
                f"{path} holds pickled objects ({found.group(1)}), not only tensors and plain "
                "data; refusing to load it (nothing was executed)"
            ) from None
        # torch's message is a paragraph; the line naming what it refused is the useful one
        lines = [s.strip() for s in message.splitlines() if s.strip()] or [type(e).__name__]
        reason = next((s for s in lines if s.startswith("Unsupported")), lines[0])
        raise CheckpointError(f"{path} is not a readable PyTorch file of plain tensors "
                              f"({reason}); nothing was executed") from None


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; choose a new --out")


def write_run(imported: ImportedModel, out_dir: str | Path) -> Path:
    """Write `imported` as the chargpt run directory `out_dir` (which must be new or empty)."""
    from chargpt.model.gpt import build_model
    from chargpt.runs import checkpoint as ckpt
    from chargpt.runs.rundir import RunDir
    from chargpt.runs.safety import LOAD_FACTOR, check_bounds, require_memory

    out = Path(out_dir)
    _check_out(out)
    cfg = Config(model=imported.config)
    source = imported.source.get("path", "the source")  # its sizes are a stranger's numbers
    check_bounds(cfg.model, source)
    require_memory(cfg.model, LOAD_FACTOR, source)
    model = build_model(cfg.model)
    sd = dict(imported.state_dict)
    if cfg.model.tie_weights:  # one matrix under two names; either may be given
        sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight"))
        sd.setdefault("transformer.wte.weight", sd["lm_head.weight"])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(
            f"the weights of {imported.source.get('path', 'the source')} do not fit a chargpt "
            f"model with their config: {detail}"
        ) from None
    val = math.inf if imported.val_loss is None else imported.val_loss
    state = ckpt.TrainState(step=imported.step, val_loss=val, best_val_loss=val,
                            imported_from=imported.source)
    data = ckpt.CheckpointData(config=cfg.to_dict(), vocab=imported.tokenizer.to_dict(),
                               state=state)
    tmp = temp_path_for(out, "import")
    try:
        tmp.mkdir(parents=True)
        ckpt.save(tmp, CHECKPOINT_NAME, model, data)
        RunDir(tmp).write_config(cfg)
        _check_out(out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def detect(src: Path) -> str:
    """'hf' or 'nanogpt', from what `src` holds."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if src.is_dir():
        if (src / "config.json").is_file():
            return "hf"
        if (src / "ckpt.pt").is_file():
            return "nanogpt"
        raise CheckpointError(f"{src} holds neither a Hugging Face model (config.json) nor a "
                              "nanoGPT checkpoint (ckpt.pt)")
    if src.suffix in (".pt", ".pth"):
        return "nanogpt"
    raise CheckpointError(f"{src} is not a Hugging Face folder or a nanoGPT .pt checkpoint")


def import_model(src: str | Path, out_dir: str | Path, meta: str | Path | None = None
                 ) -> tuple[ImportedModel, Path]:
    """Read `src` (a Hugging Face folder, or nanoGPT's ckpt.pt or its folder) and write it as
    the run directory `out_dir`; `meta` is nanoGPT's meta.pkl when it is not found by itself."""
    src, out = Path(src), Path(out_dir)
    _check_out(out)  # before reading anything large
    kind = detect(src)
    if meta is not None and kind != "nanogpt":
        raise ConfigError("--meta is only for nanoGPT checkpoints")
    if kind == "hf":
        from chargpt.interop.hf_import import read_hf

        imported = read_hf(src)
    else:
        from chargpt.interop.nanogpt import read_nanogpt

        ckpt_path = src / "ckpt.pt" if src.is_dir() else src
        imported = read_nanogpt(ckpt_path, Path(meta) if meta is not None else None)
    return imported, write_run(imported, out)
