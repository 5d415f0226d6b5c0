"""DDP through torchrun on CPU (gloo): two processes must train exactly like one process with
twice the gradient accumulation, to float tolerance, only rank 0 writes, the ranks agree on a
stop that only one of them was sent, and a rank that cannot join exits with torchrun's retry
status."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import cli_command, metrics, tiny_flags, write_corpus
from safetensors.torch import load_file


def flags(max_steps: int = 30) -> list[str]:
    return tiny_flags(dropout=0.0, max_steps=max_steps, eval_iters=4, sample_chars=0,
                      warmup_steps=5, lr=3e-3, min_lr=3e-4)


def run(cmd, check=True, timeout="60", **kw):
    # A collective waiting on a rank that went its own way fails after 60 s, not 30 minutes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CHARGPT_DIST_TIMEOUT": timeout}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)
    except subprocess.TimeoutExpired as e:  # say where it stood, not only that it timed out
        tail = [(x or b"").decode(errors="replace")[-1500:] for x in (e.stdout, e.stderr)]
        pytest.fail(f"{cmd[-12:]} timed out; stdout ends:\n{tail[0]}\nstderr ends:\n{tail[1]}")
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def torchrun(nproc, *args, faults=None, check=True, worker=None, timeout="60"):
    worker = worker or cli_command(*args, faults=faults)[1:]  # torchrun starts the Python
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *worker], check=check, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_corpus(tmp)
    single, ddp = tmp / "single", tmp / "ddp"
    run([sys.executable, "-m", "chargpt.cli.commands", "train", "--input", str(data), "--out",
         str(single), "--grad-accum", "2", *flags()])
    out = torchrun(2, "train", "--input", str(data), "--out", str(ddp), "--grad-accum", "1",
                   *flags())
    return single, ddp, out


def test_two_processes_match_one_with_twice_the_accumulation(runs):
    single, ddp, _ = runs
    a, b = metrics(single, "train"), metrics(ddp, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(5, 31, 5))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-5)
    ea, eb = metrics(single, "eval"), metrics(ddp, "eval")
    for ra, rb in zip(ea, eb, strict=True):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4, abs=1e-5)
    wa = load_file(str(single / "last" / "model.safetensors"))
    wb = load_file(str(ddp / "last" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)
    assert abs(a[0]["loss"] - a[-1]["loss"]) > 0.3  # it did learn something


def test_only_rank_zero_prints_and_writes(runs):
    _, ddp, out = runs
    assert out.stdout.count("step 30: train loss") == 1  # not once per rank
    assert "x 2 processes" in out.stdout
    state = json.loads((ddp / "last" / "state.json").read_text())
    assert state["world_size"] == 2
    rng = load_file(str(ddp / "last" / "rng.safetensors"))
    assert "torch_cpu" in rng and "torch_cpu.1" in rng  # each rank's RNG, for exact resume
    assert not any(p.name.endswith((".tmp", ".old")) for p in ddp.iterdir())


def test_ddp_resume_is_exact(tmp_path, runs):
    _, ddp_ref, _ = runs
    data = write_corpus(tmp_path)
    cut = tmp_path / "cut"
    # Stop after 15 steps of the reference's 30-step schedule, then resume to 30.
    torchrun(2, "train", "--input", str(data), "--out", str(cut), "--grad-accum", "1",
             *flags(max_steps=15), "--lr-decay-steps", "30")
    torchrun(2, "train", "--resume", str(cut), "--max-steps", "30")
    wa = load_file(str(ddp_ref / "last" / "model.safetensors"))
    wb = load_file(str(cut / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_ranks_agree_on_a_stop_only_one_of_them_was_sent(tmp_path):
    # SIGINT reaches rank 1 alone, right after step 12. Had it stopped by itself, rank 0 would
    # wait in the next step's all-reduce for a rank gathering RNG states for a checkpoint.
    data = write_corpus(tmp_path)
    out = tmp_path / "run"
    proc = torchrun(2, "train", "--input", str(data), "--out", str(out), "--grad-accum", "1",
                    *flags(), faults=["--interrupt-at-step", "12", "--rank", "1"], check=False)
    # both stopped at the next log step, where they agree, and the checkpoint holds both ranks
    state = json.loads((out / "last" / "state.json").read_text())
    assert (state["step"], state["world_size"]) == (15, 2), proc.stderr[-3000:]
    assert max(r["step"] for r in metrics(out)) == 15
    # the signalled rank exits as after a Ctrl-C; torchrun reports it
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1 .*\n\s*exitcode\s*:\s*130", proc.stderr), proc.stderr[-3000:]


HUNG_LEAVE = """
import sys, time
import torch.distributed
torch.distributed.destroy_process_group = lambda *a, **k: time.sleep(600)  # never returns
from chargpt.cli.commands import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_cannot_leave_the_group_exits_once_its_work_is_written(tmp_path):
    # Torch hanging in its goodbye (once seen in CI: 300 s with a 60 s timeout) must not hold a
    # finished run: after the timeout each rank says so in one line and exits with success.
    script = tmp_path / "hung_leave.py"
    script.write_text(HUNG_LEAVE)
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = torchrun(2, worker=[str(script), "train", "--input", str(write_corpus(tmp_path)),
                               "--out", str(out), "--grad-accum", "1", *flags(max_steps=10)],
                    timeout="8")
    assert time.monotonic() - t0 < 120  # the watchdog, not the test's timeout
    warned = [line for line in proc.stderr.splitlines() if "could not leave" in line]
    assert sorted(warned) == [
        f"chargpt: warning: rank {r} could not leave the process group within 8 s "
        "(CHARGPT_DIST_TIMEOUT); its work is complete and written, so it exits"
        for r in (0, 1)], proc.stderr[-3000:]
    state = json.loads((out / "last" / "state.json").read_text())
    assert (state["step"], state["world_size"]) == (10, 2)


HUNG_JOIN = """
import sys, time
import torch.distributed
torch.distributed.init_process_group = lambda *a, **k: time.sleep(600)  # never returns
from chargpt.cli.commands import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_cannot_join_exits_with_status_75(tmp_path):
    # A join that hangs inside torch (gloo has, after an elastic restart, with its own timeout
    # never firing): the watchdog reports it in one line and exits with torchrun's retry status.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CHARGPT_DIST_TIMEOUT": "3"}
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HUNG_JOIN, "train", "--input",
                           str(write_corpus(tmp_path)), "--out", str(out), *flags()],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "chargpt: error: rank 0 could not join the process group within 3 s "
        "(CHARGPT_DIST_TIMEOUT); exiting so that torchrun can restart the job"]
    assert time.monotonic() - t0 < 100  # the watchdog, not the test's timeout
    assert not out.exists()  # it gave up before the run directory was made


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    from chargpt import distributed
    from chargpt.errors import ConfigError

    monkeypatch.setenv("CHARGPT_DIST_TIMEOUT", value)
    with pytest.raises(ConfigError, match="CHARGPT_DIST_TIMEOUT must be"):
        distributed._timeout_seconds()
