"""The CLI end to end on a tiny corpus, and every bad input as a one-line error with exit != 0."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import corpus_text, one_line_error, tiny_flags

from chargpt.cli.commands import COMMANDS, main
from chargpt.cli.parser import CHECKPOINT_CHOICES, build_parser
from chargpt.runs.rundir import CHECKPOINTS

TINY_FLAGS = tiny_flags(max_steps=40, eval_interval=20, log_interval=10, warmup_steps=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the sample/eval tests."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(30_000), encoding="utf-8")
    run = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", "--input", str(corpus), "--out", str(run), "--sample-chars", "40",
                     *TINY_FLAGS])
    assert code == 0
    (root / "train-output.txt").write_text(printed.getvalue(), encoding="utf-8")
    return run


def test_train_ends_with_a_sample(trained):
    printed = (trained.parent / "train-output.txt").read_text(encoding="utf-8")
    header = f"--- sample from {trained / 'best'} (step 40, seed "
    assert header in printed
    sample = printed.split(header, 1)[1].split("\n", 1)[1]
    text = sample[: sample.index("\nsample more with: ")]
    vocab = set(json.loads((trained / "data" / "vocab.json").read_text(encoding="utf-8"))["chars"])
    assert len(text) == 40 and set(text) <= vocab  # 40 characters, every one the model's
    assert (trained / "best" / "manifest.json").exists()
    assert (trained / "loss_curve.png").exists()


def test_sample_is_reproducible_and_streams_the_prompt(trained, capsys):
    args = ["sample", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "60",
            "--seed", "7", "--temperature", "0.8", "--top-k", "10"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 60 + 1
    assert main([*args[:-6], "--seed", "8"]) == 0
    assert capsys.readouterr().out != first


def test_sample_options(trained, capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("ROMEO", encoding="utf-8")
    # 5 prompt + 10 new characters fit in block_size 16, where cached and recomputed sampling
    # must agree exactly (beyond it the cache keeps a half window, see generation/loop.py).
    assert main(["sample", str(trained), "--prompt-file", str(prompt), "--max-new-tokens", "10",
                 "--num-samples", "2", "--seed", "1", "--temperature", "0", "--no-kv-cache",
                 "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    a, b = out[:-1].split("\n---\n")  # the CLI adds one final newline; samples may end in more
    assert a == b and a.startswith("ROMEO") and len(a) == 15  # greedy: both samples identical
    assert main(["sample", str(trained), "--prompt", "ROMEO", "--max-new-tokens", "10",
                 "--temperature", "0", "--checkpoint", "last"]) == 0
    assert capsys.readouterr().out == a + "\n"
    long_prompt = "ROMEO: " * 20  # longer than block_size 16: cropped, not an error
    assert main(["sample", str(trained), "--prompt", long_prompt, "--max-new-tokens", "5",
                 "--seed", "1"]) == 0


def test_unknown_prompt_characters(trained, capsys):
    code = main(["sample", str(trained), "--prompt", "héllo ☃", "--max-new-tokens", "5"])
    line = one_line_error(capsys, code)
    assert "'☃'" in line and "'é'" in line
    assert main(["sample", str(trained), "--prompt", "héllo ☃", "--max-new-tokens", "5",
                 "--unknown", "skip", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("héllo ☃")


def test_eval_on_val_and_on_a_file(trained, capsys, tmp_path):
    assert main(["eval", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "the val split: loss" in out and "bits/char" in out
    text = tmp_path / "t.txt"
    text.write_text(corpus_text(2000), encoding="utf-8")
    assert main(["eval", str(trained), "--input", str(text)]) == 0
    assert "1,999 predictions" in capsys.readouterr().out


def test_resume_finished_run_with_more_steps(trained, capsys, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    assert main(["train", "--resume", str(run), "--max-steps", "45", "--sample-chars", "0"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 40" in out and "step 45:" in out


def test_prepare_command(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("şğıİ 漢字 🙂\n" * 100, encoding="utf-8")
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "d")]) == 0
    assert "prepared" in capsys.readouterr().out
    meta = json.loads((tmp_path / "d" / "meta.json").read_text(encoding="utf-8"))
    assert meta["train_tokens"] + meta["val_tokens"] == len("şğıİ 漢字 🙂\n") * 100


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b"caf\xe9 au lait\n" * 10, "UTF-8"),
        (b"\x00\x01\x02binary\x00" * 10, "binary"),
    ],
)
def test_bad_corpus(tmp_path, capsys, content, needle):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    code = main(["train", "--input", str(f), "--out", str(tmp_path / "run"), *TINY_FLAGS])
    assert needle in one_line_error(capsys, code)


def test_corpus_shorter_than_context(tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("abcdefghij" * 3, encoding="utf-8")
    code = main(["train", "--input", str(f), "--out", str(tmp_path / "run"), *TINY_FLAGS])
    assert "block_size" in one_line_error(capsys, code)


def test_compile_where_torch_cannot_is_one_line_before_the_run_exists(tmp_path, capsys,
                                                                       monkeypatch):
    """No C++ compiler (inductor's InvalidCxxCompiler, stood in for by a compiled function that
    raises it): `--compile` says so in one line and leaves no run directory behind."""
    from chargpt.model import compiling

    def broken(module, **options):
        def call(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\ndetails")
        return call

    monkeypatch.setattr(compiling, "compiled", broken)
    compiling.check_works.cache_clear()
    try:
        f = tmp_path / "corpus.txt"
        f.write_text(corpus_text(30_000), encoding="utf-8")
        code = main(["train", "--input", str(f), "--out", str(tmp_path / "run"), "--compile",
                     *TINY_FLAGS])
        line = one_line_error(capsys, code)
    finally:
        compiling.check_works.cache_clear()
    assert "No working C++ compiler found" in line and "install a C++ compiler" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, needle, status",
    [
        (["--n-embd", "30", "--n-head", "4"], "divisible", 1),
        (["--block-size", "0"], "block_size must be >= 1", 1),
        (["--val-fraction", "1.5"], "val_fraction", 1),
        (["--val-fraction", "0"], "val_fraction", 1),
        (["--no-such-flag"], "unrecognized arguments", 2),
        (["--n-layer", "two"], "invalid int value", 2),
        (["--norm", "sideways"], "invalid choice", 2),
    ],
)
def test_impossible_configs(tmp_path, capsys, flags, needle, status):
    code = main(["train", "--out", str(tmp_path / "run"), "--input", "x", *flags])
    assert needle in one_line_error(capsys, code, status)


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nn_layers = 3\n")
    code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert "unknown key 'n_layers'" in one_line_error(capsys, code)


def test_missing_and_corrupted_runs(trained, tmp_path, capsys):
    code = main(["sample", str(tmp_path / "nope")])
    assert "does not exist" in one_line_error(capsys, code)
    code = main(["sample", str(tmp_path)])
    assert "no checkpoint" in one_line_error(capsys, code)
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    for name in ("best", "last"):
        weights = bad / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    code = main(["sample", str(bad)])
    line = one_line_error(capsys, code)
    assert f"{bad / 'best' / 'model.safetensors'} is truncated" in line
    assert f"{bad / 'last' / 'model.safetensors'} is truncated" in line
    code = main(["train", "--resume", str(bad)])
    line = one_line_error(capsys, code)
    assert line.startswith(f"chargpt: error: cannot resume {bad}: ")
    assert line.endswith(f"{bad} has no other complete checkpoint")
    shutil.rmtree(bad / "last")
    code = main(["train", "--resume", str(bad)])
    assert "no complete checkpoint to resume from" in one_line_error(capsys, code)


def test_foreign_checkpoint_file(tmp_path, capsys):
    pt = tmp_path / "ckpt.pt"
    pt.write_bytes(b"\x80\x04K\x01.")  # a pickle, as other trainers write
    code = main(["sample", str(pt)])
    assert "not a chargpt run" in one_line_error(capsys, code)


def test_console_script_and_module_entry_points():
    exe = shutil.which("chargpt", path=str(Path(sys.executable).parent))
    assert exe, "the chargpt console script is not installed next to this Python"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("prepare", "train", "sample", "eval", "presets"):
        assert command in out
    help_ = subprocess.run([sys.executable, "-m", "chargpt", "train", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "Number of Transformer blocks." in help_  # field docstrings become --help


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "shakespeare-cpu" in out and "(default)" in out


def test_checkpoint_flag_offers_the_run_directorys_checkpoints():
    # The CLI spells the names out so that `chargpt --help` need not import torch.
    assert CHECKPOINT_CHOICES == CHECKPOINTS


def test_every_subcommand_the_parser_offers_has_a_command():
    # The parser (cli_parser.py) and the commands (cli.py) meet by the subcommand's name.
    subparsers = build_parser()._subparsers._group_actions[0]
    assert set(subparsers.choices) == set(COMMANDS)


def test_warnings_and_errors_are_lines_of_their_own_beside_a_progress_bar(capsys):
    from tqdm import tqdm

    from chargpt.errors import CheckpointError, report, warn

    bar = tqdm(total=10, file=sys.stderr)  # drawn, as on a terminal
    bar.update(3)
    warn("something went on differently")
    report(CheckpointError("something failed"))
    bar.close()
    err = capsys.readouterr().err
    # the bar is cleared first (a carriage return), so each line starts a line of its own
    assert "\rchargpt: warning: something went on differently\n" in err
    assert "\rchargpt: error: something failed\n" in err
    warn("no bar")
    assert capsys.readouterr().err == "chargpt: warning: no bar\n"


def test_a_warning_is_one_write_so_ranks_sharing_stderr_keep_their_lines(monkeypatch):
    from tqdm import tqdm

    from chargpt.errors import warn

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    for with_bar in (False, True):
        err = Recorder()
        monkeypatch.setattr(sys, "stderr", err)
        bar = tqdm(total=10, file=err) if with_bar else None
        err.writes.clear()
        warn("one line")
        lines = [w for w in err.writes if "one line" in w]
        assert lines and all(w.endswith("chargpt: warning: one line\n") for w in lines)
        if bar is not None:
            bar.close()
