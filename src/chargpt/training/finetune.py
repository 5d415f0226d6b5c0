"""Starting a new run from a trained model: `chargpt train --init-from SOURCE --input NEW_TEXT`.

A fine-tune is a new run (its own directory, a fresh optimizer, its own schedule and budget)
whose weights start from SOURCE: a chargpt run or checkpoint directory, a Hugging Face folder
chargpt exported, or nanoGPT's `ckpt.pt`. A foreign source is first imported into a scratch
run directory (`interop.importer`), so every source passes the same gate (`runs.safety`)
before a model is built from it; the source itself is only read. The model's shape is the
source's: a value that contradicts it is an error naming the source's value, and only the
fields in `FREE_FIELDS` may differ. The vocabulary is the union of the two: the source's
characters keep their ids and the new text's other characters are appended (`data.prepare`
with `extend_vocab`); their rows of every vocabulary-sized matrix (embeddings, value
embeddings, the head) start as the mean of the source's rows (`grown`). Characters the new
text lacks stay, so the model can still write them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from chargpt.config.presets import load_toml
from chargpt.config.schema import Config, ModelConfig
from chargpt.errors import CheckpointError, ConfigError
from chargpt.model.build import build_model
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.rundir import CHECKPOINTS, find_checkpoint
from chargpt.runs.safety import CheckedCheckpoint
from chargpt.text.tokenizer import CharTokenizer

__all__ = ["FREE_FIELDS", "LR_SCALE", "check_model", "check_vocab", "describe",
           "explicit_values", "finetune_config", "grown", "load_source_weights", "source"]

# ModelConfig fields a fine-tune may set apart from its source; block_size only where
# positions are not a learned table (see `check_model`)
FREE_FIELDS = ("dropout", "emb_dropout", "block_size", "vocab_size")
# a fine-tune's learning rates as a fraction of its preset's, unless given explicitly
# (benchmarks/finetune.py; docs/finetune.md has the measurement)
LR_SCALE = 0.3
LR_FIELDS = ("lr", "min_lr", "muon_lr")


def _is_chargpt(path: Path) -> bool:
    """A chargpt checkpoint directory, or a run directory holding one."""
    return path.is_dir() and ((path / ckpt.MANIFEST).is_file()
                              or any((path / name).is_dir() for name in CHECKPOINTS))


@contextlib.contextmanager
def source(spec: str | Path) -> Iterator[CheckedCheckpoint]:
    """The checkpoint `spec` names, checked before anything is built from it; a Hugging Face
    folder or a nanoGPT checkpoint is imported into a scratch run directory, removed after."""
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--init-from {spec}: no such file or directory")
    if _is_chargpt(path):
        yield find_checkpoint(path)
        return
    from chargpt.interop.importer import detect, import_model

    detect(path)  # one line for anything that is neither kind, before the scratch exists
    scratch = Path(tempfile.mkdtemp(prefix="chargpt-init-from-"))
    try:
        _, run = import_model(path, scratch / "run")
        yield find_checkpoint(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def explicit_values(config_file: str | Path | None,
                    overrides: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """What the user asked for by name: the TOML file's tables, then the flags."""
    given: dict[str, dict[str, Any]] = {}
    for layer in (load_toml(config_file) if config_file else {}, overrides or {}):
        for section, values in layer.items():
            if isinstance(values, dict):
                given.setdefault(section, {}).update(values)
    return given


def check_model(model: ModelConfig, src: ModelConfig, spec: str | Path) -> None:
    """Refuse a model that is not `src`'s shape, naming the source's value."""
    for f in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(model, f.name), getattr(src, f.name)
        if ours == theirs or f.name in FREE_FIELDS and f.name != "block_size":
            continue
        if f.name == "block_size" and src.pos_emb != "learned":
            continue
        why = " (a learned position table)" if f.name == "block_size" else ""
        raise ConfigError(f"--init-from {spec}: model.{f.name} is fixed by the source{why}: "
                          f"{theirs!r}, not {ours!r}")


def check_vocab(tokenizer: CharTokenizer, src: CharTokenizer, spec: str | Path) -> None:
    """Refuse data whose vocabulary does not begin with the source's, id for id."""
    if tokenizer.unit != src.unit:
        raise ConfigError(f"--init-from {spec}: the source reads {src.unit}s and this data "
                          f"{tokenizer.unit}s; a byte-level model and a code-point corpus "
                          "cannot be mixed")
    if tokenizer.chars[: src.vocab_size] != src.chars:
        raise ConfigError(f"--init-from {spec}: the data's vocabulary does not keep the "
                          "source's characters at their ids; prepare it with --input instead")


def finetune_config(cfg: Config, src: Config, spec: str | Path,
                    given: dict[str, dict[str, Any]]) -> Config:
    """`cfg` (preset, file and flags resolved as for any run) made a fine-tune of `src`: the
    source's model with the free fields the user gave, the source's token unit, and learning
    rates `LR_SCALE` of `cfg`'s unless given; `init_from` records the source."""
    model = dataclasses.replace(src.model, **{
        k: v for k, v in given.get("model", {}).items() if k in FREE_FIELDS})
    check_model(dataclasses.replace(src.model, **given.get("model", {})), src.model, spec)
    check_model(model, src.model, spec)
    unit = given.get("data", {}).get("unit", src.data.unit)
    if unit != src.data.unit:
        raise ConfigError(f"--init-from {spec}: the source reads {src.data.unit}s, so its "
                          f"corpus cannot be prepared as {unit}s; a byte-level model and a "
                          "code-point corpus cannot be mixed")
    train = {k: getattr(cfg.train, k) * LR_SCALE for k in LR_FIELDS
             if k not in given.get("train", {})}
    return dataclasses.replace(
        cfg, model=model, data=dataclasses.replace(cfg.data, unit=unit),
        train=dataclasses.replace(cfg.train, init_from=str(Path(spec).resolve()), **train))


def describe(spec: str | Path, src: CheckedCheckpoint, tokenizer: CharTokenizer) -> str:
    """The line a fine-tune opens with: where it starts and what it adds to the vocabulary."""
    where = src.path if _is_chargpt(Path(spec)) else spec
    new = tokenizer.chars[src.tokenizer.vocab_size:]
    more = "..." if len(new) > 20 else ""
    added = f"{len(new)} new: {''.join(new[:20])!r}{more}" if new else "none new"
    return (f"fine-tuning from {where} (step {src.state.step}): vocab "
            f"{src.tokenizer.vocab_size} + {added}")


def grown(weights: dict[str, Tensor], shapes: dict[str, torch.Size], old_vocab: int
          ) -> dict[str, Tensor]:
    """`weights` fitted to `shapes`: a tensor whose first dimension is the old vocabulary and
    must become the new one gets new rows, each the mean of its old rows (measured against
    zero rows in docs/finetune.md); every other tensor must already fit."""
    out = {}
    for name, shape in shapes.items():
        w = weights[name]
        if w.shape != shape:
            if not (w.dim() >= 1 and w.shape[0] == old_vocab and w.shape[1:] == shape[1:]
                    and shape[0] > old_vocab):
                raise CheckpointError(f"the source's {name} has shape {tuple(w.shape)}, which "
                                      f"does not grow into {tuple(shape)}")
            new = w.mean(dim=0, keepdim=True).expand(shape[0] - old_vocab, *shape[1:])
            w = torch.cat((w, new), dim=0)
        out[name] = w
    return out


def load_source_weights(model: nn.Module, src: CheckedCheckpoint) -> None:
    """Put the source's weights into `model` (built for the union vocabulary)."""
    old = build_model(src.config.model)
    ckpt.load_model_tensors(old, src.path)
    target = model.state_dict()
    weights = grown(old.state_dict(), {k: v.shape for k, v in target.items()},
                    src.config.model.vocab_size)
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
