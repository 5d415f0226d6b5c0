"""The `chargpt` command: subcommands, each a thin call into one module.

Config flags for `train` and `estimate` are generated from the config dataclasses (flags.py).
To add a subcommand, write its `cmd_NAME(args) -> int` and its parser block in `build_parser`.
Errors a user can fix are printed as one line,
`chargpt: error: ...`, with a non-zero exit status; torch is imported only by the subcommands
that need it, so `chargpt --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from . import __version__, faults
from .config import DEFAULT_PRESET, preset_description, preset_names, resolve_config
from .errors import ChargptError, ConfigError
from .flags import add_config_flags, config_overrides
from .io import os_reason

EXIT_ERROR, EXIT_USAGE = 1, 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"chargpt: error: {message} (see '{self.prog} --help')\n")


# --- subcommands ------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    import time

    from .preparation import prepare

    t0 = time.perf_counter()
    sources = args.input if len(args.input) > 1 else args.input[0]
    meta = prepare(sources, Path(args.out), val_fraction=args.val_fraction,
                   test_fraction=args.test_fraction, unit=args.unit, separator=args.separator,
                   progress=True)
    test = f" / {meta['test_tokens']:,} test" if meta["test_tokens"] else ""
    print(
        f"prepared {meta['total_chars']:,} {args.unit}s ({meta['vocab_size']} distinct) from "
        f"{len(meta['sources'])} file(s) in {time.perf_counter() - t0:.1f}s: "
        f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val{test} tokens "
        f"({meta['dtype']}) -> {args.out}"
    )
    return 0


def _print_sample(run_path: Path, chars: int, seed: int) -> tuple[int, str]:
    """Stream a sample from the best checkpoint (or last); returns its step and text."""
    from .run import load_run

    run = load_run(run_path, device="auto")
    print(f"--- sample from {run.checkpoint} (step {run.step}, seed {seed}) ---")
    text = []
    for ch in run.stream("", chars, seed=seed):
        sys.stdout.write(ch)
        sys.stdout.flush()
        text.append(ch)
    print()
    return run.step, "".join(text)


def cmd_train(args: argparse.Namespace) -> int:
    from .launch import train
    from .rundir import RunDir

    overrides = config_overrides(args)
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--preset and --config cannot be combined with --resume")
        result = train(resume=args.resume, overrides=overrides)
    else:
        result = train(resolve_config(args.preset, args.config, overrides),
                       auto_resume=args.auto_resume)
    if result.interrupted_by is not None:
        return 128 + result.interrupted_by
    print(f"done: {result.step} steps in {result.elapsed:.1f}s, best val loss "
          f"{result.best_val_loss:.4f} -> {result.run_dir / 'best'}")
    cfg = RunDir(result.run_dir).read_config()
    tc = cfg.train
    if tc.sample_chars:
        step, text = _print_sample(result.run_dir, tc.sample_chars, seed=tc.seed)
        if tc.log_to:
            from .trackers import log_sample

            log_sample(cfg, result.run_dir, step, text)
    print(f"sample more with: chargpt sample {result.run_dir} --prompt \"ROMEO:\"")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .run import load_run
    from .sampling import SamplingSettings
    from .textfiles import read_text_file

    if args.prompt is not None and args.prompt_file:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    prompt = read_text_file(args.prompt_file) if args.prompt_file else (args.prompt or "")
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise ConfigError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed,
                                use_cache=not args.no_kv_cache, compile=args.compile)
    run = load_run(args.run_dir, args.checkpoint, device=args.device)
    ids = run.encode_prompt(prompt, args.unknown)  # checked before anything is printed
    # all samples decode as one batch; the first streams, the others follow when it is done
    rest: list[list[str]] = [[] for _ in range(args.num_samples - 1)]
    sys.stdout.write(prompt)
    for chars in run.stream_samples(ids, args.max_new_tokens, settings, args.num_samples):
        sys.stdout.write(chars[0])
        sys.stdout.flush()
        for text, ch in zip(rest, chars[1:], strict=True):
            text.append(ch)
    for text in rest:
        sys.stdout.write(f"\n---\n{prompt}{''.join(text)}")
    sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import bits_per_char
    from .run import load_run
    from .rundir import RunDir
    from .textfiles import encode_file
    from .tokenizer import check_same_vocab

    run = load_run(args.run_dir, args.checkpoint, device=args.device)
    if args.input:
        tokens = encode_file(args.input, run.tokenizer, unknown=args.unknown)
        what = args.input
    else:
        rundir = RunDir(Path(args.run_dir))
        data = rundir.load_data(rundir.read_config())
        check_same_vocab(data.tokenizer, run.tokenizer,
                         what=f"{data.path} and {run.checkpoint}")
        tokens = data.split(args.split)
        what = f"the {args.split} split"
    loss = run.evaluate_ids(tokens, batch_size=args.batch_size)
    # bits per token: per byte for a byte-level run, the unit enwik8 results are given in
    print(f"{what}: loss {loss:.4f}, {bits_per_char(loss):.3f} bits/{run.tokenizer.unit} over "
          f"{len(tokens) - 1:,} predictions ({run.checkpoint}, step {run.step})")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from .config import apply_overrides
    from .datasets import DATASETS
    from .flops import report

    cfg = resolve_config(args.preset, args.config, config_overrides(args))
    # The named dataset's sizes, unless the run reads the user's own text.
    named = not (cfg.data.input or cfg.data.data_dir)
    vocab, chars = DATASETS[cfg.data.dataset if named else "shakespeare"].estimate_sizes
    vocab = args.vocab_size or vocab
    cfg = apply_overrides(cfg, {"model": {"vocab_size": vocab}}, "command line")
    print(report(cfg, gpu=args.gpu, gpus=args.gpus, mfu=args.mfu,
                 corpus_chars=args.corpus_chars or chars))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from .lm import build_model

    for name in preset_names():
        cfg = resolve_config(name, overrides={"model": {"vocab_size": 65}})
        with torch.device("meta"):
            n = build_model(cfg.model).num_params()
        marker = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:<18} {n / 1e6:7.2f} M params at vocab 65  {preset_description(name)}"
              f"{marker}")
    return 0


def cmd_ladder(args: argparse.Namespace) -> int:
    from . import ladder
    from .ladder_run import run_ladder

    if args.list:
        print(ladder.format_list())
        return 0
    budget = ladder.Budget(recipe=args.recipe, seeds=args.seeds, seed=args.seed,
                           max_steps=args.max_steps, seconds=args.seconds,
                           batch_size=args.batch_size, evals=args.evals)
    results = run_ladder(ladder.parse_rungs(args.rungs), args.out, budget, input=args.input)
    if results and results[-1].status.startswith("interrupted"):
        return 130
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from .plots import plot_attention_grid
    from .run import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device)
    if not args.prompt:
        raise ConfigError("--prompt must not be empty")
    prompt_ids = run.tokenizer.encode(args.prompt, what="prompt")
    ids = prompt_ids[-run.block_size :]
    maps = run.attention_maps(ids)  # (n_layer, n_head, T, T)
    if len(prompt_ids) > len(ids):
        print(f"note: the prompt has {len(prompt_ids)} characters; drawing its last "
              f"{len(ids)} (the model's block_size)", file=sys.stderr)
    chars = [run.tokenizer.decode([i]) for i in ids]
    title = f"attention maps of {Path(args.run_dir).resolve().name} at step {run.step}"
    plot_attention_grid(maps, chars, args.out, title=title)
    print(f"wrote {args.out}: {maps.shape[0]} layers x {maps.shape[1]} heads over "
          f"{len(ids)} characters")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import require_extra, serve

    require_extra()  # before torch is imported: a missing extra is a one-line error at once
    from .serve.api import Limits

    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_new_tokens=args.max_new_tokens,
                    max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent,
                    max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                    request_timeout=args.request_timeout)
    serve(args.run_dir, args.host, args.port, limits=limits, checkpoint=args.checkpoint,
          device=args.device, threads=args.threads, name=args.name, log_level=args.log_level)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hf import export_run

    fmt, out = args.to
    if fmt != "hf":
        raise ConfigError(f"unknown export format {fmt!r} (known: hf)")
    r = export_run(args.run_dir, out, checkpoint=args.checkpoint)
    print(f"exported {r.checkpoint} (step {r.step}) as {r.architecture} -> {r.out_dir} "
          f"(largest logit difference from chargpt {r.max_logit_diff:.1e} over "
          f"{r.checked_tokens} tokens)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .imports import import_model

    imported, out = import_model(args.src, args.out, meta=args.meta)
    m = imported.config
    print(f"imported {imported.source['format']} model from {args.src} -> {out}: "
          f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}, "
          f"vocab {m.vocab_size}")
    print(f"sample with: chargpt sample {out}")
    return 0


# --- parser -----------------------------------------------------------------------------------

# rundir.CHECKPOINTS, spelled out so that `chargpt --help` does not load torch (a test checks).
CHECKPOINT_CHOICES = ("best", "last")


def _checkpoint_flag(p: argparse.ArgumentParser) -> None:
    # Not given (None) differs from a typed "best": a damaged best is then passed over for last
    # with a warning, while a checkpoint the user named is refused (rundir.find_checkpoint).
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default=None,
                   help="which checkpoint of the run; a damaged one is refused (default: best, "
                   "or last, with a warning, when best is missing or damaged)")


def build_parser() -> Parser:
    parser = Parser(prog="chargpt", description="Train character-level GPT models and sample "
                    "from them.")
    parser.add_argument("--version", action="version", version=f"chargpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="COMMAND")

    p = sub.add_parser("prepare", help="turn UTF-8 text into a vocabulary and token files")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text file(s), folder(s) of .txt files, or glob pattern(s)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction held out for validation, from the end (default: 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="fraction held out after val, at the very end, as a test split "
                   "(default: 0, none)")
    p.add_argument("--unit", choices=("char", "byte"), default="char",
                   help="one token per character (code point) or per byte of UTF-8 "
                   "(default: char)")
    p.add_argument("--separator", default="\n\n",
                   help="text placed between documents when several files are given")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (default: Tiny Shakespeare on the CPU)",
                       description="Train a model. Values come from the preset, then --config, "
                       "then flags.")
    p.add_argument("--preset", choices=preset_names(), default=None,
                   help=f"start from a shipped preset (default: {DEFAULT_PRESET})")
    p.add_argument("--config", metavar="FILE", help="TOML file with [model], [data], [train]")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its last checkpoint ([train] flags may change)")
    p.add_argument("--auto-resume", action="store_true",
                   help="if --out already holds this run, continue it from its last checkpoint "
                   "(for restart scripts and torchrun --max-restarts)")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained model")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to draw, "
                   "decoded as one batch (sample i is seeded --seed + i)")
    p.add_argument("--compile", action="store_true", help="compile the decode step with "
                   "torch.compile: a slow first start, then faster per character")
    _checkpoint_flag(p)
    p.add_argument("--unknown", choices=("error", "skip", "replace"), default="error",
                   help="what to do with prompt characters the model has never seen")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the full context "
                   "for each character (slower; for comparison)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="loss and bits/char (bits/byte) on a split or any text")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--input", metavar="FILE", help="evaluate on this UTF-8 file instead")
    p.add_argument("--split", choices=("val", "train", "test"), default="val",
                   help="which split of the run's data (default: val); test needs data "
                   "prepared with a test split (--test-fraction, or a benchmark dataset)")
    _checkpoint_flag(p)
    p.add_argument("--unknown", choices=("error", "skip"), default="error")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ladder", help="retrace the lecture rung by rung, then go past it",
                       description="Train each rung of the ladder (the lecture's model built "
                       "up one idea at a time, then what small-model training added since), "
                       "score each on the whole val split, and write a table with the "
                       "lecture's own figures beside ours, curves and samples into --out.")
    p.add_argument("--list", action="store_true", help="list the rungs and their sizes, then exit")
    p.add_argument("--recipe", choices=("lecture", "fair"), default="lecture",
                   help="'lecture': each lecture rung with the lecture's hyperparameters, so "
                   "its figures can be checked; 'fair': one shared budget for every lecture "
                   "rung (default: lecture). Rungs past the lecture share one budget in both")
    p.add_argument("--rungs", "--steps", dest="rungs", default="all",
                   metavar="all|lecture|modern|NAME,NAME",
                   help="which rungs to run, in ladder order (default: all)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train each rung N times with seeds seed, seed+1, ... and report the "
                   "mean (default: 3 for the lecture's rungs, 1 past it)")
    p.add_argument("--seed", type=int, default=1337, help="the first seed (default: 1337)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="train every rung N steps instead of its recipe's count")
    budget.add_argument("--seconds", type=float, default=None, metavar="S",
                        help="train every rung for S seconds instead of a step count")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size for every rung (default: the recipe's)")
    p.add_argument("--evals", type=int, default=20, metavar="N",
                   help="points on each val curve (training-time estimates; default: 20)")
    p.add_argument("--input", metavar="FILE", default=None,
                   help="text to train on (default: Tiny Shakespeare, downloaded once)")
    p.add_argument("--out", default="runs/ladder", metavar="DIR",
                   help="one run directory per rung and seed, plus the report "
                   "(default: runs/ladder)")
    p.set_defaults(func=cmd_ladder)

    p = sub.add_parser("attention", help="draw a trained model's attention maps for a prompt")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text whose attention to draw")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the image")
    _checkpoint_flag(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("estimate", help="parameters, FLOPs, memory and time of a config",
                       description="Estimate what a configuration costs before training it.")
    p.add_argument("--preset", choices=preset_names(), default=None)
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokens in the vocabulary (default: the config's dataset's, e.g. 65 "
                   "for Tiny Shakespeare)")
    p.add_argument("--corpus-chars", type=int, default=None,
                   help="training tokens, for the time per epoch (default: the config's "
                   "dataset's)")
    p.add_argument("--gpu", default="A100", help="GPU model for the time estimate")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="assumed model FLOPs utilisation (default: 0.4)")
    add_config_flags(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("serve", help="a local web page and JSON API for a trained model",
                       description="Serve a trained model: a web page to generate text and view "
                       "attention, and a JSON API (see docs/serve.md). Needs the serve extra: "
                       "pip install 'chargpt[serve]'.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    _checkpoint_flag(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default=None, help="model name shown (default: the run's folder)")
    p.add_argument("--max-prompt-chars", type=int, default=4000,
                   help="longest prompt accepted (default: 4000)")
    p.add_argument("--max-new-tokens", type=int, default=2000,
                   help="most characters one request may generate (default: 2000)")
    p.add_argument("--max-body-bytes", type=int, default=65536,
                   help="largest request body (default: 65536)")
    p.add_argument("--max-concurrent", type=int, default=2,
                   help="generations running at once (default: 2)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a "
                   "slot; beyond that, 429 with Retry-After (default: 16)")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request waits for a slot before a 429 (default: 30)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds one generation may run (default: 60)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: cores / max-concurrent, at most 4)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                   default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a trained model in another library's format",
                       description="Write a trained model as a Hugging Face transformers "
                       "folder (model, config and character tokenizer); see "
                       "docs/ecosystem.md. Needs the hf extra: pip install 'chargpt[hf]'.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DIR"),
                   help="format (hf) and a new or empty output directory")
    _checkpoint_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="make a run directory from a Hugging Face or nanoGPT model",
                       description="Bring a Hugging Face GPT-2-shaped character model folder, or "
                       "a nanoGPT ckpt.pt with its meta.pkl, into a chargpt run directory. Only "
                       "tensors and plain data are read; nothing in the files is executed.")
    p.add_argument("src", metavar="SRC", help="Hugging Face folder, or nanoGPT ckpt.pt (or "
                   "the out dir holding it)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="new run directory")
    p.add_argument("--meta", metavar="FILE", default=None, help="nanoGPT meta.pkl with the "
                   "characters (default: next to ckpt.pt, or data/<dataset>/meta.pkl)")
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors and --help: argparse has printed what it had to say
        return int(e.code or 0)
    try:
        faults.load()  # test-only fault injection, read once here (see faults.py)
        return args.func(args)
    except ChargptError as e:
        print(f"chargpt: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("chargpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"chargpt: error: {os_reason(e)}{where}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
