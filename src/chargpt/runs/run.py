"""A trained model ready to use: load a run directory or checkpoint, generate text, evaluate.

`Run.load("runs/x")` picks the best checkpoint (or `last`: see rundir.find_checkpoint for what
happens when one is damaged), checks it completely before allocating anything (safety.py), then
builds the model from the checkpoint's own config and vocabulary and loads the weights. Nothing
is unpickled, so a run directory from a stranger can be loaded without running their code, and
no config from a stranger can make it build a model the machine cannot hold. A `Run`
offers what every front end needs (the CLI, the web server, notebooks): a stream of generated
characters, the attention maps of a prompt, and the loss on a text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chargpt.config.schema import Config
from chargpt.config.values import MAX_SEED, check_device
from chargpt.device import pick_device
from chargpt.errors import ConfigError
from chargpt.generation.loop import check_lengths, generate_tokens
from chargpt.generation.settings import SamplingSettings
from chargpt.model.build import build_model
from chargpt.model.evaluate import evaluate_tokens
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.rundir import find_checkpoint
from chargpt.runs.trainstate import TrainState
from chargpt.text.textstream import TextStream
from chargpt.text.tokenizer import CharTokenizer


@dataclass
class Run:
    """A model, its tokenizer and its config, loaded from one checkpoint."""

    checkpoint: Path
    config: Config
    tokenizer: CharTokenizer
    model: torch.nn.Module
    state: TrainState
    device: torch.device

    @classmethod
    def load(cls, path: str | Path, checkpoint: str | None = None, device: str = "auto") -> Run:
        """The model in run directory (or checkpoint directory) `path`. `checkpoint` names
        best or last; None (the default) is best, or last when best is missing or damaged."""
        check_device(device)  # a typo is one line before any checkpoint is read
        dev = pick_device(device)
        found = find_checkpoint(path, checkpoint)
        model = build_model(found.config.model)
        ckpt.load_model_tensors(model, found.path)
        model.to(dev).eval()
        return cls(found.path, found.config, found.tokenizer, model, found.state, dev)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def val_loss(self) -> float:
        return self.state.val_loss

    @property
    def block_size(self) -> int:
        return self.config.model.block_size

    @property
    def has_attention(self) -> bool:
        return self.model.capabilities().attention

    def default_prompt(self) -> str:
        return "\n" if "\n" in self.tokenizer.chars else self.tokenizer.chars[0]

    def encode_prompt(self, prompt: str, unknown: str = "error") -> list[int]:
        """The ids of `prompt` (default: a newline); unknown characters follow `unknown`."""
        ids = self.tokenizer.encode(prompt or self.default_prompt(), unknown=unknown,
                                    what="prompt")
        if not ids:
            raise ConfigError("the prompt has no characters left after skipping unknown ones")
        return ids

    def stream_ids(self, ids: Sequence[int], max_new_tokens: int,
                   settings: SamplingSettings) -> Iterator[str]:
        """Yield the text of each token generated after the prompt `ids`, one at a time.

        A character run yields one character per token. A byte-level run yields "" for a
        byte that does not finish a character yet, U+FFFD where the bytes are not UTF-8, and
        a last U+FFFD if the sample ends inside a character (see textstream.py).
        Close the iterator to stop early: the model's mode is restored at once."""
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        tokens = generate_tokens(self.model, idx, max_new_tokens, settings,
                                 generator=settings.generator(self.device))
        text = TextStream(self.tokenizer)
        with contextlib.closing(tokens):
            for token in tokens:
                yield text.feed(int(token[0]))
        if tail := text.flush():
            yield tail

    def stream_samples(self, ids: Sequence[int], max_new_tokens: int,
                       settings: SamplingSettings, num_samples: int) -> Iterator[list[str]]:
        """Yield the next character of each of `num_samples` continuations of `ids`, decoded
        as one batch. Sample i draws from its own generator seeded `settings.seed + i` (fresh
        seeds when unseeded), so it is the text `stream_ids` gives with that seed."""
        check_lengths(num_samples, max_new_tokens)  # before the batch of prompts is built
        if settings.seed is not None and settings.seed + num_samples - 1 > MAX_SEED:
            raise ConfigError(f"seed must be at most 2**63 - {num_samples} for {num_samples} "
                              f"samples (sample i is seeded seed + i), got {settings.seed}")
        idx = torch.tensor([list(ids)] * num_samples, dtype=torch.long, device=self.device)
        generators = [settings.with_seed(None if settings.seed is None else settings.seed + i)
                      .generator(self.device) for i in range(num_samples)]
        tokens = generate_tokens(self.model, idx, max_new_tokens, settings,
                                 generator=generators)
        return self._characters(tokens)  # checked now, not at the first character

    def _characters(self, tokens: Iterator[torch.Tensor]) -> Iterator[list[str]]:
        decode = self.tokenizer.decode
        with contextlib.closing(tokens):
            for token in tokens:
                yield [decode([i]) for i in token.tolist()]

    def stream(self, prompt: str = "", max_new_tokens: int = 500,
               settings: SamplingSettings | None = None, *, unknown: str = "error",
               **options: Any) -> Iterator[str]:
        """Yield generated characters one at a time (the prompt is not repeated).

        How to sample is `settings`, or its fields as keywords (temperature=, top_k=, top_p=,
        seed=, use_cache=); an unseeded run draws a fresh random seed."""
        settings = SamplingSettings.of(settings, **options)
        return self.stream_ids(self.encode_prompt(prompt, unknown), max_new_tokens, settings)

    def generate(self, prompt: str = "", max_new_tokens: int = 500, **kwargs: Any) -> str:
        """The generated continuation of `prompt` as one string."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    def attention_maps(self, ids: Sequence[int]) -> torch.Tensor:
        """Softmax attention weights (n_layer, n_head, T, T) of the prompt `ids`, on the CPU.

        At most `block_size` ids; a model without attention (the bigram) is a ConfigError."""
        if not self.has_attention:
            raise ConfigError(f"{self.checkpoint} holds a {self.config.model.arch} model, "
                              "which has no attention to draw")
        if not 0 < len(ids) <= self.block_size:
            raise ConfigError(f"attention needs 1 to {self.block_size} characters, "
                              f"got {len(ids)}")
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.model.attention_maps(idx)[:, 0].cpu()  # (n_layer, B=1, ...): drop B

    def evaluate_ids(self, ids, batch_size: int = 64, tiled: bool = False) -> float:
        """Mean loss over every token of `ids` (see `evaluate_tokens` for `tiled`)."""
        return evaluate_tokens(self.model, ids, block_size=self.block_size,
                               batch_size=batch_size, device=self.device, tiled=tiled)


def load_run(path: str | Path, checkpoint: str | None = None, device: str = "auto") -> Run:
    """Load a trained model from a run directory (or a checkpoint directory)."""
    return Run.load(path, checkpoint=checkpoint, device=device)
