"""Hugging Face out and in, against references: an exported model gives chargpt's logits (to
1e-5) and its samples for the same seed in `transformers`, the tokenizer gives chargpt's ids,
`pipeline` writes text, import gives back the same weights, a GPT2LMHeadModel built with
`transformers` samples the same text in chargpt, and what cannot be exact is refused."""

import json
import pickle
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is part of dev")
from conftest import one_line_error, tiny_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402

from chargpt.cli.commands import main  # noqa: E402
from chargpt.config.schema import ModelConfig, apply_overrides  # noqa: E402
from chargpt.interop import hf_export as hf  # noqa: E402
from chargpt.interop.imported import ImportedModel  # noqa: E402
from chargpt.interop.importer import write_run  # noqa: E402
from chargpt.model.build import build_model  # noqa: E402
from chargpt.runs.run import load_run  # noqa: E402
from chargpt.text.tokenizer import CharTokenizer  # noqa: E402
from chargpt.training.launch import train  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
LINE = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\nJULIET:\nAy me!"


def corpus_text() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text(encoding="utf-8")[:40_000]
    return (LINE + "\n") * 600


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vocabulary() -> CharTokenizer:
    return CharTokenizer(sorted(set(corpus_text() + LINE + "é😀")))


def perturbed_run(tmp_path: Path, name: str, **model) -> Path:
    """A run directory holding a freshly built model whose every parameter is random noise, so
    that no part (bias, gain, position table) can be wrong without the logits showing it."""
    tok = vocabulary()
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32,
                      **model)
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return write_run(ImportedModel(cfg, tok, m.state_dict(), {"format": "test"}),
                     tmp_path / name)


def export(run: Path, out: Path, capsys) -> str:
    assert main(["export", str(run), "--to", "hf", str(out)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@torch.no_grad()
def assert_same_logits(run: Path, hf_dir: Path, tol: float = 1e-5) -> float:
    ours = load_run(run, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, ours.tokenizer.vocab_size, (2, ours.config.model.block_size),
                        generator=torch.Generator().manual_seed(1))
    diff = (ours.model(idx)[0] - theirs(input_ids=idx).logits).abs().max().item()
    assert diff <= tol
    return diff


EXPORTABLE = {
    # GPT-2: learned positions, LayerNorm
    "classic": ("GPT2LMHeadModel", dict()),
    "tied-relu-nobias": ("GPT2LMHeadModel", dict(tie_weights=True, activation="relu",
                                                 bias=False)),
    "nopos-relu2": ("GPT2LMHeadModel", dict(pos_emb="none", activation="relu2")),
    # Qwen3: rotary, RMSNorm, QK-norm (the fast recipe)
    "fast": ("Qwen3ForCausalLM", dict(bias=False, norm_type="rmsnorm", activation="relu2",
                                      pos_emb="rope", qk_norm=True, zero_init_proj=True)),
    "fast-tied-base": ("Qwen3ForCausalLM", dict(bias=False, norm_type="rmsnorm",
                                                activation="relu2", pos_emb="rope",
                                                qk_norm=True, tie_weights=True,
                                                rope_base=500.0)),
    # Llama: rotary and RMSNorm without QK-norm
    "rope-relu2-bias": ("LlamaForCausalLM", dict(norm_type="rmsnorm", activation="relu2",
                                                 pos_emb="rope")),
    "rope-gelu": ("LlamaForCausalLM", dict(bias=False, norm_type="rmsnorm", pos_emb="rope")),
    "rope-relu-bias-tied": ("LlamaForCausalLM", dict(norm_type="rmsnorm", activation="relu",
                                                     pos_emb="rope", tie_weights=True)),
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_gives_chargpts_logits_and_imports_back_unchanged(tmp_path, capsys, name):
    architecture, model = EXPORTABLE[name]
    run = perturbed_run(tmp_path, "run", **model)
    out = export(run, tmp_path / "hf", capsys)
    assert f"as {architecture} -> " in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        architecture]
    assert_same_logits(run, tmp_path / "hf")

    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    before, after = (load_file(str(p / "last" / "model.safetensors"))
                     for p in (run, tmp_path / "back"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    cfg_before, cfg_after = (json.loads((p / "config.json").read_text())["model"]
                             for p in (run, tmp_path / "back"))
    cfg_before["zero_init_proj"] = False  # how weights start, not the function they compute
    assert cfg_after == cfg_before


REFUSED = {
    "norm=post": dict(norm="post"),
    "norm=none": dict(norm="none"),
    "residual=false": dict(residual=False),
    "mlp=false": dict(mlp=False),
    "pos_emb=rope with norm_type=layernorm": dict(pos_emb="rope"),
    "activation=gelu with qk_norm=true": dict(pos_emb="rope", norm_type="rmsnorm",
                                              qk_norm=True, bias=False),
    "bias=true with qk_norm=true": dict(pos_emb="rope", norm_type="rmsnorm", qk_norm=True,
                                        activation="relu2"),
    "norm_type=rmsnorm with pos_emb=learned": dict(norm_type="rmsnorm"),
    "qk_norm=true with pos_emb=learned": dict(qk_norm=True),
    "arch=bigram": dict(arch="bigram"),
    "attn_proj=false": dict(attn_proj=False),
    "mlp_proj=false": dict(mlp_proj=False, mlp_ratio=1),
    "attn_scale=embd": dict(attn_scale="embd"),
    "head_bias=true": dict(head_bias=True),
    "value_embeds=true": dict(value_embeds=True),
    "logit_softcap=15": dict(logit_softcap=15.0),
}


@pytest.mark.parametrize("switch", REFUSED)
def test_switches_without_an_exact_transformers_architecture_are_refused(tmp_path, capsys,
                                                                         switch):
    run = perturbed_run(tmp_path, "run", **REFUSED[switch])
    code = main(["export", str(run), "--to", "hf", str(tmp_path / "hf")])
    line = one_line_error(capsys, code)
    assert f"cannot export {switch} to transformers: " in line
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny trained runs, the classic and the fast recipe."""
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    runs = {}
    fast = dict(bias=False, norm_type="rmsnorm", activation="relu2", pos_emb="rope",
                qk_norm=True, zero_init_proj=True)
    for name, model in (("classic", {}), ("fast", fast)):
        cfg = tiny_config(corpus, root / name, max_steps=20, eval_interval=20)
        train(apply_overrides(cfg, {"model": {"block_size": 32, **model}}, "test"), quiet=True)
        runs[name] = root / name
    return runs


@pytest.mark.parametrize("name", ["classic", "fast"])
def test_exported_run_tokenizes_generates_and_samples_like_chargpt(trained, tmp_path, capsys,
                                                                   name):
    run_dir, out = trained[name], tmp_path / "hf"
    line = export(run_dir, out, capsys).strip()
    assert line.startswith(f"exported {run_dir / 'best'} (step 20) as ")
    assert_same_logits(run_dir, out)
    run = load_run(run_dir, device="cpu")

    tok = transformers.AutoTokenizer.from_pretrained(out)  # no trust_remote_code needed
    ids = tok.encode(LINE[: run.config.model.block_size])
    assert ids == run.tokenizer.encode(LINE[: run.config.model.block_size])
    assert tok.decode(tok.encode(LINE)) == LINE
    with pytest.raises(Exception, match="UNK"):
        tok.encode("Zürich")  # not in the vocabulary: an error, as in chargpt

    generate = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out))
    text = generate("ROMEO:", max_new_tokens=20)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20
    assert set(text) <= set(run.tokenizer.chars)

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    prompt = torch.tensor([run.tokenizer.encode("ROMEO:")])
    torch.manual_seed(7)  # transformers draws from torch's global generator
    sequence = model.generate(prompt, max_new_tokens=25)  # the exported defaults: top_k=0
    theirs = tok.decode(sequence[0, prompt.size(1):])
    assert theirs == run.generate("ROMEO:", 25, seed=7)


def test_export_needs_a_new_or_empty_directory(trained, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    code = main(["export", str(trained["classic"]), "--to", "hf", str(tmp_path / "hf")])
    assert "already exists and is not empty" in one_line_error(capsys, code)
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    code = main(["export", str(trained["classic"]), "--to", "onnx", str(tmp_path / "x")])
    assert "unknown export format 'onnx'" in one_line_error(capsys, code)


def test_export_without_the_extra_names_it(trained, tmp_path, capsys, monkeypatch):
    real = hf.importlib.util.find_spec
    monkeypatch.setattr(hf.importlib.util, "find_spec",
                        lambda n, *a: None if n == "transformers" else real(n, *a))
    code = main(["export", str(trained["classic"]), "--to", "hf", str(tmp_path / "hf")])
    assert "pip install 'chargpt[hf]'" in one_line_error(capsys, code)


# --- a model made by transformers, imported into chargpt -------------------------------------


def gpt2_folder(path: Path, **config) -> tuple[Path, list[str]]:
    """A GPT2LMHeadModel with noisy weights and its own character tokenizer (shuffled ids, a
    grapheme pre-tokenizer), saved by transformers itself."""
    chars = sorted(set(corpus_text()))
    random.Random(0).shuffle(chars)
    base = dict(vocab_size=len(chars), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                activation_function="gelu", tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**base, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        transformers.utils.logging.enable_progress_bar()
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\X"), behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path, chars


def test_gpt2_from_transformers_samples_the_same_text_in_chargpt(tmp_path, capsys):
    src, chars = gpt2_folder(tmp_path / "gpt2")
    assert main(["import", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "imported huggingface-gpt2 model" in capsys.readouterr().out
    run = load_run(tmp_path / "run", device="cpu")
    assert list(run.tokenizer.chars) == chars  # the source's ids, not re-sorted
    assert_same_logits(tmp_path / "run", src)

    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    prompt = "ROMEO:"
    torch.manual_seed(3)
    out = model.generate(torch.tensor([run.tokenizer.encode(prompt)]), do_sample=True,
                         top_k=0, max_new_tokens=26)
    theirs = run.tokenizer.decode(out[0, len(prompt):])
    assert main(["sample", str(tmp_path / "run"), "--prompt", prompt, "--seed", "3",
                 "--max-new-tokens", "26"]) == 0
    assert capsys.readouterr().out == prompt + theirs + "\n"


def test_importing_what_chargpt_cannot_compute_exactly_is_refused(tmp_path, capsys):
    src, _ = gpt2_folder(tmp_path / "tanh", activation_function="gelu_new")
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert "activation_function 'gelu_new' (the tanh approximation" in one_line_error(capsys,
                                                                                      code)
    assert not (tmp_path / "run").exists()

    src, chars = gpt2_folder(tmp_path / "words")
    vocab = {("<|endoftext|>" if i == 0 else c): i for i, c in enumerate(chars)}
    Tokenizer(models.WordLevel(vocab=vocab)).save(str(src / "tokenizer.json"))
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert "is not a character tokenizer: token '<|endoftext|>'" in one_line_error(capsys, code)


class WritesAFile:
    """Unpickling this calls open(path, 'w'): proof of code execution if the file appears."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_planted_in_pytorch_model_bin_runs_nothing(tmp_path, capsys):
    src, _ = gpt2_folder(tmp_path / "gpt2")
    weights = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**weights, "x": WritesAFile(marker)}, src / "pytorch_model.bin")
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    line = one_line_error(capsys, code)
    assert "holds pickled objects" in line and "nothing was executed" in line
    assert not marker.exists() and not (tmp_path / "run").exists()
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(WritesAFile(probe)))  # the reference: a plain unpickler runs it
    assert probe.exists()


# --- a hostile folder is bounded before any tensor is read -----------------------------------


def forbid_tensor_reads(monkeypatch):
    """Fail the test if a tensor of a safetensors file is loaded from now on (headers may be
    read)."""
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was loaded before the bounds and memory were checked")

    monkeypatch.setattr(safetensors.torch, "safe_open", refuse)


def edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_hostile_hf_config_is_refused_before_a_tensor_is_read(tmp_path, capsys, monkeypatch):
    src, _ = gpt2_folder(tmp_path / "gpt2")
    forbid_tensor_reads(monkeypatch)
    edit_config(src, n_layer=1_000_000)
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert f"{src}: model.n_layer is 1,000,000, more than chargpt loads" in one_line_error(
        capsys, code)
    edit_config(src, n_layer=2, head_dim=[1] * 3, model_type="llama", hidden_size=32,
                num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                rms_norm_eps=hf.RMS_NORM_EPS, max_position_embeddings=32)
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert "head_dim must be a positive integer, got [1, 1, 1]" in one_line_error(capsys, code)
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_past_the_bounds_in_a_header_is_refused_before_it_is_read(
        tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    src, _ = gpt2_folder(tmp_path / "gpt2")
    weights = load_file(str(src / "model.safetensors"))
    # 1.2 M rows of one byte: a small file whose header names more characters than Unicode has
    weights["transformer.wte.weight"] = torch.zeros(1_200_000, 1, dtype=torch.uint8)
    save_file(weights, str(src / "model.safetensors"))
    forbid_tensor_reads(monkeypatch)
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert "model.vocab_size is 1,200,000, more than chargpt loads" in one_line_error(capsys,
                                                                                       code)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_an_hf_model_larger_than_the_memory_is_refused_before_a_tensor_is_read(
        tmp_path, capsys, monkeypatch, weights_file):
    """The model's own need, and then the weights files' bytes (a 4 MB tensor the model does
    not have): both counted from the headers, before the tensors are loaded."""
    from chargpt.runs import safety

    src, _ = gpt2_folder(tmp_path / "gpt2")
    weights = load_file(str(src / "model.safetensors"))
    if weights_file == "pytorch_model.bin":
        (src / "model.safetensors").unlink()
        torch.save(weights, src / weights_file)
    forbid_tensor_reads(monkeypatch)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    monkeypatch.setattr(safety, "available_memory", lambda: 100_000)
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert "describes a model of 0.0 M parameters" in one_line_error(capsys, code)
    assert all(k.get("mmap") for k in loads)  # a .bin is only mapped, never read

    weights["junk"] = torch.zeros(1_000_000)
    if weights_file == "pytorch_model.bin":
        torch.save(weights, src / weights_file)
    else:
        from safetensors.torch import save_file

        save_file(weights, str(src / weights_file))
    monkeypatch.setattr(safety, "available_memory", lambda: 3_000_000)
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert "of memory; this machine has 0.0 GB available" in one_line_error(capsys, code)
    assert all(k.get("mmap") for k in loads)
    monkeypatch.undo()  # enough memory: the tensors are read, and the extra one refused
    code = main(["import", str(src), "--out", str(tmp_path / "run")])
    assert "tensor transformer.junk (not part of a GPT-2" in one_line_error(capsys, code)
