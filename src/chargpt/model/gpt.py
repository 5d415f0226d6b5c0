"""The decoder-only Transformer (GPT), chargpt's main model (the factory is in lm.py).

`GPT` follows GPT-2's layout and parameter names (`transformer.wte`, `transformer.h.0.attn.c_attn`,
`lm_head`, ...) so its checkpoints read like nanoGPT's. Every part the lecture discusses can be
switched through `ModelConfig`: LayerNorm placement (pre, post, none), residual connections, the
MLP sub-layer, the activation and weight tying; so can the speedrun community's changes: rotary
position embeddings (RoPE), ReLU-squared MLPs, QK-norm, RMSNorm and zero-initialised output
projections. Attention runs through PyTorch's fused
`scaled_dot_product_attention`; an explicit masked-softmax path computes the same thing and is
used to check the fused path and to return attention weights for heatmaps. Incremental decoding
uses a `KVCache` (see sampling.py) that lives outside the model and is passed to `forward`;
single-token steps have their own functional path in decode.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chargpt.config.schema import ModelConfig
from chargpt.model.lm import Capabilities, language_model_loss
from chargpt.model.rope import apply_rope, rope_angles

if TYPE_CHECKING:
    from chargpt.model.kv_cache import KVCache


def causal_mask(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """Boolean (t_q, t_k) mask, True where attention is allowed.

    The queries are the last `t_q` of `t_k` positions (the first `t_k - t_q` keys come from a
    cache), so query i may see keys up to and including its own position `t_k - t_q + i`.
    """
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def make_norm(config: ModelConfig) -> nn.Module:
    """The normalisation layer the config asks for: LayerNorm or RMSNorm."""
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention: every position attends to itself and earlier ones.

    Queries, keys and values come from one fused projection `c_attn`; the heads' outputs are
    concatenated and mixed by `c_proj`. With a `KVCache` the new keys and values are appended
    to those of earlier calls, so a forward over only the newest token still sees the whole
    context. Set `use_sdpa = False` (or ask for weights) to use the explicit masked-softmax path.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.use_sdpa = True
        # the lecture's code divides by sqrt(n_embd) (a slip): keep it reproducible
        self.scale = 1.0 / math.sqrt(config.head_dim if config.attn_scale == "head"
                                     else config.n_embd)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd,
                                bias=config.bias and config.qkv_bias)
        # without a projection the heads' outputs, side by side, are the result
        self.c_proj = (nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
                       if config.attn_proj else None)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, ve: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, nh, T, hs) of `x` (B, T, C), normalised and rotated
        as the config says, the value embeddings `ve` (B, T, C) added to the values."""
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        if ve is not None:
            qkv = torch.cat((qkv[..., : 2 * C], qkv[..., 2 * C :] + ve), dim=-1)
        v = qkv[..., 2 * C :].view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        # queries and keys side by side, so each transform runs once for both
        qk = qkv[..., : 2 * C].view(B, T, 2 * self.n_head, self.head_dim)  # (B, T, 2nh, hs)
        if self.qk_norm:
            qk = F.rms_norm(qk, (self.head_dim,))
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split(self.n_head, dim=1)  # (B, nh, T, hs) each
        return q, k, v

    def forward(
        self,
        x: Tensor,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        ve: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return the attention output (B, T, C) and, if `need_weights`, the softmax weights
        (B, nh, T, T_total), where T_total counts cached positions too. `rope` is the (cos,
        sin) pair of the new tokens' positions when positions are rotary; `ve` (B, T, C), the
        tokens' value embeddings, is added to the values."""
        B, T, C = x.shape
        q, k, v = self._heads(x, rope, ve)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, T_total, hs)
            # a cache kept in another dtype than autocast's output must not break the matmuls
            k, v = k.to(q.dtype), v.to(q.dtype)
        t_total = k.size(2)

        weights = None
        if self.use_sdpa and not need_weights:
            p = self.dropout if self.training else 0.0
            if t_total == T:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                   scale=self.scale)
            elif T == 1:
                # the single newest query may see every cached key: nothing to mask
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
            else:
                # is_causal aligns its triangle to the top-left, wrong when keys precede queries
                mask = causal_mask(T, t_total, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                   scale=self.scale)
        else:
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, T_total)
            att = att.masked_fill(~causal_mask(T, t_total, x.device), float("-inf"))
            att = F.softmax(att, dim=-1)
            if need_weights:
                weights = att
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        if self.c_proj is not None:
            y = self.c_proj(y)
        return self.resid_dropout(y), weights


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
        h = self.act(self.c_fc(x))  # (B, T, mlp_ratio * C)
        return self.dropout(self.c_proj(h) if self.c_proj is not None else h)


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
        need_weights: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        ve: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return the new residual stream (B, T, C) and the attention weights if asked for."""
        if self.norm == "post":
            a, weights = self.attn(x, kv_cache, need_weights, rope, ve)
            x = self.ln_1(self._sublayer(x, a))
            if self.mlp is not None and self.ln_2 is not None:
                x = self.ln_2(self._sublayer(x, self.mlp(x)))
        else:  # 'pre', or 'none' where ln_1/ln_2 are identities
            a, weights = self.attn(self.ln_1(x), kv_cache, need_weights, rope, ve)
            x = self._sublayer(x, a)
            if self.mlp is not None and self.ln_2 is not None:
                x = self._sublayer(x, self.mlp(self.ln_2(x)))
        return x, weights


class GPT(nn.Module):
    """A character-level GPT: token embeddings, positions, blocks, a linear head.

    Positions are learned absolute embeddings added to the tokens (`wpe`), rotary embeddings
    applied to each head's queries and keys, or nothing. `forward(idx, targets=None,
    kv_cache=None)` returns logits (B, T, vocab_size) for every position and the mean
    cross-entropy if targets are given. Sequences may not be longer than `block_size` (callers
    crop the context). With a `KVCache`, `idx` holds only the tokens that follow those already
    cached, positions continue from the cache's position, and the cache grows by T. With rotary
    positions a full rolling cache takes one more token at a time, replacing its oldest entry.
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
        if self.use_rope:
            # not persistent: derived from the config, so checkpoints hold only weights
            cos, sin = rope_angles(torch.arange(config.block_size), config.head_dim,
                                   config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
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
        for i, block in enumerate(self.transformer.h):
            x, _ = block(x, kv_cache, False, rope, self._value_embed(i, idx))
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        logits = self._logits(self.lm_head(self.transformer.ln_f(x)))  # (B, T, vocab_size)
        loss = language_model_loss(logits, targets) if targets is not None else None
        return logits, loss

    def _value_embed(self, layer: int, idx: Tensor) -> Tensor | None:
        """Block `layer`'s value embeddings of the tokens `idx`, (B, T, C), if it has them."""
        return self.transformer.ve[layer](idx) if "ve" in self.transformer else None

    def _logits(self, logits: Tensor) -> Tensor:
        """The head's output, soft-capped if the config asks for it."""
        cap = self.config.logit_softcap
        # tanh saturates smoothly: confident logits stop growing without a hard clip
        return cap * torch.tanh(logits / cap) if cap else logits

    def _embed(
        self, idx: Tensor, kv_cache: KVCache | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The embedded tokens (B, T, C) and, for rotary models, their positions' (cos, sin)."""
        T = idx.size(1)
        start = kv_cache.position if kv_cache is not None else 0
        block_size = self.config.block_size
        if T < 1:
            raise ValueError("GPT.forward needs at least one token per sequence")
        rolls = self.use_rope and kv_cache is not None and kv_cache.rolling and T == 1
        if start + T > block_size and not rolls:
            where = f"{start} cached + {T} new tokens" if start else f"sequence of {T} tokens"
            raise ValueError(
                f"{where} exceeds block_size {block_size}; "
                "crop the context to the last block_size tokens"
            )
        x = self.transformer.wte(idx)
        rope = None
        if self.use_rope:
            if start + T <= block_size:
                rope = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            else:  # a rolled cache: positions past the table, relative distances unchanged
                pos = torch.arange(start, start + T, device=idx.device)  # (T,)
                rope = rope_angles(pos, self.config.head_dim, self.config.rope_base)
        elif "wpe" in self.transformer:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x), rope

    def capabilities(self) -> Capabilities:
        """A KV cache (rolling with rotary positions), attention maps, and the fast single-token
        step of decode.py for pre-norm (or no norm) models with residuals."""
        cfg = self.config
        return Capabilities(context=cfg.block_size, kv_cache=True, rolling_cache=self.use_rope,
                            fast_decode=cfg.norm in ("pre", "none") and cfg.residual,
                            attention=True)

    @torch.no_grad()
    def attention_maps(self, idx: Tensor) -> Tensor:
        """Softmax attention weights of every layer and head for the sequences `idx` (B, T).

        Returns a float tensor (n_layer, B, n_head, T, T) whose entry [l, b, h, i, j] is how
        much query position i attends to key position j (rows sum to 1, zero above the
        diagonal). Computed with the explicit path in eval mode; the training mode is restored.
        """
        was_training = self.training
        self.eval()
        try:
            x, rope = self._embed(idx, None)
            maps = []
            for i, block in enumerate(self.transformer.h):
                x, weights = block(x, need_weights=True, rope=rope,
                                   ve=self._value_embed(i, idx))
                assert weights is not None
                maps.append(weights.float())
            return torch.stack(maps)
        finally:
            self.train(was_training)

