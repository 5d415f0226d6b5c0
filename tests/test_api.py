"""The Python API shown in the README, run as written (on a small budget)."""

import subprocess
import sys
from pathlib import Path

from conftest import corpus_text

import chargpt


def test_readme_python_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("input.txt").write_text(corpus_text(50_000), encoding="utf-8")

    meta = chargpt.prepare("input.txt", "data/mytext")
    cfg = chargpt.resolve_config("shakespeare-cpu", overrides={
        "data": {"data_dir": "data/mytext"},
        "train": {"max_steps": 30, "eval_interval": 15, "eval_iters": 2, "out_dir": "runs/api"},
    })
    result = chargpt.train(cfg)
    run = chargpt.load_run(result.run_dir)
    text_out = run.generate("ROMEO:", max_new_tokens=50, temperature=0.8, top_k=50, seed=1)

    assert meta["vocab_size"] == run.tokenizer.vocab_size
    assert len(text_out) == 50
    assert text_out == run.generate("ROMEO:", max_new_tokens=50, temperature=0.8, top_k=50,
                                    seed=1)
    assert result.step == 30 and (Path("runs/api") / "best").is_dir()
    streamed = "".join(run.stream("ROMEO:", 50, temperature=0.8, top_k=50, seed=1))
    assert streamed == text_out


def test_import_has_no_side_effects_and_does_not_load_torch():
    code = "import sys, chargpt; print('torch' in sys.modules, sorted(chargpt.__all__)[:1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("False")


def test_exported_names_survive_submodule_imports():
    # Importing a submodule binds it on the package; no exported name may be such a module.
    import importlib
    import pkgutil
    import types

    for info in pkgutil.iter_modules(chargpt.__path__):
        if info.name != "__main__":
            importlib.import_module(f"chargpt.{info.name}")
    for name in chargpt.__all__:
        value = getattr(chargpt, name)
        assert value is not None and not isinstance(value, types.ModuleType), name
    assert callable(chargpt.train) and callable(chargpt.generate)
