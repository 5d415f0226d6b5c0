"""No silent substitution: a damaged checkpoint the user named is refused; one they did not name
is passed over for the other, with one warning line that says what was wrong and what is used
instead. The same rule for sample, eval, attention, export, serve and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import one_line_error, tiny_flags, weights

from chargpt.cli.commands import main
from chargpt.errors import CheckpointError, ConfigError
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.rundir import find_checkpoint

SAMPLE = ["--max-new-tokens", "20", "--seed", "1", "--prompt", "ROMEO:"]


def flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def edit_config(path: Path) -> None:
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["model"]["dropout"] = 0.5  # valid, the same size, and not what the manifest recorded
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# (how the checkpoint is damaged, the file it names, what the message says about it)
DAMAGE = {
    "bit flip": (flip_a_bit, "model.safetensors", "does not match its manifest (sha256"),
    "truncated": (truncate, "model.safetensors", "is truncated: "),
    "config edited": (edit_config, "config.json", "does not match its manifest (sha256"),
    "file missing": (Path.unlink, "vocab.json", "is missing (its manifest lists it)"),
}


def two_lines(capsys) -> tuple[str, str]:
    """(stdout, the one warning line on stderr)."""
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chargpt: warning: "), err
    return out, lines[0]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_best_is_passed_over_with_a_warning_when_none_was_named(
        run_copy, capsys, damage):
    spoil, name, says = DAMAGE[damage]
    spoil(run_copy / "best" / name)
    assert main(["sample", str(run_copy), *SAMPLE]) == 0
    out, warning = two_lines(capsys)
    assert f"{run_copy / 'best' / name} {says}" in warning
    assert warning.endswith(f"; using {run_copy / 'last'} instead")
    assert main(["sample", str(run_copy), *SAMPLE, "--checkpoint", "last"]) == 0
    assert capsys.readouterr().out == out  # what was used is really last/


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_the_user_named_is_refused(run_copy, capsys, damage):
    spoil, name, says = DAMAGE[damage]
    spoil(run_copy / "best" / name)
    line = one_line_error(capsys, main(["sample", str(run_copy), *SAMPLE, "--checkpoint",
                                        "best"]))
    assert line.startswith(f"chargpt: error: {run_copy / 'best' / name} {says}")
    # the checkpoint directory itself, given as the path, is named too
    line = one_line_error(capsys, main(["sample", str(run_copy / "best"), *SAMPLE]))
    assert f"{run_copy / 'best' / name} {says}" in line


def test_both_damaged_is_one_error_naming_both(run_copy, capsys):
    flip_a_bit(run_copy / "best" / "model.safetensors")
    truncate(run_copy / "last" / "model.safetensors")
    line = one_line_error(capsys, main(["sample", str(run_copy), *SAMPLE]))
    assert str(run_copy / "best" / "model.safetensors") in line
    assert str(run_copy / "last" / "model.safetensors") in line
    assert line.endswith(f"{run_copy} has no other complete checkpoint")


def test_a_missing_best_is_no_damage(run_copy, capsys):
    # A run with only last/ (as `chargpt import` writes) uses it without a word.
    shutil.rmtree(run_copy / "best")
    assert main(["sample", str(run_copy), *SAMPLE]) == 0
    assert capsys.readouterr().err == ""
    line = one_line_error(capsys, main(["sample", str(run_copy), *SAMPLE, "--checkpoint",
                                        "best"]))
    assert line == f"chargpt: error: {run_copy} has no best checkpoint"


def test_a_crash_inside_a_save_is_recovered_in_silence(run_copy, capsys):
    # Between save's two renames best/ is gone and best.tmp/ is the complete new checkpoint.
    (run_copy / "best").rename(run_copy / "best.tmp")
    for named in ([], ["--checkpoint", "best"]):
        assert main(["sample", str(run_copy), *SAMPLE, *named]) == 0
        assert capsys.readouterr().err == ""
    assert find_checkpoint(run_copy).path == run_copy / "best.tmp"


def test_find_checkpoint_is_the_one_rule(run_copy):
    assert find_checkpoint(run_copy).path == run_copy / "best"
    assert find_checkpoint(run_copy, "last").path == run_copy / "last"
    assert find_checkpoint(run_copy / "last").path == run_copy / "last"
    assert find_checkpoint(run_copy / "last", "last").path == run_copy / "last"
    with pytest.raises(ConfigError, match="is a checkpoint directory"):
        find_checkpoint(run_copy / "last", "best")
    flip_a_bit(run_copy / "best" / "model.safetensors")
    warnings = []
    assert find_checkpoint(run_copy, warn=warnings.append).path == run_copy / "last"
    assert len(warnings) == 1 and "best/model.safetensors" in warnings[0]
    with pytest.raises(CheckpointError, match="sha256"):
        find_checkpoint(run_copy, "best", warn=warnings.append)
    assert len(warnings) == 1


@pytest.mark.parametrize("command", ["eval", "attention", "export", "serve"])
def test_every_command_follows_the_rule(run_copy, tmp_path, capsys, monkeypatch, command):
    extra = {"eval": [], "attention": ["--prompt", "ROMEO", "--out", str(tmp_path / "a.png")],
             "export": ["--to", "hf", str(tmp_path / "hf")], "serve": ["--port", "0"]}[command]
    if command == "export":
        pytest.importorskip("transformers", reason="the hf extra is part of dev")
    if command == "serve":
        uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is part of dev")
        served = []
        monkeypatch.setattr(uvicorn.Server, "run", lambda server, **kw: served.append(server))
    flip_a_bit(run_copy / "best" / "model.safetensors")
    line = one_line_error(capsys, main([command, str(run_copy), *extra, "--checkpoint", "best"]))
    assert "best/model.safetensors does not match its manifest" in line
    assert main([command, str(run_copy), *extra]) == 0
    _, warning = two_lines(capsys)
    assert warning.endswith(f"; using {run_copy / 'last'} instead")
    if command == "serve":
        assert len(served) == 1


# --- resume ---------------------------------------------------------------------------------


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("how", ["--resume", "--auto-resume"])
def test_resume_refuses_a_damaged_last_with_nothing_else(run_copy, capsys, how):
    flip_a_bit(run_copy / "last" / "optimizer.safetensors")
    before = snapshot(run_copy)
    if how == "--resume":
        argv = ["train", "--resume", str(run_copy), "--max-steps", "30"]
    else:  # the run's own command again, as a restart script would: never a silent new run
        corpus = json.loads((run_copy / "config.json").read_text())["data"]["input"]
        argv = ["train", "--auto-resume", "--input", corpus, "--out", str(run_copy),
                *tiny_flags(max_steps=20, eval_interval=10, sample_chars=0)]
    line = one_line_error(capsys, main(argv))
    assert line.startswith(f"chargpt: error: cannot resume {run_copy}: ")
    assert f"{run_copy / 'last' / 'optimizer.safetensors'} does not match its manifest" in line
    assert snapshot(run_copy) == before


def test_resume_passes_over_a_damaged_last_for_an_intact_leftover(run_copy, capsys):
    # last.old: the previous last/ that a crash left behind; last/ is then damaged on disk.
    shutil.copytree(run_copy / "last", run_copy / "last.old")
    flip_a_bit(run_copy / "last" / "model.safetensors")
    assert main(["train", "--resume", str(run_copy), "--max-steps", "25"]) == 0
    out, warning = two_lines(capsys)
    assert "last/model.safetensors does not match its manifest" in warning
    assert warning.endswith(f"; using {run_copy / 'last.old'} instead")
    assert "resuming from step 20" in out and "step 25:" in out
    assert ckpt.verify(run_copy / "last") and weights(run_copy)  # a fresh last/ was written
