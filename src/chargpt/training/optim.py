"""Optimizers and learning-rate schedules.

`make_optimizer` builds the optimizer a `TrainConfig` asks for: AdamW for every parameter, or
`Muon` (orthogonalised momentum for the Transformer blocks' weight matrices, AdamW for
embeddings, the head, biases and norms) as ONE `torch.optim.Optimizer`, so checkpointing and
resuming treat both alike. `lr_at` gives the learning rate for a step: linear warmup, then a
cosine decay or a warmup-stable-decay (WSD) schedule with a linear cooldown. Both are pure
functions of the config, so a resumed run recomputes exactly the schedule it would have
followed, and nothing here reads a tensor back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from chargpt.config.schema import TrainConfig
from chargpt.config.values import parse_cooldown_plan
from chargpt.device import autocast_dtype
from chargpt.errors import ConfigError

# Coefficients of the quintic Newton-Schulz iteration, chosen (Jordan et al., 2024) to push
# every singular value of a normalised matrix into roughly [0.7, 1.2] in about five steps,
# faster than the textbook cubic iteration that converges to exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine or WSD decay to min_lr at decay_steps, then flat; or,
    with the 'constant' schedule, lr after the warmup.

    WSD holds lr until the last `cooldown_frac` of the decay steps, then falls linearly to
    min_lr (`cooldown_level`, which a time budget's plans may re-aim).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if step >= cfg.decay_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        return cfg.lr + cooldown_level(step, cfg) * (cfg.min_lr - cfg.lr)
    progress = (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def cooldown_level(step: int, cfg: TrainConfig) -> float:
    """How far a WSD run's rate has fallen at `step`, from lr (0) to min_lr (1): linearly over
    the last `cooldown_frac` of the decay steps; or, once a time budget has re-aimed the
    cooldown (`cooldown_plan`), along a straight line from each re-aiming step toward min_lr at
    the end planned there, each line starting where the one before it had got to, so that the
    rates before a re-aiming are the ones the run took."""
    plan = parse_cooldown_plan(cfg.cooldown_plan)
    if not plan:
        start = cooldown_start(cfg)
        return max(0.0, (step - start) / max(1, cfg.decay_steps - start))
    level = 0.0
    if step < plan[0][0]:
        return level
    for (at, end), following in zip(plan, [*plan[1:], None], strict=True):
        upto = step if following is None or step < following[0] else following[0]
        level += (1.0 - level) * min(1.0, (upto - at) / (end - at))
        if upto == step:
            break
    return level


def cooldown_start(cfg: TrainConfig) -> int:
    """The first step of a WSD schedule's linear cooldown."""
    cooldown = max(1, round(cfg.cooldown_frac * cfg.decay_steps))
    return max(cfg.warmup_steps, cfg.decay_steps - cooldown)


def length_free_steps(cfg: TrainConfig) -> int:
    """Until which step a time budget may still change max_steps without changing a rate
    already used (budget.py): the end for WSD (whose cooldown a plan re-aims instead, see
    `cooldown_level`) and for a schedule that does not depend on the length, the warmup for
    cosine, whose decay spans the whole run."""
    if cfg.schedule == "constant" or cfg.lr_decay_steps:
        return cfg.max_steps  # the length decides nothing but the end
    if cfg.schedule == "wsd":  # re-aiming the cooldown keeps every rate used (see lr_at)
        return cfg.max_steps
    return cfg.warmup_steps  # cosine: the decay spans the whole run


def orthogonalize(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> Tensor:
    """An approximately orthogonal matrix with the singular vectors of `g` (..., m, n).

    Runs the quintic Newton-Schulz iteration X <- aX + (bA + cA^2)X with A = XX^T, which
    maps each singular value s of X to a s + b s^3 + c s^5 and leaves the singular vectors
    alone. Dividing by the Frobenius norm first puts every singular value in (0, 1]. Works on
    the wide orientation (m <= n), where A is the smaller Gram matrix. Computed in `dtype`; the
    iteration is robust to bfloat16, whose result is within about 0.01 of float32's.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    batched = x.dim() == 3
    for _ in range(steps):
        gram = x @ x.mT  # (..., m, m)
        if batched:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
            x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
        else:
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    if tall:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for hidden weight matrices and AdamW for everything else, in one optimizer.

    Each param group has a `kind`. A 'muon' group keeps a momentum buffer per matrix; the
    update is the Nesterov look-ahead g + momentum * buffer, orthogonalised by Newton-Schulz
    and scaled by sqrt(max(1, rows / cols)) so tall and wide matrices move alike. `split` > 1
    orthogonalises that many equal row blocks separately (the fused q, k, v projection is
    three matrices, not one). An 'adamw' group is plain AdamW with decoupled weight decay.
    The blocks of every Muon group that have the same shape, once each is turned wide (a tall
    one transposed), are orthogonalised together as one batch, and the momentum of a group
    advances in a few multi-tensor operations: on a CPU a step's cost there is the number of
    operations more than their arithmetic. Step counts are Python ints: the state holds no
    tensor that would need a host sync, and it serialises to JSON as it is.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 1e-3,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        self.ns_dtype = ns_dtype  # what Newton-Schulz computes in; not state: the run decides
        defaults = dict(lr=lr, kind="adamw", betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                        momentum=0.95, nesterov=True, ns_steps=5, split=1, lr_scale=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["kind"] not in ("muon", "adamw"):
                raise ConfigError(f"unknown param group kind {group['kind']!r}")
            if group["kind"] == "muon" and any(p.dim() != 2 for p in group["params"]):
                raise ConfigError("Muon groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "muon":
                muon.append((group, params, self._momentum(group, params)))
            else:
                self._adamw_step(group, params)
        if muon:
            self._muon_step(muon)
        return loss

    def _momentum(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """Advance each matrix's momentum buffer by its gradient; return the updates to
        orthogonalise (the Nesterov look-ahead g + momentum * buffer, or the buffer)."""
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        mu = group["momentum"]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        return list(torch._foreach_add(grads, bufs, alpha=mu)) if group["nesterov"] else bufs

    def _muon_step(self, groups: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> None:
        """Orthogonalise the updates of every Muon group and apply them. The blocks are taken
        in their wide orientation (a tall block transposed), so a matrix and one of its
        transpose's shape share a batch: one Newton-Schulz per wide shape and step count."""
        batches: dict[tuple[int, int, int], list[Tensor]] = {}
        placed = []  # per update: its batch, its first block's index there, and orientation
        for group, _, updates in groups:
            split = group["split"]
            for u in updates:
                blocks = u.view(split, u.size(0) // split, u.size(1))  # (split, rows, cols)
                tall = blocks.size(1) > blocks.size(2)
                if tall:
                    blocks = blocks.mT  # (split, cols, rows)
                key = (blocks.size(1), blocks.size(2), group["ns_steps"])
                batch = batches.setdefault(key, [])
                placed.append((key, len(batch), tall))
                batch.extend(blocks.unbind(0))
        ortho = {key: orthogonalize(torch.stack(blocks), key[2], self.ns_dtype)  # (n, sh, lo)
                 for key, blocks in batches.items()}
        where = iter(placed)
        for group, params, _ in groups:
            lr, wd, split = group["lr"], group["weight_decay"], group["split"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            for p in params:
                key, i, tall = next(where)
                out = ortho[key][i : i + split]  # (split, short, long)
                # tall blocks move as far as wide ones: scaled by sqrt(rows / cols)
                scale = (key[1] / key[0]) ** 0.5 if tall else 1.0
                p.add_((out.mT if tall else out).reshape(p.shape), alpha=-lr * scale)

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        grads, exp_avgs, exp_avg_sqs = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        step = self.state[params[0]]["step"]  # the same for every parameter of a group
        bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bias1)


def _adamw_split(params: Iterable[torch.nn.Parameter], embedding_ids: set[int]):
    decay, no_decay = [], []
    for p in params:
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return decay, no_decay


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (weight decay on Linear matrices only, not on biases, norms, embeddings), or Muon
    for the 2-D weights inside the Transformer blocks and AdamW for the rest."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied: once
    if cfg.optimizer == "adamw":
        decay, no_decay = _adamw_split((p for _, p in named), embedding_ids)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)

    def hidden(name: str, p: torch.Tensor) -> bool:
        return name.startswith("transformer.h.") and p.dim() == 2 and id(p) not in embedding_ids

    qkv = [p for n, p in named if hidden(n, p) and n.endswith("attn.c_attn.weight")]
    other = [p for n, p in named if hidden(n, p) and not n.endswith("attn.c_attn.weight")]
    decay, no_decay = _adamw_split((p for n, p in named if not hidden(n, p)), embedding_ids)
    muon = dict(kind="muon", momentum=cfg.muon_momentum, nesterov=True,
                ns_steps=cfg.muon_ns_steps, weight_decay=0.0, lr_scale=cfg.muon_lr / cfg.lr)
    adamw = dict(kind="adamw", betas=(cfg.beta1, cfg.beta2), eps=1e-8, lr_scale=1.0)
    groups = [
        {"params": qkv, "split": 3, **muon},
        {"params": other, "split": 1, **muon},
        {"params": decay, "weight_decay": cfg.weight_decay, **adamw},
        {"params": no_decay, "weight_decay": 0.0, **adamw},
    ]
    groups = [g for g in groups if g["params"]]
    # Newton-Schulz in bfloat16 on GPUs and wherever the run trains in bfloat16: twice the
    # speed where bfloat16 matmuls are fast, and a run in float32 on a CPU stays exact there
    bf16 = device.type == "cuda" or autocast_dtype(device, cfg.dtype) is torch.bfloat16
    optimizer = Muon(groups, lr=cfg.lr, ns_dtype=torch.bfloat16 if bf16 else torch.float32)
    for group in optimizer.param_groups:  # ready for a step before the trainer sets the lr
        group["lr"] = cfg.lr * group["lr_scale"]
    return optimizer
