"""Hugging Face out and in: a chargpt GPT as a `transformers` folder, and such a folder read back.

A model is exported as the `transformers` architecture that computes exactly its function:
GPT-2 for learned (or no) positions with LayerNorm, Llama for rotary models with RMSNorm, and
Qwen3 when they also normalise queries and keys (the fast recipe). Parts chargpt can switch off
but the target always has are written as exact zeros (biases, position embeddings). A ReLU²
MLP becomes a gated MLP whose gate and up projections are the same matrix, because
relu(a)·a = relu(a)²; a plain GELU or ReLU MLP in Llama gets an up projection that is the
constant 1 (zero weights, bias one). chargpt rotates each (x[i], x[i + hs/2]) pair the opposite
way to `transformers`, so the second half of every query and key head is negated: the rotated
queries and keys are then negated in the same places, and their dot products (so the logits)
are unchanged. Switches no architecture here can express are refused with the reason.
`export_run` checks the written model against chargpt's on one block of text before it moves
the folder into place. The tokenizer is a `tokenizers` WordLevel model over chargpt's
characters that `AutoTokenizer` loads without remote code. `read_hf` goes the other way for
GPT-2-shaped folders with a character tokenizer and for the Llama/Qwen3 folders written here,
reading weights as plain tensors only (safetensors, or torch.load with weights_only=True).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .config import ModelConfig
from .errors import ChargptError, CheckpointError, ConfigError
from .imports import ImportedModel, load_plain_torch
from .io import temp_path_for
from .tokenizer import CharTokenizer

HF_EXTRA = "pip install 'chargpt[hf]'"
REQUIRED = ("transformers", "tokenizers")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which chargpt uses
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # what eps=None means in torch's RMSNorm
EXPORT_TOLERANCE = 1e-4  # largest |logit difference| export accepts when it checks itself
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def require_hf(what: str) -> None:
    """Raise a one-line ChargptError if the `hf` extra is not installed."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise ChargptError(f"{what} needs the hf extra: {HF_EXTRA} "
                           f"(missing: {', '.join(missing)})")


# --- which architecture ------------------------------------------------------------------------


def _refuse(switch: str, why: str) -> ConfigError:
    return ConfigError(f"cannot export {switch} to transformers: {why}")


def _refuse_lecture_and_extra_switches(cfg: ModelConfig) -> None:
    """The lecture's early modules and chargpt's additions have no transformers counterpart."""
    if not cfg.attn_proj:
        raise _refuse("attn_proj=false", "every transformers attention layer ends with an "
                      "output projection")
    if not cfg.mlp_proj:
        raise _refuse("mlp_proj=false", "every transformers MLP projects back to the width")
    if cfg.attn_scale != "head":
        raise _refuse(f"attn_scale={cfg.attn_scale}", "transformers scales attention by the "
                      "head size")
    if cfg.head_bias:
        raise _refuse("head_bias=true", "the GPT-2, Llama and Qwen3 heads have no bias")
    if cfg.value_embeds:
        raise _refuse("value_embeds=true", "no transformers decoder adds a token table to the "
                      "attention values")
    if cfg.logit_softcap:
        raise _refuse(f"logit_softcap={cfg.logit_softcap:g}", "GPT-2, Llama and Qwen3 do not "
                      "soft-cap their logits")


def family_for(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3': the architecture that computes exactly what `cfg` does."""
    if cfg.arch != "gpt":
        raise _refuse(f"arch={cfg.arch}", "a bigram table is not a transformers architecture")
    _refuse_lecture_and_extra_switches(cfg)
    if cfg.norm == "post":
        raise _refuse("norm=post", "GPT-2, Llama and Qwen3 normalise each sub-layer's input "
                      "(pre-norm); normalising after the residual addition is another function")
    if cfg.norm == "none":
        raise _refuse("norm=none", "GPT-2, Llama and Qwen3 always normalise, and no weights "
                      "turn a LayerNorm or RMSNorm into the identity")
    if not cfg.residual:
        raise _refuse("residual=false", "transformers' decoder blocks always add each "
                      "sub-layer's output to its input")
    if not cfg.mlp:
        raise _refuse("mlp=false", "every GPT-2, Llama and Qwen3 block has an MLP")
    if cfg.pos_emb == "rope":
        if cfg.norm_type != "rmsnorm":
            raise _refuse("pos_emb=rope with norm_type=layernorm", "the rotary architectures "
                          "that match chargpt's blocks (Llama, Qwen3) normalise with RMSNorm")
        if not cfg.qk_norm:
            return "llama"
        if cfg.activation != "relu2":
            raise _refuse(f"activation={cfg.activation} with qk_norm=true", "Qwen3 (the "
                          "architecture with per-head QK-norm) has a gated MLP without biases, "
                          "which computes relu2 exactly (relu(a)*a) but not GELU or ReLU")
        if cfg.bias:
            raise _refuse("bias=true with qk_norm=true", "Qwen3 (the architecture with "
                          "per-head QK-norm) has no MLP biases")
        return "qwen3"
    if cfg.norm_type == "rmsnorm":
        raise _refuse(f"norm_type=rmsnorm with pos_emb={cfg.pos_emb}", "GPT-2 (the "
                      "architecture with learned positions) normalises with LayerNorm")
    if cfg.qk_norm:
        raise _refuse(f"qk_norm=true with pos_emb={cfg.pos_emb}", "GPT-2 has no QK-norm, and "
                      "the architectures that have it use rotary positions")
    return "gpt2"


# --- chargpt weights -> transformers weights ----------------------------------------------------


def _bias(sd: dict[str, Tensor], name: str, size: int) -> Tensor:
    """A bias chargpt may not have (bias=false): exact zeros do nothing."""
    return sd[name] if name in sd else torch.zeros(size)


def _half_flip(cfg: ModelConfig) -> Tensor:
    """(n_embd,) signs negating the second half of every head: chargpt's rotation direction
    seen from transformers' (see the module docstring)."""
    flip = torch.ones(cfg.n_head, cfg.head_dim)
    flip[:, cfg.head_dim // 2 :] = -1.0
    return flip.reshape(-1)


def _gpt2_weights(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    C, hidden = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    out = {"transformer.wte.weight": sd["transformer.wte.weight"],
           "transformer.wpe.weight": sd.get("transformer.wpe.weight",
                                            torch.zeros(cfg.block_size, C)),
           "transformer.ln_f.weight": sd["transformer.ln_f.weight"],
           "transformer.ln_f.bias": _bias(sd, "transformer.ln_f.bias", C),
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = sd[p + ln + ".weight"]
            out[p + ln + ".bias"] = _bias(sd, p + ln + ".bias", C)
        for name, n_out in (("attn.c_attn", 3 * C), ("attn.c_proj", C), ("mlp.c_fc", hidden),
                            ("mlp.c_proj", C)):
            # GPT-2's Conv1D keeps its weight as (in, out), a Linear's transposed
            out[p + name + ".weight"] = sd[p + name + ".weight"].t().contiguous()
            out[p + name + ".bias"] = _bias(sd, p + name + ".bias", n_out)
    return out


def _rotary_weights(sd: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    C, hidden = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    flip = _half_flip(cfg)
    gated_relu2 = cfg.activation == "relu2"
    mlp_bias = cfg.bias or not gated_relu2
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
        w_q, w_k, w_v = sd[p + "attn.c_attn.weight"].split(C)  # (C, C) each
        out[q + "self_attn.q_proj.weight"] = w_q * flip[:, None]
        out[q + "self_attn.k_proj.weight"] = w_k * flip[:, None]
        out[q + "self_attn.v_proj.weight"] = w_v
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        if cfg.bias:
            b_q, b_k, b_v = sd[p + "attn.c_attn.bias"].split(C)
            out[q + "self_attn.q_proj.bias"] = b_q * flip
            out[q + "self_attn.k_proj.bias"] = b_k * flip
            out[q + "self_attn.v_proj.bias"] = b_v
            out[q + "self_attn.o_proj.bias"] = sd[p + "attn.c_proj.bias"]
        if family == "qwen3":
            out[q + "self_attn.q_norm.weight"] = torch.ones(cfg.head_dim)
            out[q + "self_attn.k_norm.weight"] = torch.ones(cfg.head_dim)
        w_fc = sd[p + "mlp.c_fc.weight"]
        out[q + "mlp.gate_proj.weight"] = w_fc
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.c_proj.weight"]
        if gated_relu2:
            out[q + "mlp.up_proj.weight"] = w_fc
        else:  # up(x) = 0·x + 1, so act(gate(x)) * up(x) = act(gate(x))
            out[q + "mlp.up_proj.weight"] = torch.zeros_like(w_fc)
        if mlp_bias:
            b_fc = _bias(sd, p + "mlp.c_fc.bias", hidden)
            out[q + "mlp.gate_proj.bias"] = b_fc
            out[q + "mlp.up_proj.bias"] = b_fc if gated_relu2 else torch.ones(hidden)
            out[q + "mlp.down_proj.bias"] = _bias(sd, p + "mlp.c_proj.bias", C)
    return out


def hf_config(cfg: ModelConfig, family: str) -> Any:
    """The transformers config object of `cfg` exported as `family`."""
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  architectures=[ARCHITECTURES[family]])
    if family == "gpt2":
        return GPT2Config(n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_inner=cfg.mlp_ratio * cfg.n_embd,
                          activation_function=cfg.activation, resid_pdrop=cfg.dropout,
                          embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                          layer_norm_epsilon=LAYER_NORM_EPS, **common)
    rotary = dict(hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_ratio * cfg.n_embd,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_head, head_dim=cfg.head_dim,
                  hidden_act="relu" if cfg.activation == "relu2" else cfg.activation,
                  max_position_embeddings=cfg.block_size, rms_norm_eps=RMS_NORM_EPS,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
                  attention_bias=cfg.bias, attention_dropout=cfg.dropout, **common)
    if family == "qwen3":
        return Qwen3Config(use_sliding_window=False, **rotary)
    return LlamaConfig(mlp_bias=cfg.bias or cfg.activation != "relu2", **rotary)


def to_hf_weights(sd: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    if family == "gpt2":
        return _gpt2_weights(sd, cfg)
    return _rotary_weights(sd, cfg, family)


# --- the tokenizer -----------------------------------------------------------------------------


def hf_tokenizer(tokenizer: CharTokenizer, block_size: int) -> Any:
    """A PreTrainedTokenizerFast giving every character its chargpt id, and back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # No unknown token: a character outside the vocabulary is an error, as in chargpt.
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(tokenizer.chars)}))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters joined as they are, no spaces between them
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=block_size)


# --- export ------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What `export_run` wrote."""

    out_dir: Path
    architecture: str
    checkpoint: Path
    step: int
    max_logit_diff: float
    checked_tokens: int


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; choose a new directory")


def _model_card(result_arch: str, source: Path, step: int, cfg: ModelConfig) -> str:
    return (
        f"# chargpt character-level model\n\n"
        f"Exported by `chargpt export` from `{source.parent.name}/{source.name}` (step {step}) "
        f"as `{result_arch}`.\n\n"
        f"- {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, context "
        f"{cfg.block_size} characters, {cfg.vocab_size} characters in the vocabulary\n"
        f"- the tokenizer maps each character (one Unicode code point) to one token\n"
        f"- the model was trained on at most {cfg.block_size} characters of context; "
        f"generate at most that many tokens in all\n\n"
        "```python\n"
        "from transformers import pipeline\n"
        "generate = pipeline('text-generation', model='PATH')\n"
        f"print(generate('ROMEO:', max_new_tokens={max(1, cfg.block_size // 2)}, "
        "do_sample=True)[0]['generated_text'])\n"
        "```\n"
    )


def export_run(run_path: str | Path, out_dir: str | Path, checkpoint: str = "best"
               ) -> ExportResult:
    """Write the model of `run_path` as a transformers folder `out_dir` (new or empty)."""
    require_hf("chargpt export --to hf")
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    from .run import load_run

    out = Path(out_dir)
    _check_target(out)
    run = load_run(run_path, checkpoint, device="cpu")
    cfg = run.config.model
    family = family_for(cfg)
    config = hf_config(cfg, family)
    model = AutoModelForCausalLM.from_config(config)
    weights = to_hf_weights(run.model.state_dict(), cfg, family)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (cfg.tie_weights and k == "lm_head.weight")]
    if missing or unexpected:  # a bug in the mapping above, never the user's input
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, extra {unexpected}")
    model.eval()
    # chargpt's own defaults: sample from the full distribution at temperature 1
    model.generation_config = GenerationConfig(do_sample=True, top_k=0, temperature=1.0)
    diff, n = _max_logit_diff(run.model, model, run.tokenizer, cfg.block_size)
    if not diff <= EXPORT_TOLERANCE:
        raise ChargptError(f"the exported {ARCHITECTURES[family]} does not reproduce the "
                           f"model (largest logit difference {diff:.2e}); nothing was written")
    tmp = temp_path_for(out, "export")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one line of output, as every chargpt command
    try:
        model.save_pretrained(tmp)
        hf_tokenizer(run.tokenizer, cfg.block_size).save_pretrained(tmp)
        (tmp / "README.md").write_text(
            _model_card(ARCHITECTURES[family], run.checkpoint, run.step, cfg), encoding="utf-8")
        _check_target(out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return ExportResult(out, ARCHITECTURES[family], run.checkpoint, run.step, diff, n)


@torch.no_grad()
def _max_logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module, tokenizer: CharTokenizer,
                    block_size: int) -> tuple[float, int]:
    """Largest |logit difference| over one block of the vocabulary's characters, repeated."""
    ids = torch.arange(block_size) % tokenizer.vocab_size
    idx = ids[torch.randperm(block_size, generator=torch.Generator().manual_seed(0))][None]
    was_training = ours.training
    ours.eval()
    try:
        expected = ours(idx)[0]
    finally:
        ours.train(was_training)
    got = theirs(input_ids=idx).logits
    return float((expected - got).abs().max()), block_size


# --- import ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {' '.join(str(e).split())}") from None


def read_hf_weights(src: Path) -> dict[str, Tensor]:
    """The folder's tensors, from safetensors (one file or shards) or a weights-only .bin."""
    if (src / "model.safetensors").is_file():
        return _load_safetensors(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        out: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index} names a shard outside the folder: {shard!r}")
            out.update(_load_safetensors(src / shard))
        return out
    if (src / "pytorch_model.bin").is_file():
        state = load_plain_torch(src / "pytorch_model.bin")
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{src / 'pytorch_model.bin'} is not a dict of tensors")
        return state
    raise CheckpointError(f"{src} has no weights (expected one of {', '.join(WEIGHT_FILES)})")


def read_char_tokenizer(src: Path, vocab_size: int) -> CharTokenizer:
    """chargpt's vocabulary from the folder's tokenizer.json, checked to work character-wise."""
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{src} has no tokenizer.json (a character tokenizer is needed)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise CheckpointError(f"{path} is unreadable: {' '.join(str(e).split())}") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(vocab_size)):
        raise CheckpointError(f"{path} has {len(vocab)} tokens with ids that are not "
                              f"0..{vocab_size - 1}, the model's vocabulary")
    chars = [by_id[i] for i in range(vocab_size)]
    long = [t for t in chars if len(t) != 1]
    if long:
        raise CheckpointError(f"{path} is not a character tokenizer: token {long[0]!r} is "
                              f"{len(long[0])} characters long")
    text = "".join(chars)
    try:
        ids = tok.encode(text, add_special_tokens=False).ids
    except Exception as e:
        raise CheckpointError(f"{path} cannot encode its own vocabulary: {e}") from None
    # Only the ids matter: chargpt decodes with its own vocabulary, not the file's decoder.
    if ids != list(range(vocab_size)):
        raise CheckpointError(f"{path} does not give each character its own token (its "
                              "normaliser or pre-tokeniser changes or groups the text)")
    try:
        return CharTokenizer(chars)
    except ChargptError as e:
        raise CheckpointError(f"{path}: {e}") from None


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


def _from_gpt2(config: dict[str, Any], weights: dict[str, Tensor], src: Path
               ) -> tuple[ModelConfig, dict[str, Tensor]]:
    cpath = src / "config.json"
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
    n_embd = _int(config, "n_embd", cpath)
    n_head = _int(config, "n_head", cpath)
    n_layer = _int(config, "n_layer", cpath)
    n_inner = config.get("n_inner") or 4 * n_embd
    if not isinstance(n_inner, int) or n_inner % n_embd:
        raise _unsupported(src, f"n_inner {n_inner}", f"chargpt's MLP width is a whole "
                           f"multiple of n_embd ({n_embd})")
    # Weights saved from the bare GPT2Model have no "transformer." prefix; the causal-mask
    # buffers some older checkpoints carry are not weights.
    w = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
         for k, v in weights.items()
         if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    sd: dict[str, Tensor] = {"transformer.wte.weight": _take(w, "transformer.wte.weight", src)}
    wpe = _take(w, "transformer.wpe.weight", src)
    vocab_size = sd["transformer.wte.weight"].size(0)
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
    biases.append("transformer.ln_f.bias")
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
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise CheckpointError(f"{src / 'config.json'}: rope_theta must be a number")
    return float(theta)


def _from_rotary(config: dict[str, Any], weights: dict[str, Tensor], src: Path, family: str
                 ) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The inverse of `_rotary_weights`: Llama/Qwen3 folders shaped like chargpt's exports."""
    cpath = src / "config.json"
    n_embd = _int(config, "hidden_size", cpath)
    n_head = _int(config, "num_attention_heads", cpath)
    n_layer = _int(config, "num_hidden_layers", cpath)
    hidden = _int(config, "intermediate_size", cpath)
    if config.get("num_key_value_heads", n_head) != n_head:
        raise _unsupported(src, "grouped-query attention", "chargpt has one key and value "
                           "head per query head")
    if config.get("head_dim", n_embd // n_head) * n_head != n_embd or hidden % n_embd:
        raise _unsupported(src, "head_dim or intermediate_size", "chargpt's heads split "
                           "n_embd evenly and its MLP is a whole multiple of n_embd wide")
    eps = config.get("rms_norm_eps")
    if eps != RMS_NORM_EPS:
        raise _unsupported(src, f"rms_norm_eps {eps}", f"chargpt's RMSNorm uses {RMS_NORM_EPS}")
    if config.get("use_sliding_window"):
        raise _unsupported(src, "sliding-window attention", "chargpt attends to the whole block")
    theta = _rope_theta(config, src)
    act = config.get("hidden_act")
    w = dict(weights)
    flip = None  # set once the head size is known to be valid (ModelConfig checks it)
    sd: dict[str, Tensor] = {"transformer.wte.weight": _take(w, "model.embed_tokens.weight",
                                                             src)}
    vocab_size = sd["transformer.wte.weight"].size(0)
    activations, any_bias = set(), False
    for i in range(n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        sd[p + "ln_1.weight"] = _take(w, q + "input_layernorm.weight", src)
        sd[p + "ln_2.weight"] = _take(w, q + "post_attention_layernorm.weight", src)
        if family == "qwen3":
            for norm in ("q_norm", "k_norm"):
                if not torch.all(_take(w, f"{q}self_attn.{norm}.weight", src) == 1):
                    raise _unsupported(src, f"learned {norm} gains", "chargpt's QK-norm has no "
                                       "weights")
        if flip is None:
            flip = _half_flip(ModelConfig(n_embd=n_embd, n_head=n_head))
        proj = {n: _take(w, f"{q}self_attn.{n}.weight", src) for n in ("q_proj", "k_proj",
                                                                         "v_proj", "o_proj")}
        sd[p + "attn.c_attn.weight"] = torch.cat(
            (proj["q_proj"] * flip[:, None], proj["k_proj"] * flip[:, None], proj["v_proj"]))
        sd[p + "attn.c_proj.weight"] = proj["o_proj"]
        b = {n: w.pop(f"{q}self_attn.{n}.bias", None) for n in proj}
        gate = _take(w, q + "mlp.gate_proj.weight", src)
        up = _take(w, q + "mlp.up_proj.weight", src)
        sd[p + "mlp.c_fc.weight"] = gate
        sd[p + "mlp.c_proj.weight"] = _take(w, q + "mlp.down_proj.weight", src)
        b_gate = w.pop(q + "mlp.gate_proj.bias", None)
        b_up = w.pop(q + "mlp.up_proj.bias", None)
        b_down = w.pop(q + "mlp.down_proj.bias", None)
        same_bias = (b_gate is None and b_up is None) or (
            b_gate is not None and b_up is not None and torch.equal(b_gate, b_up))
        if act == "relu" and torch.equal(gate, up) and same_bias:
            activations.add("relu2")  # relu(a) * a
        elif (act in ("gelu", "relu", "relu2") and torch.count_nonzero(up) == 0
              and b_up is not None and torch.all(b_up == 1)):
            activations.add(act)  # act(a) * 1
        else:
            raise _unsupported(src, f"a gated MLP with hidden_act {act!r}", "chargpt's MLP "
                               "is not gated; only the gated forms chargpt exports (relu(a)*a, "
                               "or an up projection that is constant 1) can be read")
        qkv_bias = None if b["q_proj"] is None else torch.cat(
            (b["q_proj"] * flip, b["k_proj"] * flip, b["v_proj"]))
        # chargpt has all four biases or none: missing ones are zeros, dropped below if all are
        for name, t, size in (("attn.c_attn.bias", qkv_bias, 3 * n_embd),
                              ("attn.c_proj.bias", b["o_proj"], n_embd),
                              ("mlp.c_fc.bias", b_gate, hidden),
                              ("mlp.c_proj.bias", b_down, n_embd)):
            any_bias = any_bias or (t is not None and bool(torch.count_nonzero(t)))
            sd[p + name] = t if t is not None else torch.zeros(size)
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
    cfg = ModelConfig(arch="gpt", vocab_size=vocab_size,
                      block_size=_int(config, "max_position_embeddings", cpath),
                      n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      dropout=_dropout(config, "attention_dropout"), bias=any_bias,
                      norm="pre", mlp_ratio=hidden // n_embd, activation=activations.pop(),
                      tie_weights=tie, pos_emb="rope", rope_base=theta,
                      qk_norm=family == "qwen3", norm_type="rmsnorm")
    return cfg, sd


def read_hf(src: str | Path) -> ImportedModel:
    """A chargpt model from a transformers folder (GPT-2-shaped, or Llama/Qwen3 as exported)."""
    require_hf("importing a Hugging Face folder")
    src = Path(src)
    config = _read_json(src / "config.json")
    model_type = config.get("model_type")
    weights = read_hf_weights(src)
    try:
        if model_type == "gpt2":
            cfg, sd = _from_gpt2(config, weights, src)
        elif model_type in ("llama", "qwen3"):
            cfg, sd = _from_rotary(config, weights, src, model_type)
        else:
            raise _unsupported(src, f"model_type {model_type!r}", "chargpt reads gpt2, and the "
                               "llama and qwen3 folders it exports")
    except ConfigError as e:  # a shape or size ModelConfig refuses
        raise CheckpointError(f"cannot import {src}: {e}") from None
    tokenizer = read_char_tokenizer(src, cfg.vocab_size)
    return ImportedModel(config=cfg, tokenizer=tokenizer, state_dict=sd,
                         source={"format": f"huggingface-{model_type}", "path": str(src)})
