"""In CI a skip fails the run with the line that names what is missing; elsewhere it stays a
skip (conftest's `_fail_skip_in_ci`). Run on a scratch test folder with this suite's conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRATCH_TESTS = {
    "test_missing_extra.py": 'import pytest\npytest.importorskip("no_such_extra_xyz", '
                             'reason="the xyz extra: pip install xyz")\n\n'
                             'def test_x():\n    pass\n',
    "test_missing_tool.py": "import pytest\n\ndef test_y():\n    pytest.skip('no C compiler "
                            "found; install gcc')\n\ndef test_z():\n    pass\n",
}


@pytest.mark.parametrize("name", sorted(SCRATCH_TESTS))
@pytest.mark.parametrize("ci", [True, False])
def test_a_skip_fails_only_in_ci(tmp_path, name, ci):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path)
    (tmp_path / name).write_text(SCRATCH_TESTS[name])
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    named = "pip install xyz" if "extra" in name else "install gcc"
    if ci:
        assert done.returncode != 0, done.stdout
        assert "skipped in CI, where nothing may be missing: " in done.stdout
        assert named in done.stdout
    else:
        assert done.returncode in (0, 5), done.stdout  # 5: the only test was skipped
        assert "skipped" in done.stdout.splitlines()[-1]


SLOW_TESTS = ("import pytest\n\n@pytest.mark.slow\ndef test_long():\n    pass\n\n"
              "def test_short():\n    pass\n")


@pytest.mark.parametrize("ci, marks, node, ran", [
    (True, [], "", 2),  # CI runs everything
    (False, [], "", 1),  # a plain pytest leaves the slow test out and says so
    (False, ["-m", "slow"], "", 1),  # a marker expression chooses for itself
    (False, ["-m", "slow or not slow"], "", 2),
    (False, [], "::test_long", 1),  # so does a test named by its id
])
def test_slow_tests_run_in_ci_and_when_asked(tmp_path, ci, marks, node, ran):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path)
    (tmp_path / "test_slow.py").write_text(SLOW_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *marks, f"{tmp_path / 'test_slow.py'}{node}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert f"{ran} passed" in done.stdout
    left_out = "1 slow test(s) left out" in done.stdout
    assert left_out == (not ci and not marks and not node), done.stdout
