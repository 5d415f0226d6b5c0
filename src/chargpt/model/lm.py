"""What every chargpt language model is: its loss, its capabilities, and the factory.

A chargpt model is an `nn.Module` with `forward(idx, targets=None, kv_cache=None)` returning
(logits (B, T, vocab_size), mean cross-entropy or None), `num_params()`, a `config`
(`ModelConfig`) and `capabilities()`, the one way to ask what else it can do: code that
samples, serves or draws attention asks `model.capabilities()`, never `hasattr` or the
config's `arch`. `build_model` turns a `ModelConfig` into a fresh model of its `arch`, and
`language_model_loss` is the loss both models use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from chargpt.config.schema import ModelConfig
from chargpt.errors import ConfigError

__all__ = ["Capabilities", "build_model", "eval_mode", "language_model_loss"]


@dataclass(frozen=True)
class Capabilities:
    """What a model can do besides `forward(idx, targets)`."""

    context: int
    """Tokens of history its next-token prediction can depend on (block_size; 1 for bigram)."""
    kv_cache: bool = False
    """`forward(idx, kv_cache=cache)` decodes incrementally from a `sampling.KVCache`."""
    rolling_cache: bool = False
    """Positions are relative (rotary), so a full cache may drop its oldest entry and go on."""
    fast_decode: bool = False
    """`chargpt.generation.decode` has a fast single-token step for this configuration."""
    attention: bool = False
    """It has self-attention: `attention_maps(idx)` returns its weights."""


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position of every sequence."""
    # float32 keeps the log-softmax accurate when the logits come out of bf16 autocast
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def build_model(config: ModelConfig) -> nn.Module:
    """Build the model `config.arch` names, freshly initialised (vocab_size must be known)."""
    # Imported here: model.py and bigram.py import this module for the loss and Capabilities.
    from chargpt.model.bigram import BigramLM
    from chargpt.model.gpt import GPT

    if config.vocab_size <= 0:
        raise ConfigError(
            f"vocab_size must be > 0 to build a model, got {config.vocab_size} "
            "(it is taken from the prepared data)"
        )
    if config.arch == "gpt":
        return GPT(config)
    if config.arch == "bigram":
        return BigramLM(config)
    raise ConfigError(f"unknown model arch {config.arch!r} (expected gpt or bigram)")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode (no dropout) for the block, then restore its training mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
