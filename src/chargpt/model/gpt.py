"""The decoder-only Transformer (GPT), chargpt's main model (the factory is in build.py).

`GPT` follows GPT-2's layout and parameter names (`transformer.wte`, `transformer.h.0.attn.c_attn`,
`lm_head`, ...) so its checkpoints read like nanoGPT's. Every part the lecture discusses can be
switched through `ModelConfig`: LayerNorm placement (pre, post, none), residual connections, the
MLP sub-layer, the activation and weight tying; so can the speedrun community's changes: rotary
position embeddings (RoPE), ReLU-squared MLPs, QK-norm, RMSNorm and zero-initialised output
projections. Attention is its own module (attention.py). Incremental decoding uses a `KVCache`
that lives outside the model and is passed to `forward`; `step` is the same model for one token
in eval mode, through the same modules (each block's, attention's and the MLP's own `step`),
written for decoding speed: no dropout, shape checks, module calls around the matrix products
or cache bookkeeping, and static shapes that `torch.compile` can fuse (generation/decode.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chargpt.config.schema import ModelConfig
from chargpt.errors import ConfigError
from chargpt.model.attention import CausalSelfAttention, Linear
from chargpt.model.lm import Capabilities, language_model_loss
from chargpt.model.rope import rope_rows

if TYPE_CHECKING:
    from chargpt.model.kv_cache import CacheSlot, KVCache


def make_norm(config: ModelConfig) -> nn.Module:
    """The normalisation layer the config asks for: LayerNorm or RMSNorm."""
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class MLP(nn.Module):
    """The position-wise feed-forward network: widen, apply a non-linearity, project back.

    Attention moves information between positions; this is where each position processes what
    it gathered. The hidden width is `mlp_ratio * n_embd` and the activation GELU, ReLU or
    ReLU squared. Without `mlp_proj` it is the lecture's first feed-forward layer: one
    n_embd-wide Linear and the activation, nothing projected back.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act: nn.Module = (
            nn.GELU() if config.activation == "gelu"
            else ReLUSquared() if config.activation == "relu2"
            else nn.ReLU()
        )
        self.c_proj = (nn.Linear(hidden, config.n_embd, bias=config.bias)
                       if config.mlp_proj else None)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.step(x, F.linear))

    def step(self, x: Tensor, linear: Linear) -> Tensor:
        """The MLP of `x` (..., C) without dropout, its matrix products by `linear`: `forward`
        in eval mode, and the MLP of a decode step."""
        fc, proj = self.c_fc, self.c_proj
        h = self.act(linear(x, fc.weight, fc.bias))  # (..., mlp_ratio * C)
        return h if proj is None else linear(h, proj.weight, proj.bias)


class ReLUSquared(nn.Module):
    """relu(x)^2: as cheap as ReLU, with a smooth zero crossing (Primer; the speedruns)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class Block(nn.Module):
    """One Transformer layer: self-attention, then the MLP, wired as the config says.

    norm 'pre' normalises each sub-layer's input (GPT-2), 'post' normalises after the residual
    addition (the original Transformer), 'none' drops LayerNorm. Without residual connections a
    sub-layer's output replaces its input instead of being added to it; with `mlp` off the
    block is attention only.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm = config.norm
        self.residual = config.residual
        use_ln = config.norm != "none"
        self.ln_1 = make_norm(config) if use_ln else nn.Identity()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2: nn.Module | None = None
        self.mlp: MLP | None = None
        if config.mlp:
            self.ln_2 = make_norm(config) if use_ln else nn.Identity()
            self.mlp = MLP(config)

    def _sublayer(self, x: Tensor, out: Tensor) -> Tensor:
        return x + out if self.residual else out

    def forward(
        self,
        x: Tensor,
        kv_cache: KVCache | None = None,
        need_att: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        ve: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return the new residual stream (B, T, C) and, if `need_att`, the attention
        probabilities."""
        if self.norm == "post":
            a, att = self.attn(x, kv_cache, need_att, rope, ve)
            x = self.ln_1(self._sublayer(x, a))
            if self.mlp is not None and self.ln_2 is not None:
                x = self.ln_2(self._sublayer(x, self.mlp(x)))
        else:  # 'pre', or 'none' where ln_1/ln_2 are identities
            a, att = self.attn(self.ln_1(x), kv_cache, need_att, rope, ve)
            x = self._sublayer(x, a)
            if self.mlp is not None and self.ln_2 is not None:
                x = self._sublayer(x, self.mlp(self.ln_2(x)))
        return x, att

    def step(self, x: Tensor, at: CacheSlot, rope: tuple[Tensor, Tensor] | None,
             ve: Tensor | None, linear: Linear) -> Tensor:
        """`forward` for one token `x` (B, C) in eval mode, reading and writing the cache at
        `at`; for pre-norm (or norm-free) blocks with residuals, the ones `GPT.step` serves."""
        x = x + self.attn.step(self.ln_1(x), at, rope, ve, linear)
        mlp = self.mlp
        if mlp is not None:
            x = x + mlp.step(self.ln_2(x), linear)
        return x


class GPT(nn.Module):
    """A character-level GPT: token embeddings, positions, blocks, a linear head.

    Positions are learned absolute embeddings added to the tokens (`wpe`), rotary embeddings
    applied to each head's queries and keys, or nothing. `forward(idx, targets=None,
    kv_cache=None)` returns logits (B, T, vocab_size) for every position and the mean
    cross-entropy if targets are given. Sequences may not be longer than `block_size` (callers
    crop the context). With a `KVCache`, `idx` holds only the tokens that follow those already
    cached, positions continue from the cache's position, and the cache grows by T. With rotary
    positions a full rolling cache takes one more token at a time, replacing its oldest entry.
    `step(tok, at)` is that cached forward for a single token, the decode step.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        modules: dict[str, nn.Module] = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout) if config.emb_dropout else nn.Identity(),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=make_norm(config) if config.norm != "none" else nn.Identity(),
        )
        if config.value_embeds:
            # one table per block: (vocab_size, n_embd), added to that block's values
            modules["ve"] = nn.ModuleList(
                nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.n_layer)
            )
        self.transformer = nn.ModuleDict(modules)
        self.use_rope = config.pos_emb == "rope"
        self.learned_pos = config.pos_emb == "learned"
        self.value_embeds = config.value_embeds
        if self.use_rope:
            # not persistent: derived from the config, so checkpoints hold only weights
            cos, sin = rope_rows(torch.arange(config.block_size), config.head_dim,
                                 config.rope_base)
            self.register_buffer("rope_cos", cos[:, None], persistent=False)  # (T, 1, hs)
            self.register_buffer("rope_sin", sin[:, None], persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.head_bias)
        if config.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight
        self._init_parameters()

    def _init_parameters(self) -> None:
        """GPT-2's initialisation, or PyTorch's layer defaults (already in place) for 'torch'."""
        config = self.config
        if config.init == "gpt2":
            self.apply(self._init_weights)
        # Each block adds two projections into the residual stream; shrinking them keeps the
        # stream's variance from growing with depth (GPT-2's scaled initialisation).
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    # every block starts as the identity; the gradient still reaches c_proj
                    # (through its input), so the block switches on at the first step
                    nn.init.zeros_(p)
                elif config.init == "gpt2":
                    nn.init.normal_(p, mean=0.0, std=resid_std)
            elif name.startswith("transformer.ve."):
                # value embeddings start as a no-op; their gradient is that of the values
                nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small weights make the initial logits nearly uniform, so step-0 loss is ~ln(vocab).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, a tied matrix counted once.

        With `non_embedding`, the token, position and value embedding tables are left out (as
        in scaling-law papers); with tied weights that also leaves out the output head's
        matrix.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.transformer.modules()
                     if isinstance(m, nn.Embedding))
        return n

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        x, rope = self._embed(idx, kv_cache)
        for block, ve in zip(self.transformer.h, self._value_embeds(idx), strict=True):
            x, _ = block(x, kv_cache, False, rope, ve)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        logits = self._head(x, F.linear)  # (B, T, vocab_size)
        loss = language_model_loss(logits, targets) if targets is not None else None
        return logits, loss

    def step(self, tok: Tensor, at: CacheSlot, rope: tuple[Tensor, Tensor] | None = None,
             linear: Linear = F.linear) -> Tensor:
        """Logits (B, vocab_size) of the token after `tok` (B,): what `forward(tok[:, None],
        kv_cache=cache)` computes in eval mode, for the models whose `capabilities()` say
        `fast_decode`. The token's keys and values are written at `at.slot` in place; `rope`
        is the (cos, sin) rows (hs,) of its position (rotary models). The matrix products go
        through `linear`; the caller advances its `KVCache`."""
        x = self._tokens(tok, at.slot)  # (B, C)
        for block, ve in zip(self.transformer.h, self._value_embeds(tok), strict=True):
            x = block.step(x, at, rope, ve, linear)
        return self._head(x, linear)  # (B, vocab_size)

    def _tokens(self, idx: Tensor, pos: Tensor | None) -> Tensor:
        """The token embeddings (..., C) of `idx` (...), plus those of their positions `pos`
        when positions are learned."""
        tr = self.transformer
        x = F.embedding(idx, tr.wte.weight)
        if self.learned_pos:
            x = x + F.embedding(pos, tr.wpe.weight)
        return x

    def _value_embeds(self, idx: Tensor) -> Iterator[Tensor | None]:
        """Each block's value embeddings (..., C) of the tokens `idx` (...), in block order and
        made as the blocks ask for them; None for every block when the model has none."""
        if not self.value_embeds:
            return itertools.repeat(None, self.config.n_layer)
        return (F.embedding(idx, table.weight) for table in self.transformer.ve)

    def _head(self, x: Tensor, linear: Linear) -> Tensor:
        """The logits of the residual stream `x` (..., C), soft-capped if the config asks."""
        head = self.lm_head
        logits = linear(self.transformer.ln_f(x), head.weight, head.bias)
        cap = self.config.logit_softcap
        # tanh saturates smoothly: confident logits stop growing without a hard clip
        return cap * torch.tanh(logits / cap) if cap else logits

    def _embed(
        self, idx: Tensor, kv_cache: KVCache | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The embedded tokens (B, T, C) and, for rotary models, their positions' (cos, sin)
        rows (T, 1, hs)."""
        T = idx.size(1)
        start = kv_cache.position if kv_cache is not None else 0
        block_size = self.config.block_size
        if T < 1:
            raise ConfigError("GPT.forward needs at least one token per sequence")
        rolls = self.use_rope and kv_cache is not None and kv_cache.rolling and T == 1
        if start + T > block_size and not rolls:
            where = f"{start} cached + {T} new tokens" if start else f"sequence of {T} tokens"
            raise ConfigError(f"{where} exceeds block_size {block_size}; "
                              "crop the context to the last block_size tokens")
        pos = (torch.arange(start, start + T, device=idx.device)  # (T,)
               if self.learned_pos or start + T > block_size else None)
        x = self.transformer.drop(self._tokens(idx, pos))
        if not self.use_rope:
            return x, None
        if start + T <= block_size:
            return x, (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        # a rolled cache: positions past the table, relative distances unchanged
        cos, sin = rope_rows(pos, self.config.head_dim, self.config.rope_base)
        return x, (cos[:, None], sin[:, None])

    def capabilities(self) -> Capabilities:
        """A KV cache (rolling with rotary positions), attention maps, and the single-token
        `step` for pre-norm (or no norm) models with residuals."""
        cfg = self.config
        return Capabilities(context=cfg.block_size, kv_cache=True, rolling_cache=self.use_rope,
                            fast_decode=cfg.norm in ("pre", "none") and cfg.residual,
                            attention=True)

    @torch.no_grad()
    def attention_maps(self, idx: Tensor) -> Tensor:
        """Attention probabilities of every layer and head for the sequences `idx` (B, T).

        Returns a float tensor (n_layer, B, n_head, T, T) whose entry [l, b, h, i, j] is how
        much query position i attends to key position j (rows sum to 1, zero above the
        diagonal). Computed with the explicit path in eval mode; the training mode is restored.
        """
        was_training = self.training
        self.eval()
        try:
            x, rope = self._embed(idx, None)
            maps = []
            for block, ve in zip(self.transformer.h, self._value_embeds(idx), strict=True):
                x, att = block(x, need_att=True, rope=rope, ve=ve)
                assert att is not None  # need_att: always returned
                maps.append(att.float())
            return torch.stack(maps)
        finally:
            self.train(was_training)

