"""Tests for sampling: the KV cache, next-token sampling rules and the decode loop, checked
against full recomputation and against hand-built references."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chargpt.config.schema import ModelConfig
from chargpt.errors import ConfigError
from chargpt.generation.decode import Decoder
from chargpt.generation.draw import sample_next_token
from chargpt.generation.loop import generate, generate_tokens
from chargpt.generation.settings import SamplingSettings
from chargpt.model.build import build_model
from chargpt.model.kv_cache import KVCache

V = 13


def tiny_gpt(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, block_size=12, n_layer=2, n_head=2, n_embd=16)
    base.update(overrides)
    model = build_model(ModelConfig(**base))
    # Freshly initialised logits are nearly uniform, so the context would hardly change what
    # is sampled; a larger head makes the choice of context visible in the tokens.
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompt(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=gen(seed))


# --- KVCache ----------------------------------------------------------------------------------


def test_kv_cache_update_advance_reset():
    cache = KVCache(n_layer=2, batch_size=1, n_head=2, head_dim=3, max_len=5)
    k1, v1 = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3)
    k_all, v_all = cache.update(0, k1, v1)
    assert k_all.shape == (1, 2, 2, 3) and cache.length == 0  # advancing is the caller's job
    torch.testing.assert_close(k_all, k1)
    cache.update(1, k1, v1)
    cache.advance(2)
    k2, v2 = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    k_all, v_all = cache.update(0, k2, v2)
    torch.testing.assert_close(k_all, torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(v_all, torch.cat([v1, v2], dim=2))
    assert k_all.data_ptr() == cache.k[0].data_ptr()  # a view into the preallocated storage
    cache.advance(3)
    assert cache.length == 5
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, k2[:, :, :1], v2[:, :, :1])
    cache.reset()
    assert cache.length == 0


def test_kv_cache_for_model():
    model = tiny_gpt().to(torch.float64)
    cache = KVCache.for_model(model, batch_size=3)
    assert len(cache.k) == len(cache.v) == 2 and cache.k[1].shape == (3, 2, 12, 8)
    assert cache.k[0].dtype == torch.float64 and cache.max_len == 12


def test_incremental_cached_logits_match_full_forward():
    model = tiny_gpt().eval()
    idx = prompt(2, 12)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.for_model(model, 2)
        steps = [model(idx[:, :3], kv_cache=cache)[0]]  # prefill, then one token at a time
        steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(3, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


# --- generate: cache versus recomputation -----------------------------------------------------


@pytest.mark.parametrize("switches", [
    dict(norm="pre"),
    dict(norm="post"),
    # the lecture's early rungs: no residuals, no projections, PyTorch's init
    dict(norm="none", residual=False, attn_proj=False, mlp_proj=False, mlp_ratio=1,
         init="torch", attn_scale="embd", qkv_bias=False, head_bias=True),
    dict(value_embeds=True, logit_softcap=4.0),
])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_matches_recompute_within_block_size(switches, temperature):
    model = tiny_gpt(**switches)
    idx = prompt(3, 4)
    kwargs = dict(temperature=temperature, top_k=8 if temperature else None)
    cached = generate(model, idx, 8, use_cache=True, generator=gen(5), **kwargs)
    recomputed = generate(model, idx, 8, use_cache=False, generator=gen(5), **kwargs)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :4], idx)


def reference_generate(model, idx, n_new, generator, window_policy):
    """Full-recomputation decoding with greedy/sampled picks; `window_policy(start, n)` gives the
    first context index for a context of n tokens, given the previous one."""
    seq = idx[:, -model.config.block_size :].clone()
    start = 0
    with torch.no_grad():
        for _ in range(n_new):
            start = window_policy(start, seq.size(1))
            logits, _ = model(seq[:, start:])
            probs = torch.softmax(logits[:, -1].float(), dim=-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return seq


def test_recompute_path_uses_the_last_block_size_tokens():
    model = tiny_gpt()
    bs = model.config.block_size
    idx = prompt(2, 5)
    out = generate(model, idx, 30, use_cache=False, generator=gen(3))
    ref = reference_generate(model, idx, 30, gen(3), lambda start, n: max(0, n - bs))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("block_size", [1, 5, 12])
def test_cache_beyond_block_size_refills_from_the_last_half(block_size):
    model = tiny_gpt(block_size=block_size)
    keep = max(1, block_size // 2)

    def refill_policy(start: int, n: int) -> int:
        # the context grows until it exceeds block_size, then restarts from the last `keep`
        return n - keep if n - start > block_size else start

    idx = prompt(2, min(3, block_size))
    out = generate(model, idx, 40, use_cache=True, generator=gen(4))
    ref = reference_generate(model, idx, 40, gen(4), refill_policy)
    assert torch.equal(out, ref)
    if block_size == 12:
        # the policy really differs from nanoGPT's sliding window, or the test would be moot
        sliding = reference_generate(model, idx, 40, gen(4), lambda s, n: max(0, n - block_size))
        assert not torch.equal(out, sliding)


def test_long_prompt_is_cropped_and_kept_in_front():
    model = tiny_gpt()
    idx = prompt(2, 30)
    for use_cache in (True, False):
        out = generate(model, idx, 5, temperature=0.0, use_cache=use_cache)
        assert out.shape == (2, 35)
        assert torch.equal(out[:, :30], idx)
        cropped = generate(model, idx[:, -12:], 5, temperature=0.0, use_cache=use_cache)
        assert torch.equal(out[:, 30:], cropped[:, 12:])


def test_generate_tokens_streams_and_restores_training_mode():
    model = tiny_gpt(dropout=0.1)
    model.train()
    stream = generate_tokens(model, prompt(2, 3), 4, generator=gen(0))
    first = next(stream)
    assert first.shape == (2,) and first.dtype == torch.long
    assert not model.training  # eval mode (dropout off) while sampling
    rest = list(stream)
    assert len(rest) == 3
    assert model.training
    # tokens are ordinary tensors, usable in autograd code outside inference mode
    assert not first.is_inference()


def test_generate_with_zero_new_tokens():
    model = tiny_gpt()
    idx = prompt(1, 3)
    assert torch.equal(generate(model, idx, 0), idx)


def test_bigram_generation():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="bigram", vocab_size=V, block_size=4))
    idx = prompt(2, 6)
    cached = generate(model, idx, 20, use_cache=True, generator=gen(9))
    recomputed = generate(model, idx, 20, use_cache=False, generator=gen(9))
    assert torch.equal(cached, recomputed)
    assert cached.shape == (2, 26) and cached.min() >= 0 and cached.max() < V


def test_empty_prompt_and_bad_arguments_are_rejected_before_sampling():
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="empty"):
        generate_tokens(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match="temperature"):
        generate_tokens(model, prompt(1, 2), 3, temperature=-1.0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, prompt(1, 2), -1)


# --- sample_next_token ------------------------------------------------------------------------


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(6, 50, generator=gen(0))
    argmax = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, gen(1), temperature=0.0), argmax)
    assert torch.equal(sample_next_token(logits, gen(1), top_k=1), argmax)
    assert torch.equal(sample_next_token(logits, gen(1), top_p=1e-6), argmax)


def test_top_k_restricts_the_support():
    logits = torch.randn(1, 30, generator=gen(2)).expand(4000, 30)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    drawn = set(sample_next_token(logits, gen(3), temperature=2.0, top_k=5)[:, 0].tolist())
    assert drawn <= allowed
    assert len(drawn) == 5  # high temperature: every allowed token shows up


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log().expand(4000, 5)
    cases = {0.75: {1, 3}, 0.85: {1, 2, 3}, 0.4: {1}, 1.0: {0, 1, 2, 3, 4}}
    for top_p, expected in cases.items():
        drawn = set(sample_next_token(logits, gen(4), top_p=top_p)[:, 0].tolist())
        assert drawn == expected, top_p


def test_top_k_and_top_p_combine():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(2000, 4)
    drawn = sample_next_token(logits, gen(5), top_k=3, top_p=0.6)[:, 0]
    assert set(drawn.tolist()) == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log().expand(20000, 3)
    drawn = sample_next_token(logits, gen(6))[:, 0]
    freq = torch.bincount(drawn, minlength=3).float() / drawn.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # temperature 0.5 squares the probabilities before renormalising
    sharp = sample_next_token(logits, gen(7), temperature=0.5)[:, 0]
    freq = torch.bincount(sharp, minlength=3).float() / sharp.numel()
    torch.testing.assert_close(freq, probs**2 / (probs**2).sum(), atol=0.015, rtol=0)


def test_seeds_control_the_draws():
    logits = torch.zeros(64, 1000)
    a = sample_next_token(logits, gen(8))
    assert torch.equal(a, sample_next_token(logits, gen(8)))
    assert not torch.equal(a, sample_next_token(logits, gen(9)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_k=0),
        dict(top_k=2.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=1e-39),  # float32 logits / 1e-39 overflow: NaN, then token 0 always
        dict(top_p=1e-46),  # rounds to 0 in float32, where it dropped every token
    ],
)
def test_invalid_sampling_arguments_raise(kwargs):
    with pytest.raises(ConfigError):
        sample_next_token(torch.zeros(1, 4), gen(0), **kwargs)


# --- rotary models: a rolling cache ------------------------------------------------------------


def test_rolling_kv_cache_overwrites_the_oldest_slot():
    cache = KVCache(n_layer=1, batch_size=1, n_head=1, head_dim=2, max_len=3, rolling=True)
    keys = [torch.full((1, 1, 1, 2), float(i)) for i in range(5)]
    cache.update(0, torch.cat(keys[:3], dim=2), torch.cat(keys[:3], dim=2))
    cache.advance(3)
    assert cache.length == 3 and cache.position == 3
    k_all, _ = cache.update(0, keys[3], keys[3])
    cache.advance(1)
    assert k_all[0, 0, :, 0].tolist() == [3.0, 1.0, 2.0]  # slot 0 (token 0) replaced
    k_all, _ = cache.update(0, keys[4], keys[4])
    cache.advance(1)
    assert k_all[0, 0, :, 0].tolist() == [3.0, 4.0, 2.0]
    assert cache.length == 3 and cache.position == 5
    with pytest.raises(ValueError, match="overflow"):  # only single tokens may roll in
        cache.update(0, torch.cat(keys[:2], dim=2), torch.cat(keys[:2], dim=2))


def rope_gpt(seed: int = 0, **overrides) -> torch.nn.Module:
    return tiny_gpt(seed, pos_emb="rope", qk_norm=True, activation="relu2",
                    norm_type="rmsnorm", **overrides)


@pytest.mark.parametrize("block_size", [1, 5, 12])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_layer_rope_cache_rolls_and_matches_recompute_beyond_block_size(block_size,
                                                                              temperature):
    # With one layer, a cached key depends only on its token and (relative) position, so a
    # rolled cache is exactly the recompute path's last-block_size context.
    model = rope_gpt(block_size=block_size, n_layer=1)
    assert KVCache.for_model(model, 1).rolling
    idx = prompt(3, min(4, block_size))
    cached = generate(model, idx, 40, use_cache=True, generator=gen(5), temperature=temperature)
    recomputed = generate(model, idx, 40, use_cache=False, generator=gen(5),
                          temperature=temperature)
    assert torch.equal(cached, recomputed)
    if temperature:
        # recomputation over exactly the last block_size tokens, as nanoGPT does
        ref = reference_generate(model, idx, 40, gen(5), lambda s, n: max(0, n - block_size))
        assert torch.equal(cached, ref)


def sliding_window_logits(model, idx, window: int, monkeypatch) -> torch.Tensor:
    """Logits of `model`'s weights over all of `idx` (B, N) at once, each position attending
    to itself and the window - 1 positions before it, in every layer."""
    import chargpt.model.attention as attention_module

    big = build_model(dataclasses.replace(model.config, block_size=idx.size(1))).double()
    big.load_state_dict(model.state_dict())  # rotary: no position table, same weights
    for block in big.transformer.h:
        block.attn.use_sdpa = False

    def banded(t_q, t_k, device):
        full = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
        return full.tril(diagonal=t_k - t_q) & full.triu(diagonal=t_k - t_q - window + 1)

    monkeypatch.setattr(attention_module, "causal_mask", banded)
    with torch.no_grad():
        return big.eval()(idx)[0]


def test_rolled_cache_is_sliding_window_attention_in_every_layer(monkeypatch):
    # With more layers a rolled cache is NOT the recompute path beyond block_size: the keys of
    # deeper layers were computed when their tokens could still see tokens that have since
    # left the cache. What it computes exactly is sliding-window attention of width
    # block_size in every layer over the whole text (as in Mistral-style models).
    model = rope_gpt(block_size=8).double().eval()
    idx = prompt(2, 30)
    reference = sliding_window_logits(model, idx, 8, monkeypatch)
    cache = KVCache.for_model(model, 2)
    with torch.no_grad():
        steps = [model(idx[:, :5], kv_cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 30)]
        recompute_last = model(idx[:, -8:])[0][:, -1]
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=1e-9, rtol=0)
    assert not torch.allclose(steps[-1][:, -1], recompute_last, atol=1e-3)


def test_batched_samples_match_single_samples_greedily():
    model = tiny_gpt()
    idx = prompt(4, 3)
    batch = generate(model, idx, 20, temperature=0.0)
    for b in range(4):
        assert torch.equal(batch[b : b + 1], generate(model, idx[b : b + 1], 20, temperature=0.0))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(pos_emb="rope", qk_norm=True, activation="relu2", norm_type="rmsnorm", bias=False),
        dict(pos_emb="none", mlp=False, norm="none", tie_weights=True),
        dict(pos_emb="rope", activation="relu", block_size=5),
        dict(value_embeds=True, logit_softcap=5.0, head_bias=True, qkv_bias=False),
        dict(attn_proj=False, mlp_proj=False, mlp_ratio=1, attn_scale="embd", init="torch"),
    ],
)
def test_decode_step_matches_the_cached_forward(overrides):
    model = tiny_gpt(**overrides).eval()
    assert model.capabilities().fast_decode
    idx = prompt(2, 14)
    slow, fast = KVCache.for_model(model, 2), KVCache.for_model(model, 2)
    n = min(3, model.config.block_size)
    steps = 14 if slow.rolling else model.config.block_size
    decoder = Decoder(model, fast, SamplingSettings(native=False))  # its eager step
    with torch.no_grad():
        model(idx[:, :n], kv_cache=slow)
        model(idx[:, :n], kv_cache=fast)
        for t in range(n, steps):
            expected = model(idx[:, t : t + 1], kv_cache=slow)[0][:, -1]
            torch.testing.assert_close(decoder.logits(idx[:, t]), expected,
                                       atol=1e-5, rtol=1e-5)
    assert fast.position == slow.position
    assert not tiny_gpt(norm="post").capabilities().fast_decode


# --- sampling settings --------------------------------------------------------------------------


def test_settings_are_checked_once_when_made():
    with pytest.raises(ConfigError, match="top_k"):
        SamplingSettings(top_k=0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingSettings(temperature=float("inf"))
    s = SamplingSettings(temperature=0.7, top_k=5, seed=3)
    assert SamplingSettings.of(s) is s and SamplingSettings.of(None, top_k=5).top_k == 5
    with pytest.raises(TypeError, match="not both"):
        SamplingSettings.of(s, temperature=1.0)
    assert s.with_seed(4) == SamplingSettings(temperature=0.7, top_k=5, seed=4)


def test_settings_and_keywords_sample_the_same_tokens():
    model = tiny_gpt()
    idx = prompt(2, 3)
    s = SamplingSettings(temperature=0.8, top_k=6, top_p=0.9, seed=11, use_cache=False)
    by_settings = generate(model, idx, 15, s)
    by_keywords = generate(model, idx, 15, temperature=0.8, top_k=6, top_p=0.9,
                           use_cache=False, generator=s.generator("cpu"))
    assert torch.equal(by_settings, by_keywords)
    # a seed makes the draws repeatable; another seed changes them
    assert torch.equal(generate(model, idx, 15, s), by_settings)
    assert not torch.equal(generate(model, idx, 15, s.with_seed(12)), by_settings)
