"""Time to a good loss: the classic recipe against the fast one, side by side on this machine.

Trains the `classic-cpu` and `fast-cpu` presets (same model size) and the `--also` presets
(by default `shakespeare-cpu`, the fast recipe at the smaller size that is chargpt's default)
on Tiny Shakespeare in one process, one step of each in turn (always the one whose training
clock is behind), so all see the same load on a shared machine. The training clock counts
only `Trainer.train_step`; every `--snapshot-every` seconds of it the weights are copied aside
(no evaluation while training).
Afterwards ONE evaluator, `chargpt.model.evaluate.evaluate_tokens` over the whole val split, scores
the snapshots: the last one of each run, the others' snapshots at the classic run's full
wall time, and a bisection for the first time each run reaches `--target` (assuming the val
loss falls over time; the time is interpolated between the two bracketing snapshots).

It also times a plain eager PyTorch implementation of the classic model (written below, no
chargpt code) against the classic preset's training step, interleaved in blocks of steps.

    python benchmarks/time_to_loss.py [--target 1.89] [--snapshot-every 2.5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chargpt.config.resolve import resolve_config
from chargpt.data.preparation import prepare
from chargpt.model.build import build_model
from chargpt.model.evaluate import evaluate_tokens
from chargpt.training.launch import new_trainer
from chargpt.training.trainer import Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


# --- a plain eager PyTorch reference of the classic model -------------------------------------


class RefBlock(nn.Module):
    def __init__(self, c: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.out = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    """The lecture's model as anyone would write it in plain PyTorch."""

    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, c: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, c), nn.Embedding(block, c)
        self.blocks = nn.Sequential(*[RefBlock(c, n_head) for _ in range(n_layer)])
        self.ln, self.head = nn.LayerNorm(c), nn.Linear(c, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def reference_vs_classic_ms(trainer: Trainer, blocks: int = 8, steps: int = 15) -> tuple:
    """Median ms/step of the plain reference and of the classic trainer, interleaved."""
    cfg = trainer.cfg
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    ref = RefGPT(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd)
    opt = torch.optim.AdamW(ref.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                            weight_decay=t.weight_decay)
    sampler = trainer.sampler

    def ref_step() -> None:
        x, y = sampler.next_batch()
        loss = ref(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ref_ms, ours_ms = [], []
    for fn in (ref_step, trainer.train_step):  # warm-up
        for _ in range(5):
            fn()
    for _ in range(blocks):
        for fn, out in ((ref_step, ref_ms), (trainer.train_step, ours_ms)):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            out.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(ref_ms), statistics.median(ours_ms)


# --- the race ---------------------------------------------------------------------------------


@dataclass
class Run:
    preset: str
    trainer: Trainer
    clock: float = 0.0  # seconds inside train_step
    snapshots: list[tuple[float, int, dict]] = field(default_factory=list)  # (time, step, w)
    losses: dict[int, float] = field(default_factory=dict)  # snapshot index -> val loss

    def snapshot(self) -> None:
        weights = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        self.snapshots.append((self.clock, self.trainer.step, weights))

    @property
    def done(self) -> bool:
        return self.trainer.step >= self.trainer.cfg.train.max_steps


def make_trainer(preset: str, data_dir: str, out: Path, seed: int,
                 max_steps: int | None = None) -> Trainer:
    train = {"out_dir": str(out), "progress": False, "sample_chars": 0, "seed": seed}
    if max_steps:
        train["max_steps"] = max_steps
    cfg = resolve_config(preset, overrides={"data": {"data_dir": data_dir}, "train": train})
    trainer = new_trainer(cfg, quiet=True)
    trainer.model.train()
    return trainer


def race(runs: list[Run], every: float, horizon: float | None = None) -> None:
    """Step whichever unfinished run has the smaller clock until all are done (or past the
    horizon), copying weights every `every` seconds of each run's own clock."""
    for run in runs:
        run.snapshot()
    while True:
        active = [r for r in runs if not r.done and (horizon is None or r.clock < horizon)]
        if not active:
            break
        run = min(active, key=lambda r: r.clock)
        t0 = time.perf_counter()
        loss = run.trainer.train_step()
        loss.item()  # CPU: already computed; on a GPU this waits for the step to finish
        run.clock += time.perf_counter() - t0
        if run.clock >= every * len(run.snapshots) or run.done:
            run.snapshot()


class Evaluator:
    """The one evaluator: loss over every character of the val split."""

    def __init__(self, val, device: torch.device) -> None:
        self.val, self.device = val, device
        self.seconds = 0.0

    def __call__(self, run: Run, i: int) -> float:
        if i not in run.losses:
            t0 = time.perf_counter()
            model = build_model(run.trainer.cfg.model).to(self.device)
            model.load_state_dict(run.snapshots[i][2])
            run.losses[i] = evaluate_tokens(model, self.val, device=self.device, batch_size=256,
                                            block_size=run.trainer.cfg.model.block_size)
            self.seconds += time.perf_counter() - t0
        return run.losses[i]


def time_to_target(run: Run, evaluate: Evaluator, target: float) -> float:
    """Seconds of training until the val loss first reaches `target` (inf if never)."""
    last = len(run.snapshots) - 1
    if evaluate(run, last) > target:
        return math.inf
    lo, hi = 0, last  # loss(lo) > target >= loss(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(run, mid) > target:
            lo = mid
        else:
            hi = mid
    (t_lo, _, _), (t_hi, _, _) = run.snapshots[lo], run.snapshots[hi]
    l_lo, l_hi = evaluate(run, lo), evaluate(run, hi)
    return t_lo + (t_hi - t_lo) * (l_lo - target) / max(l_lo - l_hi, 1e-12)


def index_at(run: Run, seconds: float) -> int:
    """The last snapshot taken at or before `seconds` of training."""
    return max(i for i, (t, _, _) in enumerate(run.snapshots) if t <= seconds + 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=SHAKESPEARE)
    ap.add_argument("--classic", default="classic-cpu")
    ap.add_argument("--fast", default="fast-cpu")
    ap.add_argument("--also", default="shakespeare-cpu",
                    help="comma-separated presets raced beside the two ('' for none)")
    ap.add_argument("--target", type=float, default=1.89)
    ap.add_argument("--snapshot-every", type=float, default=2.5, help="training seconds")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--max-steps", type=int, default=0, help="override both presets (smoke)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "data")
        prepare(str(args.input), data_dir)
        classic = Run(args.classic, make_trainer(args.classic, data_dir, Path(tmp) / "c",
                                                 args.seed, args.max_steps))
        fast = Run(args.fast, make_trainer(args.fast, data_dir, Path(tmp) / "f", args.seed,
                                           args.max_steps))
        others = [Run(name, make_trainer(name, data_dir, Path(tmp) / f"o{i}", args.seed,
                                         args.max_steps))
                  for i, name in enumerate(filter(None, args.also.split(",")))]
        race([classic, fast, *others], args.snapshot_every)
        horizon = classic.clock
        evaluate = Evaluator(classic.trainer.data.val, classic.trainer.device)
        rows = []
        # every other run's state at the classic run's full wall time (or its end, if earlier)
        for run, at_horizon in ((classic, len(classic.snapshots) - 1),
                                *((r, index_at(r, horizon)) for r in (fast, *others))):
            reach = time_to_target(run, evaluate, args.target)
            rows.append((run, reach, evaluate(run, at_horizon), run.snapshots[at_horizon]))
        ref_ms, classic_ms = reference_vs_classic_ms(
            make_trainer(args.classic, data_dir, Path(tmp) / "c2", args.seed))

    n_val = len(classic.trainer.data.val)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{classic.trainer.device.type}; val loss = evaluate_tokens over all {n_val:,} val "
          f"characters; training clock excludes evaluation ({evaluate.seconds:.0f}s of it)\n")
    print(f"| preset | params | steps | ms/step | s to val {args.target} | "
          f"val at {horizon:.1f}s (classic's full time) | step there |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run, reach, loss, (_, step, _) in rows:
        tr = run.trainer
        ms = run.clock / max(tr.step, 1) * 1e3
        reach_s = f"{reach:.1f}" if math.isfinite(reach) else "not reached"
        print(f"| {run.preset} | {tr.model.num_params() / 1e6:.2f} M | {tr.step} | {ms:.1f} | "
              f"{reach_s} | {loss:.4f} | {step} |")
    c_reach, f_reach = rows[0][1], rows[1][1]
    if math.isfinite(c_reach) and math.isfinite(f_reach):
        print(f"\nfast reaches {args.target} in {f_reach / c_reach:.2f}x the classic time "
              f"(target <= 0.25); fast val at classic's full time: {rows[1][2]:.4f} "
              f"(target <= 1.60)")
    for run, reach, _, _ in rows[2:]:
        if math.isfinite(c_reach) and math.isfinite(reach):
            print(f"{run.preset} reaches {args.target} in {reach / c_reach:.2f}x the classic time")
    print("\n| implementation (classic model, same batch) | ms/step |")
    print("|---|---:|")
    print(f"| plain eager PyTorch reference (this file) | {ref_ms:.1f} |")
    print(f"| chargpt {args.classic} | {classic_ms:.1f} |")


if __name__ == "__main__":
    main()
