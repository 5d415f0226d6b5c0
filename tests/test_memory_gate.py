"""The memory gate's figure: the machine's MemAvailable, or less where a memory cgroup (a
container's limit, v2 or v1, on the process's own cgroup or one above it) allows less. Each
case is a fake /proc and /sys/fs/cgroup written here, the paths pointed at them."""

from __future__ import annotations

from pathlib import Path

import pytest

from chargpt.config.schema import ModelConfig
from chargpt.errors import CheckpointError
from chargpt.runs import safety

GiB, MiB = 1 << 30, 1 << 20
V1_UNLIMITED = 9223372036854771712  # what v1 writes for no limit


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake machine with 8 GiB available; returns the cgroup mount root to fill in."""
    write(tmp_path / "meminfo", f"MemTotal: {16 * GiB // 1024} kB\n"
                                f"MemAvailable: {8 * GiB // 1024} kB\n")
    monkeypatch.setattr(safety, "PROC_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(safety, "PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(safety, "CGROUP_ROOT", tmp_path / "sys")
    return tmp_path


def v2(root: Path, path: str, limit: str, current: int, inactive: int = 0) -> None:
    d = root / "sys" / path.lstrip("/")
    write(d / "memory.max", limit + "\n")
    write(d / "memory.current", f"{current}\n")
    write(d / "memory.stat", f"anon {current}\nfile 0\ninactive_file {inactive}\n")


def test_no_cgroup_is_the_machines_figure(fake):
    assert safety.available_memory() == 8 * GiB
    write(fake / "cgroup", "0::/\n")  # a cgroup2 mount without the memory controller
    (fake / "sys").mkdir()
    assert safety.available_memory() == 8 * GiB


def test_a_v2_limit_lower_than_the_machine_is_the_limit_less_the_usage(fake):
    write(fake / "cgroup", "0::/app\n")
    v2(fake, "/app", str(GiB), current=300 * MiB, inactive=100 * MiB)
    # 1 GiB less 300 MiB used, of which 100 MiB is page cache the kernel can drop
    assert safety.available_memory() == GiB - 200 * MiB
    v2(fake, "/app", "max", current=300 * MiB)
    assert safety.available_memory() == 8 * GiB
    v2(fake, "/app", str(64 * GiB), current=0)  # higher than the machine: the machine
    assert safety.available_memory() == 8 * GiB


def test_a_limit_above_the_processs_cgroup_counts(fake):
    write(fake / "cgroup", "0::/user.slice/app\n")
    v2(fake, "/user.slice/app", "max", current=10 * MiB)
    v2(fake, "/user.slice", str(2 * GiB), current=GiB)
    assert safety.available_memory() == GiB


def test_a_container_sees_its_cgroup_at_the_mounts_root(fake):
    write(fake / "cgroup", "0::/docker/0123abcd\n")  # the host's path, not mounted inside
    v2(fake, "/", str(512 * MiB), current=12 * MiB)
    assert safety.available_memory() == 500 * MiB


def test_v1s_memory_controller(fake):
    write(fake / "cgroup", "5:memory:/process/x\n4:cpu,cpuacct:/\n0::/\n")
    d = fake / "sys" / "memory" / "process" / "x"
    write(d / "memory.limit_in_bytes", f"{V1_UNLIMITED}\n")
    write(d / "memory.usage_in_bytes", f"{GiB}\n")
    assert safety.available_memory() == 8 * GiB  # v1 writes no limit as a huge number
    write(d / "memory.limit_in_bytes", f"{3 * GiB}\n")
    write(d / "memory.stat", f"cache {GiB}\ntotal_inactive_file {512 * MiB}\n")
    assert safety.available_memory() == 3 * GiB - 512 * MiB


def test_unreadable_cgroup_files_are_no_limit(fake):
    write(fake / "cgroup", "garbage\n0::/app\n")
    write(fake / "sys" / "app" / "memory.max", "\x00 not a number")
    assert safety.available_memory() == 8 * GiB


def test_a_model_that_fits_the_machine_but_not_the_container_is_refused(fake):
    write(fake / "cgroup", "0::/\n")
    v2(fake, "/", str(GiB), current=0)
    model = ModelConfig(vocab_size=65, n_layer=12, n_head=16, n_embd=1024)  # ~150 M parameters
    with pytest.raises(CheckpointError, match="this machine has 1.1 GB available"):
        safety.require_memory(model, safety.LOAD_FACTOR, "config.json")
    v2(fake, "/", "max", current=0)
    safety.require_memory(model, safety.LOAD_FACTOR, "config.json")
