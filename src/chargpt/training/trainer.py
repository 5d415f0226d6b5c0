"""The training loop: step, log, evaluate, checkpoint, until done or interrupted.

A `Trainer` holds one run's model, optimizer, batch sampler and run directory (launch.py builds it,
for a new run or a resumed one) and `run()` trains until max_steps (which a time budget's plans or
the plateau rule may move, budget.py, plateau.py), a time limit or a signal. A resumed run restores
weights, optimizer, step, random-number states and the batch sampler (a `trainstate.TrainState`),
and evaluation draws its batches from its own fixed-seed sampler, so on CPU a run interrupted after
N steps and resumed gives bit-identical weights to an uninterrupted one. The hot path does no host-
device synchronisation except at log and eval steps. SIGINT and SIGTERM finish the current step,
write `last/`, and return; a second Ctrl-C aborts at once (the previous checkpoint is never
damaged, see checkpoint.py). What the run tells (console lines, the progress bar, metrics rows, the
loss curve) goes through its `trainlog.TrainLog`.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chargpt import faults
from chargpt.config.schema import Config
from chargpt.config.sizing import expected
from chargpt.data.batches import BatchSampler
from chargpt.data.prepared import PreparedData
from chargpt.device import allow_tf32, autocast_context, autocast_dtype
from chargpt.distributed import DistEnv, all_reduce_mean, gather_tensors
from chargpt.errors import CheckpointError, TrainingError, warn
from chargpt.model.build import build_model
from chargpt.model.compiling import compiled
from chargpt.model.evaluate import estimate_loss
from chargpt.model.flops import estimate, mfu
from chargpt.runs import checkpoint as ckpt
from chargpt.runs.rundir import BEST, LAST, RunDir
from chargpt.runs.safety import check_optimizer_state
from chargpt.runs.trainstate import TrainState
from chargpt.training.budget import EVAL_PROBE_ITERS, Planner, covering_iters
from chargpt.training.optim import lr_at, make_optimizer
from chargpt.training.plateau import counted, end_early, final_word
from chargpt.training.stopping import StopRequest
from chargpt.training.trainlog import SinceLog, TrainLog, describe


@dataclass
class TrainResult:
    """What a call to `train()` achieved."""

    run_dir: Path
    step: int
    best_val_loss: float
    last_val_loss: float
    elapsed: float
    interrupted_by: int | None = None  # signal number, when stopped by SIGINT/SIGTERM


class Trainer:
    """One training run; built by `launch.new_trainer` or `launch.resume_trainer`; call `run()`.

    Under torchrun every process builds a Trainer; rank 0 prepares the data and writes all
    files, the model is wrapped in DistributedDataParallel, and decisions that must be taken by
    all ranks together (stop on a signal or a deadline) are agreed on at log steps.
    """

    def __init__(self, cfg: Config, rundir: RunDir, data: PreparedData, env: DistEnv,
                 device: torch.device, quiet: bool = False):
        self.cfg, self.rundir, self.data = cfg, rundir, data
        self.run_dir = rundir.path
        self.env, self.device = env, device
        self.is_main = env.is_main
        self.out = TrainLog(rundir, env.is_main, quiet)
        tc = cfg.train
        self.amp_dtype = autocast_dtype(self.device, tc.dtype)
        allow_tf32(self.device)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model).to(self.device)
        if env.rank:
            torch.manual_seed(tc.seed + env.rank)  # but different dropout masks
        forward: Any = compiled(self.model, self.device.type) if tc.compile else self.model
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DDP(forward, device_ids=ids)
        self.forward = forward
        self.optimizer = make_optimizer(self.model, tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype is torch.float16)
        self.sampler = BatchSampler(
            data.train, cfg.model.block_size, tc.batch_size, seed=tc.seed, device=self.device,
            rank=env.rank, world_size=env.world_size, order=tc.data_order)
        self.step = 0
        self.resumed = False  # a resumed run's checkpoint follows its evaluation at that step
        self.best_val_loss = self.last_val_loss = math.inf
        self.elapsed_before = 0.0
        self.stale_evals = 0  # evaluations in a row without a clearly better val loss
        self.skipped_steps = 0
        # a time budget not yet turned into a step count: the steps are timed (budget.py)
        self._planner = Planner.of(tc, covering_iters(
            len(data.val), tc.batch_size * cfg.model.block_size))
        self._config_stale = False  # a plan newer than config.json

    def restore(self, last: Path, state: TrainState) -> None:
        """Continue from checkpoint `last`: its weights and its training state."""
        ckpt.load_model_tensors(self.model, last)
        try:
            self.optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{last}: optimizer state does not fit the model: {e}") from None
        check_optimizer_state(self.optimizer, last)
        if state.world_size != self.env.world_size and self.is_main:
            warn(f"{last} was written by {state.world_size} process(es), this run has "
                 f"{self.env.world_size}; training continues but is not bit-identical")
        cpu_rng, cuda_rng = state.rng_of(self.env.rank)
        if cpu_rng is not None:
            torch.set_rng_state(cpu_rng)
        if self.device.type == "cuda" and cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.sampler.load_state_dict(state.sampler)
        self.step, self.resumed = state.step, True
        self.best_val_loss, self.last_val_loss = state.best_val_loss, state.val_loss
        self.elapsed_before, self.stale_evals = state.elapsed, state.stale_evals
        if self.is_main:
            # Rows logged after this checkpoint by the interrupted process are replayed now.
            self.rundir.truncate_metrics(self.step)

    # checkpoints

    def _gather_rng(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Every rank's CPU (and CUDA) RNG state, so that each can resume its own."""
        cpu = gather_tensors(torch.get_rng_state(), self.env)
        cuda = None
        if self.device.type == "cuda":
            local = torch.cuda.get_rng_state(self.device).to(self.device)
            cuda = [t.cpu() for t in gather_tensors(local, self.env)]
        return cpu, cuda

    def save(self, name: str) -> None:
        """Write checkpoint `name`; every rank must call it (RNG states are gathered)."""
        resumable = name == LAST
        cpu_rng, cuda_rng = self._gather_rng() if resumable else (None, None)
        if not self.is_main:
            return
        if self._config_stale:  # a resume must find the plan the saved steps were taken under
            self.rundir.write_config(self.cfg)
            self._config_stale = False
        state = TrainState(
            step=self.step, best_val_loss=self.best_val_loss, val_loss=self.last_val_loss,
            elapsed=self.elapsed(), stale_evals=self.stale_evals, world_size=self.env.world_size,
            sampler=self.sampler.state_dict(), cpu_rng=cpu_rng, cuda_rng=cuda_rng,
            optimizer=self.optimizer.state_dict() if resumable else None,
        )
        data = ckpt.CheckpointData(config=self.cfg.to_dict(),
                                   vocab=self.data.tokenizer.to_dict(), state=state)
        try:
            ckpt.save(self.run_dir, name, self.model, data)
        except ckpt.SaveError as e:
            raise self.out.write_failed(f"checkpoint {e.target}", e.reason) from None

    # evaluation

    def evaluate(self, iters: int | None = None) -> tuple[float, float]:
        """Train and val loss, averaged over `iters` (default eval_iters) batches each."""
        tc = self.cfg.train
        losses = estimate_loss(
            self.model if self.env.enabled else self.forward,
            {"train": self.data.train, "val": self.data.val},
            block_size=self.cfg.model.block_size,
            batch_size=tc.batch_size,
            iters=iters or tc.eval_iters,
            seed=tc.seed + 1,
            device=self.device,
            autocast=lambda: autocast_context(self.device, self.amp_dtype),
            env=self.env,
        )
        return losses["train"], losses["val"]

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def _eval_and_checkpoint(self) -> None:
        t0 = time.perf_counter()
        train_loss, val_loss = self.evaluate()
        t1 = time.perf_counter()
        self.last_val_loss = val_loss
        bpc = val_loss / math.log(2)
        elapsed = self.elapsed()
        self.out.log(
            f"step {self.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"val {'bpb' if self.data.tokenizer.unit == 'byte' else 'bpc'} {bpc:.3f}, "
            f"{elapsed:.1f}s"
        )
        self.out.record({"kind": "eval", "step": self.step, "train_loss": train_loss,
                         "val_loss": val_loss, "val_bpc": bpc, "elapsed": round(elapsed, 3)})
        if not math.isfinite(val_loss):
            raise self._diverged(f"val loss is {val_loss} at step {self.step}",
                                 "try a lower --lr or --dtype float32")
        self.stale_evals = counted(self.stale_evals, val_loss, self.best_val_loss)
        self._end_if_plateaued(val_loss)
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.save(BEST)
        self.save(LAST)
        self.out.plot()
        if self._planner is not None:
            t2 = time.perf_counter()
            self._planner.evaluated((t1 - t0) / self.cfg.train.eval_iters, t2 - t1, t2 - t0)

    def _end_if_plateaued(self, val_loss: float) -> None:
        """End the run early when its val loss has stopped improving (plateau.py): the revised
        plan reaches config.json before the checkpoints of this evaluation, and no budget
        plan moves it again."""
        ended = end_early(self.cfg.train, self.step, self.stale_evals, val_loss,
                          self.best_val_loss)
        if ended is None:
            return
        train, message = ended
        self.cfg = dataclasses.replace(self.cfg, train=train)
        self._config_stale = True
        self._planner = None
        self.out.set_total(train.max_steps)
        self.out.log(message)

    def _diverged(self, what: str, advice: str = "") -> TrainingError:
        """The error for a non-finite loss: `what` happened, and which checkpoint is still good
        (a non-finite loss never replaces one)."""
        hint = f" ({advice})" if advice else ""
        return TrainingError(f"{what}; the last good checkpoint is "
                             f"{self.rundir.checkpoint(LAST)}{hint}")

    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.cfg.model.block_size * self.env.world_size

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
            sync = self.forward.no_sync() if self.env.enabled and not last else nullcontext()
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
            self.out.log(f"step {self.step + 1}: loss is not finite; update skipped")
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

    def run(self, time_limit: float | None = None) -> TrainResult:
        """Train until max_steps, `time_limit` seconds of this call, or a signal.

        Stopping early leaves a `last/` checkpoint that a resume continues exactly."""
        tc = self.cfg.train
        self.out.open_trackers(self.cfg, self.step)
        self._t0 = time.perf_counter()
        deadline = None if time_limit is None else self._t0 + time_limit
        self._flops_per_token = estimate(self.cfg).flops_per_token
        self.out.log(describe(self.model, self.data, self.device, self.amp_dtype, self.env,
                              self.run_dir))
        if self.resumed:
            self.out.log(f"resuming from step {self.step}")
        self.model.train()
        with StopRequest(self.env, self.device, deadline) as stop:
            self.out.open_bar(tc.max_steps, self.step, tc.progress)
            try:
                if not (self.resumed or tc.time_budget):  # a budget buys steps instead
                    self._eval_and_checkpoint()
                self._loop(stop)
            finally:
                self.out.close()
        return TrainResult(self.run_dir, self.step, self.best_val_loss, self.last_val_loss,
                           self.elapsed(), stop.signum)

    def _loop(self, stop: StopRequest) -> None:
        tc = self.cfg.train
        since = SinceLog(torch.zeros((), device=self.device))
        saved_at = self.step
        stopping = stop.due(at_log_step=True)
        while self.step < tc.max_steps and not stopping:
            since.add(self.train_step())
            faults.active().after_step(self.step)
            if self._planner is not None and self._planner.after_step(self.step, tc):
                self._plan(self._planner)
                tc = self.cfg.train  # max_steps and the evaluations as planned
            at_log = self.step % tc.log_interval == 0 or self.step == tc.max_steps
            if at_log:
                self._log_train(since)
            self.out.advance()
            if self.step % tc.eval_interval == 0 or self.step == tc.max_steps:
                self._eval_and_checkpoint()
                saved_at = self.step
                tc = self.cfg.train  # the plateau rule may have chosen an earlier end
            stopping = stop.due(at_log)
        if self.step != saved_at:
            if since.losses and not math.isfinite(all_reduce_mean(since.total, self.env).item()):
                # Weights may be NaN since the last log step; never let them replace last/.
                raise self._diverged(f"training loss became non-finite before step {self.step}")
            self.save(LAST)
        final = final_word(self.last_val_loss, self.best_val_loss)
        if self.step >= tc.max_steps and final is not None:
            self.out.log(final)
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            self.out.log(f"{name} received: stopped after step {self.step}; checkpoint written "
                         f"to {self.rundir.checkpoint(LAST)}; continue with: chargpt train "
                         f"--resume {self.run_dir}")

    def _plan(self, planner: Planner) -> None:
        """Fix (or revise) max_steps and the evaluations from the budget and the clock."""
        t0 = time.perf_counter()
        first = not planner.clock.planned
        train, message = planner.plan(
            self.cfg.train, self.step, self.elapsed(), rehearse=self._rehearse_evaluation,
            average=lambda xs: all_reduce_mean(torch.tensor(xs), self.env).tolist())
        if train is not None:
            self.cfg = dataclasses.replace(self.cfg, train=train)
            self._config_stale = True
            self.out.set_total(train.max_steps)
        if message is not None:
            self.out.log(message)
        if first and self.is_main:
            if line := expected(self.cfg, self.model, self.data, self.tokens_per_step()):
                self.out.log(line)
                self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(
                    self.cfg.train, size_choice=line))
            self.rundir.write_config(self.cfg)
            self._config_stale = False
        planner.clock.exclude(time.perf_counter() - t0)

    def _rehearse_evaluation(self) -> tuple[float, float]:
        """What an evaluation costs, before the first one (a budget run has no step-0
        evaluation): a few of its batches, timed and scaled to eval_iters, then a real `last/`
        checkpoint and plot, timed after a first plot has loaded the plotting library."""
        tc = self.cfg.train
        iters = min(EVAL_PROBE_ITERS, tc.eval_iters)
        self.evaluate(iters=1)  # the first batches in eval mode warm up
        t0 = time.perf_counter()
        self.evaluate(iters=iters)
        batch = (time.perf_counter() - t0) / iters
        self.out.plot()
        t0 = time.perf_counter()
        self.save(LAST)
        self.out.plot()
        return batch, 2 * (time.perf_counter() - t0)  # best/ and last/ at a new best

    def _log_train(self, since: SinceLog) -> None:
        """A log step: the mean loss since the last one (the only per-log sync), speed, MFU."""
        mean_loss = all_reduce_mean(since.total / max(since.losses, 1), self.env).item()
        now = time.perf_counter()
        tok_s = since.steps * self.tokens_per_step() / max(now - since.t0, 1e-9)
        if not math.isfinite(mean_loss):
            raise self._diverged(f"training loss became {mean_loss} by step {self.step}",
                                 "try a lower --lr, --grad-clip 1.0 or --dtype float32")
        util = mfu(self._flops_per_token, tok_s / self.env.world_size, self.device)
        self.out.record({"kind": "train", "step": self.step, "loss": mean_loss,
                         "lr": lr_at(self.step - 1, self.cfg.train), "tok_per_s": round(tok_s),
                         "elapsed": round(self.elapsed(), 3),
                         **({"mfu": round(util, 4)} if util is not None else {}),
                         **({"skipped": self.skipped_steps} if self.skipped_steps else {})})
        mfu_text = f", MFU {util:.1%}" if util is not None else ""
        self.out.show(f"loss {mean_loss:.4f}, {tok_s / 1e3:.1f}k tok/s{mfu_text}")
        since.reset(now)
