"""A loaded model, checked before any tensor is allocated: bounds, memory, weights header.

A checkpoint's manifest proves that its files are the ones written together, not that whoever
wrote them meant well: a run directory from a stranger can carry a consistent manifest over a
config with a million layers, weights of other shapes or dtypes than the config says, or a
vocabulary of another size. `check_checkpoint` is the one gate every loader passes (sample,
eval, serve, attention, export and resume, through rundir.find_checkpoint): it verifies the
manifest, then checks the config's sizes against generous but finite bounds (`check_bounds`),
the memory the model needs, estimated from the config alone, against what the machine has, or
its memory cgroup (a container's limit) if that allows less (`require_memory`), and the
vocabulary against the config. Only then is the model built, on the meta device, which allocates
nothing, to compare the tensors it expects with the weights file's header, read without loading
a tensor (`check_weights`). A caller builds the real model after all of that has passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from chargpt.config.schema import Config, ModelConfig
from chargpt.errors import CheckpointError, ConfigError
from chargpt.fileio import utf8_path
from chargpt.model.build import build_model
from chargpt.runs import checkpoint as ckpt
from chargpt.text.tokenizer import CharTokenizer, check_same_vocab

__all__ = ["BOUNDS", "LOAD_FACTOR", "TRAIN_FACTOR", "CheckedCheckpoint", "available_memory",
           "beyond_bounds", "check_bounds", "check_checkpoint", "check_optimizer_state",
           "check_weights", "estimate_params", "memory_shortfall", "read_header",
           "require_memory"]

# The largest value of each size a loaded config may have: far past any model chargpt trains
# (GPT-3 has 96 layers of width 12,288), yet finite, so that a config from a stranger never
# makes chargpt even count a million modules. vocab_size: the number of Unicode code points.
BOUNDS = {"n_layer": 1024, "n_head": 1024, "n_embd": 65_536, "mlp_ratio": 64,
          "block_size": 1 << 20, "vocab_size": 0x110000}

# Bytes needed per parameter, besides activations: float32 weights plus the tensors read from
# the file while loading; training adds the gradients and AdamW's two moments.
LOAD_FACTOR, TRAIN_FACTOR = 2 * 4, 5 * 4

# safetensors' dtype names of the tensors a chargpt model holds
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


@dataclass(frozen=True)
class CheckedCheckpoint:
    """A checkpoint whose manifest, config, vocabulary and weights header all agree."""

    path: Path
    config: Config
    tokenizer: CharTokenizer
    state: ckpt.TrainState  # its numbers only (step, losses); resuming loads the rest


def beyond_bounds(model: ModelConfig) -> tuple[str, int, int] | None:
    """The first size of `model` past BOUNDS, as (name, value, limit); None if all are within:
    a loader refuses such a config (`check_bounds`), and training never writes one."""
    for name, limit in BOUNDS.items():
        value = getattr(model, name)
        if value > limit:
            return name, value, limit
    return None


def check_bounds(model: ModelConfig, source: str | Path,
                 why: str = "; the file is damaged or hostile") -> None:
    """Refuse a config whose sizes no real model has, before anything is built from it; `why`
    ends the message (a file's sizes, or sizes typed as flags)."""
    beyond = beyond_bounds(model)
    if beyond is not None:
        name, value, limit = beyond
        raise CheckpointError(f"{source}: model.{name} is {value:,}, more than chargpt "
                              f"loads (at most {limit:,}){why}")


def _expected_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[set[str]]]:
    """The tensors a checkpoint of `model` holds, by name, and the names that share one tensor
    (a tied embedding and head): a file holds one name of each such group."""
    expected = dict(model.state_dict())
    by_id: dict[int, set[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in expected:
            by_id.setdefault(id(tensor), set()).add(name)
    return expected, [names for names in by_id.values() if len(names) > 1]


def read_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} of a safetensors file, from its header alone (no tensor is
    read); a file safetensors cannot open is one CheckpointError."""
    try:
        with safe_open(utf8_path(path, "the checkpoint file", CheckpointError),
                       framework="pt", device="cpu") as f:
            return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape()))
                    for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: "
                              f"{' '.join(str(e).split())}") from None


def check_weights(path: Path, model: torch.nn.Module, config_file: str | Path) -> None:
    """The weights file holds exactly the tensors `model` (built on the meta device from
    `config_file`) has, with the same shapes and dtypes; read from its header only."""
    header = read_header(path)
    expected, tied = _expected_tensors(model)
    for name, (dtype, shape) in header.items():
        if name not in expected:
            raise CheckpointError(f"{path} holds {name!r}, which the model in {config_file} "
                                  "does not have")
        want = expected[name]
        if shape != list(want.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(shape)} but the model in "
                                  f"{config_file} needs {tuple(want.shape)}")
        if dtype != _DTYPE_NAMES.get(want.dtype):
            raise CheckpointError(f"{path}: {name} is stored as {dtype} but the model needs "
                                  f"{_DTYPE_NAMES.get(want.dtype, want.dtype)}")
    held = set(header)
    for name in expected:
        group = next((g for g in tied if name in g), {name})
        if not group & held:
            raise CheckpointError(f"{path} has no {name!r}, which the model in {config_file} "
                                  "needs")


def estimate_params(model: ModelConfig) -> int:
    """The parameter count of `model`, from its sizes alone (nothing is built): every matrix
    and embedding; biases and norms, a fraction of a percent, are left out."""
    d, v = model.n_embd, model.vocab_size
    if model.arch == "bigram":
        return v * v
    hidden = d * model.mlp_ratio
    block = 3 * d * d + (d * d if model.attn_proj else 0)
    if model.mlp:
        block += d * hidden + (hidden * d if model.mlp_proj else 0)
    if model.value_embeds:
        block += v * d
    embeddings = v * d * (1 if model.tie_weights else 2)
    positions = model.block_size * d if model.pos_emb == "learned" else 0
    return model.n_layer * block + embeddings + positions


def check_checkpoint(ckpt_dir: str | Path, factor: int = LOAD_FACTOR) -> CheckedCheckpoint:
    """Verify checkpoint `ckpt_dir` completely without allocating its model: manifest, config
    bounds, memory (`factor` bytes per parameter), vocabulary, and the weights' names, shapes
    and dtypes. One line if anything fails."""
    ckpt_dir = Path(ckpt_dir)
    ckpt.verify(ckpt_dir)
    config_file = ckpt_dir / ckpt.CONFIG_FILE
    config = ckpt.load_config(ckpt_dir)
    check_bounds(config.model, config_file)
    require_memory(config.model, factor, config_file)
    tokenizer = ckpt.load_vocab(ckpt_dir)
    check_same_vocab(tokenizer, config.model.vocab_size, error=CheckpointError,
                     what=f"{ckpt_dir}: the vocabulary and the model in the config")
    try:
        with torch.device("meta"):
            model = build_model(config.model)
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    check_weights(ckpt_dir / ckpt.MODEL_FILE, model, config_file)
    return CheckedCheckpoint(ckpt_dir, config, tokenizer, ckpt.load_train_state(ckpt_dir))


def check_optimizer_state(optimizer: torch.optim.Optimizer, where: Path) -> None:
    """Every loaded per-parameter tensor (momenta) has its parameter's shape, or is a scalar
    (step counts): torch's load_state_dict does not check, and the first step would fail."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise CheckpointError(f"{where}: the optimizer's {key} has shape "
                                          f"{tuple(value.shape)} for a parameter of shape "
                                          f"{tuple(p.shape)}")


# Where the memory figures are read; tests point these at files of their own.
PROC_MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Per cgroup version: the limit file, the usage file, and the memory.stat key of the page cache
# the kernel can drop (inactive files), which counts as free as MemAvailable counts it.
_CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have now, or None if unknown: the machine's
    (Linux's MemAvailable, which counts the page cache that can be dropped; elsewhere the
    physical memory from sysconf), or less where a memory cgroup (a container's limit) allows
    less."""
    figures = [f for f in (_machine_available(), _cgroup_available()) if f is not None]
    return min(figures) if figures else None


def _machine_available() -> int | None:
    try:
        with open(PROC_MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None if it is missing, unreadable or 'max' (no limit)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _page_cache(directory: Path, key: str) -> int:
    try:
        lines = (directory / "memory.stat").read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    values = [line.split()[1] for line in lines if line.startswith(key + " ")]
    return int(values[0]) if values and values[0].isdigit() else 0


def _cgroup_dirs() -> list[tuple[int, Path, Path]]:
    """(version, mount, directory) of this process's memory cgroups, from /proc/self/cgroup:
    the v2 cgroup (on a cgroup2 mount at CGROUP_ROOT, or at CGROUP_ROOT/unified beside v1) and
    v1's memory controller (CGROUP_ROOT/memory)."""
    try:
        lines = PROC_CGROUP.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            version, mounts = 2, [CGROUP_ROOT, CGROUP_ROOT / "unified"]
        elif "memory" in controllers.split(","):
            version, mounts = 1, [CGROUP_ROOT / "memory"]
        else:
            continue
        relative = Path(path.strip()).relative_to("/") if path.startswith("/") else Path()
        found += [(version, mount, mount / relative) for mount in mounts if ".." not in
                  relative.parts]
    return found


def _cgroup_available() -> int | None:
    """The least memory this process's memory cgroups, and every cgroup above them, still
    allow: each limit less its usage (less the page cache it can drop); None where none has a
    limit. Inside a container the cgroup's own path is often not mounted: the mount's root is
    the container's cgroup then."""
    least = None
    for version, mount, leaf in _cgroup_dirs():
        limit_file, usage_file, cache_key = _CGROUP_FILES[version]
        directory = leaf if leaf.is_dir() else mount
        for d in [directory, *directory.parents]:
            limit = _read_int(d / limit_file)
            if limit is not None:
                used = max(0, (_read_int(d / usage_file) or 0) - _page_cache(d, cache_key))
                free = max(0, limit - used)
                least = free if least is None else min(least, free)
            if d == mount:
                break
    return least


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def memory_shortfall(model: ModelConfig, factor: int, extra_bytes: int = 0) -> str | None:
    """None if the machine has the memory `model` needs (`factor` bytes per parameter, and
    `extra_bytes` besides); else what it lacks, as 'a model of N M parameters, which needs
    about X GB of memory; this machine has Y GB available'."""
    params = estimate_params(model)
    need, have = params * factor + extra_bytes, available_memory()
    if have is None or need <= have:
        return None
    return (f"a model of {params / 1e6:,.1f} M parameters, which needs about {_gb(need)} of "
            f"memory; this machine has {_gb(have)} available")


def require_memory(model: ModelConfig, factor: int, source: str | Path,
                   extra_bytes: int = 0) -> None:
    """Refuse a model that needs more memory (`factor` bytes per parameter, and `extra_bytes`
    besides: files read whole) than the machine has available, before it is built."""
    lacking = memory_shortfall(model, factor, extra_bytes)
    if lacking is not None:
        raise CheckpointError(f"{source} describes {lacking}")
