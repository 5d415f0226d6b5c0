"""Experiment trackers: TensorBoard event files and W&B offline runs, read back and compared
with metrics.jsonl row by row, across an interruption and a resume (and a crash, whose
replayed steps TensorBoard must not show twice); the CLI flag, missing extras and failures."""

import html
import json
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is part of dev")
pytest.importorskip("wandb", reason="the wandb extra is part of dev")

from conftest import cli, ctrl_c_after, one_line_error, tiny_config  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from chargpt.cli.commands import main  # noqa: E402
from chargpt.config.schema import apply_overrides  # noqa: E402
from chargpt.runs.rundir import RunDir  # noqa: E402
from chargpt.training import trackers  # noqa: E402
from chargpt.training.launch import train  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    if SHAKESPEARE.exists():
        p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    else:
        p.write_text("ROMEO: to be or not to be, that is the question.\n" * 800)
    return p


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B with no network and no account: offline mode, settings kept inside tmp_path."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    yield
    wandb.teardown()  # wandb caches settings per process; the next test starts afresh


def logged_rows(run_dir):
    """metrics.jsonl as {(tag, step): value} for the numbers each row holds."""
    out = {}
    for row in RunDir(run_dir).read_metrics():
        for k, v in row.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)):
                out[(f"{row['kind']}/{k}", row["step"])] = float(v)
    return out


# --- TensorBoard ---------------------------------------------------------------------------------


def tensorboard_scalars(run_dir):
    acc = EventAccumulator(str(Path(run_dir) / trackers.TENSORBOARD_DIR),
                           size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert (tag, event.step) not in scalars, f"{tag} logged twice at step {event.step}"
            scalars[(tag, event.step)] = event.value
    texts = {(tag.removesuffix("/text_summary"), e.step): e.tensor_proto.string_val[0].decode()
             for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag)}
    return scalars, texts


def assert_mirrors_metrics(scalars, run_dir):
    expected = logged_rows(run_dir)
    assert set(scalars) == set(expected)
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key  # event files hold float32


def test_tensorboard_mirrors_metrics_across_a_resume(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(corpus, run, max_steps=30, log_to="tensorboard")
    with ctrl_c_after(15):
        train(cfg, quiet=True)
    first, _ = tensorboard_scalars(run)
    assert max(step for _, step in first) == 15
    train(resume=run, quiet=True)
    scalars, _ = tensorboard_scalars(run)
    assert_mirrors_metrics(scalars, run)
    steps = sorted(step for tag, step in scalars if tag == "train/loss")
    assert steps == [5, 10, 15, 20, 25, 30]  # one series, continued
    assert {"train/loss", "train/lr", "train/tok_per_s", "eval/val_loss",
            "eval/val_bpc"} <= {tag for tag, _ in scalars}
    for key in first:  # what the first process logged is still there
        assert scalars[key] == first[key]


def test_tensorboard_drops_steps_a_crashed_process_logged_after_its_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    flags = ["train", "--input", str(corpus), "--out", str(run), "--n-layer", "2", "--n-head",
             "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--max-steps",
             "30", "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "5",
             "--sample-chars", "0", "--no-progress", "--log-to", "tensorboard"]
    proc = cli(*flags, faults=["--exit-at-step", "17"])
    proc.wait(timeout=300)
    assert proc.returncode == 17, proc.stderr.read()  # died after logging step 15, checkpoint at 10
    crashed, _ = tensorboard_scalars(run)
    assert ("train/loss", 15) in crashed
    assert [r["step"] for r in RunDir(run).read_metrics() if r["kind"] == "train"] == [5, 10, 15]
    train(resume=run, quiet=True)
    scalars, _ = tensorboard_scalars(run)  # asserts no step appears twice
    assert_mirrors_metrics(scalars, run)


def test_a_resumed_event_file_sorts_after_one_opened_in_the_same_second(tmp_path):
    # The reader applies a purge only to files that sort before the purging one; a file from
    # this same second with a larger host/pid name would otherwise sort last and keep its steps.
    log_dir = tmp_path / "run" / trackers.TENSORBOARD_DIR
    log_dir.mkdir(parents=True)
    planted = f"events.out.tfevents.{int(time.time()):010d}.~crashed.99999999.0"
    (log_dir / planted).write_bytes(b"")
    tracker = trackers.TensorBoardTracker(tmp_path / "run", start_step=10)
    tracker.close()
    names = sorted(p.name for p in log_dir.iterdir())
    assert len(names) == 2 and names[-1] != planted


# --- Weights & Biases (offline) ----------------------------------------------------------------


def wandb_records(path):
    """The records of a .wandb file: W&B's protobuf `Record`s in LevelDB's log framing (32 KiB
    blocks; each chunk a 7-byte header: CRC, length, FULL/FIRST/MIDDLE/LAST) after a 7-byte file
    header. wandb has no public reader for offline runs (wandb/wandb#1308)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_dir):
    """(run ids, {(key, step): value}) over every segment (one per process) of the run."""
    import wandb

    wandb.teardown()  # wandb-core may still be writing after finish(); shutting it down flushes
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, "no offline W&B run written"
    ids, history = [], {}
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
            elif kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                       for i in record.history.item}
                for key, value in row.items():
                    if not key.startswith("_"):
                        assert (key, row["_step"]) not in history, key
                        history[(key, row["_step"])] = value
    return ids, history


def test_wandb_offline_run_mirrors_metrics_across_a_resume(corpus, tmp_path, wandb_offline):
    run = tmp_path / "run"
    with ctrl_c_after(15):
        train(tiny_config(corpus, run, max_steps=30, log_to="wandb"), quiet=True)
    run_id = (run / trackers.WANDB_ID_FILE).read_text().strip()
    train(resume=run, quiet=True)
    ids, history = wandb_history(run)
    assert ids == [run_id, run_id]  # both processes logged to the same W&B run
    assert history == pytest.approx(logged_rows(run))
    assert sorted(s for k, s in history if k == "train/loss") == [5, 10, 15, 20, 25, 30]


def test_wandb_logs_offline_without_an_api_key(corpus, tmp_path, wandb_offline, monkeypatch,
                                               capsys):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))  # no credentials anywhere
    run = tmp_path / "run"
    train(tiny_config(corpus, run, max_steps=10, log_to="wandb"))
    assert "wandb: no API key set up; logging offline" in capsys.readouterr().out
    _, history = wandb_history(run)
    assert history == pytest.approx(logged_rows(run))


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_logs_to_both_trackers_including_the_final_sample(corpus, tmp_path, wandb_offline,
                                                              capsys):
    run = tmp_path / "run"
    code = main(["train", "--input", str(corpus), "--out", str(run), "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                 "--max-steps", "10", "--eval-interval", "10", "--eval-iters", "2",
                 "--log-interval", "5", "--sample-chars", "30", "--no-progress",
                 "--log-to", "tensorboard", "--log-to", "wandb"])
    out = capsys.readouterr().out
    assert code == 0
    header, rest = out.split(" ---\n", 1)
    step = int(header.rsplit("(step ", 1)[1].split(",")[0])
    sample = rest[:30]
    assert json.loads((run / "config.json").read_text())["train"]["log_to"] == "tensorboard,wandb"
    scalars, texts = tensorboard_scalars(run)
    assert_mirrors_metrics(scalars, run)
    assert texts == {("sample/text", step): "    " + sample.replace("\n", "\n    ")}
    _, history = wandb_history(run)
    html_file = history.pop(("sample/text/path", step))
    numbers = {k: v for k, v in history.items() if not k[0].startswith("sample/")}
    assert numbers == pytest.approx(logged_rows(run))
    page = next((run / "wandb").glob(f"offline-run-*/files/{html_file}")).read_text()
    assert page == f"<pre>{html.escape(sample)}</pre>"


def test_unknown_tracker_is_a_one_line_error(corpus, tmp_path, capsys):
    code = main(["train", "--input", str(corpus), "--out", str(tmp_path / "run"),
                 "--log-to", "tensorboard,neptune"])
    assert "unknown tracker 'neptune'" in one_line_error(capsys, code)


def test_missing_extra_is_a_one_line_error_before_anything_is_written(corpus, tmp_path, capsys,
                                                                      monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    run = tmp_path / "run"
    code = main(["train", "--input", str(corpus), "--out", str(run), "--log-to", "wandb"])
    line = one_line_error(capsys, code)
    assert "pip install 'chargpt[wandb]'" in line
    assert not run.exists()


def test_a_failing_tracker_is_switched_off_and_training_goes_on(corpus, tmp_path, capsys,
                                                                monkeypatch):
    calls = []

    def broken(self, row):
        calls.append(row["step"])
        raise OSError("disk full")

    monkeypatch.setattr(trackers.TensorBoardTracker, "log", broken)
    run = tmp_path / "run"
    result = train(tiny_config(corpus, run, max_steps=20, log_to="tensorboard"))
    assert result.step == 20 and calls == [0]  # tried once, then off
    assert ("chargpt: warning: tensorboard logging failed (disk full); continuing with "
            "metrics.jsonl only\n") in capsys.readouterr().err
    rows = RunDir(run).read_metrics()
    assert [r["step"] for r in rows if r["kind"] == "train"] == [5, 10, 15, 20]


def test_only_rank_zero_opens_trackers(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = apply_overrides(tiny_config(corpus, run), {"train": {"log_to": "tensorboard,wandb"}},
                          "test")
    assert not trackers.open_trackers(cfg, run, start_step=0, enabled=False)
    assert not list(run.iterdir())
