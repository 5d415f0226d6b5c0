"""The dependency floor: no torch that pyproject.toml admits has a known way to run code from
`torch.load(weights_only=True)`, which `chargpt import` calls on files from strangers, and the
README says the same floor."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# torch.load(weights_only=True) advisories: (advisory, the first release that fixes it)
WEIGHTS_ONLY_ADVISORIES = [("CVE-2025-32434 / GHSA-53q9-r3pm-6pq6", (2, 6)),
                           ("CVE-2026-24747 / GHSA-63cw-57p8-fm3p", (2, 10))]


def torch_floor() -> tuple[int, ...]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (spec,) = [d for d in project["dependencies"] if re.match(r"torch\b", d)]
    found = re.fullmatch(r"torch\s*>=\s*([\d.]+)", spec)
    assert found, f"torch is pinned as {spec!r}, not with a floor"
    return tuple(int(x) for x in found.group(1).split("."))


def test_the_torch_floor_has_no_known_weights_only_bypass():
    floor = torch_floor()
    for advisory, fixed in WEIGHTS_ONLY_ADVISORIES:
        assert floor >= fixed, f"torch>={floor} admits versions affected by {advisory}"


def test_the_readme_states_the_floor():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"PyTorch ≥ (\d+(?:\.\d+)*)", readme)
    assert stated and tuple(int(x) for x in stated.group(1).split(".")) == torch_floor()
