"""A run's training state: everything besides the weights that it needs to continue exactly.

`TrainState` holds the step, the losses, the elapsed time, the evaluations since the val loss
last clearly improved (the plateau rule's count), every rank's random-number states, the batch
sampler's stream and the optimizer. `to_saved` splits it into what a checkpoint stores as JSON
(`state.json`) and as tensors (`rng.safetensors`), and `from_saved` is its inverse and the one
place that reads older variants of that layout; `split_optimizer_state` and
`join_optimizer_state` do the same for the optimizer (`optimizer.safetensors` and the JSON
rest). Which files these go to, and how they are written, is checkpoint.py's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from chargpt.errors import CheckpointError

__all__ = ["TrainState", "join_optimizer_state", "split_optimizer_state"]


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Separate an optimizer state_dict into named tensors and a JSON-safe remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict[str, Any]:
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        per_param.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        per_param.setdefault(int(idx), {}).update(values)
    return {"state": per_param, "param_groups": rest["param_groups"]}


def _per_rank(tensors: dict[str, torch.Tensor], name: str) -> list[torch.Tensor] | None:
    """[rank 0's, rank 1's, ...] saved as `name`, `name.1`, ... (rank 0 has no suffix)."""
    if name not in tensors:
        return None
    out = [tensors[name]]
    while f"{name}.{len(out)}" in tensors:
        out.append(tensors[f"{name}.{len(out)}"])
    return out


@dataclass
class TrainState:
    """What a run needs besides its weights to continue exactly where it stopped.

    A `best/` checkpoint keeps only the numbers (step, losses, elapsed time); `last/` is
    resumable and also keeps the optimizer, every rank's RNG states and the sampler's stream.
    """

    step: int = 0
    best_val_loss: float = math.inf
    val_loss: float = math.inf
    elapsed: float = 0.0  # seconds of training before this checkpoint, all sessions
    stale_evals: int = 0  # evaluations in a row without a clearly better val loss (patience)
    world_size: int = 1  # processes of the run that wrote it
    sampler: dict[str, Any] = field(default_factory=dict)  # BatchSampler.state_dict()
    torch_version: str = field(default_factory=lambda: torch.__version__)
    cpu_rng: list[torch.Tensor] | None = None  # torch.get_rng_state() of each rank
    cuda_rng: list[torch.Tensor] | None = None  # torch.cuda.get_rng_state() of each rank
    optimizer: dict[str, Any] | None = None  # optimizer.state_dict()
    imported_from: dict[str, Any] | None = None  # provenance of a model `chargpt import` made

    @property
    def resumable(self) -> bool:
        return self.optimizer is not None and self.cpu_rng is not None

    def rng_of(self, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(CPU, CUDA) RNG states saved by `rank`; None where the run had fewer ranks."""

        def pick(states: list[torch.Tensor] | None) -> torch.Tensor | None:
            return states[rank] if states is not None and rank < len(states) else None

        return pick(self.cpu_rng), pick(self.cuda_rng)

    def to_saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """(state.json content, rng.safetensors content or None for a weights-only state)."""
        numbers = {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "val_loss": self.val_loss,
            "elapsed": self.elapsed,
            "stale_evals": self.stale_evals,
            "world_size": self.world_size,
            "sampler": {k: v for k, v in self.sampler.items()
                        if not isinstance(v, torch.Tensor)},
            "torch_version": self.torch_version,
        }
        if self.imported_from is not None:
            numbers["imported_from"] = self.imported_from
        if self.cpu_rng is None:
            return numbers, None
        rng: dict[str, torch.Tensor] = {}
        for name, states in (("torch_cpu", self.cpu_rng), ("torch_cuda", self.cuda_rng or [])):
            for r, t in enumerate(states):
                rng[name if r == 0 else f"{name}.{r}"] = t.contiguous()
        for k, v in self.sampler.items():
            if isinstance(v, torch.Tensor):
                rng[f"sampler.{k}"] = v.contiguous()
        return numbers, rng

    @classmethod
    def from_saved(cls, numbers: dict[str, Any], rng: dict[str, torch.Tensor] | None,
                   optimizer: dict[str, Any] | None) -> TrainState:
        """The inverse of `to_saved`, reading every layout version 1 has had."""
        if not isinstance(numbers, dict) or not isinstance(numbers.get("sampler", {}), dict):
            raise CheckpointError("the saved training state is not a JSON object")
        sampler = dict(numbers.get("sampler", {}))
        rng = rng or {}
        sampler.update({k.removeprefix("sampler."): v for k, v in rng.items()
                        if k.startswith("sampler.")})
        if "sampler" in rng:  # the key the first layout used for the sampler's generator
            sampler["generator"] = rng["sampler"]
        try:
            return cls(
                step=int(numbers["step"]),
                best_val_loss=float(numbers.get("best_val_loss", math.inf)),
                val_loss=float(numbers.get("val_loss", math.inf)),
                elapsed=float(numbers.get("elapsed", 0.0)),
                stale_evals=int(numbers.get("stale_evals", 0)),
                world_size=int(numbers.get("world_size", 1)),
                sampler=sampler,
                torch_version=str(numbers.get("torch_version", "")),
                cpu_rng=_per_rank(rng, "torch_cpu"),
                cuda_rng=_per_rank(rng, "torch_cuda"),
                optimizer=optimizer,
                imported_from=numbers.get("imported_from"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the saved training state is invalid ({e})") from None
