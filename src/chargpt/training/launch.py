"""Starting and continuing runs: `train()`, and everything settled before a Trainer's first step.

`new_trainer` joins the process group (under torchrun) and picks the device, creates the run
directory, prepares the data (rank 0; the other ranks wait), fills in what the config could not
know (vocab_size, an absolute data_dir) and writes it. `resume_trainer` reads the run's config,
applies [train] overrides (any other section is an error), finds the last complete checkpoint,
reads its `TrainState`, checks the data's vocabulary against the checkpoint's and restores the
Trainer; only then, once the resume is certain, does it rewrite the run's config. `train()`
chooses between the two, including `--auto-resume`'s "continue this run if it is here".
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chargpt import errors
from chargpt.config.resolve import check_length
from chargpt.config.schema import Config, apply_overrides
from chargpt.config.sizing import load_rule
from chargpt.data.datasets import dataset, fetch
from chargpt.data.preparation import prepare
from chargpt.data.prepared import PreparedData, check_split_lengths
from chargpt.device import pick_device, precision
from chargpt.distributed import DistEnv
from chargpt.errors import ChargptError, CheckpointError, ConfigError
from chargpt.model.compiling import check_works
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.rundir import RunDir
from chargpt.runs.safety import CheckedCheckpoint
from chargpt.text.tokenizer import check_same_vocab
from chargpt.training import autosize, finetune
from chargpt.training.budget import PLANNED_FIELDS
from chargpt.training.capacity import allocation_errors, check_memory, check_trainable
from chargpt.training.trackers import require_trackers
from chargpt.training.trainer import Trainer, TrainResult

__all__ = ["new_trainer", "resume_trainer", "train"]


def _join(cfg: Config) -> tuple[DistEnv, torch.device]:
    """This process's place in the job, its device, and the process group joined."""
    env = DistEnv.from_env()
    device = env.device_for(pick_device(cfg.train.device))
    env.init(device)
    return env, device


def _prepare_data(cfg: Config, rundir: RunDir, log: Callable[[str], None],
                  src: CheckedCheckpoint | None) -> None:
    """Prepare the run's own data/ from --input or the named dataset (not with --data-dir); a
    fine-tune's vocabulary is its source's, with the text's new characters appended."""
    dc = cfg.data
    if dc.data_dir:
        return
    heldout = None
    if dc.input:
        source = dc.input
    else:
        source = str(fetch(dc.dataset, progress=True))
        heldout = dataset(dc.dataset).split
        if heldout:
            noun = "bytes" if dc.unit == "byte" else "characters"
            log(f"{dc.dataset}'s standard split: the last {heldout[1]:,} {noun} are test, "
                f"the {heldout[0]:,} before them val, the rest train")
    log(f"preparing {source}")
    prepare(source, rundir.data_dir(cfg), val_fraction=dc.val_fraction,
            test_fraction=dc.test_fraction, heldout=heldout, unit=dc.unit, progress=True,
            vocab=src.tokenizer if src else None, extend_vocab=src is not None,
            # a new run's own data/ (RunDir.create found no run here): what a run killed before
            # its first checkpoint left is replaced, as the new --input asks
            overwrite=True)


def new_trainer(cfg: Config, quiet: bool = False) -> Trainer:
    """A Trainer for a new run of `cfg` in its out_dir (default: runs/<timestamp>), starting
    from `cfg.train.init_from`'s weights when it names a trained model (finetune.py)."""
    if not cfg.train.init_from:
        return _new_trainer(cfg, quiet, None)
    with finetune.source(cfg.train.init_from) as src:
        finetune.check_model(cfg.model, src.config.model, cfg.train.init_from)
        return _new_trainer(cfg, quiet, src)


def _new_trainer(cfg: Config, quiet: bool, src: CheckedCheckpoint | None) -> Trainer:
    require_trackers(cfg.train.log_to)  # before the run directory exists
    check_trainable(cfg.model)  # and before any data is prepared
    env, device = _join(cfg)
    if cfg.train.compile:
        check_works(device.type)  # before the run directory exists, too
    if env.enabled and not cfg.train.out_dir:
        raise ConfigError("set --out when training with torchrun (all ranks need one run dir)")
    rundir = RunDir(Path(cfg.train.out_dir)) if cfg.train.out_dir else RunDir.default()
    log = (lambda s: None) if quiet or not env.is_main else print
    made = env.is_main and rundir.create()
    try:
        trainer = _started(cfg, rundir, env, device, log, src, quiet)
    except BaseException:
        if made:  # nothing of value was written yet: no run is left half-made
            shutil.rmtree(rundir.path, ignore_errors=True)
        raise
    if env.is_main:  # the run exists from here: its config names it
        rundir.write_config(trainer.cfg)
    return trainer


def _started(cfg: Config, rundir: RunDir, env: DistEnv, device: torch.device,
             log: Callable[[str], None], src: CheckedCheckpoint | None, quiet: bool) -> Trainer:
    """The Trainer of a new run in `rundir`: its data prepared and loaded, the config filled
    in (vocab_size, an absolute data_dir, the precision, the size auto chooses)."""
    if env.is_main:
        _prepare_data(cfg, rundir, log, src)
    env.barrier()  # the other ranks wait for rank 0's prepared data
    data = rundir.load_data(cfg)
    if cfg.data.data_dir:
        cfg = apply_overrides(
            cfg, {"data": {"data_dir": str(Path(cfg.data.data_dir).resolve())}}, "run"
        )
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size),
        train=dataclasses.replace(cfg.train, dtype=precision(device, cfg.train.dtype)),
    )
    cfg, choosing = _sized(cfg, rundir, data, env, device, log)
    check_split_lengths(data, cfg.model.block_size)
    if src is not None:
        finetune.check_vocab(data.tokenizer, src.tokenizer, cfg.train.init_from)
        log(finetune.describe(cfg.train.init_from, src, data.tokenizer))
    check_memory(cfg, device)
    with allocation_errors("building the model"):
        trainer = Trainer(cfg, rundir, data, env, device, quiet)
    trainer.elapsed_before = choosing  # the budget began when the choosing did
    if src is not None:
        finetune.load_source_weights(trainer.model, src)
    return trainer


def _sized(cfg: Config, rundir: RunDir, data: PreparedData, env: DistEnv, device: torch.device,
           log: Callable[[str], None]) -> tuple[Config, float]:
    """`cfg` at the size `--size auto` chooses (autosize.py), and the seconds choosing took."""
    if cfg.train.size != "auto":
        return cfg, 0.0  # a named size was layered in by resolve_config
    if cfg.train.init_from:
        raise ConfigError("--size auto and --init-from both set the model's shape; give one")
    cfg, _, seconds = autosize.auto_size(cfg, rundir, data, env, device)
    log(cfg.train.size_choice)
    return cfg, seconds


def resume_trainer(
    run_dir: str | Path, overrides: dict[str, Any] | None = None, quiet: bool = False
) -> Trainer:
    """A Trainer continuing the run in `run_dir` from its last complete checkpoint.

    `overrides` ({"train": {...}}) may change [train] values such as max_steps. Nothing in the
    run directory changes unless that checkpoint can really be resumed."""
    rundir = RunDir(Path(run_dir))
    rundir.check_resumable()
    cfg = rundir.read_config()
    train_overrides = _train_overrides_only(overrides or {})
    if cfg.train.planned_steps and {"time_budget", "step_cap"} & set(train_overrides):
        why = "for its time budget" if cfg.train.time_budget else "when its val loss stalled"
        raise ConfigError(f"{run_dir} planned {cfg.train.planned_steps} steps {why}; a resumed "
                          "run keeps them (change --max-steps instead)")
    if train_overrides:
        cfg = apply_overrides(cfg, {"train": train_overrides}, "command line")
        check_length(cfg.train, [({"train": train_overrides}, "command line")])
    env, device = _join(cfg)
    found = rundir.resume_checkpoint(warn=errors.warn if env.is_main else lambda _: None)
    if found.config.model != cfg.model:
        raise CheckpointError(f"{rundir.config_file} and {found.path / ckpt.CONFIG_FILE} "
                              "describe different models; the run directory was changed")
    if "max_steps" in train_overrides and cfg.train.max_steps <= found.state.step:
        raise ConfigError(f"{run_dir} is already at step {found.state.step}; --max-steps "
                          f"{cfg.train.max_steps} would train no further (give more than "
                          f"{found.state.step} to continue it)")
    state = ckpt.load_train_state(found.path, resumable=True)
    data = rundir.load_data(cfg)
    check_same_vocab(data.tokenizer, found.tokenizer, error=CheckpointError,
                     what=f"{found.path} and its data in {data.path}")
    trainer = Trainer(cfg, rundir, data, env, device, quiet)
    try:
        trainer.restore(found.path, state)
    except ChargptError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        # A consistent but hostile state: torch's own checks speak, in one line.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{found.path}: the training state cannot be restored "
                              f"({first})") from None
    if train_overrides and env.is_main:
        rundir.write_config(cfg)
    env.barrier()  # rank 0 rewrites metrics.jsonl in restore(); nobody runs ahead of it
    return trainer


def _train_overrides_only(overrides: dict[str, Any]) -> dict[str, Any]:
    if (overrides.get("train") or {}).get("init_from"):
        raise ConfigError("--init-from starts a new run and --resume continues one; give one")
    bad = [f"{sec}.{k}" for sec, vals in overrides.items() if sec != "train" for k in vals]
    if bad:
        raise ConfigError(f"cannot change {', '.join(bad)} when resuming; start a new run instead")
    return dict(overrides.get("train") or {})


def train(
    config: Config | None = None,
    *,
    resume: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    auto_resume: bool = False,
    time_limit: float | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train a model from `config`, or continue the run in `resume` (then `overrides` may change
    [train] settings such as max_steps). With `auto_resume`, a config whose out_dir already
    holds this run continues from its last complete checkpoint (or starts over if none was
    written yet): the same call can be repeated after any crash, as torchrun's elastic restarts
    do. `time_limit` (seconds of this call) ends it early, as an interruption would, leaving a
    checkpoint that `resume` continues exactly."""
    if resume is not None:
        if config is not None:
            raise ConfigError("give either a config or a run directory to resume, not both")
        trainer = resume_trainer(resume, overrides, quiet=quiet)
    else:
        cfg = config or Config()
        if overrides:
            cfg = apply_overrides(cfg, overrides, "overrides")
        trainer = _start_or_continue(cfg, auto_resume, quiet)
    with allocation_errors(f"in {trainer.run_dir}", trainer.rundir.how_to_go_on):
        result = trainer.run(time_limit=time_limit)
    trainer.env.leave()
    return result


def _start_or_continue(cfg: Config, auto_resume: bool, quiet: bool) -> Trainer:
    rundir = RunDir(Path(cfg.train.out_dir)) if cfg.train.out_dir else None
    if not (auto_resume and rundir is not None and rundir.holds_run()):
        return new_trainer(cfg, quiet=quiet)
    if rundir.has_checkpoint():
        cfg = _as_chosen(cfg, rundir.read_config())
        return resume_trainer(rundir.path, {"train": _changed_train_values(cfg, rundir)},
                              quiet=quiet)
    if DistEnv.from_env().is_main:  # killed before its first checkpoint: nothing to keep
        rundir.forget()
    return new_trainer(cfg, quiet=quiet)


def _as_chosen(cfg: Config, saved: Config) -> Config:
    """`cfg` as its run's `--size auto` chose it when it began (size, dropout, the budget it
    kept and its cap): a continued run never chooses again. Any other `cfg` as it is."""
    if cfg.train.size != "auto" or saved.train.size in ("", "auto"):
        return cfg
    chosen = autosize.apply_size(cfg, load_rule().size(saved.train.size),
                                 saved.model.dropout, saved.train.size_choice)
    return apply_overrides(chosen, {"train": {"time_budget": saved.train.time_budget,
                                              "step_cap": saved.train.step_cap}},
                           "the run's own choice")


def _changed_train_values(cfg: Config, rundir: RunDir) -> dict[str, Any]:
    """[train] values of `cfg` that differ from the run's; any other difference is an error."""
    saved = rundir.read_config()
    for section in ("model", "data"):
        ours, theirs = getattr(cfg, section), getattr(saved, section)
        for f in dataclasses.fields(ours):
            if f.name in ("vocab_size", "data_dir"):
                continue  # filled in when the run started
            if getattr(ours, f.name) != getattr(theirs, f.name):
                raise ConfigError(
                    f"{rundir.path} holds a run with {section}.{f.name}="
                    f"{getattr(theirs, f.name)!r}, not {getattr(ours, f.name)!r}; "
                    "use another --out"
                )
    # a time-budget run's step count is its own plan, not a value the caller changed
    planned = set(PLANNED_FIELDS) if saved.train.planned_steps else {"planned_steps"}
    if cfg.train.dtype == "auto":  # the run recorded the precision 'auto' chose for it
        planned.add("dtype")
    return {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cfg.train)
            if f.name not in planned and getattr(cfg.train, f.name) != getattr(saved.train, f.name)}
