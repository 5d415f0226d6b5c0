"""A trained model ready to use: load a run directory or checkpoint, generate text, evaluate.

`Run.load("runs/x")` picks the best checkpoint (or `last`), verifies its manifest, rebuilds the
model from the checkpoint's own config and vocabulary, and loads the weights; nothing is
unpickled, so a run directory from a stranger can be loaded without running their code.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import Config
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate_tokens
from .model import build_model
from .sampling import generate_tokens
from .tokenizer import CharTokenizer
from .trainer import pick_device

CHECKPOINT_CHOICES = ("best", "last")


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A verified checkpoint directory: `path` itself, or `path/which` (falling back to last)."""
    path = Path(path)
    if which not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / ckpt.MANIFEST).is_file():
        ckpt.verify(path)
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a chargpt run directory or checkpoint")
    for name in (which, "last") if which == "best" else (which,):
        found = ckpt.resolve(path, name)
        if found is not None:
            return found
    # Nothing verified: explain the first problem found, or that this is not a run at all.
    for name in (which, f"{which}.tmp", f"{which}.old"):
        if (path / name).is_dir():
            ckpt.verify(path / name)
    raise CheckpointError(f"{path} has no checkpoint (is it a chargpt run directory?)")


@dataclass
class Run:
    """A model, its tokenizer and its config, loaded from one checkpoint."""

    checkpoint: Path
    config: Config
    tokenizer: CharTokenizer
    model: torch.nn.Module
    state: dict[str, Any]
    device: torch.device

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "best", device: str = "auto") -> Run:
        ckpt_dir = find_checkpoint(path, checkpoint)
        config = Config.from_dict(ckpt.read_json(ckpt_dir / ckpt.CONFIG_FILE),
                                  source=str(ckpt_dir / ckpt.CONFIG_FILE))
        tokenizer = CharTokenizer.from_json(
            (ckpt_dir / ckpt.VOCAB_FILE).read_text(encoding="utf-8")
        )
        if tokenizer.vocab_size != config.model.vocab_size:
            raise CheckpointError(
                f"{ckpt_dir}: vocabulary has {tokenizer.vocab_size} characters but the model "
                f"expects {config.model.vocab_size}"
            )
        model = build_model(config.model)
        ckpt.load_weights(model, ckpt_dir)
        dev = pick_device(device)
        model.to(dev).eval()
        state = ckpt.read_json(ckpt_dir / ckpt.STATE_FILE)
        return cls(ckpt_dir, config, tokenizer, model, state, dev)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def val_loss(self) -> float:
        return float(self.state.get("val_loss", math.nan))

    def default_prompt(self) -> str:
        return "\n" if "\n" in self.tokenizer.chars else self.tokenizer.chars[0]

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int = 500,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        unknown: str = "error",
    ) -> Iterator[str]:
        """Yield generated characters one at a time (the prompt is not repeated)."""
        ids = self.tokenizer.encode(prompt or self.default_prompt(), unknown=unknown,
                                    what="prompt")
        if not ids:
            raise ConfigError("the prompt has no characters left after skipping unknown ones")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        for token in generate_tokens(self.model, idx, max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, generator=generator,
                                     use_cache=use_cache):
            yield self.tokenizer.decode([int(token[0])])

    def generate(self, prompt: str = "", max_new_tokens: int = 500, **kwargs: Any) -> str:
        """The generated continuation of `prompt` as one string."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    def evaluate_ids(self, ids, batch_size: int = 64) -> float:
        return evaluate_tokens(self.model, ids, block_size=self.config.model.block_size,
                               batch_size=batch_size, device=self.device)


def load_run(path: str | Path, checkpoint: str = "best", device: str = "auto") -> Run:
    """Load a trained model from a run directory (or a checkpoint directory)."""
    return Run.load(path, checkpoint=checkpoint, device=device)
