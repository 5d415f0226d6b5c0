"""chargpt: train character-level GPT language models from scratch and generate text with them.

The public API mirrors the CLI: `prepare` a text, `resolve_config` + `train` a model, `load_run`
to generate and evaluate. Names are resolved lazily (PEP 562), so `import chargpt` has no side
effects and does not load PyTorch until a model or the training loop is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ChargptError": "errors",
    "CharTokenizer": "tokenizer",
    "prepare": "preparation",
    "load_prepared": "prepared",
    "Config": "config",
    "ModelConfig": "config",
    "DataConfig": "config",
    "TrainConfig": "config",
    "resolve_config": "config",
    "preset_names": "presets",
    "GPT": "model",
    "BigramLM": "bigram",
    "build_model": "lm",
    "KVCache": "sampling",
    "SamplingSettings": "sampling",
    "generate": "sampling",
    "generate_tokens": "sampling",
    "sample_next_token": "sampling",
    "train": "launch",
    "TrainResult": "trainer",
    "Run": "run",
    "load_run": "run",
    "fetch": "datasets",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'chargpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
