"""The fast decode path against its references: the eager step against the cached forward, the
compiled step against the eager one, noise-based draws against torch.multinomial, a batch
against its rows decoded alone, and the eager fallback when compilation fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import train_serve_run
from test_sampling import gen, prompt, rope_gpt, tiny_gpt

import chargpt.generation.decode as decode_module
from chargpt.cli.commands import main
from chargpt.errors import ConfigError
from chargpt.generation.decode import fused_linear, static_logits
from chargpt.generation.draw import draw_noise, sample_next_token
from chargpt.generation.loop import generate
from chargpt.generation.settings import SamplingSettings
from chargpt.model.kv_cache import KVCache


def multinomial_reference(logits, generator, temperature=1.0, top_k=None, top_p=None):
    """What sampling did before noise-based draws: filter, softmax, torch.multinomial."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p,
                                                  float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=9),
                                     dict(top_p=0.8), dict(temperature=1.3, top_k=20,
                                                           top_p=0.9)])
def test_noise_draws_are_multinomial_draws(options):
    logits = torch.randn(5, 65, generator=gen(0)) * 3
    a, b = gen(11), gen(11)
    for _ in range(50):
        assert torch.equal(sample_next_token(logits, a, **options),
                           multinomial_reference(logits, b, **options))


def test_noise_in_chunks_and_per_row():
    whole = draw_noise(gen(3), (6, 2, 65), torch.device("cpu"))
    g = gen(3)
    steps = torch.stack([draw_noise(g, (2, 65), torch.device("cpu")) for _ in range(6)])
    assert torch.equal(whole, steps)
    rows = draw_noise([gen(4), gen(5)], (6, 2, 65), torch.device("cpu"))
    assert torch.equal(rows[:, 0], draw_noise(gen(4), (6, 65), torch.device("cpu")))
    assert torch.equal(rows[:, 1], draw_noise(gen(5), (6, 65), torch.device("cpu")))


@pytest.mark.parametrize("overrides", [
    dict(pos_emb="rope", qk_norm=True, activation="relu2", norm_type="rmsnorm", bias=False),
    dict(pos_emb="rope", value_embeds=True, logit_softcap=5.0, head_bias=True, qkv_bias=False),
    dict(pos_emb="none", mlp=False, norm="none", tie_weights=True),
    dict(attn_proj=False, mlp_proj=False, mlp_ratio=1, attn_scale="embd", init="torch"),
])
@pytest.mark.parametrize("linear", [F.linear, fused_linear])
def test_static_step_is_the_cached_forward(overrides, linear):
    # what the compiled step computes (attention over every slot of the cache, the unwritten
    # ones masked; slot, rotation and mask from the position tensor), run eagerly
    model = tiny_gpt(**overrides).eval()
    n = 12 if model.use_rope else model.config.block_size
    idx = prompt(2, 14)
    ref, cache = KVCache.for_model(model, 2), KVCache.for_model(model, 2)
    with torch.no_grad():
        model(idx[:, :3], kv_cache=ref)
        model(idx[:, :3], kv_cache=cache)
        for t in range(3, n + 2 if model.use_rope else n):  # rotary: past the block, rolled
            expected = model(idx[:, t : t + 1], kv_cache=ref)[0][:, -1]
            got = static_logits(model, idx[:, t], cache.k, cache.v, torch.tensor(t), linear)
            cache.advance(1)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_batch_rows_with_their_own_generators_are_single_samples():
    model = rope_gpt().double()
    idx = prompt(1, 3).expand(3, 3)
    batch = generate(model, idx, 40, temperature=0.9, top_k=8,
                     generator=[gen(5), gen(6), gen(7)])
    for b in range(3):
        alone = generate(model, idx[:1], 40, temperature=0.9, top_k=8, generator=gen(5 + b))
        assert torch.equal(batch[b : b + 1], alone)
    assert not torch.equal(batch[0], batch[1])
    with pytest.raises(ConfigError, match="one generator per sequence"):
        generate(model, idx, 4, generator=[gen(0)])


@pytest.fixture
def compile_fails(monkeypatch):
    """torch.compile whose compiled step raises, as it does without a C++ compiler."""
    def broken(module, **kwargs):
        def step(*args):
            raise RuntimeError("no working C++ compiler\nlong details")
        return step
    monkeypatch.setattr(decode_module.torch, "compile", broken)


def test_a_failing_compile_falls_back_to_the_eager_step(compile_fails, monkeypatch, capsys):
    monkeypatch.setattr(decode_module, "_REPORTED", set())
    model = rope_gpt()
    idx = prompt(2, 3)
    eager = generate(model, idx, 30, temperature=1.0, generator=gen(2), native=False)
    capsys.readouterr()
    fallback = generate(model, idx, 30, temperature=1.0, generator=gen(2), compile=True,
                        native=False)
    err = capsys.readouterr().err
    assert err.startswith("chargpt: warning: torch.compile is not available for decoding")
    assert "no working C++ compiler); decoding eagerly" in err
    assert torch.equal(fallback, eager)


@pytest.mark.slow
@pytest.mark.parametrize("fast, batch", [
    (True, 1),  # the fast recipe (rolling cache) with value embeddings and soft-capping
    (False, 2),  # the classic recipe: learned positions, a refilled cache
])
def test_compiled_step_samples_what_the_eager_step_samples(fast, batch):
    model = (rope_gpt(bias=False, value_embeds=True, logit_softcap=5.0) if fast
             else tiny_gpt()).eval()
    decode_module._COMPILED.pop(model, None)
    idx = prompt(batch, 3)
    n = 2 * model.config.block_size + 5  # past the block: rolled or refilled
    for options in (dict(temperature=0.0), dict(temperature=0.9, top_k=8)):
        eager = generate(model, idx, n, generator=gen(4), native=False, **options)
        compiled = generate(model, idx, n, generator=gen(4), compile=True, native=False,
                            **options)
        assert torch.equal(compiled, eager), options
    s = SamplingSettings(temperature=0.0, compile=True, native=False)
    assert len(decode_module._COMPILED[model]) == 2  # one graph per way of picking, reused
    generate(model, idx, 5, s)
    assert len(decode_module._COMPILED[model]) == 2


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    return train_serve_run(tmp_path_factory.mktemp("decode"))


def test_cli_num_samples_are_the_single_samples_of_their_seeds(served_run, capsys):
    args = ["sample", str(served_run), "--prompt", "ROMEO:", "--max-new-tokens", "50",
            "--temperature", "0.9"]
    assert main([*args, "--num-samples", "3", "--seed", "5"]) == 0
    batch = capsys.readouterr().out.rstrip("\n").split("\n---\n")
    singles = []
    for seed in (5, 6, 7):
        assert main([*args, "--seed", str(seed)]) == 0
        singles.append(capsys.readouterr().out.rstrip("\n"))
    assert [text.rstrip("\n") for text in batch] == singles
    assert len(set(singles)) == 3 and all(s.startswith("ROMEO:") for s in singles)


def test_run_stream_samples_yields_one_character_per_sample(served_run):
    from chargpt.runs.run import load_run

    run = load_run(served_run, device="cpu")
    ids = run.encode_prompt("JULIET")
    settings = SamplingSettings(temperature=0.8, seed=11)
    steps = list(run.stream_samples(ids, 20, settings, 2))
    assert len(steps) == 20 and all(len(chars) == 2 for chars in steps)
    second = "".join(chars[1] for chars in steps)
    assert second == "".join(run.stream_ids(ids, 20, settings.with_seed(12)))
