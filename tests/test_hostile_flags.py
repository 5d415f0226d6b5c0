"""Hostile numbers and names on the command line of sample, eval, attention, serve, estimate
and ladder: each is one `chargpt: error:` line and a non-zero exit, never a traceback and never
a wrong answer with exit status 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_line_error
from hypothesis import given, settings
from hypothesis import strategies as st

from chargpt.cli.commands import main
from chargpt.config.values import MAX_SEED, check_device
from chargpt.errors import ConfigError
from chargpt.generation.loop import MAX_NEW_TOKENS, MAX_SEQUENCES
from chargpt.generation.settings import SamplingSettings
from chargpt.model.evaluate import evaluate_tokens
from chargpt.runs.run import load_run

HUGE = "99999999999999999999999"


def refused(capsys, *argv: str) -> str:
    return one_line_error(capsys, main(list(argv)))


# --- eval --batch-size ------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["-1", "0"])
def test_eval_refuses_a_batch_size_below_one(tiny_run, capsys, batch):
    # -1 used to score no window at all and print a loss of 0 with exit status 0
    line = refused(capsys, "eval", str(tiny_run), "--batch-size", batch)
    assert f"batch_size must be >= 1, got {batch}" in line


def test_any_batch_size_from_one_up_gives_the_same_loss(tiny_run):
    run = load_run(tiny_run)
    tokens = np.arange(200, dtype=np.int64) % run.tokenizer.vocab_size
    one, huge = (run.evaluate_ids(tokens, batch_size=b) for b in (1, int(HUGE)))
    assert one == pytest.approx(huge, rel=1e-5) and one > 0
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        evaluate_tokens(run.model, tokens, block_size=run.block_size, batch_size=-1)


# --- --device ---------------------------------------------------------------------------------


DEVICE_COMMANDS = [["sample", "--max-new-tokens", "1"], ["eval"],
                   ["attention", "--prompt", "ab", "--out", "a.png"]]


@pytest.mark.parametrize("device", ["bogus", "CPU", "meta", "cuda:x", "cuda:-1", ""])
@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_an_unknown_device_as_train_does(tiny_run, capsys, tmp_path,
                                                               command, device):
    line = refused(capsys, command[0], str(tiny_run), *command[1:], "--device", device)
    assert line.endswith(f"device must be auto, cpu, cuda[:N] or mps, got {device!r}")
    train = refused(capsys, "train", "--out", str(tmp_path / "r"), "--device", device)
    assert train.endswith(line.removeprefix("chargpt: error: "))  # the same words: one rule


def test_serve_refuses_an_unknown_device(tiny_run, capsys):
    pytest.importorskip("uvicorn")
    line = refused(capsys, "serve", str(tiny_run), "--device", "meta", "--port", "0")
    assert "device must be auto, cpu, cuda[:N] or mps, got 'meta'" in line


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=12),
                 st.from_regex(r"(cpu|cuda|mps|meta|auto)(:-?[0-9]{1,6})?", fullmatch=True)))
def test_a_device_name_check_accepts_only_what_torch_takes_as_cpu_cuda_or_mps(name):
    try:
        check_device(name)
    except ConfigError as e:
        assert str(e) == f"device must be auto, cpu, cuda[:N] or mps, got {name!r}"
        return
    assert name == "auto" or torch.device(name).type in ("cpu", "cuda", "mps")


# --- sample: lengths and seeds ----------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needle"), [
    (["--max-new-tokens", "1000000000000"], f"max_new_tokens must be from 0 to "
                                            f"{MAX_NEW_TOKENS:,}, got 1,000,000,000,000"),
    (["--max-new-tokens", HUGE], "max_new_tokens must be from 0 to"),
    (["--max-new-tokens", "-1"], "max_new_tokens must be from 0 to"),
    (["--num-samples", "0"], f"num_samples must be from 1 to {MAX_SEQUENCES:,}"),
    (["--num-samples", HUGE], f"num_samples must be from 1 to {MAX_SEQUENCES:,}"),
    (["--seed", HUGE], f"seed must be a whole number from 0 to 2**63 - 1, got {HUGE}"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 2**63 - 1, got -1"),
    (["--seed", str(MAX_SEED), "--num-samples", "2"], "seed must be at most 2**63 - 2 for 2"),
])
def test_sample_refuses_hostile_numbers_before_printing_anything(tiny_run, capsys, flags,
                                                                 needle):
    code = main(["sample", str(tiny_run), "--prompt", "ab", "--max-new-tokens", "3", *flags])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == "", captured.err
    assert needle in captured.err and captured.err.count("\n") == 1


def test_the_largest_seeds_sample(tiny_run, capsys):
    assert main(["sample", str(tiny_run), "--prompt", "ab", "--max-new-tokens", "3",
                 "--seed", str(MAX_SEED - 1), "--num-samples", "2"]) == 0
    assert capsys.readouterr().out.count("\n---\n") == 1


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.integers(), st.integers(-(2**80), 2**80), st.sampled_from([True, 1.0])))
def test_a_seed_is_refused_or_seeds_a_generator(seed):
    try:
        s = SamplingSettings(seed=seed)
    except ConfigError as e:
        assert "seed must be a whole number from 0 to 2**63 - 1" in str(e)
        assert isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
        return
    s.generator("cpu")  # no overflow inside torch


# --- estimate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needle"), [
    (["--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["--gpus", "-1"], "--gpus must be >= 1, got -1"),
    (["--corpus-chars", "-1"], "--corpus-chars must be >= 1, got -1"),
    (["--corpus-chars", "0"], "--corpus-chars must be >= 1, got 0"),
    (["--vocab-size", "0"], "--vocab-size must be >= 1, got 0"),
    (["--vocab-size", HUGE], "model.vocab_size is 99,999,999,999,999,999,999,999, more than"),
    (["--n-layer", "100000", "--n-embd", "100000"], "model.n_layer is 100,000, more than"),
    (["--mfu", "nan"], "--mfu must be in (0, 1], got nan"),
])
def test_estimate_refuses_hostile_numbers(capsys, flags, needle):
    assert needle in refused(capsys, "estimate", *flags)


def test_estimate_uses_the_numbers_given_and_counts_a_deep_model_at_once(capsys):
    assert main(["estimate", "--corpus-chars", "1", "--vocab-size", "7"]) == 0
    out = capsys.readouterr().out
    assert "vocab 7" in out and "one epoch of 1 characters" in out
    # 1,024 blocks built one by one, even on the meta device, took 25 s (a test's timeout)
    assert main(["estimate", "--n-layer", "1024", "--n-embd", "64", "--n-head", "2"]) == 0
    assert "1024 layers" in capsys.readouterr().out


@pytest.mark.parametrize("model", [{"n_layer": 3}, {"n_layer": 5, "value_embeds": True},
                                   {"arch": "bigram"}, {"n_layer": 2, "pos_emb": "rope"}])
def test_estimated_parameters_are_those_of_the_whole_model(model):
    from chargpt.config.schema import Config, apply_overrides
    from chargpt.model.build import build_model
    from chargpt.model.flops import estimate

    cfg = apply_overrides(Config(), {"model": {"vocab_size": 65, **model}}, "test")
    with torch.device("meta"):
        whole = build_model(cfg.model)
    matmul = sum(m.weight.numel() for m in whole.modules() if isinstance(m, torch.nn.Linear))
    e = estimate(cfg)
    assert (e.params, e.matmul_params) == (whole.num_params(), matmul)


# --- ladder -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needle"), [
    (["--seconds", "inf"], "--seconds must be a finite number > 0, got inf"),
    (["--seconds", "nan"], "--seconds must be a finite number > 0, got nan"),
    (["--seed", HUGE], f"--seed must be a whole number from 0 to 2**63 - 1, got {HUGE}"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 2**63 - 1, got -1"),
    (["--seed", str(MAX_SEED), "--seeds", "2"], "--seed must be at most 2**63 - 2 for 2 seeds"),
])
def test_ladder_refuses_hostile_numbers_before_training(capsys, tmp_path, flags, needle):
    line = refused(capsys, "ladder", "--rungs", "bigram", "--out", str(tmp_path / "l"), *flags)
    assert needle in line and not (tmp_path / "l").exists()


# --- hints name only the command's own flags --------------------------------------------------


def test_eval_hint_names_only_evals_unknown_policies(tiny_run, capsys, tmp_path):
    text = tmp_path / "unk.txt"
    text.write_text("hello \u00e9 world \u20ac\n", encoding="utf-8")
    line = refused(capsys, "eval", str(tiny_run), "--input", str(text))
    assert "--unknown skip" in line and "replace" not in line  # eval has no replace
    assert main(["eval", str(tiny_run), "--input", str(text), "--unknown", "skip"]) == 0


def test_attention_takes_the_unknown_flag_its_hint_names(tiny_run, capsys, tmp_path):
    out = tmp_path / "a.png"
    line = refused(capsys, "attention", str(tiny_run), "--prompt", "RO\u00e9", "--out", str(out))
    assert "use --unknown skip or --unknown replace" in line
    for policy in ("skip", "replace"):
        assert main(["attention", str(tiny_run), "--prompt", "RO\u00e9", "--out", str(out),
                     "--unknown", policy]) == 0
        assert f"over {2 if policy == 'skip' else 3} characters" in capsys.readouterr().out


# --- a terminal that cannot show every character ----------------------------------------------


def test_sample_to_an_ascii_terminal_escapes_what_it_cannot_show_and_says_so(tiny_run, capsys,
                                                                             monkeypatch):
    import io
    import sys

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    # the prompt is echoed as typed, its unknown characters included
    assert main(["sample", str(tiny_run), "--prompt", "\u00e9 a \u00e9", "--unknown", "skip",
                 "--max-new-tokens", "5", "--seed", "0", "--num-samples", "2"]) == 0
    sys.stdout.flush()
    out = raw.getvalue().decode("ascii")
    assert out.startswith("\\xe9 a \\xe9") and out.count("\\xe9 a \\xe9") == 2
    err = capsys.readouterr().err
    assert err.count("chargpt: warning: stdout's encoding (ascii) cannot show") == 1


def test_train_s_closing_sample_to_an_ascii_terminal_escapes_too(tmp_path, capsys, monkeypatch):
    import io
    import sys

    corpus = tmp_path / "e.txt"
    corpus.write_text("\u00e9\u00e9 a\u00e9\n" * 2000, encoding="utf-8")
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert main(["train", "--input", str(corpus), "--out-dir", str(tmp_path / "run"),
                 "--max-steps", "3", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                 "--block-size", "8", "--eval-iters", "1", "--sample-chars", "60",
                 "--no-progress"]) == 0
    sys.stdout.flush()
    sample = raw.getvalue().decode("ascii").split("---\n", 1)[1]
    assert "\\xe9" in sample  # a corpus of mostly \u00e9: the sample holds some
    assert "cannot show" in capsys.readouterr().err


# --- a pipe -----------------------------------------------------------------------------------


def test_eval_reads_a_pipe_once(tiny_run):
    import subprocess

    from conftest import cli_command

    # the unknown-character check used to read the pipe first, leaving nothing to score
    done = subprocess.run(cli_command("eval", str(tiny_run), "--input", "/dev/stdin"),
                          input="hello there\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "/dev/stdin: loss" in done.stdout and "over 11 predictions" in done.stdout


def test_serve_cannot_allow_more_characters_than_the_loop_generates():
    pytest.importorskip("starlette")
    from chargpt.errors import ChargptError
    from chargpt.serve.api import Limits

    Limits(max_new_tokens=MAX_NEW_TOKENS)
    with pytest.raises(ChargptError, match="max_new_tokens must be at most 1,000,000"):
        Limits(max_new_tokens=MAX_NEW_TOKENS + 1)
