"""nanoGPT import against a nanoGPT-shaped reference model built here: same logits, the same
sampled text for the same seed, checkpoint and vocabulary laid out as nanoGPT writes them;
and planted pickles in ckpt.pt or meta.pkl run nothing and give one line of error."""

import math
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error
from torch import nn

from chargpt.cli.commands import main
from chargpt.errors import CheckpointError
from chargpt.interop import nanogpt
from chargpt.interop.nanogpt import MAX_META_DEPTH, read_plain_pickle
from chargpt.runs.run import load_run

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_text() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    return "ROMEO: to be or not to be, that is the question.\n" * 400


# --- the reference: nanoGPT's architecture, names and sampling loop ------------------------------


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: the bias is optional."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Explicit masked softmax, with the mask kept as a buffer named `bias` (as nanoGPT does
    when flash attention is unavailable), so the checkpoint carries it."""

    def __init__(self, a, mask_buffer):
        super().__init__()
        self.n_head = a["n_head"]
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        mask = torch.tril(torch.ones(a["block_size"], a["block_size"]))
        if mask_buffer:
            self.register_buffer("bias", mask.view(1, 1, a["block_size"], a["block_size"]))
        else:
            self.register_buffer("mask", mask.view(1, 1, a["block_size"], a["block_size"]),
                                 persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = self.bias if hasattr(self, "bias") else self.mask
        att = F.softmax(att.masked_fill(mask[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_fc = nn.Linear(a["n_embd"], 4 * a["n_embd"], bias=a["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * a["n_embd"], a["n_embd"], bias=a["bias"])

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a, mask_buffer):
        super().__init__()
        self.ln_1 = LayerNorm(a["n_embd"], a["bias"])
        self.attn = CausalSelfAttention(a, mask_buffer)
        self.ln_2 = LayerNorm(a["n_embd"], a["bias"])
        self.mlp = MLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, a, mask_buffer=True):
        super().__init__()
        self.block_size = a["block_size"]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], a["n_embd"]),
            wpe=nn.Embedding(a["block_size"], a["n_embd"]),
            drop=nn.Dropout(a["dropout"]),
            h=nn.ModuleList([Block(a, mask_buffer) for _ in range(a["n_layer"])]),
            ln_f=LayerNorm(a["n_embd"], a["bias"]),
        ))
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """nanoGPT's sampling loop at temperature 1: crop, softmax, multinomial."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size:])[:, -1, :]
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def nanogpt_repo(root: Path, bias=True, prefix="_orig_mod.", mask_buffer=True):
    """nanoGPT's layout after `train.py config/train_shakespeare_char.py`: the checkpoint in
    out-shakespeare-char/, the vocabulary in data/shakespeare_char/meta.pkl."""
    chars = sorted(set(corpus_text()))
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=24, bias=bias,
                vocab_size=len(chars), dropout=0.2)
    torch.manual_seed(0)
    model = NanoGPT(args, mask_buffer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    out, data = root / "out-shakespeare-char", root / "data" / "shakespeare_char"
    out.mkdir(parents=True)
    data.mkdir(parents=True)
    torch.save({
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "model_args": args,
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),
        "config": {"dataset": "shakespeare_char", "batch_size": 64, "compile": True,
                   "learning_rate": 1e-3, "out_dir": "out-shakespeare-char"},
    }, out / "ckpt.pt")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    (data / "meta.pkl").write_bytes(pickle.dumps(meta))
    return model, out, chars


@pytest.mark.parametrize("bias,prefix,mask_buffer", [(True, "_orig_mod.", True),
                                                     (False, "", False)])
def test_imported_nanogpt_gives_its_logits_and_samples_its_text(tmp_path, capsys, bias, prefix,
                                                                 mask_buffer):
    reference, out, chars = nanogpt_repo(tmp_path, bias, prefix, mask_buffer)
    run_dir = tmp_path / "run"
    assert main(["import", str(out), "--out", str(run_dir)]) == 0
    assert "imported nanogpt model" in capsys.readouterr().out
    run = load_run(run_dir, device="cpu")
    assert list(run.tokenizer.chars) == chars
    assert run.step == 250 and run.val_loss == pytest.approx(1.4697)
    m = run.config.model
    assert (m.bias, m.tie_weights, m.dropout, m.block_size) == (bias, True, 0.2, 24)

    idx = torch.randint(0, len(chars), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (run.model(idx)[0] - reference(idx)).abs().max() <= 1e-5

    prompt = "ROMEO:"
    torch.manual_seed(11)
    ids = reference.generate(torch.tensor([run.tokenizer.encode(prompt)]), 60)
    expected = run.tokenizer.decode(ids[0])
    # 66 characters > block_size 24: --no-kv-cache crops the context as nanoGPT does
    assert main(["sample", str(run_dir), "--prompt", prompt, "--seed", "11",
                 "--max-new-tokens", "60", "--no-kv-cache"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    text = tmp_path / "text.txt"
    text.write_text(corpus_text()[:500], encoding="utf-8")
    assert main(["eval", str(run_dir), "--input", str(text)]) == 0
    assert "bits/char over 499 predictions" in capsys.readouterr().out


def test_meta_can_be_given_explicitly_and_must_match_the_model(tmp_path, capsys):
    _, out, chars = nanogpt_repo(tmp_path)
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    moved = tmp_path / "meta.pkl"
    meta.rename(moved)
    code = main(["import", str(out / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "pass --meta FILE" in one_line_error(capsys, code)
    assert main(["import", str(out / "ckpt.pt"), "--out", str(tmp_path / "run"),
                 "--meta", str(moved)]) == 0
    capsys.readouterr()
    small = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}}
    moved.write_bytes(pickle.dumps(small))
    code = main(["import", str(out), "--out", str(tmp_path / "run2"), "--meta", str(moved)])
    assert "has 3 characters but the model" in one_line_error(capsys, code)


# --- nothing in the files is ever executed ----------------------------------------------------


class WritesAFile:
    """Unpickling this calls open(path, 'w'): proof of code execution if the file appears."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_planted_object_is_a_real_exploit(tmp_path):
    # The reference for the two tests below: a plain unpickler does run it.
    pickle.loads(pickle.dumps(WritesAFile(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


def test_a_pickle_planted_in_ckpt_pt_runs_nothing(tmp_path, capsys):
    _, out, _ = nanogpt_repo(tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["config"]["note"] = WritesAFile(marker)
    torch.save(ckpt, out / "ckpt.pt")
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    line = one_line_error(capsys, code)
    assert "holds pickled objects (io.open)" in line and "nothing was executed" in line
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("payload,needle", [
    ("exploit", "refers to io.open"),
    ("float", "pickle operation BINFLOAT"),
    ("bool-protocol-0", "holds more than dicts, strings and integers"),
    ("garbage", "is not plain metadata"),
    ("bool", "pickle operation NEWTRUE"),
])
def test_meta_pkl_is_read_as_plain_data_only(tmp_path, capsys, payload, needle):
    _, out, chars = nanogpt_repo(tmp_path)
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    marker = tmp_path / "pwned"
    good = {"vocab_size": len(chars), "itos": dict(enumerate(chars))}
    if payload == "exploit":
        meta.write_bytes(pickle.dumps({**good, "x": WritesAFile(marker)}))
    elif payload == "float":
        meta.write_bytes(pickle.dumps({**good, "ratio": 0.5}))
    elif payload == "bool":
        meta.write_bytes(pickle.dumps({**good, "flag": True}))
    elif payload == "bool-protocol-0":  # protocol 0 writes True as the integer opcode "I01"
        meta.write_bytes(pickle.dumps({**good, "flag": True}, protocol=0))
    else:
        meta.write_bytes(b"\x80\x04not a pickle at all")
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    assert needle in one_line_error(capsys, code)
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_plain_reader_reads_dicts_strings_and_integers_and_nothing_else(protocol):
    meta = {"vocab_size": 3, "itos": {0: "a", 1: "\n", 300: "é", 2**40: "z", -5: "😀"},
            "stoi": {"a": 0}, "nested": {"x": {"y": "z"}}}
    assert read_plain_pickle(pickle.dumps(meta, protocol=protocol)) == meta
    for obj in (WritesAFile("x"), print, Path("x"), 1.5, [1], (1, 2), None, {1.5j}):
        with pytest.raises(CheckpointError, match="it refers to|pickle operation"):
            read_plain_pickle(pickle.dumps({"a": obj}, protocol=protocol))


def test_a_checkpoint_that_is_not_nanogpts_is_refused(tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "ckpt.pt")
    code = main(["import", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "is not a nanoGPT checkpoint" in one_line_error(capsys, code)
    (tmp_path / "ckpt.pt").write_bytes(b"not a zip file")
    code = main(["import", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "is not a readable PyTorch file" in one_line_error(capsys, code)


def shared_nesting(levels: int, width: int = 2) -> dict:
    """A dict whose `width` entries are one dict, `levels` deep: small as a pickle (each level
    is stored once), width**levels paths for a traversal that does not remember what it saw."""
    x: dict = {"a": "b"}
    for _ in range(levels):
        x = dict.fromkeys(range(width), x)
    return x


def self_referencing() -> dict:
    d: dict = {"vocab_size": 1, "itos": {0: "a"}}
    d["me"] = d
    return d


@pytest.mark.parametrize("name,obj,needle", [
    ("self", self_referencing(), "contains itself"),
    ("shared", {"vocab_size": 1, "itos": {0: "a"}, "x": shared_nesting(60)}, "nested more than"),
    ("deep", {"vocab_size": 1, "itos": {0: "a"}, "x": shared_nesting(15)}, "nested more than"),
])
def test_a_hostile_meta_pkl_is_one_line_in_bounded_time(tmp_path, capsys, name, obj, needle):
    _, out, _ = nanogpt_repo(tmp_path)
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    meta.write_bytes(pickle.dumps(obj))
    assert len(meta.read_bytes()) < 1000
    t0 = time.monotonic()
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    assert needle in one_line_error(capsys, code)
    assert time.monotonic() - t0 < 10
    with pytest.raises(CheckpointError, match=needle):
        read_plain_pickle(meta.read_bytes(), meta)


def test_shared_nesting_within_the_depth_limit_is_read_in_linear_time(tmp_path):
    _, out, chars = nanogpt_repo(tmp_path)
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    obj = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
           "x": shared_nesting(MAX_META_DEPTH - 2, 8)}  # 8**14 paths through 14 dicts
    meta.write_bytes(pickle.dumps(obj))
    t0 = time.monotonic()
    assert main(["import", str(out), "--out", str(tmp_path / "run")]) == 0
    assert time.monotonic() - t0 < 30
    back = read_plain_pickle(meta.read_bytes())
    assert back.keys() == obj.keys() and back["itos"] == obj["itos"]


def test_meta_pkl_size_and_value_limits(tmp_path, capsys, monkeypatch):
    """A meta.pkl larger than the limit is not read; one that builds more values than a full
    vocabulary needs is refused while it is read (limits lowered here, as the test's own)."""
    _, out, chars = nanogpt_repo(tmp_path)
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    size = len(meta.read_bytes())
    monkeypatch.setattr(nanogpt, "MAX_META_BYTES", size - 1)
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    assert f"more than {size - 1:,} bytes" in one_line_error(capsys, code)
    monkeypatch.setattr(nanogpt, "MAX_META_BYTES", size)
    monkeypatch.setattr(nanogpt, "MAX_META_VALUES", 3 * len(chars))
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    assert "more than" in one_line_error(capsys, code)
    monkeypatch.setattr(nanogpt, "MAX_META_VALUES", 4 * len(chars) + 8)
    assert main(["import", str(out), "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("meta,needle", [
    ({"vocab_size": 10**12, "itos": {0: "a"}}, "does not number its characters"),
    ({"vocab_size": 2, "itos": {0: "a", "1": "b"}}, "does not number its characters"),
])
def test_a_meta_pkl_with_a_lying_vocabulary_is_one_line(tmp_path, capsys, meta, needle):
    _, out, _ = nanogpt_repo(tmp_path)
    (tmp_path / "data" / "shakespeare_char" / "meta.pkl").write_bytes(pickle.dumps(meta))
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    assert needle in one_line_error(capsys, code)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_sparse_tensor_that_reads_out_of_bounds_is_refused(tmp_path, capsys):
    """A sparse CSR tensor whose row pointers claim a million values over one: torch's
    weights-only load builds it unchecked by default, and using it reads past its buffers."""
    _, out, _ = nanogpt_repo(tmp_path)
    shutil.copy(out / "ckpt.pt", out / "ckpt.pt.orig")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    name = "_orig_mod.transformer.ln_f.weight"
    n = ckpt["model"][name].numel()
    ckpt["model"][name] = torch.sparse_csr_tensor(
        torch.tensor([0, 1 << 20]), torch.tensor([0]), torch.tensor([1.0]), size=(1, n),
        check_invariants=False)
    torch.save(ckpt, out / "ckpt.pt")
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    assert "crow_indices[..., -1] == nnz" in one_line_error(capsys, code)
    # a valid sparse head: still not weights (and torch.equal, comparing it with the embedding
    # to see whether they are tied, has no sparse kernel)
    ckpt = torch.load(tmp_path / "out-shakespeare-char" / "ckpt.pt.orig", weights_only=True)
    head = "_orig_mod.lm_head.weight"
    ckpt["model"][head] = ckpt["model"][head].to_sparse()
    torch.save(ckpt, out / "ckpt.pt")
    code = main(["import", str(out), "--out", str(tmp_path / "run")])
    assert "has no 'model' state_dict of dense tensors" in one_line_error(capsys, code)
    assert not (tmp_path / "run").exists()
