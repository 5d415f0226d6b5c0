"""Checkpoints: round trip, manifest checks, recovery at every point of the directory swap,
and a full disk that leaves the previous checkpoint intact."""

import errno
import json
import os
import shutil

import pytest
import torch

from chargpt.errors import CheckpointError
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.trainstate import TrainState


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 4, bias=False)
        self.b.weight = torch.nn.Parameter(self.a.weight.t().contiguous())


def _data(step, model=None):
    opt = None
    if model is not None:
        o = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.a.weight.sum().backward()
        o.step()
        opt = o.state_dict()
    state = TrainState(step=step, optimizer=opt, cpu_rng=[torch.get_rng_state()])
    return ckpt.CheckpointData(config={"c": 1}, vocab={"chars": ["a"]}, state=state)


def _step(path):
    return json.loads((path / ckpt.STATE_FILE).read_text())["step"]


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    m = Tiny()
    data = _data(7, m)
    path = ckpt.save(tmp_path, "last", m, data)
    assert ckpt.resolve(tmp_path, "last") == path
    m2 = Tiny()
    ckpt.load_model_tensors(m2, path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    state = ckpt.load_train_state(path, resumable=True)
    assert state.step == 7 and torch.equal(state.cpu_rng[0], data.state.cpu_rng[0])
    opt = state.optimizer
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    o2.load_state_dict(opt)  # accepts what was saved
    ref = data.state.optimizer["state"]
    for idx, per in opt["state"].items():
        for key, value in per.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ref[idx][key]))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))


def test_overwrite_keeps_one_directory(tmp_path):
    m = Tiny()
    for step in range(3):
        ckpt.save(tmp_path, "last", m, _data(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert _step(tmp_path / "last") == 2


def test_bit_flip_and_truncation_are_detected(tmp_path):
    m = Tiny()
    path = ckpt.save(tmp_path, "last", m, _data(1))
    weights = path / ckpt.MODEL_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its manifest "
                       r"\(sha256 mismatch"):
        ckpt.verify(path)
    weights.write_bytes(bytes(raw[:-10]))
    n = len(raw)
    with pytest.raises(CheckpointError, match=f"model.safetensors is truncated: {n - 10:,} "
                       f"bytes where its manifest says {n:,}"):
        ckpt.verify(path)
    weights.write_bytes(bytes(raw) + b"x")
    with pytest.raises(CheckpointError, match=f"has {n + 1:,} bytes where its manifest says"):
        ckpt.verify(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing \(its manifest"):
        ckpt.verify(path)
    assert ckpt.resolve(tmp_path, "last") is None


@pytest.mark.parametrize("files, says", [
    ({"model.safetensors": 5}, "the entry of model.safetensors has no sha256 and size"),
    ({"model.safetensors": {"sha256": "0", "bytes": True}}, "has no sha256 and size"),
    ({"../config.json": {"sha256": "0", "bytes": 1}}, "lists '../config.json', which is not"),
    ({}, "does not list model.safetensors"),
    ([], "has no list of files"),
], ids=["entry", "bool size", "outside", "empty", "not a table"])
def test_a_malformed_manifest_is_one_line(tmp_path, files, says):
    path = ckpt.save(tmp_path, "last", Tiny(), _data(1))
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    if isinstance(files, dict) and files:
        manifest["files"].update(files)
    else:
        manifest["files"] = files
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="^[^\n]*$") as e:
        ckpt.verify(path)
    assert says in str(e.value)


def test_missing_manifest_and_foreign_directory(tmp_path):
    m = Tiny()
    path = ckpt.save(tmp_path, "last", m, _data(1))
    (path / ckpt.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.verify(path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / ckpt.MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a chargpt checkpoint"):
        ckpt.verify(foreign)


def test_weights_for_another_shape_are_refused(tmp_path):
    path = ckpt.save(tmp_path, "last", Tiny(), _data(1))
    other = torch.nn.Linear(5, 5)
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.load_model_tensors(other, path)


@pytest.mark.parametrize("crash_point", ["after_tmp_written", "after_first_rename"])
def test_recovery_from_a_crash_inside_the_swap(tmp_path, monkeypatch, crash_point):
    m = Tiny()
    ckpt.save(tmp_path, "last", m, _data(1))
    real_replace = os.replace
    calls = []

    def crashing_replace(src, dst):
        calls.append((src, dst))
        if crash_point == "after_tmp_written" or len(calls) == 2:
            raise SystemExit("simulated kill")  # not an OSError: nothing cleans up
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crashing_replace)
    with pytest.raises(SystemExit):
        ckpt.save(tmp_path, "last", m, _data(2))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    found = ckpt.resolve(tmp_path, "last")
    assert found is not None
    # The new checkpoint was complete before any rename, so recovery may pick it; the old one
    # is the fallback. Either way, it is a complete, verified checkpoint.
    assert _step(found) == (2 if crash_point == "after_first_rename" else 1)
    ckpt.save(tmp_path, "last", m, _data(3))  # and the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert _step(tmp_path / "last") == 3


def test_torn_tmp_directory_is_ignored(tmp_path):
    m = Tiny()
    ckpt.save(tmp_path, "last", m, _data(1))
    torn = tmp_path / "last.tmp"
    shutil.copytree(tmp_path / "last", torn)
    (torn / ckpt.MANIFEST).unlink()  # killed before the manifest was written
    assert ckpt.resolve(tmp_path, "last") == tmp_path / "last"
    shutil.rmtree(tmp_path / "last")
    assert ckpt.resolve(tmp_path, "last") is None  # a torn directory is never taken


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = Tiny()
    ckpt.save(tmp_path, "last", m, _data(1))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(tmp_path, "last", m, _data(2))
    assert "No space left on device" in str(e.value)
    assert "previous checkpoint is intact" in str(e.value)
    assert "\n" not in str(e.value)
    assert _step(ckpt.resolve(tmp_path, "last")) == 1
    assert not (tmp_path / "last.tmp").exists()
