"""A full disk (and any other write error) while training or preparing: one line that says what
could not be written and why, the last good checkpoint intact and named, and how to go on;
`--resume` then ends where an undisturbed run ends. A loss curve that cannot be drawn costs one
warning, not the run. First on a real, small file system (a tmpfs, where the test may mount
one), then with ENOSPC injected at each place training writes."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import same_weights, tiny_flags, write_corpus

import chargpt.plots as plots_mod
import chargpt.runs.checkpoint as ckpt_mod
import chargpt.runs.rundir as rundir_mod
from chargpt.cli.commands import main
from chargpt.data.preparation import prepare
from chargpt.errors import DataError

FLAGS = tiny_flags(max_steps=30, eval_interval=10, sample_chars=0)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def train(data: Path, out: Path) -> int:
    return main(["train", "--data-dir", str(data), "--out", str(out), *FLAGS])


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def full_disk_error(line: str, run: Path, what: str) -> int:
    """Check the one error line and return the step it says training continues from."""
    pattern = (rf"chargpt: error: could not write {re.escape(what)}: No space left on device; "
               rf"the last good checkpoint is {re.escape(str(run / 'last'))} \(step (\d+)\), "
               rf"intact; once there is space, `chargpt train --resume {re.escape(str(run))}` "
               r"continues from step (\d+)")
    match = re.fullmatch(pattern, line)
    assert match and match[1] == match[2], line
    step = int(match[1])
    assert json.loads((run / "last" / "state.json").read_text())["step"] == step
    ckpt_mod.verify(run / "last")
    assert not list(run.glob("*.tmp")), "a failed save left its temporary directory"
    return step


@pytest.fixture
def data(tiny_run) -> Path:
    return tiny_run / "data"


@pytest.fixture
def reference(data, tmp_path_factory) -> Path:
    """The same run, undisturbed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(data, out) == 0
    return out


# --- a real small file system ---------------------------------------------------------------


def du(path: Path) -> int:
    """Bytes `path` takes on a file system with 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path, tiny_run):
    """A tmpfs with room for the tiny run's first checkpoints, its loss curve and one more best/:
    the second last/ (about twice the size of best/, with the optimizer) does not fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC tests below cover the "
                    "same paths")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    size = (2 * du(tiny_run / "best") + du(tiny_run / "last") + du(tiny_run / "loss_curve.png")
            + 64 * 1024)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or mount.returncode}); "
                    "the injected-ENOSPC tests below cover the same paths")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_file_system_stops_training_with_one_line_and_resume_finishes_it(
        small_disk, data, reference, capsys):
    run = small_disk / "run"
    assert train(data, run) == 1
    lines = stderr_lines(capsys)
    for warning in lines[:-1]:  # a loss curve that did not fit: a warning, not the end
        assert warning.startswith(f"chargpt: warning: could not write {run / 'loss_curve.png'}")
    failed = re.search(r"could not write (checkpoint \S+|\S+): ", lines[-1])[1]
    step = full_disk_error(lines[-1], run, failed)
    assert step < 30
    # once there is space, the resume ends exactly where the undisturbed run ended
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(["train", "--resume", str(run)]) == 0
    assert same_weights(run, reference)


def test_prepare_on_a_full_file_system_is_one_line_and_leaves_nothing(small_disk, tmp_path,
                                                                      capsys):
    corpus = write_corpus(tmp_path, 20_000)
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text(encoding="utf-8") * 40, encoding="utf-8")  # ~1.6 MB of ids
    with pytest.raises(DataError, match="No space left on device"):
        prepare(big, small_disk / "data")
    assert list(small_disk.iterdir()) == []
    code = main(["prepare", "--input", str(big), "--out", str(small_disk / "data")])
    lines = stderr_lines(capsys)
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0]


# --- ENOSPC injected where training writes --------------------------------------------------


def test_a_checkpoint_that_cannot_be_written(data, reference, tmp_path, monkeypatch, capsys):
    real, calls = ckpt_mod.save_model, []

    def fails_from_the_third(*args, **kwargs):  # best and last at step 0, then best at 10
        calls.append(1)
        if len(calls) >= 3:
            no_space()
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_model", fails_from_the_third)
    run = tmp_path / "run"
    assert train(data, run) == 1
    [line] = stderr_lines(capsys)
    assert full_disk_error(line, run, f"checkpoint {run / 'best'}") == 0
    monkeypatch.setattr(ckpt_mod, "save_model", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert same_weights(run, reference)


def test_a_safetensors_write_error_is_a_full_disk(data, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def rust_no_space(*args, **kwargs):  # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    run = tmp_path / "run"
    monkeypatch.setattr(ckpt_mod, "save_file", rust_no_space)  # optimizer.safetensors of last/
    assert train(data, run) == 1
    [line] = stderr_lines(capsys)
    assert line == (f"chargpt: error: could not write checkpoint {run / 'last'}: No space left "
                    "on device; no checkpoint to resume from has been written yet; start the run "
                    "again once there is space")
    assert not (run / "last").exists() and not (run / "last.tmp").exists()


def test_a_metrics_row_that_cannot_be_written(data, tmp_path, monkeypatch, capsys):
    real = rundir_mod.RunDir.append_metrics

    def fails_after_step_10(self, row):
        if row["step"] > 10:
            no_space()
        real(self, row)

    monkeypatch.setattr(rundir_mod.RunDir, "append_metrics", fails_after_step_10)
    run = tmp_path / "run"
    assert train(data, run) == 1
    [line] = stderr_lines(capsys)
    assert full_disk_error(line, run, str(run / "metrics.jsonl")) == 10


def test_a_loss_curve_that_cannot_be_written_costs_one_warning(data, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(plots_mod, "atomic_write", no_space)
    run = tmp_path / "run"
    assert train(data, run) == 0
    [warning] = stderr_lines(capsys)  # four evaluations, one warning
    assert warning == (f"chargpt: warning: could not write {run / 'loss_curve.png'}: No space "
                       "left on device; training goes on (metrics.jsonl keeps every number; the "
                       "next curve that can be written replaces it)")
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 30


def test_a_config_that_cannot_be_written(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir_mod, "atomic_write_text", no_space)
    run = tmp_path / "run"
    assert train(data, run) == 1
    [line] = stderr_lines(capsys)
    assert line == (f"chargpt: error: could not write {run / 'config.json'}: No space left on "
                    "device; the file is as it was")
