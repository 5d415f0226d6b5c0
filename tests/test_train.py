"""Training: loss goes down, eval lines and files appear, resume is bit-identical, interruptions
(SIGINT, SIGTERM, SIGKILL) lose nothing, and the hot loop does not sync with the host."""

import json
import math
import re
import shutil
import signal
import time

import pytest
from conftest import (
    cli,
    corpus_text,
    ctrl_c_after,
    metrics,
    same_weights,
    tiny_flags,
    write,
    write_corpus,
)
from conftest import tiny_config as base_config

from chargpt import faults
from chargpt.cli.commands import main
from chargpt.config.schema import TrainConfig
from chargpt.data.preparation import prepare
from chargpt.errors import CheckpointError, ConfigError
from chargpt.faults import Faults
from chargpt.runs import checkpoint as ckpt
from chargpt.training.launch import train
from chargpt.training.optim import lr_at


def tiny_config(corpus, out, **train_overrides):
    """The tiny model with dropout, a short warmup and a higher learning rate."""
    train = {"warmup_steps": 5, "lr": 3e-3, "min_lr": 3e-4, **train_overrides}
    return base_config(corpus, out, model={"dropout": 0.1}, **train)


def test_lr_schedule():
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, tc) == pytest.approx(0.1)
    assert lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(110, tc) == pytest.approx(0.1)
    assert lr_at(500, tc) == pytest.approx(0.1)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 120))


def test_train_writes_run_and_learns(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, max_steps=60, eval_interval=20))
    printed = capsys.readouterr().out
    lines = re.findall(
        r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4}), val bpc (\d+\.\d{3}), "
        r"(\d+\.\d)s$", printed, re.M)
    assert [int(m[0]) for m in lines] == [0, 20, 40, 60]
    first_val, last_val = float(lines[0][2]), float(lines[-1][2])
    vocab = len(set(corpus_text(40_000)))
    assert abs(first_val - math.log(vocab)) < 0.3  # initialised near a uniform guess
    assert last_val < first_val - 0.8
    assert float(lines[-1][3]) == pytest.approx(float(lines[-1][2]) / math.log(2), abs=2e-3)
    assert "M parameters" in printed
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "last/model.safetensors",
                 "best/model.safetensors", "data/train.npy", "data/vocab.json"):
        assert (out / name).exists(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in metrics(out, "train")] == list(range(5, 61, 5))
    assert [r["step"] for r in metrics(out, "eval")] == [0, 20, 40, 60]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == vocab
    assert result.step == 60 and result.best_val_loss <= last_val + 1e-4
    best_state = json.loads((out / "best" / "state.json").read_text())
    assert best_state["val_loss"] == pytest.approx(result.best_val_loss)


def test_existing_run_dir_is_not_overwritten(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=2, eval_interval=2), quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(corpus, out, max_steps=2), quiet=True)


@pytest.mark.parametrize("stop_at", [13, 20])
def test_resume_is_bit_identical(corpus, tmp_path, stop_at):
    ref, split = tmp_path / "ref", tmp_path / "split"
    train(tiny_config(corpus, ref), quiet=True)
    with ctrl_c_after(stop_at):
        first = train(tiny_config(corpus, split), quiet=True)
    assert first.step == stop_at and first.interrupted_by == signal.SIGINT
    second = train(resume=split, quiet=True)
    assert second.step == 30
    assert same_weights(ref, split)
    assert [(r["step"], r["val_loss"]) for r in metrics(ref, "eval")] == \
        [(r["step"], r["val_loss"]) for r in metrics(split, "eval")]


def test_resume_can_extend_training_but_not_change_the_model(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=10, eval_interval=10), quiet=True)
    result = train(resume=out, overrides={"train": {"max_steps": 20}}, quiet=True)
    assert result.step == 20
    with pytest.raises(ConfigError, match="cannot change model.n_layer"):
        train(resume=out, overrides={"model": {"n_layer": 3}}, quiet=True)


def test_a_failed_resume_leaves_the_run_unchanged(corpus, tmp_path):
    # The run's config.json once changed before the resume knew it could go ahead.
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=10, eval_interval=10), quiet=True)
    config = (out / "config.json").read_bytes()
    more_steps = {"train": {"max_steps": 20}}
    # a foreign vocabulary, put in by hand: prepare itself refuses to replace a run's data
    prepare(write(tmp_path / "other.txt", "xyz " * 500), tmp_path / "other")
    shutil.rmtree(out / "data")
    shutil.move(tmp_path / "other", out / "data")
    with pytest.raises(CheckpointError, match="different vocabularies"):
        train(resume=out, overrides=more_steps, quiet=True)
    assert (out / "config.json").read_bytes() == config
    shutil.rmtree(out / "last")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(resume=out, overrides=more_steps, quiet=True)
    assert (out / "config.json").read_bytes() == config


def test_no_host_sync_per_step(corpus, tmp_path, item_calls):
    train(tiny_config(corpus, tmp_path / "run", max_steps=40, log_interval=20,
                      eval_interval=40), quiet=True)
    # 2 log steps + 2 evals (step 0 and 40) x 2 splits; one .item() per step would be 40+.
    assert item_calls["n"] <= 2 + 4 + 2


def _train_args(corpus, out, steps=400):
    return ["train", "--input", str(corpus), "--out", str(out),
            *tiny_flags(dropout=0.1, max_steps=steps, eval_interval=25, sample_chars=0,
                        warmup_steps=5)]


def _wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = metrics(out)
        if rows and max(r["step"] for r in rows) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("training did not progress")


SIGNAL_STEPS = 120


@pytest.fixture(scope="module")
def reference_cli_run(tmp_path_factory):
    """An uninterrupted CLI run that the interrupted ones must reproduce exactly."""
    root = tmp_path_factory.mktemp("signals")
    corpus = write_corpus(root)
    done = cli(*_train_args(corpus, root / "ref", SIGNAL_STEPS))
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    return corpus, root / "ref"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_cli_run_resumes_to_identical_weights(reference_cli_run, tmp_path, sig):
    corpus, ref = reference_cli_run
    cut = tmp_path / "cut"
    proc = cli(*_train_args(corpus, cut, SIGNAL_STEPS))
    _wait_for_step(cut, 30, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, err
        assert "checkpoint written" in out
        assert "Traceback" not in err
    resumed = cli("train", "--resume", str(cut))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from step" in out
    assert same_weights(ref, cut)


class CtrlCTwice(Faults):
    """Ctrl-C after step 13, and Ctrl-C again once the checkpoint that stop writes has its files
    written (before its manifest); records every named point reached after that."""

    def __init__(self) -> None:
        super().__init__(interrupt_at_step=13)
        self.second_sent, self.after_second = False, []

    def reached(self, phase: str) -> None:
        if self.second_sent:
            self.after_second.append(phase)
        elif phase == "checkpoint.files" and self.last_step == 13:
            self.second_sent = True
            signal.raise_signal(signal.SIGINT)


def test_a_second_ctrl_c_during_the_checkpoint_write_aborts_at_once(corpus, tmp_path, capsys,
                                                                     monkeypatch):
    run, ref = tmp_path / "run", tmp_path / "ref"
    flags = ["--input", str(corpus), *tiny_flags(sample_chars=0, dropout=0.1)]
    twice = CtrlCTwice()
    monkeypatch.setattr(faults, "_active", twice)
    code = main(["train", *flags, "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 130 and err.splitlines()[-1:] == ["chargpt: interrupted"], err
    # at once: the write went no further (no manifest, no swap) and nothing else ran
    assert twice.second_sent and twice.after_second == []
    assert not (run / "last.tmp" / "manifest.json").exists()
    # the previous checkpoint (step 10) is what a loader and a resume find, and it is intact
    assert ckpt.resolve(run, "last") == run / "last"
    assert ckpt.load_train_state(run / "last").step == 10
    monkeypatch.setattr(faults, "_active", Faults())
    assert main(["sample", str(run), "--checkpoint", "last", "--max-new-tokens", "5",
                 "--no-native"]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    assert main(["train", *flags, "--out", str(ref)]) == 0
    assert same_weights(ref, run)


def test_time_limit_stops_with_a_resumable_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    result = train(tiny_config(corpus, out, max_steps=100_000), time_limit=2.0, quiet=True)
    assert result.step < 100_000
    assert time.perf_counter() - t0 < 60  # it stopped near the limit, not at max_steps
    state = json.loads((out / "last" / "state.json").read_text())
    assert state["step"] == result.step


@pytest.mark.parametrize("fast", [False, True])
def test_a_run_records_the_precision_auto_chose_and_its_resume_keeps_it(corpus, tmp_path,
                                                                        monkeypatch, capsys,
                                                                        fast):
    from chargpt import device

    monkeypatch.setattr(device, "fast_bfloat16", lambda _: fast)
    out = tmp_path / "run"
    train(base_config(corpus, out, max_steps=4, dtype="auto"))
    want = "bfloat16" if fast else "float32"
    assert json.loads((out / "config.json").read_text())["train"]["dtype"] == want
    assert ("cpu, bfloat16" in capsys.readouterr().out) == fast  # the run's first line
    # another machine, or a later rule: the resume trains on in the recorded precision
    monkeypatch.setattr(device, "fast_bfloat16", lambda _: not fast)
    train(resume=out, overrides={"train": {"max_steps": 6}})
    assert json.loads((out / "config.json").read_text())["train"]["dtype"] == want
    assert ("cpu, bfloat16" in capsys.readouterr().out) == fast
    # and so does the same command repeated after a crash (auto-resume): its 'auto' is the
    # value the run already resolved, not a change
    train(base_config(corpus, out, max_steps=8, dtype="auto"), auto_resume=True)
    assert json.loads((out / "config.json").read_text())["train"]["dtype"] == want
    assert ("cpu, bfloat16" in capsys.readouterr().out) == fast
