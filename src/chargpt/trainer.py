"""The training loop: setup, then step, log, evaluate, checkpoint, until done or interrupted.

`train()` starts a run from a `Config`; `train(resume=RUN_DIR)` continues one from its last
complete checkpoint. A resumed run restores weights, optimizer, step, random-number states and
the batch sampler, and evaluation draws its batches from its own fixed-seed sampler, so on CPU
a run interrupted after N steps and resumed gives bit-identical weights to an uninterrupted one.
The hot path does no host-device synchronisation except at log and eval steps. SIGINT and
SIGTERM finish the current step, write `last/`, and return; a second Ctrl-C aborts at once
(the previous checkpoint is never damaged, see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import Config, apply_overrides
from .data import BatchSampler, PreparedData, check_split_lengths, load_prepared, prepare
from .datasets import fetch
from .distributed import DistEnv, all_reduce_mean, broadcast_flag, gather_tensors
from .errors import ChargptError, CheckpointError, ConfigError
from .evaluate import estimate_loss
from .flops import estimate, mfu
from .io import atomic_write_text
from .model import build_model
from .optim import lr_at, make_optimizer

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
DATA_SUBDIR = "data"


class TrainingError(ChargptError):
    """Training cannot go on (for example the loss became NaN)."""


@dataclass
class TrainResult:
    """What a call to `train()` achieved."""

    run_dir: Path
    step: int
    best_val_loss: float
    last_val_loss: float
    elapsed: float
    interrupted_by: int | None = None  # signal number, when stopped by SIGINT/SIGTERM


# --- device and precision ---------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available")
    return device


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- signals ----------------------------------------------------------------------------------


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# --- run directory ----------------------------------------------------------------------------


def _default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _new_run_dir(run_dir: Path) -> None:
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another --out"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)


def _data_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.data.data_dir) if cfg.data.data_dir else run_dir / DATA_SUBDIR


def _prepare_data(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> PreparedData:
    if cfg.data.data_dir:
        return load_prepared(cfg.data.data_dir)
    source = cfg.data.input or str(fetch(cfg.data.dataset, progress=True))
    log(f"preparing {source}")
    prepare(source, run_dir / DATA_SUBDIR, val_fraction=cfg.data.val_fraction, progress=True)
    return load_prepared(run_dir / DATA_SUBDIR)


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a chargpt run directory ({CONFIG_FILE} missing)")
    return Config.from_dict(ckpt.read_json(path), source=str(path))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; lines torn by a kill or otherwise unreadable are skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # includes undecodable bytes
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


# --- the trainer ------------------------------------------------------------------------------


class Trainer:
    """One training run; build it with `Trainer.new` or `Trainer.resume`, then call `run()`.

    Under torchrun every process builds a Trainer; rank 0 prepares the data and writes all
    files, the model is wrapped in DistributedDataParallel, and decisions that must be taken by
    all ranks together (stop on a signal or a deadline) are agreed on at log steps.
    """

    def __init__(self, cfg: Config, run_dir: Path, data: PreparedData, env: DistEnv,
                 device: torch.device, quiet: bool = False):
        self.cfg, self.run_dir, self.data, self.quiet = cfg, run_dir, data, quiet
        self.env, self.device = env, device
        self.is_main = env.is_main
        tc = cfg.train
        self.amp_dtype = autocast_dtype(self.device, tc.dtype)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model).to(self.device)
        if env.rank:
            torch.manual_seed(tc.seed + env.rank)  # but different dropout masks
        forward: Any = torch.compile(self.model) if tc.compile else self.model
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DDP(forward, device_ids=ids)
        self.forward = forward
        self.optimizer = make_optimizer(self.model, tc, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype is torch.float16
        )
        self.sampler = BatchSampler(
            data.train, cfg.model.block_size, tc.batch_size, seed=tc.seed, device=self.device,
            rank=env.rank, world_size=env.world_size, order=tc.data_order,
        )
        self.step = 0
        self.best_val_loss = math.inf
        self.last_val_loss = math.inf
        self.elapsed_before = 0.0
        self._bar = None
        self._deadline: float | None = None
        self.skipped_steps = 0
        self._crash_at = _fault_step(env)

    # construction

    @staticmethod
    def _setup(cfg: Config) -> tuple[DistEnv, torch.device]:
        env = DistEnv.from_env()
        device = env.device_for(pick_device(cfg.train.device))
        env.init(device)
        return env, device

    @classmethod
    def new(cls, cfg: Config, quiet: bool = False) -> Trainer:
        env, device = cls._setup(cfg)
        if env.enabled and not cfg.train.out_dir:
            raise ConfigError("set --out when training with torchrun (all ranks need one run dir)")
        run_dir = Path(cfg.train.out_dir) if cfg.train.out_dir else _default_run_dir()
        if env.is_main:
            _new_run_dir(run_dir)
            _prepare_data(cfg, run_dir, (lambda s: None) if quiet else print)
        env.barrier()  # the other ranks wait for rank 0's prepared data
        data = load_prepared(_data_dir(cfg, run_dir))
        if cfg.data.data_dir:
            cfg = apply_overrides(
                cfg, {"data": {"data_dir": str(Path(cfg.data.data_dir).resolve())}}, "run"
            )
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size)
        )
        check_split_lengths(data, cfg.model.block_size)
        if env.is_main:
            _write_config(run_dir, cfg)
        return cls(cfg, run_dir, data, env, device, quiet)

    @classmethod
    def resume(
        cls, run_dir: str | Path, overrides: dict[str, Any] | None = None, quiet: bool = False
    ) -> Trainer:
        run_dir = Path(run_dir)
        cfg = load_run_config(run_dir)
        overrides = overrides or {}
        bad = [f"{sec}.{k}" for sec, vals in overrides.items() if sec != "train" for k in vals]
        if bad:
            raise ConfigError(
                f"cannot change {', '.join(bad)} when resuming; start a new run instead"
            )
        if overrides.get("train"):
            cfg = apply_overrides(cfg, {"train": overrides["train"]}, "command line")
        env, device = cls._setup(cfg)
        if overrides.get("train") and env.is_main:
            _write_config(run_dir, cfg)
        last = ckpt.resolve(run_dir, "last")
        if last is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint to resume from")
        data = load_prepared(_data_dir(cfg, run_dir))
        state = ckpt.read_json(last / ckpt.STATE_FILE)
        vocab = ckpt.read_json(last / ckpt.VOCAB_FILE)
        if vocab.get("chars") != list(data.tokenizer.chars):
            raise CheckpointError(f"{last} was trained on a different vocabulary than its data")
        trainer = cls(cfg, run_dir, data, env, device, quiet)
        trainer._restore(last, state)
        env.barrier()  # rank 0 rewrites metrics.jsonl in _restore; nobody runs ahead of it
        return trainer

    def _restore(self, last: Path, state: dict[str, Any]) -> None:
        ckpt.load_weights(self.model, last)
        if "optimizer" not in state or not (last / ckpt.RNG_FILE).exists():
            raise CheckpointError(f"{last} holds weights only and cannot be resumed")
        opt_tensors = ckpt.load_tensors(last / ckpt.OPTIMIZER_FILE)
        try:
            self.optimizer.load_state_dict(ckpt.join_optimizer_state(opt_tensors,
                                                                     state["optimizer"]))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{last}: optimizer state does not fit the model: {e}") from None
        rng = ckpt.load_tensors(last / ckpt.RNG_FILE)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.env.world_size:
            self.log(f"warning: {last} was written by {saved_world} process(es), this run has "
                     f"{self.env.world_size}; training continues but is not bit-identical")
        r = self.env.rank
        cpu_state = rng.get(f"torch_cpu.{r}", rng["torch_cpu"] if r == 0 else None)
        if cpu_state is not None:
            torch.set_rng_state(cpu_state)
        cuda_state = rng.get(f"torch_cuda.{r}", rng.get("torch_cuda") if r == 0 else None)
        if self.device.type == "cuda" and cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)
        sampler_tensors = {k.removeprefix("sampler."): v for k, v in rng.items()
                           if k.startswith("sampler.")}
        if "sampler" in rng:  # the key written by the first checkpoint format
            sampler_tensors["generator"] = rng["sampler"]
        self.sampler.load_state_dict({**state.get("sampler", {}), **sampler_tensors})
        self.step = int(state["step"])
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.last_val_loss = float(state.get("val_loss", math.inf))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        if self.is_main:
            # Rows logged after this checkpoint by the interrupted process are replayed now.
            rows = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= self.step]
            atomic_write_text(
                self.run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows)
            )

    # output

    def log(self, message: str) -> None:
        if not self.is_main or self.quiet:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _record(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _plot(self) -> None:
        if not self.is_main:
            return
        from .plots import plot_loss_curve

        plot_loss_curve(read_metrics(self.run_dir), self.run_dir / PLOT_FILE)

    # checkpoints

    def _resume_tensors(self, sampler_state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """RNG and sampler states; every rank's RNG is gathered so each can resume its own."""
        rng: dict[str, torch.Tensor] = {}
        for r, t in enumerate(gather_tensors(torch.get_rng_state(), self.env)):
            rng["torch_cpu" if r == 0 else f"torch_cpu.{r}"] = t
        if self.device.type == "cuda":
            local = torch.cuda.get_rng_state(self.device).to(self.device)
            for r, t in enumerate(gather_tensors(local, self.env)):
                rng["torch_cuda" if r == 0 else f"torch_cuda.{r}"] = t.cpu()
        for k, v in sampler_state.items():
            if isinstance(v, torch.Tensor):
                rng[f"sampler.{k}"] = v
        return rng

    def save(self, name: str) -> None:
        """Write checkpoint `name`; every rank must call it (RNG states are gathered)."""
        with_resume_state = name == "last"
        sampler_state = self.sampler.state_dict()
        rng = self._resume_tensors(sampler_state) if with_resume_state else None
        if not self.is_main:
            return
        state = {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "val_loss": self.last_val_loss,
            "elapsed": self.elapsed(),
            "world_size": self.env.world_size,
            "sampler": {k: v for k, v in sampler_state.items()
                        if not isinstance(v, torch.Tensor)},
            "torch_version": torch.__version__,
        }
        data = ckpt.CheckpointData(
            state=state,
            config=self.cfg.to_dict(),
            vocab=json.loads(self.data.tokenizer.to_json()),
            optimizer=self.optimizer.state_dict() if with_resume_state else None,
            rng=rng,
        )
        ckpt.save(self.run_dir, name, self.model, data)

    # evaluation

    def evaluate(self) -> tuple[float, float]:
        tc = self.cfg.train
        losses = estimate_loss(
            self.model if self.env.enabled else self.forward,
            {"train": self.data.train, "val": self.data.val},
            block_size=self.cfg.model.block_size,
            batch_size=tc.batch_size,
            iters=tc.eval_iters,
            seed=tc.seed + 1,
            device=self.device,
            autocast=lambda: autocast_context(self.device, self.amp_dtype),
            env=self.env,
        )
        return losses["train"], losses["val"]

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def _eval_and_checkpoint(self) -> None:
        train_loss, val_loss = self.evaluate()
        self.last_val_loss = val_loss
        bpc = val_loss / math.log(2)
        elapsed = self.elapsed()
        self.log(
            f"step {self.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"val bpc {bpc:.3f}, {elapsed:.1f}s"
        )
        self._record({"kind": "eval", "step": self.step, "train_loss": train_loss,
                      "val_loss": val_loss, "val_bpc": bpc, "elapsed": round(elapsed, 3)})
        if not math.isfinite(val_loss):
            raise TrainingError(
                f"val loss is {val_loss} at step {self.step}; the last good checkpoint is "
                f"{self.run_dir / 'last'} (try a lower --lr or --dtype float32)"
            )
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.save("best")
        self.save("last")
        self._plot()

    # the loop

    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.cfg.model.block_size * self.env.world_size

    def _progress_bar(self):
        from tqdm.auto import tqdm

        tc = self.cfg.train
        enabled = tc.progress and self.is_main and not self.quiet and sys.stderr.isatty()
        if not enabled:
            return None
        return tqdm(total=tc.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                    leave=False, file=sys.stderr)

    def train_step(self) -> torch.Tensor | None:
        """One optimizer step; returns the mean micro-batch loss as a device tensor (no sync),
        or None when the 'skip' policy dropped the update."""
        tc = self.cfg.train
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            # a group may run at a multiple of the schedule (e.g. Muon's matrices)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            x, y = self.sampler.next_batch()
            # DDP all-reduces gradients on backward; only the last micro-step needs it.
            last = micro == tc.grad_accum - 1
            sync = self.forward.no_sync() if self.env.enabled and not last else _nullcontext()
            with sync:
                with autocast_context(self.device, self.amp_dtype):
                    _, loss = self.forward(x, y)
                loss = loss / tc.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        # fp16's GradScaler already skips steps with inf/NaN gradients; otherwise we check.
        skip = (tc.nonfinite == "skip" and not self.scaler.is_enabled()
                and not self._all_finite(total))
        if skip:
            self.skipped_steps += 1
            self.log(f"step {self.step + 1}: loss is not finite; update skipped")
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return None if skip else total

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Loss and every gradient finite, agreed across ranks (one sync; 'skip' policy only)."""
        ok = torch.isfinite(loss).float()
        for p in self.model.parameters():
            if p.grad is not None:
                ok = ok * torch.isfinite(p.grad).all()
        ok = all_reduce_mean(ok.reshape(1), self.env)  # 1.0 only if finite on every rank
        return bool(ok.item() == 1.0)

    def run(self, stop_at_step: int | None = None, time_limit: float | None = None) -> TrainResult:
        """Train until max_steps, `stop_at_step`, `time_limit` seconds of this call, or a signal.

        Stopping early leaves a `last/` checkpoint that a resume continues exactly."""
        tc = self.cfg.train
        end = tc.max_steps if stop_at_step is None else min(stop_at_step, tc.max_steps)
        self._t0 = time.perf_counter()
        self._deadline = None if time_limit is None else self._t0 + time_limit
        self._flops_per_token = estimate(self.cfg).flops_per_token
        n_params = self.model.num_params()
        world = f" x {self.env.world_size} processes" if self.env.enabled else ""
        self.log(
            f"{n_params / 1e6:.2f} M parameters | vocab {self.data.tokenizer.vocab_size} | "
            f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens | "
            f"{self.device.type}{world}, "
            f"{str(self.amp_dtype or torch.float32).removeprefix('torch.')} | "
            f"run dir {self.run_dir}"
        )
        if self.step > 0:
            self.log(f"resuming from step {self.step}")
        self.model.train()
        with StopRequest() as stop:
            self._bar = self._progress_bar()
            try:
                if self.step == 0:
                    self._eval_and_checkpoint()
                self._loop(end, stop)
            finally:
                if self._bar is not None:
                    self._bar.close()
                    self._bar = None
        return TrainResult(self.run_dir, self.step, self.best_val_loss, self.last_val_loss,
                           self.elapsed(), stop.signum)

    def _should_stop(self, stop: StopRequest, at_log_step: bool) -> bool:
        """A signal or the deadline; under DDP only at log steps, where ranks agree on it."""
        local = stop.signum is not None or (
            self._deadline is not None and time.perf_counter() >= self._deadline
        )
        if not self.env.enabled:
            return local
        if not at_log_step:
            return False
        return broadcast_flag(local, self.env, self.device)

    def _loop(self, end: int, stop: StopRequest) -> None:
        tc = self.cfg.train
        loss_sum = torch.zeros((), device=self.device)
        n_since_log, n_losses, t_log = 0, 0, time.perf_counter()
        saved_at = self.step
        stopping = self._should_stop(stop, at_log_step=True)
        while self.step < end and not stopping:
            loss = self.train_step()
            if self.step == self._crash_at:
                os._exit(17)
            n_since_log += 1
            if loss is not None:
                loss_sum += loss
                n_losses += 1
            at_log = self.step % tc.log_interval == 0 or self.step == end
            if at_log:
                mean = all_reduce_mean(loss_sum / max(n_losses, 1), self.env)
                mean_loss = mean.item()  # the only per-log sync
                now = time.perf_counter()
                tok_s = n_since_log * self.tokens_per_step() / max(now - t_log, 1e-9)
                if not math.isfinite(mean_loss):
                    raise TrainingError(
                        f"training loss became {mean_loss} by step {self.step}; the last good "
                        f"checkpoint is {self.run_dir / 'last'} (try a lower --lr, "
                        "--grad-clip 1.0 or --dtype float32)"
                    )
                util = mfu(self._flops_per_token, tok_s / self.env.world_size, self.device)
                self._record({"kind": "train", "step": self.step, "loss": mean_loss,
                              "lr": lr_at(self.step - 1, tc), "tok_per_s": round(tok_s),
                              "elapsed": round(self.elapsed(), 3),
                              **({"mfu": round(util, 4)} if util is not None else {}),
                              **({"skipped": self.skipped_steps} if self.skipped_steps else {})})
                if self._bar is not None:
                    mfu_text = f", MFU {util:.1%}" if util is not None else ""
                    self._bar.set_postfix_str(
                        f"loss {mean_loss:.4f}, {tok_s / 1e3:.1f}k tok/s{mfu_text}"
                    )
                loss_sum.zero_()
                n_since_log, n_losses, t_log = 0, 0, now
            if self._bar is not None:
                self._bar.update(1)
            if self.step % tc.eval_interval == 0 or self.step == tc.max_steps:
                self._eval_and_checkpoint()
                saved_at = self.step
            stopping = self._should_stop(stop, at_log)
        if self.step != saved_at:
            if n_losses and not math.isfinite(all_reduce_mean(loss_sum, self.env).item()):
                # Weights may be NaN since the last log step; never let them replace last/.
                raise TrainingError(
                    f"training loss became non-finite before step {self.step}; the last good "
                    f"checkpoint is {self.run_dir / 'last'}"
                )
            self.save("last")
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            self.log(f"{name} received: stopped after step {self.step}; checkpoint written to "
                     f"{self.run_dir / 'last'}; continue with: chargpt train --resume "
                     f"{self.run_dir}")


def _fault_step(env: DistEnv) -> int | None:
    """Test-only fault injection: CHARGPT_FAULT_EXIT_AT_STEP=N [CHARGPT_FAULT_RANK=r] makes
    rank r die like a lost machine after step N, on torchrun's first attempt only. Read once,
    so the training loop only compares two integers."""
    at = os.environ.get("CHARGPT_FAULT_EXIT_AT_STEP")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if at is None or not first_attempt:
        return None
    return int(at) if int(os.environ.get("CHARGPT_FAULT_RANK", "0")) == env.rank else None


def _write_config(run_dir: Path, cfg: Config) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")


def train(
    config: Config | None = None,
    *,
    resume: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    auto_resume: bool = False,
    stop_at_step: int | None = None,
    time_limit: float | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train a model from `config`, or continue the run in `resume` (then `overrides` may change
    [train] settings such as max_steps). With `auto_resume`, a config whose out_dir already
    holds this run continues from its last complete checkpoint (or starts over if none was
    written yet): the same call can be repeated after any crash, as torchrun's elastic restarts
    do. `stop_at_step` ends this call early, as an interruption would, leaving a checkpoint
    that `resume` continues exactly; so does `time_limit` (seconds of this call)."""
    if resume is not None:
        if config is not None:
            raise ConfigError("give either a config or a run directory to resume, not both")
        trainer = Trainer.resume(resume, overrides, quiet=quiet)
    else:
        cfg = config or Config()
        if overrides:
            cfg = apply_overrides(cfg, overrides, "overrides")
        out = Path(cfg.train.out_dir) if cfg.train.out_dir else None
        if auto_resume and out is not None and (out / CONFIG_FILE).exists():
            if ckpt.resolve(out, "last") is not None:
                trainer = Trainer.resume(out, {"train": _changed_train_keys(cfg, out)},
                                         quiet=quiet)
            else:  # killed before its first checkpoint: nothing to keep
                _start_over(out)
                trainer = Trainer.new(cfg, quiet=quiet)
        else:
            trainer = Trainer.new(cfg, quiet=quiet)
    result = trainer.run(stop_at_step=stop_at_step, time_limit=time_limit)
    trainer.env.barrier()  # no rank leaves while rank 0 may still be writing
    return result


def _changed_train_keys(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """[train] values of `cfg` that differ from the run's; any other difference is an error."""
    saved = load_run_config(run_dir)
    for section in ("model", "data"):
        ours, theirs = getattr(cfg, section), getattr(saved, section)
        for f in dataclasses.fields(ours):
            if f.name in ("vocab_size", "data_dir"):
                continue  # filled in when the run started
            if getattr(ours, f.name) != getattr(theirs, f.name):
                raise ConfigError(
                    f"{run_dir} holds a run with {section}.{f.name}="
                    f"{getattr(theirs, f.name)!r}, not {getattr(ours, f.name)!r}; use another --out"
                )
    return {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cfg.train)
            if getattr(cfg.train, f.name) != getattr(saved.train, f.name)}


def _start_over(run_dir: Path) -> None:
    env = DistEnv.from_env()
    if env.is_main:
        for name in (CONFIG_FILE, METRICS_FILE):
            (run_dir / name).unlink(missing_ok=True)
