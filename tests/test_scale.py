"""Scale: cost estimates checked against real models, GPU-name matching for MFU, the batch
stream shared by DDP ranks, epoch-order sampling, and the GPU code paths run on the CPU."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from chargpt.cli.commands import main
from chargpt.config.resolve import resolve_config
from chargpt.data.batches import BatchSampler
from chargpt.errors import ConfigError
from chargpt.model.build import build_model
from chargpt.model.flops import PEAK_FLOPS, estimate, gpu_named, match_gpu, mfu
from chargpt.training.launch import train


@pytest.mark.parametrize("preset", ["shakespeare-cpu", "shakespeare-gpu", "turkish-86m"])
def test_estimate_counts_the_real_model(preset):
    cfg = resolve_config(preset, overrides={"model": {"vocab_size": 65}})
    e = estimate(cfg)
    model = build_model(cfg.model)
    assert e.params == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    m = cfg.model
    assert e.flops_per_token == 6 * linear + 12 * m.n_layer * m.n_embd * m.block_size
    assert e.optimizer_bytes == 8 * e.params


def test_preset_sizes_match_their_descriptions():
    sizes = {name: estimate(resolve_config(name, overrides={"model": {"vocab_size": 65}})).params
             for name in ("shakespeare-cpu", "shakespeare-gpu", "turkish-86m")}
    assert 0.33e6 < sizes["shakespeare-cpu"] < 0.36e6  # its description: 0.34 M
    assert 10.7e6 < sizes["shakespeare-gpu"] < 10.9e6  # the lecture's 10.79 M
    assert 84e6 < sizes["turkish-86m"] < 88e6
    big = estimate(resolve_config("turkish-86m", overrides={"model": {"vocab_size": 200}}))
    assert big.total_bytes < 16 * 2**30 / 2  # room to spare on a 16 GB GPU


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA GeForce RTX 4090", "RTX-4090"),
    ("NVIDIA GeForce RTX 3090", "RTX-3090"), ("Some Future GPU", None),
])
def test_gpu_names(name, key):
    assert match_gpu(name) == key
    assert key is None or key in PEAK_FLOPS


@pytest.mark.parametrize("typed, key", [
    ("H100", "H100-SXM"), ("h100", "H100-SXM"), ("H100 PCIe", "H100-PCIe"), ("H200", "H200"),
    ("4090", "RTX-4090"), ("RTX 4090", "RTX-4090"), ("rtx-3090", "RTX-3090"), ("a100", "A100"),
    ("A100-SXM4-80GB", "A100"), ("L4", "L4"), ("l40s", "L40S"), ("B200", "B200"),
])
def test_gpus_by_the_names_people_type(typed, key):
    assert gpu_named(typed) == key


def test_an_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown GPU 'TPU' \(known: B200, H200, H100-SXM"):
        gpu_named("TPU")


def test_mfu_is_omitted_off_gpu():
    assert mfu(1e9, 1e5, torch.device("cpu")) is None


def test_estimate_command(capsys):
    assert main(["estimate", "--preset", "turkish-86m", "--vocab-size", "120", "--gpu", "L4",
                 "--corpus-chars", "470000000"]) == 0
    out = capsys.readouterr().out
    assert "85." in out and "AdamW state" in out and "L4" in out and "one epoch" in out
    assert main(["estimate", "--gpu", "TPU"]) == 1
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["estimate", "--gpu", "h100"]) == 0
    assert "on 1 x H100-SXM" in capsys.readouterr().out


@pytest.mark.parametrize("order", BatchSampler.ORDERS)
def test_ranks_split_the_single_process_stream(order):
    tokens = np.arange(5000, dtype=np.uint16)
    one = BatchSampler(tokens, 8, 4, seed=3, order=order)
    ranks = [BatchSampler(tokens, 8, 4, seed=3, rank=r, world_size=2, order=order)
             for r in range(2)]
    for _ in range(5):
        a, b = one.next_batch()[0], one.next_batch()[0]  # two micro-batches of one process
        assert torch.equal(ranks[0].next_batch()[0], a)
        assert torch.equal(ranks[1].next_batch()[0], b)


def test_epoch_order_sees_every_window_once_and_resumes():
    tokens = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(tokens, 10, 3, seed=0, order="epoch")
    seen = []
    while s.epoch == 0:
        x, _ = s.next_batch()
        seen.extend(int(row[0]) for row in x)
    first_epoch = seen[: (len(tokens) - 1 - seen[0] % 10) // 10]
    assert len(set(first_epoch)) == len(first_epoch)  # no window twice within an epoch
    assert len({start % 10 for start in first_epoch}) == 1  # one offset per epoch
    state = s.state_dict()
    after = [s.next_batch()[0] for _ in range(40)]  # crosses into the next epoch
    t = BatchSampler(tokens, 10, 3, seed=0, order="epoch")
    t.load_state_dict(state)
    assert all(torch.equal(a, t.next_batch()[0]) for a in after)


@pytest.fixture
def small_corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("".join(f"line {i}: to be or not to be.\n" for i in range(600)), "utf-8")
    return p


def _cfg(corpus, out, **train_kw):
    """An even smaller model (one layer, 16 wide, 8 characters) for six steps."""
    train = {"max_steps": 6, "eval_interval": 3, "log_interval": 3, **train_kw}
    return tiny_config(corpus, out, model={"n_layer": 1, "n_embd": 16, "block_size": 8},
                       **train)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_paths_run_on_cpu(small_corpus, tmp_path, dtype):
    # bf16 autocast is the CUDA default; fp16 adds the gradient scaler. Both run on CPU too.
    cfg = _cfg(small_corpus, tmp_path / dtype, dtype=dtype, data_order="epoch")
    result = train(cfg, quiet=True)
    assert result.step == 6 and np.isfinite(result.last_val_loss)


def test_torch_compile_path_runs_on_cpu(small_corpus, tmp_path):
    pytest.importorskip("torch._inductor")
    result = train(_cfg(small_corpus, tmp_path / "compiled", compile=True, max_steps=3,
                        eval_interval=3), quiet=True)
    assert result.step == 3 and np.isfinite(result.last_val_loss)
    # the checkpoint holds the raw module's names, never torch.compile's _orig_mod prefix
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "compiled" / "last" / "model.safetensors")).keys()
    assert keys and not any("_orig_mod" in k for k in keys)
