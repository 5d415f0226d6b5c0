"""What every reader of a foreign model returns (`ImportedModel`), and `load_plain_torch`, the
one way chargpt opens a PyTorch file it was handed: tensors and plain containers only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chargpt.config.schema import ModelConfig
from chargpt.errors import CheckpointError
from chargpt.text.tokenizer import CharTokenizer

__all__ = ["ImportedModel", "is_dense_tensor_dict", "load_plain_torch"]


@dataclass
class ImportedModel:
    """A foreign model translated into chargpt's terms, ready for `write_run`."""

    config: ModelConfig
    tokenizer: CharTokenizer
    state_dict: dict[str, Tensor]
    source: dict[str, Any] = field(default_factory=dict)  # format, path and what else is known
    step: int = 0
    val_loss: float | None = None


def load_plain_torch(path: Path, mmap: bool = False) -> Any:
    """torch.load restricted to tensors and plain containers: a pickled object is refused
    before it is built, so loading can never run code. Sparse tensors are checked while they
    are loaded (torch skips that by default, and a sparse tensor whose indices point past its
    values reads out of bounds when used). With `mmap`, the file is mapped and no tensor's
    bytes are read until the tensor is used."""
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def is_dense_tensor_dict(obj: Any) -> bool:
    """Whether `obj` is a dict of dense (strided) tensors: the only weights a model has."""
    return isinstance(obj, dict) and all(
        isinstance(v, Tensor) and v.layout == torch.strided for v in obj.values())
