"""nanoGPT runs into chargpt: weights from ckpt.pt, the characters from meta.pkl.

nanoGPT saves `{'model': state_dict, 'model_args': {...}, 'iter_num', 'best_val_loss',
'config', 'optimizer'}` with torch.save, and its character datasets keep the vocabulary in a
pickled `meta.pkl` (`{'vocab_size', 'itos', 'stoi'}`). Its GPT is chargpt's classic GPT
(pre-LayerNorm, learned positions, exact GELU, a 4x MLP, the head tied to the token embedding)
under the same parameter names, so translating means stripping torch.compile's `_orig_mod.`
prefix, dropping the causal-mask buffers older versions saved, and carrying `model_args` over.
Both files are read as plain data only: the checkpoint with weights-only torch.load, and
meta.pkl without an unpickler at all: its opcodes are decoded by `pickletools` and only those
that build dicts, strings and integers are carried out; any reference to a global (a class, a
function) or call is refused before anything could run.
"""

from __future__ import annotations

import pickletools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chargpt.config.schema import ModelConfig
from chargpt.errors import ChargptError, CheckpointError, ConfigError
from chargpt.interop.imported import ImportedModel, load_plain_torch
from chargpt.text.tokenizer import CharTokenizer

META_FILE = "meta.pkl"
PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DistributedDataParallel's wrappers
MODEL_ARGS = {"n_layer": int, "n_head": int, "n_embd": int, "block_size": int,
              "vocab_size": int, "bias": bool, "dropout": float}


_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_STRS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


def _refusal(name: str, arg: Any, stack: list[Any]) -> str:
    """Why an opcode outside the plain-data set is refused, naming the global if there is one."""
    if name in ("GLOBAL", "INST") and isinstance(arg, str):
        return f"it refers to {arg.replace(' ', '.')}"
    if name == "STACK_GLOBAL" and len(stack) >= 2 and all(isinstance(x, str)
                                                          for x in stack[-2:]):
        return f"it refers to {stack[-2]}.{stack[-1]}"
    return f"it uses the pickle operation {name}; only dicts, strings and integers are read"


def read_plain_pickle(raw: bytes) -> Any:
    """The value of a pickle made only of dicts, strings and integers.

    This is not an unpickler: `pickletools.genops` only decodes the opcodes, and the few that
    build dicts, strings and integers are carried out here. Every opcode that would look up a
    global (a class, or a function such as os.system), call one, or fetch an object from
    outside is refused, so there is nothing a crafted file could make run. Raises ValueError
    naming what was refused."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}

    def since_mark() -> list[Any]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for op, arg, _ in pickletools.genops(raw):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise ValueError("it ends with an unbalanced stack")
            return stack[0]
        if name in _INTS or name in _STRS:
            stack.append(arg)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "DICT":
            items = since_mark()
            stack.append(dict(zip(items[::2], items[1::2], strict=True)))
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = since_mark()
            stack[-1].update(zip(items[::2], items[1::2], strict=True))
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in _PUTS:
            memo[arg] = stack[-1]
        elif name in _GETS:
            stack.append(memo[arg])
        else:
            raise ValueError(_refusal(name, arg, stack))
    raise ValueError("it has no STOP")


def _is_plain(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in obj.items())
    return isinstance(obj, str) or (isinstance(obj, int) and not isinstance(obj, bool))


def read_meta(path: Path) -> dict[str, Any]:
    """meta.pkl as a dict of dicts, strings and integers, or a one-line CheckpointError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        obj = read_plain_pickle(raw)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # TypeError/AttributeError: e.g. SETITEM on a string; KeyError: an unknown memo slot
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path} is not plain metadata ({reason}); refused without "
                              "running anything") from None
    if not isinstance(obj, dict) or not _is_plain(obj):
        raise CheckpointError(f"{path} holds more than dicts, strings and integers; refused")
    return obj


def tokenizer_from_meta(meta: dict[str, Any], path: Path) -> CharTokenizer:
    itos, size = meta.get("itos"), meta.get("vocab_size")
    if not isinstance(itos, dict) or not isinstance(size, int):
        raise CheckpointError(f"{path} has no character vocabulary ('itos' and 'vocab_size'); "
                              "is this a character-level nanoGPT dataset?")
    if sorted(itos) != list(range(size)):
        raise CheckpointError(f"{path}: 'itos' does not number its characters 0..{size - 1}")
    chars = [itos[i] for i in range(size)]
    stoi = meta.get("stoi")
    if isinstance(stoi, dict) and any(stoi.get(c) != i for i, c in enumerate(chars)):
        raise CheckpointError(f"{path}: 'stoi' and 'itos' disagree")
    try:
        return CharTokenizer(chars)
    except ChargptError as e:
        raise CheckpointError(f"{path}: {e}") from None


def find_meta(ckpt_path: Path, ckpt: dict[str, Any], meta: Path | None) -> Path:
    """The meta.pkl to use: the one given, the one beside ckpt.pt, or where nanoGPT's own
    sample.py looks (data/<dataset>/meta.pkl in the repository holding the out dir)."""
    if meta is not None:
        return meta
    candidates = [ckpt_path.parent / META_FILE]
    config = ckpt.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if isinstance(dataset, str) and dataset and Path(dataset).name == dataset:
        candidates.append(ckpt_path.resolve().parent.parent / "data" / dataset / META_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"no {META_FILE} for {ckpt_path} (looked in {', '.join(map(str, candidates))}); pass "
        "--meta FILE (a nanoGPT model trained on GPT-2 tokens is not a character model)"
    )


def _model_args(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    args = ckpt.get("model_args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{path} has no model_args")
    out = {}
    for key, tp in MODEL_ARGS.items():
        value = args.get(key)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
              else isinstance(value, tp) and (tp is bool or not isinstance(value, bool)))
        if not ok:
            raise CheckpointError(f"{path}: model_args[{key!r}] is {value!r}, expected "
                                  f"{tp.__name__}")
        out[key] = tp(value)
    return out


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def state_dict_from(ckpt: dict[str, Any], path: Path) -> dict[str, Tensor]:
    model = ckpt.get("model")
    if not isinstance(model, dict) or not all(isinstance(v, Tensor) for v in model.values()):
        raise CheckpointError(f"{path} has no 'model' state_dict of tensors")
    # ".attn.bias" alone (not ".c_attn.bias") is the causal mask older nanoGPTs registered
    return {_strip(k): v for k, v in model.items() if not _strip(k).endswith(".attn.bias")}


def _number(value: Any) -> float | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def read_nanogpt(ckpt_path: Path, meta: Path | None = None) -> ImportedModel:
    """An `ImportedModel` from nanoGPT's ckpt.pt and the meta.pkl of its character data."""
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path} does not exist")
    ckpt = load_plain_torch(ckpt_path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is not a nanoGPT checkpoint (no 'model' entry)")
    args = _model_args(ckpt, ckpt_path)
    sd = state_dict_from(ckpt, ckpt_path)
    meta_path = find_meta(ckpt_path, ckpt, meta)
    tokenizer = tokenizer_from_meta(read_meta(meta_path), meta_path)
    if tokenizer.vocab_size != args["vocab_size"]:
        raise CheckpointError(
            f"{meta_path} has {tokenizer.vocab_size} characters but the model in {ckpt_path} "
            f"has {args['vocab_size']} outputs; they do not belong together"
        )
    head, wte = sd.get("lm_head.weight"), sd.get("transformer.wte.weight")
    tie = head is None or (wte is not None and torch.equal(head, wte))
    try:
        cfg = ModelConfig(arch="gpt", vocab_size=args["vocab_size"],
                          block_size=args["block_size"], n_layer=args["n_layer"],
                          n_head=args["n_head"], n_embd=args["n_embd"],
                          dropout=args["dropout"], bias=args["bias"], norm="pre",
                          mlp_ratio=4, activation="gelu", tie_weights=tie, pos_emb="learned",
                          norm_type="layernorm")
    except ConfigError as e:
        raise CheckpointError(f"{ckpt_path}: model_args: {e}") from None
    step = ckpt.get("iter_num", 0)
    return ImportedModel(
        config=cfg, tokenizer=tokenizer, state_dict=sd,
        source={"format": "nanogpt", "path": str(ckpt_path), "meta": str(meta_path)},
        step=step if isinstance(step, int) and not isinstance(step, bool) else 0,
        val_loss=_number(ckpt.get("best_val_loss")),
    )
