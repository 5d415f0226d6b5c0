"""Elastic restarts: under torchrun --max-restarts, a worker that dies mid-run is restarted with
the same command, every rank finds the last complete checkpoint by itself, and training ends
with the weights of an undisturbed run."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli_command, same_weights, tiny_flags

# The tiny model without dropout, evaluated every 20 steps.
TINY = tiny_flags(dropout=0.0, eval_interval=20, sample_chars=0, warmup_steps=5)


def torchrun(*args, faults=None, restarts=0, timeout=600):
    # A collective stuck on a dead peer errors out after 60 s instead of 30 minutes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHARGPT_DIST_TIMEOUT": "60"}
    worker = cli_command(*args, faults=faults)[1:]  # torchrun starts the Python itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", *worker]
    # Own session, so a timeout kills torchrun's workers too instead of orphaning them.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _errors(stderr: str) -> str:
    """The lines that say what went wrong, not torchrun's long tracebacks."""
    keep = [line for line in stderr.splitlines()
            if "chargpt: error" in line or "RuntimeError" in line or "Error:" in line]
    return "\n".join(keep[-15:]) or stderr[-2000:]


def test_elastic_restart_finds_the_last_checkpoint(corpus, tmp_path):
    flags = ["train", "--input", str(corpus), "--auto-resume", *TINY, "--max-steps", "40"]
    ref = torchrun(*flags, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, _errors(ref.stderr)
    t0 = time.time()
    # One kill, one restart: the restarted workers must form a new group at once (chargpt
    # namespaces the rendezvous store by attempt, so they never dial the dead workers).
    hit = torchrun(*flags, "--out", str(tmp_path / "hit"), restarts=1,
                   faults=["--exit-at-step", "27", "--rank", "1"])
    assert hit.returncode == 0, _errors(hit.stderr)
    assert time.time() - t0 < 600
    out = hit.stdout
    assert "resuming from step 20" in out  # rank 1 died after step 27; step 20 was saved
    assert same_weights(tmp_path / "ref", tmp_path / "hit")
