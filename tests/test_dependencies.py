"""The dependency floors: no torch that pyproject.toml admits has a known way to run code from
`torch.load(weights_only=True)`, which `chargpt import` calls on files from strangers, and the
README says the same floor; no starlette the serve extra admits has a known hole the server
could meet, and no transformers the hf extra admits loads code from a folder's config."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# torch.load(weights_only=True) advisories: (advisory, the first release that fixes it)
WEIGHTS_ONLY_ADVISORIES = [("CVE-2025-32434 / GHSA-53q9-r3pm-6pq6", (2, 6)),
                           ("CVE-2026-24747 / GHSA-63cw-57p8-fm3p", (2, 10))]


# starlette advisories reachable from chargpt serve (FileResponse, StaticFiles, request.url,
# routing): (advisory, the first release that fixes it)
STARLETTE_ADVISORIES = [("CVE-2025-62727 / GHSA-7f5h-v6xp-fcq8", (0, 49, 1)),
                        ("CVE-2026-48710 / GHSA-86qp-5c8j-p5mr", (1, 0, 1)),
                        ("CVE-2026-48818 / GHSA-wqp7-x3pw-xc5r", (1, 1, 0)),
                        ("CVE-2026-54282 / GHSA-jp82-jpqv-5vv3", (1, 3, 0))]

# transformers advisories on loading or saving a model folder: (advisory, first fixed release)
TRANSFORMERS_ADVISORIES = [("CVE-2026-4372 / GHSA-29pf-2h5f-8g72", (5, 3)),
                           ("CVE-2026-5241 / GHSA-fgcw-684q-jj6r", (5, 5)),
                           ("CVE-2026-9856", (5, 10))]

# the rest: (requirement as pyproject.toml names it, advisory, first fixed release)
OTHER_ADVISORIES = [("tqdm", "CVE-2024-34062 / GHSA-g7vv-2v7x-gj9p", (4, 66, 3)),
                    ("pytest", "CVE-2025-71176 / GHSA-6w46-j5rx-g56g", (9, 0, 3))]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def floor(spec: str, package: str) -> tuple[int, ...]:
    found = re.fullmatch(rf"{package}\s*>=\s*([\d.]+)", spec)
    assert found, f"{package} is pinned as {spec!r}, not with a floor"
    return tuple(int(x) for x in found.group(1).split("."))


def torch_floor() -> tuple[int, ...]:
    (spec,) = [d for d in project()["dependencies"] if re.match(r"torch\b", d)]
    return floor(spec, "torch")


def test_the_torch_floor_has_no_known_weights_only_bypass():
    floor = torch_floor()
    for advisory, fixed in WEIGHTS_ONLY_ADVISORIES:
        assert floor >= fixed, f"torch>={floor} admits versions affected by {advisory}"


def test_the_readme_states_the_floor():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"PyTorch ≥ (\d+(?:\.\d+)*)", readme)
    assert stated and tuple(int(x) for x in stated.group(1).split(".")) == torch_floor()


@pytest.mark.parametrize(("package", "advisories"), [("starlette", STARLETTE_ADVISORIES),
                                                     ("transformers", TRANSFORMERS_ADVISORIES)])
def test_every_extra_floor_has_no_known_hole(package, advisories):
    specs = [d for extra in project()["optional-dependencies"].values() for d in extra
             if re.match(rf"{package}(?![\w-])", d)]
    assert len(specs) >= 2, f"an extra of its own and dev both name {package}"
    for spec in specs:
        for advisory, fixed in advisories:
            assert floor(spec, package) >= fixed, f"{spec} admits {advisory}"


@pytest.mark.parametrize(("package", "advisory", "fixed"), OTHER_ADVISORIES)
def test_every_other_floor_has_no_known_hole(package, advisory, fixed):
    every = project()["dependencies"] + [
        d for extra in project()["optional-dependencies"].values() for d in extra]
    specs = [d.split(";")[0].strip() for d in every if re.match(rf"{package}(?![\w-])", d)]
    assert specs, f"pyproject.toml names no {package}"
    for spec in specs:
        assert floor(spec, package) >= fixed, f"{spec} admits {advisory}"
