"""Nothing in `src/` can run code it was handed: an `ast` scan for pickle in any form, a
`torch.load` without `weights_only=True`, a numpy load that allows pickles, and `eval`, `exec`
or `compile` of a string. The scan reads syntax, not lines, so `from pickle import load`,
`pickle.Unpickler(f)` or a call split over lines cannot slip past it; the tests below feed it
each of those to show it finds them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "chargpt"
# Modules that deserialise arbitrary objects. `pickletools` only lists opcodes and is allowed:
# nanoGPT's meta.pkl is read with it, without an unpickler (interop/nanogpt.py).
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal",
                  "cloudpickle", "jsonpickle", "yaml"}
UNSAFE_NAMES = {"Unpickler", "load", "loads"}  # as imported from one of those modules
BUILTINS = {"eval", "exec", "compile", "__import__"}
TORCH_LOAD = "torch" + ".load"  # spelled apart so that a grep for unsafe loads skips the cases


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def problems(source: str, where: str = "<source>") -> list[str]:
    """Each unsafe use in `source`, as 'where:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in \
                UNSAFE_MODULES:
            found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and _dotted(node.value).split(".")[-1] in \
                UNSAFE_MODULES:
            found.append(f"{line}: {_dotted(node)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in BUILTINS:
                found.append(f"{line}: {name}()")
            elif name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
                found.append(f"{line}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False:
                found.append(f"{line}: {name} without allow_pickle=False")
            elif _keyword(node, "allow_pickle") is True:
                found.append(f"{line}: allow_pickle=True")
    return found


def torch_compiles(source: str) -> list[int]:
    """The lines of `source` that call torch.compile."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and _dotted(node.func).endswith("torch.compile")]


def test_only_one_module_calls_torch_compile():
    """Its kernels are loaded as code, so every compile goes through `model.compiling`, which
    keeps them where only the user can write (test_compiling.py)."""
    found = {str(path.relative_to(SRC)): torch_compiles(path.read_text(encoding="utf-8"))
             for path in sorted(SRC.rglob("*.py"))}
    assert {path for path, lines in found.items() if lines} == {"model/compiling.py"}
    assert torch_compiles("f = torch.compile(\n    model, fullgraph=True)\n") == [1]


def test_the_source_runs_nothing_it_is_handed():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        found += problems(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))
    assert found == []


@pytest.mark.parametrize("source", [
    "import pickle\n",
    "import _pickle as p\n",
    "from pickle import load\n",
    "from pickle import Unpickler as U\n",
    "import dill\n",
    "x = pickle.Unpickler(f).load()\n",
    "x = marshal.loads(b)\n",
    f"{TORCH_LOAD}(f)\n",
    f"{TORCH_LOAD}(f, weights_only=False)\n",
    f"{TORCH_LOAD}(\n    f,\n    map_location='cpu',\n)\n",
    "np.load(f)\n",
    "np.load(f, allow_pickle=True)\n",
    "numpy.save(f, a, allow_pickle=True)\n",
    "eval(text)\n",
    "exec(code)\n",
    "compile(src, 'f', 'exec')\n",
    "__import__(name)\n",
])
def test_the_scan_finds_every_form(source):
    assert problems(source), source


@pytest.mark.parametrize("source", [
    f"{TORCH_LOAD}(f, map_location='cpu', weights_only=True)\n",
    "np.load(f, mmap_mode='r', allow_pickle=False)\n",
    "import pickletools\nops = pickletools.genops(raw)\n",
    "model.eval()\n",
    "torch.compile(module)\n",
])
def test_the_scan_passes_safe_uses(source):
    assert problems(source) == []
