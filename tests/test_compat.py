"""Runs written by an earlier chargpt (tests/data/main-v1, see its README) still load, sample and
resume, and the resumed run ends with the weights the earlier code trained (to float rounding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import weights
from safetensors.torch import load_file

from chargpt.runs.checkpoint import load_train_state
from chargpt.runs.run import load_run
from chargpt.training.launch import train

MAIN_V1 = Path(__file__).resolve().parent / "data" / "main-v1"


@pytest.fixture(autouse=True)
def one_thread():
    """The runs were written with one torch thread; CPU results are exact for a thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_of_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(MAIN_V1 / "run", run)
    return run


def test_an_earlier_run_resumes_to_the_weights_the_earlier_code_trained(tmp_path):
    run = copy_of_run(tmp_path)
    result = train(resume=run, quiet=True)
    assert result.step == 12
    ref = load_file(str(MAIN_V1 / "ref-step12-model.safetensors"))
    ours = weights(run)
    assert ours.keys() == ref.keys()
    # Bit-identical on the kind of CPU the reference was written on; another CPU's kernels
    # (AVX2 here) round differently, by about 4e-7 after 12 steps. A broken
    # resume (lost optimizer state, RNG or batch position) is off by about what the six
    # resumed steps move the weights: up to 2e-3.
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["step"] == 12 and set(state) >= {"sampler", "optimizer", "world_size"}


def test_an_earlier_checkpoint_loads_and_samples(tmp_path):
    run = load_run(MAIN_V1 / "run", device="cpu")
    assert run.step == 6 and run.tokenizer.vocab_size == run.config.model.vocab_size == 49
    text = run.generate("\n", 20, seed=1)
    assert len(text) == 20 and text == run.generate("\n", 20, seed=1)
    state = load_train_state(MAIN_V1 / "run" / "last", resumable=True)
    assert state.sampler["order"] == "epoch" and state.sampler["generator"].dtype == torch.uint8
    assert len(state.cpu_rng) == 1 and state.cuda_rng is None
