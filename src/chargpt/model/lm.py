"""What every chargpt language model is: its loss and its capabilities.

A chargpt model is an `nn.Module` with `forward(idx, targets=None, kv_cache=None)` returning
(logits (B, T, vocab_size), mean cross-entropy or None), `num_params()`, a `config`
(`ModelConfig`) and `capabilities()`, the one way to ask what else it can do: code that
samples, serves or draws attention asks `model.capabilities()`, never `hasattr` or the
config's `arch`. `language_model_loss` is the loss both models use; `model.build` makes one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Capabilities", "eval_mode", "language_model_loss"]


@dataclass(frozen=True)
class Capabilities:
    """What a model can do besides `forward(idx, targets)`."""

    context: int
    """Tokens of history its next-token prediction can depend on (block_size; 1 for bigram)."""
    kv_cache: bool = False
    """`forward(idx, kv_cache=cache)` decodes incrementally from a `kv_cache.KVCache`."""
    rolling_cache: bool = False
    """Positions are relative (rotary), so a full cache may drop its oldest entry and go on."""
    fast_decode: bool = False
    """`step(tok, at)` computes its forward for one token from a KV cache (`GPT.step`, run by
    `chargpt.generation.decode` eagerly or compiled; the native loop computes the same)."""
    attention: bool = False
    """It has self-attention: `attention_maps(idx)` returns its attention probabilities."""


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position of every sequence."""
    # float32 keeps the log-softmax accurate when the logits come out of bf16 autocast
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode (no dropout) for the block, then restore its training mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
