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
function) or call is refused before anything could run. Its size, the values it pushes and the
depth of its dicts are bounded, a dict inside itself is refused, and the check takes time
linear in the file however its dicts are shared.
"""

from __future__ import annotations

import math
import pickletools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chargpt.config.schema import ModelConfig
from chargpt.errors import ChargptError, CheckpointError, ConfigError
from chargpt.fileio import read_bytes
from chargpt.interop.imported import ImportedModel, is_dense_tensor_dict, load_plain_torch
from chargpt.text.tokenizer import CharTokenizer

META_FILE = "meta.pkl"
PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DistributedDataParallel's wrappers
MODEL_ARGS = {"n_layer": int, "n_head": int, "n_embd": int, "block_size": int,
              "vocab_size": int, "bias": bool, "dropout": float}


# A meta.pkl's limits. nanoGPT's is two dicts deep ({"itos": {0: "a"}}); a vocabulary of every
# code point, itos and stoi, is about 25 MB and pushes about 4.4 million values (each id and
# character, and stoi's entries), so these refuse nothing real and bound the memory and time
# a hostile file can take.
MAX_META_BYTES = 64 << 20
MAX_META_VALUES = 4 * 0x110000 + 4096
MAX_META_DEPTH = 16

_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_STRS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUSHES = _INTS | _STRS | _GETS | {"EMPTY_DICT", "DICT"}


class _NotPlain(Exception):
    """What the plain reader refuses; `read_plain_pickle` turns it into one line."""


def _refusal(name: str, arg: Any, stack: list[Any]) -> str:
    """Why an opcode outside the plain-data set is refused, naming the global if there is one."""
    if name in ("GLOBAL", "INST") and isinstance(arg, str):
        return f"it refers to {arg.replace(' ', '.')}"
    if name == "STACK_GLOBAL" and len(stack) >= 2 and all(isinstance(x, str)
                                                          for x in stack[-2:]):
        return f"it refers to {stack[-2]}.{stack[-1]}"
    return f"it uses the pickle operation {name}; only dicts, strings and integers are read"


def read_plain_pickle(raw: bytes, source: str | Path = "the pickle") -> Any:
    """The value of a pickle made only of dicts, strings and integers.

    This is not an unpickler: `pickletools.genops` only decodes the opcodes, and the few that
    build dicts, strings and integers are carried out here. Every opcode that would look up a
    global (a class, or a function such as os.system), call one, or fetch an object from
    outside is refused, so there is nothing a crafted file could make run; so is a pickle that
    pushes more than MAX_META_VALUES values, nests dicts more than MAX_META_DEPTH deep, or puts
    a dict inside itself. Whatever is refused, and whatever the opcodes do wrong (a truncated
    file, an unknown memo slot, an item set on a string), is one CheckpointError naming
    `source`."""
    try:
        obj = _run_plain_ops(raw)
        _check_plain(obj)
    except (_NotPlain, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # ValueError: genops' own (truncated, unknown opcode) and an odd number of items;
        # TypeError/AttributeError: an item set on a string, an unhashable key; KeyError: an
        # unknown memo slot; IndexError: an empty stack or no mark
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{source} is not plain metadata ({reason}); refused without "
                              "running anything") from None
    return obj


def _run_plain_ops(raw: bytes) -> Any:
    """Carry out the plain-data opcodes of `raw`; `_NotPlain` for any other."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}

    def since_mark() -> list[Any]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    pushed = 0
    for op, arg, _ in pickletools.genops(raw):
        name = op.name
        pushed += name in _PUSHES
        if pushed > MAX_META_VALUES:
            raise _NotPlain(f"it pushes more than {MAX_META_VALUES:,} values")
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise _NotPlain("it ends with an unbalanced stack")
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
            raise _NotPlain(_refusal(name, arg, stack))
    raise _NotPlain("it has no STOP")


def _check_plain(obj: Any) -> None:
    """Every value reachable from `obj` is a dict, a string or an integer (not a bool), dicts
    nest at most MAX_META_DEPTH deep, and no dict holds itself. Each dict's height is worked
    out once and remembered, so a dict shared by many others (2**n paths through n dicts)
    costs one visit, and the recursion never goes deeper than the limit."""
    heights: dict[int, int] = {}  # id of a checked dict -> its height
    on_path: set[int] = set()

    def height(value: Any, depth: int) -> int:
        if not isinstance(value, dict):
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise _NotPlain("it holds more than dicts, strings and integers: a "
                                f"{type(value).__name__}")
            return 0
        key = id(value)
        if key in on_path:
            raise _NotPlain("a dict in it contains itself")
        if key not in heights:
            if depth >= MAX_META_DEPTH:
                raise _NotPlain(f"its dicts are nested more than {MAX_META_DEPTH} deep")
            on_path.add(key)
            heights[key] = 1 + max((height(x, depth + 1) for kv in value.items() for x in kv),
                                   default=0)
            on_path.discard(key)
        if depth + heights[key] > MAX_META_DEPTH:
            raise _NotPlain(f"its dicts are nested more than {MAX_META_DEPTH} deep")
        return heights[key]

    height(obj, 0)


def read_meta(path: Path) -> dict[str, Any]:
    """meta.pkl as a dict of dicts, strings and integers, or a one-line CheckpointError."""
    raw = read_bytes(path, what="nanoGPT meta.pkl", error=CheckpointError,
                     max_bytes=MAX_META_BYTES)
    obj = read_plain_pickle(raw, path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, where nanoGPT keeps a "
                              "dict of its vocabulary")
    return obj


def tokenizer_from_meta(meta: dict[str, Any], path: Path) -> CharTokenizer:
    itos, size = meta.get("itos"), meta.get("vocab_size")
    if not isinstance(itos, dict) or not isinstance(size, int):
        raise CheckpointError(f"{path} has no character vocabulary ('itos' and 'vocab_size'); "
                              "is this a character-level nanoGPT dataset?")
    if len(itos) != size or set(itos) != set(range(size)):  # a size checked before a range
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
        if tp is float:
            ok, value = _number(value) is not None, _number(value)
        else:
            ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{path}: model_args[{key!r}] is {_shown(value)}, expected "
                                  f"{tp.__name__}")
        out[key] = value
    return out


def _shown(value: Any) -> str:
    """A value of a stranger's file in a message: a scalar's repr, cut short (an int has no
    repr past 4,300 digits), else its type."""
    if isinstance(value, int) and value.bit_length() > 128:
        return "a very large int"
    if value is None or isinstance(value, int | float | str):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__}"


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
    if not is_dense_tensor_dict(model):
        raise CheckpointError(f"{path} has no 'model' state_dict of dense tensors")
    # ".attn.bias" alone (not ".c_attn.bias") is the causal mask older nanoGPTs registered
    return {_strip(k): v for k, v in model.items() if not _strip(k).endswith(".attn.bias")}


def _number(value: Any) -> float | None:
    """`value` (a number or a one-element tensor) as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor):
        return None
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError, RuntimeError):  # huge, complex, not one element
        return None
    return number if math.isfinite(number) else None


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
        step=step if isinstance(step, int) and not isinstance(step, bool)
        and 0 <= step < 2**63 else 0,
        val_loss=_number(ckpt.get("best_val_loss")),
    )
