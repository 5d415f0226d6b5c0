"""Tests for the optimizers and schedules: Newton-Schulz orthogonalisation, the Muon + AdamW
hybrid against torch's AdamW, parameter grouping, the WSD schedule, config validation, and
bit-identical resume and no per-step host sync with Muon on the real training loop."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ctrl_c_after, metrics, same_weights, tiny_config

from chargpt.config.schema import Config, ModelConfig, TrainConfig
from chargpt.errors import ConfigError
from chargpt.model.build import build_model
from chargpt.runs.trainstate import split_optimizer_state
from chargpt.training.launch import train
from chargpt.training.optim import Muon, lr_at, make_optimizer, orthogonalize

CPU = torch.device("cpu")


# --- Newton-Schulz and the Muon update --------------------------------------------------------


def conditioned(*shape: int, cond: float = 100.0, seed: int = 0) -> torch.Tensor:
    """A random matrix (or batch) whose singular values spread log-uniformly over `cond`."""
    gen = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen))
    s = cond ** -torch.rand(*batch, k, generator=gen)
    return u @ torch.diag_embed(s) @ v.mT


@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (32, 128), (4, 48, 16)])
def test_orthogonalize_puts_singular_values_near_one(shape):
    # Five quintic steps lift singular values down to ~1/400 of the Frobenius norm; real
    # gradients' spectra, and these condition-100 matrices, stay well within that.
    g = conditioned(*shape)
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.6 and s.max() < 1.25
    # singular vectors are kept: the result is close to the exact polar factor U V^T
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    o = orthogonalize(g)
    cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert torch.all(cos > 0.97)


def test_batched_orthogonalize_matches_one_at_a_time():
    g = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(1))
    together = orthogonalize(g)
    for i in range(3):
        torch.testing.assert_close(together[i], orthogonalize(g[i]), atol=1e-5, rtol=1e-5)


def test_orthogonalize_in_bfloat16_agrees_with_float32():
    g = conditioned(6, 48, 192, seed=3)
    f32 = orthogonalize(g)
    bf16 = orthogonalize(g, dtype=torch.bfloat16)
    assert f32.dtype == bf16.dtype == torch.float32
    err = (bf16 - f32).abs().max().item()
    assert 1e-3 < err < 0.03  # it did run in bfloat16, and bfloat16 is close enough
    s = torch.linalg.svdvals(bf16)
    assert s.min() > 0.6 and s.max() < 1.25


@pytest.mark.parametrize(("dtype", "ns"), [("float32", torch.float32),
                                           ("bfloat16", torch.bfloat16),
                                           ("auto", torch.float32)])
def test_newton_schulz_runs_in_the_precision_the_run_trains_in(dtype, ns):
    # 'auto' reaches the optimizer only from a run recorded before runs recorded their
    # precision: on a CPU that meant float32, and its resume stays exact
    model = build_model(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = make_optimizer(model, TrainConfig(optimizer="muon", dtype=dtype), CPU)
    assert opt.ns_dtype is ns


def test_fast_bfloat16_reads_the_cpus_instructions(monkeypatch):
    from chargpt import device as dev

    def cpu_with(**flags):
        dev._cpu_has_bfloat16_dot.cache_clear()
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags, raising=False)
        return dev.fast_bfloat16(CPU)

    try:
        assert cpu_with(avx512_f=True, avx512_bf16=True)
        assert cpu_with(amx_bf16=True)
        assert cpu_with(neon=True, bf16=True)
        assert not cpu_with(avx512_f=True, avx2=True)  # converts every element: slower
        monkeypatch.delattr(torch.cpu, "get_capabilities")  # older torch: float32
        dev._cpu_has_bfloat16_dot.cache_clear()
        assert not dev.fast_bfloat16(CPU)
        assert not dev.fast_bfloat16(torch.device("meta"))
    finally:
        monkeypatch.undo()
        dev._cpu_has_bfloat16_dot.cache_clear()


def _one_muon_step(weight: torch.Tensor, grad: torch.Tensor, split: int = 1) -> torch.Tensor:
    p = torch.nn.Parameter(weight.clone())
    opt = Muon([{"params": [p], "kind": "muon", "momentum": 0.0, "nesterov": False,
                 "split": split}], lr=0.1)
    p.grad = grad
    opt.step()
    return (weight - p.detach()) / 0.1


def test_muon_refuses_groups_it_cannot_step():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ConfigError, match="unknown param group kind 'sgd'"):
        Muon([{"params": [p], "kind": "sgd"}])
    with pytest.raises(ConfigError, match="2-D weight matrices only"):
        Muon([{"params": [p], "kind": "muon"}])


def test_a_muon_update_has_singular_values_near_one():
    update = _one_muon_step(torch.randn(64, 64), conditioned(64, 64, seed=2))
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.6 and s.max() < 1.25
    # tall matrices are scaled by sqrt(rows / cols)
    tall = _one_muon_step(torch.zeros(128, 32), conditioned(128, 32, seed=3))
    s = torch.linalg.svdvals(tall) / 2.0
    assert s.min() > 0.6 and s.max() < 1.25


def test_split_orthogonalises_each_block_on_its_own():
    g = torch.cat([conditioned(16, 16, seed=i) for i in range(3)])
    g[16:32] *= 50.0  # one block far larger: a joint orthogonalisation would drown the others
    update = _one_muon_step(torch.zeros(48, 16), g, split=3)
    for block in update.split(16):
        s = torch.linalg.svdvals(block)
        assert s.min() > 0.6 and s.max() < 1.25


def test_muon_momentum_is_nesterov():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    opt = Muon([{"params": [p], "kind": "muon", "momentum": 0.5}], lr=1.0)
    g1, g2 = torch.randn(8, 8), torch.randn(8, 8)
    p.grad = g1
    opt.step()
    p.grad = g2
    before = p.detach().clone()
    opt.step()
    buf = 0.5 * g1 + g2
    torch.testing.assert_close(before - p.detach(), orthogonalize(g2 + 0.5 * buf))


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(4)
    ref = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)
    opt_ours = Muon([{"params": ours, "kind": "adamw", "betas": (0.9, 0.99),
                      "weight_decay": 0.1, "eps": 1e-8}], lr=0.01)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ref]
        for p, q, g in zip(ref, ours, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_ours.step()
    for p, q in zip(ref, ours, strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


def test_make_optimizer_groups():
    model = build_model(ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                                    pos_emb="rope"))
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.04), CPU)
    assert isinstance(opt, torch.optim.Optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["kind"], g.get("split", 1), g["weight_decay"]):
              sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups[("muon", 3, 0.0)] == [f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)]
    assert all(".h." in n and n.endswith("weight") and "ln_" not in n
               for n in groups[("muon", 1, 0.0)])
    assert len(groups[("muon", 1, 0.0)]) == 2 * 3
    assert groups[("adamw", 1, 0.1)] == ["lm_head.weight"]
    assert "transformer.wte.weight" in groups[("adamw", 1, 0.0)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    scales = {g["kind"]: g["lr_scale"] for g in opt.param_groups}
    assert scales == {"muon": pytest.approx(20.0), "adamw": 1.0}
    # the default stays torch's AdamW
    assert type(make_optimizer(model, TrainConfig(), CPU)) is torch.optim.AdamW


def test_muon_state_dict_is_tensors_plus_json():
    model = build_model(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    _, loss = model(torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)))
    loss.backward()
    opt.step()
    tensors, rest = split_optimizer_state(opt.state_dict())
    json.dumps(rest)
    assert any(k.endswith("momentum_buffer") for k in tensors)
    assert any(k.endswith("exp_avg_sq") for k in tensors)


# --- schedules --------------------------------------------------------------------------------


def test_wsd_schedule():
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="wsd",
                     cooldown_frac=0.2)
    assert lr_at(0, tc) == pytest.approx(0.1)
    assert lr_at(9, tc) == pytest.approx(1.0)
    assert all(lr_at(s, tc) == 1.0 for s in range(10, 88))  # stable until the last 22 steps
    assert lr_at(88, tc) == 1.0
    assert lr_at(99, tc) == pytest.approx(1.0 - 0.9 * 11 / 22)  # linear cooldown
    assert lr_at(110, tc) == pytest.approx(0.1)
    assert lr_at(500, tc) == pytest.approx(0.1)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 120))
    # cosine stays the default and is untouched
    cos = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(60, cos) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(optimizer="sgd"), "optimizer"),
        (dict(muon_lr=0.0), "muon_lr"),
        (dict(muon_momentum=1.0), "muon_momentum"),
        (dict(muon_ns_steps=0), "muon_ns_steps"),
        (dict(schedule="linear"), "schedule"),
        (dict(cooldown_frac=0.0), "cooldown_frac"),
        (dict(cooldown_frac=1.5), "cooldown_frac"),
    ],
)
def test_invalid_optimizer_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"train": overrides})


# --- the training loop with Muon --------------------------------------------------------------


FAST_MODEL = {"dropout": 0.1, "pos_emb": "rope", "qk_norm": True, "activation": "relu2",
              "zero_init_proj": True, "norm_type": "rmsnorm"}


def fast_config(corpus, out, **train_overrides):
    """The tiny model with the fast recipe's switches, Muon and the WSD schedule."""
    train = {"warmup_steps": 5, "lr": 3e-3, "min_lr": 3e-4, "optimizer": "muon",
             "schedule": "wsd", **train_overrides}
    return tiny_config(corpus, out, model=FAST_MODEL, **train)


def test_muon_resume_is_bit_identical(corpus, tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    train(fast_config(corpus, ref), quiet=True)
    with ctrl_c_after(13):
        first = train(fast_config(corpus, split), quiet=True)
    assert first.step == 13
    second = train(resume=split, quiet=True)
    assert second.step == 30
    assert same_weights(ref, split)
    evals = [[(r["step"], r["val_loss"]) for r in metrics(d, "eval")] for d in (ref, split)]
    assert evals[0] == evals[1]
    assert evals[0][-1][1] < evals[0][0][1] - 0.5  # and it learns


def test_muon_adds_no_host_sync_per_step(corpus, tmp_path, item_calls):
    train(fast_config(corpus, tmp_path / "run", max_steps=40, log_interval=20,
                      eval_interval=40), quiet=True)
    assert item_calls["n"] <= 2 + 4 + 2  # as in test_train: log steps and evals only
