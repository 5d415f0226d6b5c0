"""What `chargpt train` refuses before it spends the run's time, and what it leaves behind when
it fails: a model no loader would open, a model the machine cannot hold, an allocation that
fails anyway, an --out that is a folder of the user's own, and a run that fails before it is
written."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import corpus_text, edit_json, one_line_error, tiny_flags

from chargpt.cli.commands import main
from chargpt.runs import safety
from chargpt.training import launch

FLAGS = tiny_flags(max_steps=2, eval_interval=2, sample_chars=0)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(20_000), encoding="utf-8")
    return path


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if a Trainer (and so the model) is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the check refused it")

    monkeypatch.setattr(launch, "Trainer", refuse)


@pytest.mark.parametrize("flags, needle", [
    (["--mlp-ratio", "65"], "model.mlp_ratio is 65, more than chargpt loads (at most 64)"),
    (["--n-layer", "2000"], "model.n_layer is 2,000, more than chargpt loads (at most 1,024)"),
    (["--n-head", "2048", "--n-embd", "4096"], "model.n_head is 2,048"),
    (["--n-embd", "65540", "--n-head", "2"], "model.n_embd is 65,540"),
])
def test_a_model_past_the_loaders_bounds_is_refused_before_the_run(
        tmp_path, corpus, capsys, never_built, flags, needle):
    out = tmp_path / "run"
    code = main(["train", "--input", str(corpus), "--out", str(out), *FLAGS, *flags])
    line = one_line_error(capsys, code)
    assert needle in line and "could never be sampled or resumed" in line
    assert "hostile" not in line and "--" + line.split("smaller --")[1] in flags
    assert not out.exists()


def test_a_model_larger_than_memory_is_refused_before_it_is_built(
        tmp_path, corpus, capsys, never_built, monkeypatch):
    monkeypatch.setattr(safety, "available_memory", lambda: 1 << 30)  # a 1 GiB machine
    out = tmp_path / "run"
    code = main(["train", "--input", str(corpus), "--out", str(out), *FLAGS,
                 "--n-layer", "1", "--n-embd", "8192", "--n-head", "1"])
    line = one_line_error(capsys, code)
    # 12 x 8192^2 in its block and 2 x 8192 per character of the vocabulary, which is the
    # corpus's: Tiny Shakespeare's where it is here, the stand-in text's elsewhere
    found = re.search(r"cannot train a model of ([\d.]+) M parameters", line)
    assert found and 805 < float(found.group(1)) < 808, line
    assert "1.1 GB available" in line and "choose a smaller model" in line
    assert not out.exists()


def test_a_failed_allocation_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    """The estimate may pass where the allocation fails (another process took the memory):
    torch's CPU allocator's RuntimeError becomes one line, and no half-made run stays."""
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 51539607552 bytes.\n"
                           "second line")

    monkeypatch.setattr(launch, "Trainer", no_memory)
    out = tmp_path / "run"
    code = main(["train", "--input", str(corpus), "--out", str(out), *FLAGS])
    line = one_line_error(capsys, code)
    assert line.startswith("chargpt: error: out of memory building the model (")
    assert "you tried to allocate 51539607552 bytes" in line
    assert not out.exists()


def test_a_failed_allocation_in_a_step_is_one_line_naming_the_checkpoint(
        tmp_path, corpus, capsys, monkeypatch):
    from chargpt.training.trainer import Trainer

    def no_memory(self):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 123 bytes.")

    monkeypatch.setattr(Trainer, "train_step", no_memory)
    out = tmp_path / "run"
    code = main(["train", "--input", str(corpus), "--out", str(out), *FLAGS])
    line = one_line_error(capsys, code)
    assert line.startswith(f"chargpt: error: out of memory in {out} (DefaultCPUAllocator")
    assert f"the last good checkpoint is {out / 'last'} (step 0)" in line


def test_any_other_runtime_error_is_not_called_out_of_memory(tmp_path, corpus, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(launch, "Trainer", broken)
    with pytest.raises(RuntimeError, match="something else"):
        main(["train", "--input", str(corpus), "--out", str(tmp_path / "run"), *FLAGS])


def test_a_run_that_fails_on_its_data_leaves_no_directory(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "a" / "run"
    code = main(["train", "--input", str(empty), "--out", str(out), *FLAGS])
    assert "empty" in one_line_error(capsys, code)
    assert not out.exists()


def test_an_empty_folder_of_the_users_stays_when_the_run_fails(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "mine"
    out.mkdir()
    code = main(["train", "--input", str(empty), "--out", str(out), *FLAGS])
    one_line_error(capsys, code)
    assert out.is_dir()


def test_a_folder_of_the_users_own_files_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n', encoding="utf-8")
    (out / "notes.txt").write_text("mine\n", encoding="utf-8")
    code = main(["train", "--input", str(corpus), "--out", str(out), *FLAGS])
    line = one_line_error(capsys, code)
    assert f"{out} is not empty and holds no chargpt run (notes.txt" in line
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == '{"step": 1, "loss": 1.0}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "notes.txt"]


def test_an_empty_folder_and_a_runs_leftovers_are_trained_in(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    (out / "last.tmp").mkdir(parents=True)  # what a kill in a first checkpoint's save leaves
    (out / ".loss_curve.png.1.ab.tmp").write_bytes(b"")
    assert main(["train", "--input", str(corpus), "--out", str(out), *FLAGS]) == 0
    assert (out / "config.json").is_file() and (out / "last").is_dir()


# --- resume -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run trained to its end (step 4)."""
    root = tmp_path_factory.mktemp("finished")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(20_000), encoding="utf-8")
    run = root / "run"
    assert main(["train", "--input", str(corpus), "--out", str(run),
                 *tiny_flags(max_steps=4, eval_interval=2, sample_chars=0)]) == 0
    return run


def snapshot(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("steps", ["2", "4"])
def test_resuming_to_a_step_the_run_has_passed_is_refused_untouched(finished, capsys, steps):
    before = snapshot(finished)
    code = main(["train", "--resume", str(finished), "--max-steps", steps])
    line = one_line_error(capsys, code)
    assert f"{finished} is already at step 4; --max-steps {steps} would train no further" in line
    assert snapshot(finished) == before


def test_resume_says_what_it_was_given(finished, tmp_path, capsys):
    corpus = finished.parent / "corpus.txt"
    code = main(["train", "--resume", str(corpus)])
    assert f"{corpus} is a file, not a run directory" in one_line_error(capsys, code)
    code = main(["train", "--resume", str(finished / "best")])
    line = one_line_error(capsys, code)
    assert f"{finished / 'best'} is a checkpoint directory" in line
    assert line.endswith(f"--resume {finished}")
    lost = tmp_path / "lost"
    shutil.copytree(finished, lost)
    (lost / "config.json").unlink()
    code = main(["train", "--resume", str(lost)])
    line = one_line_error(capsys, code)
    assert f"{lost} has lost its config.json, though its checkpoints remain (best, last)" in line
    assert f"copy {lost / 'last' / 'config.json'} to {lost / 'config.json'}" in line


# --- a time budget and a step count -----------------------------------------------------------


def test_resuming_a_budget_run_not_yet_planned_refuses_max_steps(finished, tmp_path, capsys):
    """A budget run stopped before its first plan plans when resumed: a --max-steps would be
    replaced by that plan."""
    run = tmp_path / "budget"
    shutil.copytree(finished, run)
    edit_json(run / "config.json", lambda cfg: cfg["train"].update(time_budget="60s"))
    before = snapshot(run)
    code = main(["train", "--resume", str(run), "--max-steps", "50"])
    assert "max_steps and the time budget (60s)" in one_line_error(capsys, code)
    assert snapshot(run) == before
