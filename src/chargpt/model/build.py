"""`build_model`: a fresh model of the kind a `ModelConfig` names (`arch`: gpt or bigram)."""

from __future__ import annotations

from torch import nn

from chargpt.config.schema import ModelConfig
from chargpt.errors import ConfigError
from chargpt.model.bigram import BigramLM
from chargpt.model.gpt import GPT

__all__ = ["build_model"]


def build_model(config: ModelConfig) -> nn.Module:
    """Build the model `config.arch` names, freshly initialised (vocab_size must be known)."""
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
