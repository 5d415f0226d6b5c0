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
    "CharTokenizer": "text.tokenizer",
    "prepare": "data.preparation",
    "load_prepared": "data.prepared",
    "Config": "config.schema",
    "ModelConfig": "config.schema",
    "DataConfig": "config.schema",
    "TrainConfig": "config.schema",
    "resolve_config": "config.resolve",
    "preset_names": "config.presets",
    "GPT": "model.gpt",
    "BigramLM": "model.bigram",
    "build_model": "model.build",
    "KVCache": "model.kv_cache",
    "SamplingSettings": "generation.settings",
    "generate": "generation.loop",
    "generate_tokens": "generation.loop",
    "sample_next_token": "generation.draw",
    "train": "training.launch",
    "TrainResult": "training.trainer",
    "Run": "runs.run",
    "load_run": "runs.run",
    "fetch": "data.datasets",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"chargpt.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'chargpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
