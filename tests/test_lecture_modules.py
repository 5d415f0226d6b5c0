"""The lecture's modules as switches of chargpt's GPT, each checked against a reference written
in the lecture's shape: separate key/query/value layers per head, heads concatenated, a
feed-forward net that is one Linear + ReLU until the residual rung, a head with a bias.

For every lecture rung the GPT built from the ladder's config must have exactly the
reference's parameter count and, given the reference's weights, the same logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chargpt.config.schema import ModelConfig
from chargpt.errors import ConfigError
from chargpt.ladder import rungs as ladder
from chargpt.model.build import build_model
from chargpt.model.gpt import GPT

VOCAB = 65


class RefHead(nn.Module):
    """One head: its own key, query and value layers (no biases), masked softmax."""

    def __init__(self, n_embd: int, head_size: int, block_size: int, scale_by: int):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.scale_by = scale_by
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x):
        T = x.size(1)
        scores = self.query(x) @ self.key(x).transpose(-2, -1) / math.sqrt(self.scale_by)
        scores = scores.masked_fill(self.mask[:T, :T] == 0, float("-inf"))
        return F.softmax(scores, dim=-1) @ self.value(x)


class RefAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, proj: bool, scale_by: int):
        super().__init__()
        size = n_embd // n_head
        self.heads = nn.ModuleList(RefHead(n_embd, size, block_size, scale_by)
                                   for _ in range(n_head))
        self.proj = nn.Linear(n_embd, n_embd) if proj else None

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.proj(out) if self.proj is not None else out


class RefFeedForward(nn.Module):
    def __init__(self, n_embd: int, wide: bool):
        super().__init__()
        layers = ([nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd)]
                  if wide else [nn.Linear(n_embd, n_embd), nn.ReLU()])
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class RefBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size, *, ffwd, residual, layernorm, scale_by):
        super().__init__()
        self.residual = residual
        self.sa = RefAttention(n_embd, n_head, block_size, proj=residual, scale_by=scale_by)
        self.ffwd = RefFeedForward(n_embd, wide=residual) if ffwd else None
        self.ln1 = nn.LayerNorm(n_embd) if layernorm else nn.Identity()
        self.ln2 = nn.LayerNorm(n_embd) if layernorm and ffwd else nn.Identity()

    def forward(self, x):
        a = self.sa(self.ln1(x))
        x = x + a if self.residual else a
        if self.ffwd is not None:
            f = self.ffwd(self.ln2(x))
            x = x + f if self.residual else f
        return x


class RefModel(nn.Module):
    """The lecture's language model at any of its rungs."""

    def __init__(self, *, n_embd, n_head, n_layer, block_size, ffwd=False, residual=False,
                 layernorm=False):
        super().__init__()
        self.token_embedding_table = nn.Embedding(VOCAB, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        # the lecture's code scales attention by the block's input width, not the head size
        self.blocks = nn.Sequential(*[
            RefBlock(n_embd, n_head, block_size, ffwd=ffwd, residual=residual,
                     layernorm=layernorm, scale_by=n_embd) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd) if layernorm else nn.Identity()
        self.lm_head = nn.Linear(n_embd, VOCAB)

    def forward(self, idx):
        T = idx.size(1)
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
        return self.lm_head(self.ln_f(self.blocks(x)))


def load_reference_weights(gpt: GPT, ref: RefModel) -> None:
    """Copy the reference's weights into chargpt's GPT-2-named parameters."""
    tr = gpt.transformer
    with torch.no_grad():
        tr.wte.weight.copy_(ref.token_embedding_table.weight)
        tr.wpe.weight.copy_(ref.position_embedding_table.weight)
        for block, rb in zip(tr.h, ref.blocks, strict=True):
            heads = rb.sa.heads
            # c_attn's rows: every head's queries, then every head's keys, then values
            block.attn.c_attn.weight.copy_(torch.cat(
                [torch.cat([getattr(h, n).weight for h in heads]) for n in
                 ("query", "key", "value")]))
            if rb.sa.proj is not None:
                block.attn.c_proj.weight.copy_(rb.sa.proj.weight)
                block.attn.c_proj.bias.copy_(rb.sa.proj.bias)
            if rb.ffwd is not None:
                net = rb.ffwd.net
                block.mlp.c_fc.weight.copy_(net[0].weight)
                block.mlp.c_fc.bias.copy_(net[0].bias)
                if len(net) == 3:
                    block.mlp.c_proj.weight.copy_(net[2].weight)
                    block.mlp.c_proj.bias.copy_(net[2].bias)
            for ours, theirs in ((block.ln_1, rb.ln1), (block.ln_2, rb.ln2)):
                if isinstance(theirs, nn.LayerNorm):
                    ours.load_state_dict(theirs.state_dict())
        if isinstance(ref.ln_f, nn.LayerNorm):
            tr.ln_f.load_state_dict(ref.ln_f.state_dict())
        gpt.lm_head.weight.copy_(ref.lm_head.weight)
        gpt.lm_head.bias.copy_(ref.lm_head.bias)


REFERENCE_SHAPES = {
    "one-head": dict(n_embd=32, n_head=1, n_layer=1, block_size=8),
    "multi-head": dict(n_embd=32, n_head=4, n_layer=1, block_size=8),
    "feed-forward": dict(n_embd=32, n_head=4, n_layer=1, block_size=8, ffwd=True),
    "blocks": dict(n_embd=32, n_head=4, n_layer=3, block_size=8, ffwd=True),
    "residual": dict(n_embd=32, n_head=4, n_layer=3, block_size=8, ffwd=True, residual=True),
    "layernorm": dict(n_embd=32, n_head=4, n_layer=3, block_size=8, ffwd=True, residual=True,
                      layernorm=True),
    "scaled-up": dict(n_embd=384, n_head=6, n_layer=6, block_size=256, ffwd=True,
                      residual=True, layernorm=True),
}


def lecture_gpt(name: str) -> GPT:
    cfg = ladder.rung_config(name, ladder.Budget(), vocab_size=VOCAB).model
    model = build_model(cfg)
    assert isinstance(model, GPT)
    return model


@pytest.mark.parametrize("name", list(REFERENCE_SHAPES))
def test_each_lecture_rung_equals_the_lecture_shaped_reference(name):
    torch.manual_seed(0)
    ref = RefModel(**REFERENCE_SHAPES[name]).eval()
    gpt = lecture_gpt(name).eval()
    assert gpt.num_params() == sum(p.numel() for p in ref.parameters())
    load_reference_weights(gpt, ref)
    T = min(REFERENCE_SHAPES[name]["block_size"], 40)
    idx = torch.randint(0, VOCAB, (3, T))
    with torch.no_grad():
        expected = ref(idx)
        got, _ = gpt(idx)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for block in gpt.transformer.h:  # the explicit softmax path agrees too
            block.attn.use_sdpa = False
        torch.testing.assert_close(gpt(idx)[0], expected, rtol=1e-5, atol=1e-5)


def test_the_scaled_up_rung_has_the_lectures_parameter_count():
    # gpt.py prints "10.788929 M parameters" for its final model
    assert ladder.count_params("scaled-up") == 10_788_929


def test_torch_init_keeps_pytorchs_layer_defaults():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, init="torch")
    model = GPT(cfg)
    wte = model.transformer.wte.weight
    assert 0.9 < wte.std().item() < 1.1  # nn.Embedding: N(0, 1)
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    bound = 1 / math.sqrt(64)  # nn.Linear: uniform within 1/sqrt(fan_in)
    assert c_fc.abs().max().item() <= bound
    assert c_fc.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert model.transformer.h[0].attn.c_proj.weight.abs().max().item() <= bound
    gpt2 = GPT(ModelConfig(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2))
    assert gpt2.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_attention_scale_by_embedding_width_only_matters_with_several_heads():
    idx = torch.randint(0, VOCAB, (2, 16))

    def logits(n_head: int, scale: str) -> torch.Tensor:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=n_head, n_layer=1,
                          attn_scale=scale)
        with torch.no_grad():
            return GPT(cfg).eval()(idx)[0]

    torch.testing.assert_close(logits(1, "embd"), logits(1, "head"))
    assert not torch.allclose(logits(4, "embd"), logits(4, "head"))


def test_switched_off_parts_have_no_parameters():
    names = {n for n, _ in lecture_gpt("feed-forward").named_parameters()}
    assert "lm_head.bias" in names
    assert not any("c_proj" in n for n in names)  # no attention or MLP projection yet
    assert "transformer.h.0.attn.c_attn.bias" not in names  # the lecture's heads: no bias
    assert "transformer.h.0.mlp.c_fc.weight" in names


def test_a_one_layer_mlp_needs_ratio_one():
    with pytest.raises(ConfigError, match="mlp_ratio 1"):
        ModelConfig(mlp_proj=False, mlp_ratio=4)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_logit_softcap_must_be_finite_and_not_negative(bad):
    with pytest.raises(ConfigError, match="logit_softcap"):
        ModelConfig(logit_softcap=bad)


def test_value_embeddings_start_as_a_no_op_and_then_learn():
    idx = torch.randint(0, VOCAB, (2, 16))
    base = ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2)
    torch.manual_seed(0)
    plain = GPT(base).eval()
    with_ve = GPT(ModelConfig(**{**vars(base), "value_embeds": True})).eval()
    missing, unexpected = with_ve.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["transformer.ve.0.weight", "transformer.ve.1.weight"]
    assert not unexpected
    with torch.no_grad():
        torch.testing.assert_close(with_ve(idx)[0], plain(idx)[0])
    with_ve.train()
    _, loss = with_ve(idx, idx)
    loss.backward()
    assert with_ve.transformer.ve[0].weight.grad.abs().sum() > 0
    # a value embedding is a lookup: not counted with the non-embedding parameters
    assert (with_ve.num_params() - with_ve.num_params(non_embedding=True)
            == plain.num_params() - plain.num_params(non_embedding=True) + 2 * VOCAB * 32)


def test_softcap_bounds_the_logits_smoothly():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=1, logit_softcap=2.0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # push raw logits far beyond the cap
        logits, _ = model(idx)
        model.config = ModelConfig(**{**vars(cfg), "logit_softcap": 0.0})
        raw, _ = model(idx)
    assert raw.abs().max().item() > 10
    assert logits.abs().max().item() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
