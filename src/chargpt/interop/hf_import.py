"""Hugging Face in: a `transformers` folder read back into a chargpt model (hf_export writes one).

`read_hf` accepts GPT-2-shaped folders with a character tokenizer and the Llama/Qwen3 folders
`chargpt export` writes, undoing what the export did (Conv1D transposes, the gated-MLP forms,
the sign flip of rotary heads), and refuses with the reason whatever chargpt cannot compute
exactly. Before any tensor is read, the model's sizes, from config.json and the weights'
headers, pass the same bounds and memory check as a loaded checkpoint (`_check_sizes`). Weights
are read as plain tensors only (safetensors, or torch.load with weights_only=True; see
hf_files.py), and the tokenizer must give every character its own id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chargpt.config.schema import ModelConfig
from chargpt.errors import CheckpointError, ConfigError
from chargpt.interop.hf_export import LAYER_NORM_EPS, RMS_NORM_EPS, half_flip, require_hf
from chargpt.interop.hf_files import (
    read_char_tokenizer,
    read_config,
    read_hf_weights,
    read_weights_header,
    weight_files,
)
from chargpt.interop.imported import ImportedModel
from chargpt.runs.safety import LOAD_FACTOR, check_bounds, require_memory

__all__ = ["read_hf"]

MODEL_TYPES = ("gpt2", "llama", "qwen3")


def _take(weights: dict[str, Tensor], name: str, where: Path) -> Tensor:
    if name not in weights:
        raise CheckpointError(f"{where} has no tensor {name}")
    return weights.pop(name)


def _int(config: dict[str, Any], key: str, where: Path, default: Any = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _dropout(config: dict[str, Any], key: str) -> float:
    p = config.get(key, 0.0)
    return float(p) if isinstance(p, (int, float)) and 0.0 <= p < 1.0 else 0.0


def _unsupported(where: Path, what: str, why: str) -> CheckpointError:
    return CheckpointError(f"cannot import {where}: {what} ({why})")


def _gpt2_activation(config: dict[str, Any], src: Path) -> str:
    """The config's activation, if chargpt computes GPT-2's blocks with it exactly."""
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu", "relu", "relu2"):
        why = ("the tanh approximation of GELU; chargpt's GELU is the exact one"
               if "gelu" in str(act) else "chargpt has gelu, relu and relu2")
        raise _unsupported(src, f"activation_function {act!r}", why)
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        raise _unsupported(src, f"layer_norm_epsilon {eps}", f"chargpt's is {LAYER_NORM_EPS}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if config.get(key, want) != want:
            raise _unsupported(src, f"{key}={config[key]}", "chargpt's attention is plain "
                               "causal self-attention scaled by 1/sqrt(head size)")
    return act


def _gpt2_blocks(w: dict[str, Tensor], n_layer: int, src: Path,
                 sd: dict[str, Tensor]) -> list[str]:
    """Move the blocks' and final norm's tensors from `w` into `sd`; return the bias names."""
    biases: list[str] = []
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"] = _take(w, p + ln + ".weight", src)
            sd[p + ln + ".bias"] = _take(w, p + ln + ".bias", src)
            biases.append(p + ln + ".bias")
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            sd[p + name + ".weight"] = _take(w, p + name + ".weight", src).t().contiguous()
            sd[p + name + ".bias"] = _take(w, p + name + ".bias", src)
            biases.append(p + name + ".bias")
    sd["transformer.ln_f.weight"] = _take(w, "transformer.ln_f.weight", src)
    sd["transformer.ln_f.bias"] = _take(w, "transformer.ln_f.bias", src)
    return [*biases, "transformer.ln_f.bias"]


def _gpt2_shape(config: dict[str, Any], src: Path) -> tuple[int, int, int, int]:
    """(n_embd, n_head, n_layer, MLP width) of a GPT-2 config chargpt can express."""
    cpath = src / "config.json"
    n_embd = _int(config, "n_embd", cpath)
    n_head = _int(config, "n_head", cpath)
    n_layer = _int(config, "n_layer", cpath)
    n_inner = config.get("n_inner") or 4 * n_embd
    if not isinstance(n_inner, int) or isinstance(n_inner, bool) or n_inner % n_embd:
        raise _unsupported(src, f"n_inner {str(n_inner)[:40]}", "chargpt's MLP width is a "
                           f"whole multiple of n_embd ({n_embd})")
    return n_embd, n_head, n_layer, n_inner


def _from_gpt2(config: dict[str, Any], weights: dict[str, Tensor], src: Path
               ) -> tuple[ModelConfig, dict[str, Tensor]]:
    act = _gpt2_activation(config, src)
    n_embd, n_head, n_layer, n_inner = _gpt2_shape(config, src)
    # Weights saved from the bare GPT2Model have no "transformer." prefix; the causal-mask
    # buffers some older checkpoints carry are not weights.
    w = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
         for k, v in weights.items()
         if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    sd: dict[str, Tensor] = {"transformer.wte.weight": _take(w, "transformer.wte.weight", src)}
    wpe = _take(w, "transformer.wpe.weight", src)
    vocab_size = sd["transformer.wte.weight"].size(0)
    biases = _gpt2_blocks(w, n_layer, src, sd)
    tie = bool(config.get("tie_word_embeddings", True))
    head = w.pop("lm_head.weight", None)
    if tie or head is None:
        if head is not None and not torch.equal(head, sd["transformer.wte.weight"]):
            raise _unsupported(src, "tie_word_embeddings with a different lm_head.weight",
                               "the config and the weights disagree")
        head, tie = sd["transformer.wte.weight"], True
    sd["lm_head.weight"] = head
    if w:
        raise _unsupported(src, f"tensor {sorted(w)[0]}", "not part of a GPT-2 language model")
    # Parts that are exactly zero are parts chargpt can leave out (see export).
    bias = not all(torch.count_nonzero(sd[k]) == 0 for k in biases)
    if not bias:
        for k in biases:
            del sd[k]
    pos_emb = "learned" if torch.count_nonzero(wpe) else "none"
    if pos_emb == "learned":
        sd["transformer.wpe.weight"] = wpe
    cfg = ModelConfig(arch="gpt", vocab_size=vocab_size, block_size=wpe.size(0),
                      n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      dropout=_dropout(config, "resid_pdrop"), bias=bias, norm="pre",
                      mlp_ratio=n_inner // n_embd, activation=act, tie_weights=tie,
                      pos_emb=pos_emb, norm_type="layernorm")
    return cfg, sd


def _rope_theta(config: dict[str, Any], src: Path) -> float:
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{src / 'config.json'}: rope_parameters must be an object")
    rope_type = params.get("rope_type", "default")
    if rope_type != "default" or config.get("rope_scaling"):
        raise _unsupported(src, f"rope_type {rope_type!r}", "chargpt's rotary positions are "
                           "the default, unscaled ones")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    try:
        if isinstance(theta, int | float) and not isinstance(theta, bool):
            return float(theta)  # ModelConfig checks that it is finite and > 1
    except OverflowError:  # an integer of hundreds of digits
        pass
    raise CheckpointError(f"{src / 'config.json'}: rope_theta must be a finite number")


def _rotary_shape(config: dict[str, Any], src: Path) -> tuple[int, int, int, int]:
    """(n_embd, n_head, n_layer, MLP width) of a Llama/Qwen3 config chargpt can express."""
    cpath = src / "config.json"
    n_embd = _int(config, "hidden_size", cpath)
    n_head = _int(config, "num_attention_heads", cpath)
    n_layer = _int(config, "num_hidden_layers", cpath)
    hidden = _int(config, "intermediate_size", cpath)
    if config.get("num_key_value_heads", n_head) != n_head:
        raise _unsupported(src, "grouped-query attention", "chargpt has one key and value "
                           "head per query head")
    if _int(config, "head_dim", cpath, n_embd // n_head or 1) * n_head != n_embd or hidden % n_embd:
        raise _unsupported(src, "head_dim or intermediate_size", "chargpt's heads split "
                           "n_embd evenly and its MLP is a whole multiple of n_embd wide")
    eps = config.get("rms_norm_eps")
    if eps != RMS_NORM_EPS:
        raise _unsupported(src, f"rms_norm_eps {eps}", f"chargpt's RMSNorm uses {RMS_NORM_EPS}")
    if config.get("use_sliding_window"):
        raise _unsupported(src, "sliding-window attention", "chargpt attends to the whole block")
    return n_embd, n_head, n_layer, hidden


def _gated_mlp(w: dict[str, Tensor], q: str, act: Any, src: Path
               ) -> tuple[str, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Undo the gated forms chargpt exports: (activation, c_fc and c_proj weights, biases)."""
    gate = _take(w, q + "mlp.gate_proj.weight", src)
    up = _take(w, q + "mlp.up_proj.weight", src)
    down = _take(w, q + "mlp.down_proj.weight", src)
    b_gate = w.pop(q + "mlp.gate_proj.bias", None)
    b_up = w.pop(q + "mlp.up_proj.bias", None)
    b_down = w.pop(q + "mlp.down_proj.bias", None)
    same_bias = (b_gate is None and b_up is None) or (
        b_gate is not None and b_up is not None and torch.equal(b_gate, b_up))
    if act == "relu" and torch.equal(gate, up) and same_bias:
        return "relu2", gate, down, b_gate, b_down  # relu(a) * a
    if (act in ("gelu", "relu", "relu2") and torch.count_nonzero(up) == 0
            and b_up is not None and torch.all(b_up == 1)):
        return act, gate, down, b_gate, b_down  # act(a) * 1
    raise _unsupported(src, f"a gated MLP with hidden_act {act!r}", "chargpt's MLP is not "
                       "gated; only the gated forms chargpt exports (relu(a)*a, or an up "
                       "projection that is constant 1) can be read")


def _check_qk_norm_gains(w: dict[str, Tensor], q: str, src: Path) -> None:
    """Qwen3's per-head norm gains must be the ones chargpt exports: chargpt's have none."""
    for norm in ("q_norm", "k_norm"):
        if not torch.all(_take(w, f"{q}self_attn.{norm}.weight", src) == 1):
            raise _unsupported(src, f"learned {norm} gains", "chargpt's QK-norm has no weights")


def _rotary_layer(w: dict[str, Tensor], i: int, sd: dict[str, Tensor], flip: Tensor,
                  config: dict[str, Any], src: Path, family: str) -> tuple[str, bool]:
    """Move layer `i` from `w` into `sd` with chargpt's names; its MLP's activation, and
    whether it has a bias that is not zero. chargpt has all four biases or none: a missing one
    is zeros (all are dropped later if every one is zero)."""
    p, q = f"transformer.h.{i}.", f"model.layers.{i}."
    sd[p + "ln_1.weight"] = _take(w, q + "input_layernorm.weight", src)
    sd[p + "ln_2.weight"] = _take(w, q + "post_attention_layernorm.weight", src)
    if family == "qwen3":
        _check_qk_norm_gains(w, q, src)
    proj = {n: _take(w, f"{q}self_attn.{n}.weight", src)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    sd[p + "attn.c_attn.weight"] = torch.cat(
        (proj["q_proj"] * flip[:, None], proj["k_proj"] * flip[:, None], proj["v_proj"]))
    sd[p + "attn.c_proj.weight"] = proj["o_proj"]
    b = {n: w.pop(f"{q}self_attn.{n}.bias", None) for n in proj}
    activation, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_proj.weight"], b_gate, b_down = (
        _gated_mlp(w, q, config.get("hidden_act"), src))
    qkv_bias = None if b["q_proj"] is None else torch.cat(
        (b["q_proj"] * flip, b["k_proj"] * flip, b["v_proj"]))
    n_embd, hidden = flip.numel(), config["intermediate_size"]  # checked by _rotary_shape
    any_bias = False
    for name, t, size in (("attn.c_attn.bias", qkv_bias, 3 * n_embd),
                          ("attn.c_proj.bias", b["o_proj"], n_embd),
                          ("mlp.c_fc.bias", b_gate, hidden), ("mlp.c_proj.bias", b_down, n_embd)):
        any_bias = any_bias or (t is not None and bool(torch.count_nonzero(t)))
        sd[p + name] = t if t is not None else torch.zeros(size)
    return activation, any_bias


def _from_rotary(config: dict[str, Any], weights: dict[str, Tensor], src: Path, family: str
                 ) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The inverse of `_rotary_weights`: Llama/Qwen3 folders shaped like chargpt's exports."""
    n_embd, n_head, n_layer, hidden = _rotary_shape(config, src)
    theta = _rope_theta(config, src)
    w = dict(weights)
    sd = {"transformer.wte.weight": _take(w, "model.embed_tokens.weight", src)}
    flip = half_flip(ModelConfig(n_embd=n_embd, n_head=n_head))
    layers = [_rotary_layer(w, i, sd, flip, config, src, family) for i in range(n_layer)]
    activations = {activation for activation, _ in layers}
    any_bias = any(bias for _, bias in layers)
    if len(activations) != 1:
        raise _unsupported(src, "layers with different MLP forms", "chargpt uses one "
                           "activation everywhere")
    sd["transformer.ln_f.weight"] = _take(w, "model.norm.weight", src)
    tie = bool(config.get("tie_word_embeddings", False))
    head = w.pop("lm_head.weight", None)
    if tie or head is None:
        head, tie = sd["transformer.wte.weight"], True
    sd["lm_head.weight"] = head
    if w:
        raise _unsupported(src, f"tensor {sorted(w)[0]}", f"not part of a {family} model "
                           "chargpt can express")
    if not any_bias:
        sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    cfg = ModelConfig(arch="gpt", vocab_size=sd["transformer.wte.weight"].size(0),
                      block_size=_int(config, "max_position_embeddings", src / "config.json"),
                      n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      dropout=_dropout(config, "attention_dropout"), bias=any_bias,
                      norm="pre", mlp_ratio=hidden // n_embd, activation=activations.pop(),
                      tie_weights=tie, pos_emb="rope", rope_base=theta,
                      qk_norm=family == "qwen3", norm_type="rmsnorm")
    return cfg, sd


def _rows(header: dict[str, tuple[str, list[int]]], names: tuple[str, ...]) -> int:
    """The first dimension of the first of `names` the header holds (1 if none: the
    translation then says which tensor is missing)."""
    shape = next((header[n][1] for n in names if n in header), [])
    return shape[0] if shape else 1


def _check_sizes(config: dict[str, Any], files: list[Path], src: Path, model_type: str
                 ) -> None:
    """The model the folder describes, from config.json and the weights' headers alone, within
    the bounds a loaded checkpoint must keep, and the memory to load it (its weights files are
    read whole, and the model is built besides) available: checked before any tensor is read.
    The sizes are what the import builds; only details no size depends on wait for the
    tensors' values (which biases are zero, whether the head is tied: counted untied)."""
    header = read_weights_header(files)
    if model_type == "gpt2":
        n_embd, n_head, n_layer, width = _gpt2_shape(config, src)
        vocab = _rows(header, ("transformer.wte.weight", "wte.weight"))
        block = _rows(header, ("transformer.wpe.weight", "wpe.weight"))
    else:
        n_embd, n_head, n_layer, width = _rotary_shape(config, src)
        vocab = _rows(header, ("model.embed_tokens.weight",))
        block = _int(config, "max_position_embeddings", src / "config.json")
    sizes = ModelConfig(arch="gpt", vocab_size=vocab, block_size=block, n_layer=n_layer,
                        n_head=n_head, n_embd=n_embd, mlp_ratio=max(1, width // n_embd),
                        tie_weights=False, pos_emb="learned" if model_type == "gpt2" else "rope")
    check_bounds(sizes, src)
    require_memory(sizes, LOAD_FACTOR, src, extra_bytes=sum(f.stat().st_size for f in files))


def read_hf(src: str | Path) -> ImportedModel:
    """A chargpt model from a transformers folder (GPT-2-shaped, or Llama/Qwen3 as exported)."""
    require_hf("importing a Hugging Face folder")
    src = Path(src)
    config = read_config(src / "config.json")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise _unsupported(src, f"model_type {str(model_type)[:40]!r}", "chargpt reads gpt2, "
                           "and the llama and qwen3 folders it exports")
    try:
        _check_sizes(config, weight_files(src), src, model_type)
        weights = read_hf_weights(src)
        if model_type == "gpt2":
            cfg, sd = _from_gpt2(config, weights, src)
        else:
            cfg, sd = _from_rotary(config, weights, src, model_type)
    except ConfigError as e:  # a shape or size ModelConfig refuses
        raise CheckpointError(f"cannot import {src}: {e}") from None
    tokenizer = read_char_tokenizer(src, cfg.vocab_size)
    return ImportedModel(config=cfg, tokenizer=tokenizer, state_dict=sd,
                         source={"format": f"huggingface-{model_type}", "path": str(src)})
