"""How far chargpt is from this machine's limits: training to a time budget and sampling speed.

Prints, in one run on one machine, with the load average beside each part:

1. Sampling, chars/s: the default model (3 layers, 4 heads, 96 wide, block 64, rotary) at
   batch 1 and 16, fast-cpu's 4 x 128 model (the default before the default shrank to the size
   a short budget buys best) and the lecture-size model (6 x 384, block 256); chargpt's eager
   and compiled decode steps, and a nanoGPT-shaped reference loop written below (learned
   positions, full recomputation of the context each character, torch.multinomial), all
   interleaved so they share the machine's load: the torch step eager (`--no-native`) and
   compiled (`--no-native --compile`), and the native C loop (the default; for 6 x 384 also
   with `--weights bfloat16` and `--weights int8`, "native-bf16", "native-int8"). Next to each:
   the FLOP-bound ceiling, the rate at which this machine multiplies the model's own weight
   shapes (a batched matmul) divided by the FLOPs one character costs; and the ratio to it.
   Under the table, the memory-bound ceilings of batch 1 for the model whose weights outgrow
   the caches: this machine's streaming bandwidth over the bytes of weights one character
   reads, for each way of storing them.
2. Training to a budget: `chargpt train --time 30s` and `--time 2m` (as the CLI runs it: the
   size the budget buys), each scored on the whole val split (`evaluate_tokens`).
3. The race of benchmarks/time_to_loss.py: classic-cpu against fast-cpu (and the default
   preset), time to whole-split val 1.89 and the val each reaches in the classic run's full
   time.

    python benchmarks/speed.py [--threads 1] [--chars 2000] [--skip-train] [--skip-race]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from time_to_loss import SHAKESPEARE, RefGPT  # noqa: E402

from chargpt.config.resolve import resolve_config  # noqa: E402
from chargpt.config.schema import ModelConfig  # noqa: E402
from chargpt.generation.loop import generate  # noqa: E402
from chargpt.model.build import build_model  # noqa: E402

DEFAULT = dataclasses.replace(resolve_config().model, vocab_size=65)
FAST = dataclasses.replace(resolve_config("fast-cpu").model, vocab_size=65)  # 4 x 128
LARGE = dataclasses.replace(DEFAULT, n_layer=6, n_head=6, n_embd=384, block_size=256)
NARROW = {"native-bf16": "bfloat16", "native-int8": "int8"}  # rows with narrower weights


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


# --- the ceiling --------------------------------------------------------------------------------


def matmul_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every weight matrix a character passes through."""
    c, h = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    return [(c, 3 * c), (c, c), (c, h), (h, c)] * cfg.n_layer + [(c, cfg.vocab_size)]


def flops_per_char(cfg: ModelConfig) -> float:
    """Forward FLOPs of one new character: the matmuls, and attention over a full cache."""
    weights = sum(i * o for i, o in matmul_shapes(cfg))
    return 2 * weights + 4 * cfg.n_layer * cfg.block_size * cfg.n_embd


def matmul_flops(cfg: ModelConfig, rows: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of this machine on the model's weight shapes, `rows` characters at once."""
    mats = [(torch.randn(rows, i), torch.randn(o, i)) for i, o in matmul_shapes(cfg)]
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w in mats:
            F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * sum(i * o for i, o in matmul_shapes(cfg)) / best


def stream_bandwidth(repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory: the best of a few sums of 400 MB."""
    x = torch.ones(100_000_000)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


# --- sampling -----------------------------------------------------------------------------------


def nanogpt_generate(model: RefGPT, idx: torch.Tensor, n: int, block: int,
                     generator: torch.Generator) -> torch.Tensor:
    """nanoGPT's decode loop: crop to the block, a full forward, the last logits, a draw."""
    with torch.no_grad():
        for _ in range(n):
            context = idx[:, -block:]
            x = model.tok(context) + model.pos(torch.arange(context.size(1)))
            logits = model.head(model.ln(model.blocks(x)[:, -1]))  # (B, V): last position only
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
    return idx


def sampler(kind: str, cfg: ModelConfig, batch: int):
    """A function n -> seconds to sample n characters per sequence, for one way of decoding."""
    torch.manual_seed(0)
    idx = torch.zeros(batch, 1, dtype=torch.long)
    if kind == "nanogpt":
        ref = RefGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).eval()

        def run_ref(n: int) -> None:
            nanogpt_generate(ref, idx, n, cfg.block_size, torch.Generator().manual_seed(1))
        return run_ref
    model = build_model(cfg)
    with torch.no_grad():  # trained-looking weights: zero-initialised projections drawn
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, 0.02)

    def run_chargpt(n: int) -> None:
        generate(model, idx, n, seed=1, compile=kind == "compiled",
                 native=kind.startswith("native"),
                 weight_format=NARROW.get(kind, "float32"))
    return run_chargpt


def sampling_rows(chars: int, rounds: int) -> list[dict]:
    torch_and_native = ("eager", "compiled", "native")
    cases = [("default", DEFAULT, 1, k) for k in ("nanogpt", *torch_and_native)]
    cases += [("default", DEFAULT, 16, k) for k in ("nanogpt", *torch_and_native)]
    cases += [("4x128", FAST, 1, k) for k in ("nanogpt", *torch_and_native)]
    cases += [("4x128", FAST, 16, k) for k in ("compiled", "native")]
    cases += [("6x384/256", LARGE, 1, k) for k in (*torch_and_native, *NARROW)]
    fns = []
    for _name, cfg, batch, kind in cases:
        fn = sampler(kind, cfg, batch)
        t0 = time.perf_counter()
        fn(8)  # warm-up; for the compiled step, compilation
        fns.append((fn, time.perf_counter() - t0))
    seconds: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):  # interleaved: every way of decoding sees the same load
        for i, (fn, _) in enumerate(fns):
            t0 = time.perf_counter()
            fn(chars)
            seconds[i].append((time.perf_counter() - t0) / chars)
    ceilings = {id(cfg): matmul_flops(cfg) / flops_per_char(cfg) for cfg in (DEFAULT, FAST, LARGE)}
    rows = []
    for (name, cfg, batch, kind), (_, warm), secs in zip(cases, fns, seconds, strict=True):
        rate = batch / statistics.median(secs)
        rows.append(dict(model=name, batch=batch, kind=kind, rate=rate, warm=warm,
                         ceiling=ceilings[id(cfg)]))
    return rows


def print_sampling(rows: list[dict], chars: int, rounds: int, before: str) -> None:
    print(f"\n### Sampling ({chars} characters per sequence, median of {rounds} interleaved "
          f"rounds; load {before} before, {load()} after)\n")
    print("| model | batch | decode | chars/s | FLOP-bound ceiling | of ceiling | vs nanoGPT "
          "loop | first call, s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    base = {(r["model"], r["batch"]): r["rate"] for r in rows if r["kind"] == "nanogpt"}
    for r in rows:
        ref = base.get((r["model"], r["batch"]))
        vs = f"{r['rate'] / ref:.1f}x" if ref else "-"
        print(f"| {r['model']} | {r['batch']} | {r['kind']} | {r['rate']:,.0f} | "
              f"{r['ceiling']:,.0f} | {r['rate'] / r['ceiling']:.1%} | {vs} | {r['warm']:.1f} |")
    eager = {(r["model"], r["batch"]): r["rate"] for r in rows if r["kind"] == "eager"}
    print()
    for r in rows:
        if r["kind"] not in ("eager", "nanogpt") and (r["model"], r["batch"]) in eager:
            print(f"\n{r['kind']} / eager, {r['model']} batch {r['batch']}: "
                  f"{r['rate'] / eager[(r['model'], r['batch'])]:.1f}x", end="")
    print()
    bandwidth = stream_bandwidth()
    rate = {r["kind"]: r["rate"] for r in rows if r["model"] == "6x384/256"}
    print(f"\n6x384/256 at batch 1 reads all its weight matrices for each character; this machine "
          f"streams {bandwidth / 1e9:.1f} GB/s from memory (a sum over 400 MB, "
          f"{torch.get_num_threads()} threads), so each way of storing them has a memory-bound "
          "ceiling (a rate past it means the weights are served partly from the CPU's "
          "last-level cache):\n")
    print("| decode | weights | MB per character | memory-bound ceiling, chars/s | reached |")
    print("|---|---|---:|---:|---:|")
    for kind, stored, size in (("native", "float32", 4), ("native-bf16", "bfloat16", 2),
                               ("native-int8", "int8 + a scale per row", 1)):
        mb = size * sum(i * o for i, o in matmul_shapes(LARGE)) / 1e6
        ceiling = bandwidth / (mb * 1e6)
        print(f"| {kind} | {stored} | {mb:.1f} | {ceiling:,.0f} | {rate[kind] / ceiling:.0%} |")


# --- training -----------------------------------------------------------------------------------


def budget_run(budget: str, data_dir: str, out: Path) -> dict:
    """`chargpt train --time BUDGET` as the CLI runs it (the size chosen for the budget,
    `--size auto`); val over the whole split."""
    from chargpt.data.prepared import load_prepared
    from chargpt.runs.run import load_run
    from chargpt.training.launch import train

    cfg = resolve_config(overrides={"data": {"data_dir": data_dir}, "train": {
        "time_budget": budget, "out_dir": str(out), "progress": False, "sample_chars": 0,
        "size": "auto"}})
    t0 = time.perf_counter()
    result = train(cfg, quiet=True)
    wall = time.perf_counter() - t0
    val = load_run(out, "last", device="cpu").evaluate_ids(load_prepared(Path(data_dir)).val,
                                                           batch_size=256)
    return dict(budget=budget, steps=result.step, wall=wall, trainer=result.elapsed, val=val)


def print_budgets(rows: list[dict], before: str) -> None:
    print(f"\n### chargpt train --time (default preset; load {before} before, {load()} after)\n")
    print("| budget | steps planned | trainer clock, s | wall incl. setup, s | whole-split val |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['budget']} | {r['steps']} | {r['trainer']:.1f} | {r['wall']:.1f} | "
              f"{r['val']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budgets", default="30s,2m")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-race", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load {load()} at start")
    before = load()
    print_sampling(sampling_rows(args.chars, args.rounds), args.chars, args.rounds, before)
    if args.skip_train:
        return
    from chargpt.data.preparation import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "data")
        prepare(str(SHAKESPEARE), data_dir)
        before = load()
        rows = [budget_run(b, data_dir, Path(tmp) / f"t{b}") for b in args.budgets.split(",")]
        print_budgets(rows, before)
    if not args.skip_race:
        print(f"\n### classic-cpu against fast-cpu (benchmarks/time_to_loss.py; load {load()})\n",
              flush=True)
        import time_to_loss

        sys.argv = [sys.argv[0]]
        time_to_loss.main()
        print(f"\n(load {load()} at the end)")


if __name__ == "__main__":
    main()
