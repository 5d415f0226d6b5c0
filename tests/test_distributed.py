"""DDP through torchrun on CPU (gloo): two processes must train exactly like one process with
twice the gradient accumulation, to float tolerance, and only rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import metrics, tiny_flags, write_corpus
from safetensors.torch import load_file


def flags(max_steps: int = 30) -> list[str]:
    return tiny_flags(dropout=0.0, max_steps=max_steps, eval_iters=4, sample_chars=0,
                      warmup_steps=5, lr=3e-3, min_lr=3e-4)


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def torchrun(nproc, *args):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "chargpt.cli.commands", *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_corpus(tmp)
    single, ddp = tmp / "single", tmp / "ddp"
    run([sys.executable, "-m", "chargpt.cli.commands", "train", "--input", str(data), "--out",
         str(single), "--grad-accum", "2", *flags()])
    out = torchrun(2, "train", "--input", str(data), "--out", str(ddp), "--grad-accum", "1",
                   *flags())
    return single, ddp, out


def test_two_processes_match_one_with_twice_the_accumulation(runs):
    single, ddp, _ = runs
    a, b = metrics(single, "train"), metrics(ddp, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(5, 31, 5))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-5)
    ea, eb = metrics(single, "eval"), metrics(ddp, "eval")
    for ra, rb in zip(ea, eb, strict=True):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4, abs=1e-5)
    wa = load_file(str(single / "last" / "model.safetensors"))
    wb = load_file(str(ddp / "last" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)
    assert abs(a[0]["loss"] - a[-1]["loss"]) > 0.3  # it did learn something


def test_only_rank_zero_prints_and_writes(runs):
    _, ddp, out = runs
    assert out.stdout.count("step 30: train loss") == 1  # not once per rank
    assert "x 2 processes" in out.stdout
    state = json.loads((ddp / "last" / "state.json").read_text())
    assert state["world_size"] == 2
    rng = load_file(str(ddp / "last" / "rng.safetensors"))
    assert "torch_cpu" in rng and "torch_cpu.1" in rng  # each rank's RNG, for exact resume
    assert not any(p.name.endswith((".tmp", ".old")) for p in ddp.iterdir())


def test_ddp_resume_is_exact(tmp_path, runs):
    _, ddp_ref, _ = runs
    data = write_corpus(tmp_path)
    cut = tmp_path / "cut"
    # Stop after 15 steps of the reference's 30-step schedule, then resume to 30.
    torchrun(2, "train", "--input", str(data), "--out", str(cut), "--grad-accum", "1",
             *flags(max_steps=15), "--lr-decay-steps", "30")
    torchrun(2, "train", "--resume", str(cut), "--max-steps", "30")
    wa = load_file(str(ddp_ref / "last" / "model.safetensors"))
    wb = load_file(str(cut / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
