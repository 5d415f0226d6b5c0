"""Hugging Face out: a chargpt GPT as a `transformers` folder (hf_import.py reads one back).

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
characters that `AutoTokenizer` loads without remote code. The names both directions share
(the extra, the norm epsilons, the weight files, `half_flip`) live here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chargpt.config.schema import ModelConfig
from chargpt.errors import ChargptError, ConfigError
from chargpt.fileio import check_new_dir, new_dir
from chargpt.text.tokenizer import CharTokenizer

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


def half_flip(cfg: ModelConfig) -> Tensor:
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
    flip = half_flip(cfg)
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

    from chargpt.runs.run import load_run

    out = Path(out_dir)
    check_new_dir(out)
    run = load_run(run_path, checkpoint, device="cpu")
    if run.tokenizer.unit == "byte":
        raise _refuse("a byte-level run (unit=byte)", "the exported tokenizer gives each "
                      "character one id; a byte vocabulary has no such form")
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
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one line of output, as every chargpt command
    try:
        with new_dir(out, "export") as tmp:
            model.save_pretrained(tmp)
            hf_tokenizer(run.tokenizer, cfg.block_size).save_pretrained(tmp)
            (tmp / "README.md").write_text(
                _model_card(ARCHITECTURES[family], run.checkpoint, run.step, cfg),
                encoding="utf-8")
    finally:
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
