"""What happens where the native decode loop cannot run, and what needs no compiler to check:
models the loop does not compute, a machine without a working C compiler, the weight kinds'
storage and their settings. These run everywhere; test_native.py, which compares the loop with
the torch step, needs the compiler (and names it when it is missing)."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_sampling import gen, prompt, rope_gpt, tiny_gpt

import chargpt.generation.decode as decode_module
from chargpt.errors import ConfigError
from chargpt.generation.loop import generate
from chargpt.generation.native import build, layout, loop
from chargpt.generation.settings import SamplingSettings


def both(model, idx, n, **options):
    """`n` tokens after `idx` through the native loop and through the torch step."""
    native_out = generate(model, idx, n, generator=gen(9), **options)
    torch_out = generate(model, idx, n, generator=gen(9), native=False, **options)
    return native_out, torch_out


def dequantized(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The reference for what each weight kind stores: the float32 weights the C loop computes
    with when it stores `weight` as `kind`."""
    stored, scale = layout.stored_weights(weight, kind)
    return stored.to(torch.float32) if scale is None else stored.to(torch.float32) * scale[:, None]


def test_models_the_loop_does_not_compute_use_the_torch_step():
    assert not loop.supports(tiny_gpt(norm="post"))  # no fast step at all
    assert not loop.supports(tiny_gpt().double())  # float64 weights
    assert not loop.supports(tiny_gpt().to(torch.bfloat16))
    model = tiny_gpt().double()
    got, expected = both(model, prompt(1, 3), 20, temperature=1.0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("cc, reason", [
    (None, "no C compiler found"),
    ("false", "could not build it"),  # a compiler that fails on every flag set
])
def test_without_a_working_compiler_sampling_warns_once_and_uses_the_torch_step(
        fresh_library, monkeypatch, capsys, cc, reason):
    monkeypatch.setattr(build, "_compiler", lambda: cc and [shutil.which(cc)])
    ok, why = build.available()
    assert not ok and reason in why
    model = rope_gpt()
    expected = generate(model, prompt(1, 3), 30, generator=gen(1), native=False)
    for _ in range(2):
        got = generate(model, prompt(1, 3), 30, generator=gen(1))
        assert torch.equal(got, expected)
    err = capsys.readouterr().err
    assert err.count("chargpt: warning: the native decode loop is unavailable here") == 1
    assert reason in err and len(err.strip().splitlines()) == 1


def test_int8_weights_are_rows_scaled_to_127():
    w = torch.tensor([[0.5, -0.25, 0.1], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.004]])
    q, scale = layout.stored_weights(w, "int8")
    assert q.dtype == torch.int8 and q.abs().amax(dim=1).tolist() == [127, 0, 127]
    assert torch.allclose(scale, torch.tensor([0.5 / 127, 1.0, 2.0 / 127]))
    assert (dequantized(w, "int8") - w).abs().le(scale[:, None] / 2 + 1e-9).all()
    assert torch.equal(dequantized(w, "float32"), w)


def test_bfloat16_weights_are_a_setting_of_the_native_loop(capsys, monkeypatch):
    with pytest.raises(ConfigError, match="weights must be one of float32, bfloat16, int8"):
        SamplingSettings(weight_format="float16")
    with pytest.raises(ConfigError, match="needs the KV cache"):
        SamplingSettings(weight_format="int8", native=False)
    with pytest.raises(ConfigError, match="needs the KV cache and native decoding"):
        SamplingSettings(weight_format="bfloat16", native=False)
    with pytest.raises(ConfigError, match="needs the KV cache and native decoding"):
        SamplingSettings(weight_format="bfloat16", use_cache=False)
    monkeypatch.setattr(decode_module, "_REPORTED", set())
    model = tiny_gpt().double()  # the loop does not run it: float32, and said once
    for _ in range(2):
        got = generate(model, prompt(1, 3), 20, generator=gen(2), weight_format="bfloat16")
        assert torch.equal(got, generate(model, prompt(1, 3), 20, generator=gen(2)))
    err = capsys.readouterr().err
    assert err.count("bfloat16 weights are a setting of the native decode loop") == 1
    assert "decoding in float32" in err
