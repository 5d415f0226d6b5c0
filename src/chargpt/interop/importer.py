"""Models from elsewhere into chargpt run directories: `chargpt import SRC --out RUN_DIR`.

A reader (hf_import.py for Hugging Face folders, nanogpt.py for nanoGPT's ckpt.pt + meta.pkl)
turns a source into an `ImportedModel`: a chargpt `ModelConfig`, a `CharTokenizer` and a
state_dict with chargpt's parameter names. `write_run` checks that the weights fit the model
exactly and writes a normal run directory with chargpt's own checkpoint writer (a weights-only
`last/` checkpoint, which `sample`, `eval`, `serve` and `export` use like any other). Nothing a
source holds is ever executed: tensors come from safetensors or `torch.load(weights_only=True)`
(`load_plain_torch`), and other metadata from JSON or a pickle reader that refuses every
object (nanogpt.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from chargpt.config.schema import Config
from chargpt.errors import CheckpointError, ConfigError
from chargpt.fileio import check_new_dir, new_dir
from chargpt.interop.imported import ImportedModel

CHECKPOINT_NAME = "last"


def write_run(imported: ImportedModel, out_dir: str | Path) -> Path:
    """Write `imported` as the chargpt run directory `out_dir` (which must be new or empty)."""
    from chargpt.model.build import build_model
    from chargpt.runs import checkpoint as ckpt
    from chargpt.runs.rundir import RunDir
    from chargpt.runs.safety import LOAD_FACTOR, check_bounds, require_memory

    out = Path(out_dir)
    check_new_dir(out)
    cfg = Config(model=imported.config)
    source = imported.source.get("path", "the source")  # its sizes are a stranger's numbers
    check_bounds(cfg.model, source)
    require_memory(cfg.model, LOAD_FACTOR, source)
    model = build_model(cfg.model)
    sd = dict(imported.state_dict)
    if cfg.model.tie_weights:  # one matrix under two names; either may be given
        sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight"))
        sd.setdefault("transformer.wte.weight", sd["lm_head.weight"])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(
            f"the weights of {imported.source.get('path', 'the source')} do not fit a chargpt "
            f"model with their config: {detail}"
        ) from None
    val = math.inf if imported.val_loss is None else imported.val_loss
    state = ckpt.TrainState(step=imported.step, val_loss=val, best_val_loss=val,
                            imported_from=imported.source)
    data = ckpt.CheckpointData(config=cfg.to_dict(), vocab=imported.tokenizer.to_dict(),
                               state=state)
    with new_dir(out, "import") as tmp:
        ckpt.save(tmp, CHECKPOINT_NAME, model, data)
        RunDir(tmp).write_config(cfg)
    return out


def detect(src: Path) -> str:
    """'hf' or 'nanogpt', from what `src` holds."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if src.is_dir():
        if (src / "config.json").is_file():
            return "hf"
        if (src / "ckpt.pt").is_file():
            return "nanogpt"
        raise CheckpointError(f"{src} holds neither a Hugging Face model (config.json) nor a "
                              "nanoGPT checkpoint (ckpt.pt)")
    if src.suffix in (".pt", ".pth"):
        return "nanogpt"
    raise CheckpointError(f"{src} is not a Hugging Face folder or a nanoGPT .pt checkpoint")


def import_model(src: str | Path, out_dir: str | Path, meta: str | Path | None = None
                 ) -> tuple[ImportedModel, Path]:
    """Read `src` (a Hugging Face folder, or nanoGPT's ckpt.pt or its folder) and write it as
    the run directory `out_dir`; `meta` is nanoGPT's meta.pkl when it is not found by itself."""
    src, out = Path(src), Path(out_dir)
    check_new_dir(out)  # before reading anything large
    kind = detect(src)
    if meta is not None and kind != "nanogpt":
        raise ConfigError("--meta is only for nanoGPT checkpoints")
    if kind == "hf":
        from chargpt.interop.hf_import import read_hf

        imported = read_hf(src)
    else:
        from chargpt.interop.nanogpt import read_nanogpt

        ckpt_path = src / "ckpt.pt" if src.is_dir() else src
        imported = read_nanogpt(ckpt_path, Path(meta) if meta is not None else None)
    return imported, write_run(imported, out)
