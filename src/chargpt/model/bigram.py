"""The bigram language model: the lecture's baseline before any attention.

Each token looks only at itself. A single vocab x vocab embedding table maps the current token
straight to the logits of the next one, so the model can learn which character tends to follow
which, and nothing more. It shares GPT's forward contract so that training, evaluation and
sampling treat both models alike; its context is one token whatever `block_size` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from chargpt.config.schema import ModelConfig
from chargpt.model.lm import Capabilities, language_model_loss

if TYPE_CHECKING:
    from chargpt.model.kv_cache import KVCache


class BigramLM(nn.Module):
    """Next-token logits read from a table row chosen by the current token.

    `forward(idx, targets=None, kv_cache=None)` accepts sequences of any length and ignores
    `kv_cache`: with a context of one token there is nothing to cache.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        if config.init == "gpt2":
            # Like GPT: near-uniform initial predictions, so the step-0 loss is ~ln(vocab_size).
            # ('torch' keeps nn.Embedding's N(0, 1), the lecture's starting point.)
            nn.init.normal_(self.token_embedding_table.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters; all of them are the embedding table, so 0 with `non_embedding`."""
        return 0 if non_embedding else self.token_embedding_table.weight.numel()

    def capabilities(self) -> Capabilities:
        """A context of one token: no cache, no attention."""
        return Capabilities(context=1)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        logits = self.token_embedding_table(idx)  # (B, T, vocab_size)
        loss = language_model_loss(logits, targets) if targets is not None else None
        return logits, loss
