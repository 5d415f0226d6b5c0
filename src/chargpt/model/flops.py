"""What a configuration costs: parameters, FLOPs per token, memory, time, and MFU.

FLOPs per trained token follow the usual accounting for a decoder-only Transformer: 6 FLOPs per
matrix-multiply parameter (2 forward, 4 backward) plus 12 * n_layer * n_embd * block_size for
the attention scores and their weighted sums (the PaLM paper's appendix gives the derivation).
Activation memory uses the per-layer estimate of Korthikanti et al. (2022), 34 * T * B * d bytes
in 16-bit with fused attention (no T x T matrices stored), plus the float32 logits. These are
estimates for planning, not measurements. Peak throughputs are vendors' dense 16-bit tensor-core
figures; model FLOPs utilisation (MFU) is achieved FLOP/s over that peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from chargpt.config.schema import Config, ModelConfig
from chargpt.errors import ConfigError
from chargpt.model.build import build_model

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, FLOP/s.
PEAK_FLOPS: dict[str, float] = {
    "B200": 2250e12,
    "H200": 989e12,
    "H100-SXM": 989e12,
    "H100-PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX-4090": 165e12,
    "L4": 121e12,
    "V100": 125e12,
    "RTX-3090": 71e12,
    "T4": 65e12,
}


def gpu_named(name: str) -> str:
    """The PEAK_FLOPS key for a GPU as people type it ('H100', 'h200', '4090', 'RTX 4090',
    'A100-SXM4-80GB'); an unknown name is a ConfigError listing the known ones."""
    exact = {key.upper(): key for key in PEAK_FLOPS}
    typed = name.strip().upper().replace(" ", "-")
    found = exact.get(typed) or match_gpu(typed) or match_gpu("RTX-" + typed)
    if found is None:
        raise ConfigError(f"unknown GPU {name!r} (known: {', '.join(PEAK_FLOPS)})")
    return found


def match_gpu(device_name: str) -> str | None:
    """The PEAK_FLOPS key for a CUDA device name such as 'NVIDIA A100-SXM4-80GB', or None."""
    name = device_name.upper().replace(" ", "-")
    if "H100" in name:
        return "H100-PCIe" if "PCIE" in name else "H100-SXM"
    for key in ("B200", "H200", "A100", "L40S", "RTX-4090", "L4", "V100", "RTX-3090", "T4"):
        token = key.upper()
        # 'L4' must not match 'L40S'; device names put the model between separators.
        if token == "L4" and "L40" in name:
            continue
        if token in name:
            return key
    return None


@dataclass
class Estimate:
    """A configuration's cost, per token and per step."""

    params: int
    matmul_params: int
    flops_per_token: float  # training (forward + backward)
    tokens_per_step: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes


def _counts(m: ModelConfig) -> tuple[int, int, bool]:
    """(parameters, matrix-multiply parameters, whether it has attention) of a model of `m`'s
    sizes, counted on the real model built on the meta device with one block and with two:
    every block is the same, so each adds what the second added. Building all n_layer blocks,
    even on the meta device, takes seconds per hundred of them."""
    counts = []
    for n_layer in (1, 2):
        with torch.device("meta"):
            model = build_model(dataclasses.replace(m, n_layer=n_layer))
        matmul = sum(mod.weight.numel() for mod in model.modules()
                     if isinstance(mod, torch.nn.Linear))
        counts.append((model.num_params(), matmul))
    (p1, w1), (p2, w2) = counts
    extra = m.n_layer - 1
    return p1 + extra * (p2 - p1), w1 + extra * (w2 - w1), model.capabilities().attention


def estimate(cfg: Config, world_size: int = 1) -> Estimate:
    """Parameters counted on the real model (see `_counts`)."""
    m, tc = cfg.model, cfg.train
    # Attention's scores and weighted sums, and the per-layer activations, exist only in a
    # Transformer; a model without attention (the bigram) has neither.
    params, matmul, transformer = _counts(m)
    attention = 12 * m.n_layer * m.n_embd * m.block_size if transformer else 0
    flops_per_token = 6 * matmul + attention
    B, T = tc.batch_size, m.block_size
    per_layer = 34 * T * B * m.n_embd if transformer else 0
    logits = 3 * B * T * m.vocab_size * 4  # float32 logits, softmax and gradient
    return Estimate(
        params=params,
        matmul_params=matmul,
        flops_per_token=float(flops_per_token),
        tokens_per_step=B * T * tc.grad_accum * world_size,
        weights_bytes=4 * params,
        grads_bytes=4 * params,
        optimizer_bytes=8 * params,  # AdamW's two float32 moments
        activation_bytes=m.n_layer * per_layer + logits,
    )


def mfu(flops_per_token: float, tokens_per_second: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation on a known GPU, or None (CPU, MPS, unknown GPU)."""
    if device.type != "cuda":
        return None
    key = match_gpu(torch.cuda.get_device_name(device))
    if key is None:
        return None
    return flops_per_token * tokens_per_second / PEAK_FLOPS[key]


def check_throughput(gpus: int, mfu: float) -> None:
    """Refuse a GPU count or model FLOPs utilisation no machine has (`chargpt estimate`)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")


def report(cfg: Config, *, gpu: str, gpus: int, mfu: float, corpus_chars: int) -> str:
    """The `chargpt estimate` text: size, FLOPs, memory and time on `gpus` x `gpu` at `mfu`."""
    gpu = gpu_named(gpu)
    check_throughput(gpus, mfu)
    if corpus_chars < 1:
        raise ConfigError(f"--corpus-chars must be >= 1, got {corpus_chars}")
    e = estimate(cfg, world_size=gpus)
    m, tc = cfg.model, cfg.train
    seconds_per_step = e.flops_per_step / (PEAK_FLOPS[gpu] * mfu * gpus)
    epoch_steps = corpus_chars / e.tokens_per_step
    return "\n".join([
        f"model          {m.arch}, {m.n_layer} layers, {m.n_head} heads, {m.n_embd} embd, "
        f"block {m.block_size}, vocab {m.vocab_size}",
        f"parameters     {e.params:,} ({e.params / 1e6:.2f} M)",
        f"FLOPs/token    {e.flops_per_token / 1e6:,.1f} M (training: forward + backward)",
        f"tokens/step    {e.tokens_per_step:,} (batch {tc.batch_size} x block "
        f"{m.block_size} x accumulation {tc.grad_accum} x {gpus} GPU(s))",
        f"memory/GPU     weights {human_bytes(e.weights_bytes)}, gradients "
        f"{human_bytes(e.grads_bytes)}, AdamW state {human_bytes(e.optimizer_bytes)}, "
        f"activations ~{human_bytes(e.activation_bytes)} (16-bit autocast); "
        f"total ~{human_bytes(e.total_bytes)}",
        f"on {gpus} x {gpu} at {mfu:.0%} MFU: {human_seconds(seconds_per_step)}/step, "
        f"{tc.max_steps:,} steps in {human_seconds(seconds_per_step * tc.max_steps)}, "
        f"one epoch of {corpus_chars:,} characters = {epoch_steps:,.0f} steps in "
        f"{human_seconds(seconds_per_step * epoch_steps)}",
        "(estimates from FLOP counts and vendor peak figures, not measurements)",
    ])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
