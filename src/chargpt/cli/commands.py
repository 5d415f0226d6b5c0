"""The `chargpt` command: subcommands, each a thin call into one module.

Each subcommand is a `cmd_NAME(args) -> int`, found by its name in `COMMANDS`; its arguments
are declared in parser.py. To add a subcommand, write its `cmd_NAME`, add it to `COMMANDS`
and add its parser block to `parser.build_parser`. Errors a user can fix are printed as one
line, `chargpt: error: ...` (`errors.report`), with a non-zero exit status; torch is imported
only by the subcommands that need it, so `chargpt --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chargpt import errors
from chargpt.cli.parser import build_parser
from chargpt.config.flags import config_overrides
from chargpt.config.presets import DEFAULT_PRESET, preset_description, preset_names
from chargpt.config.resolve import resolve_config
from chargpt.config.schema import Config
from chargpt.errors import ChargptError, ConfigError
from chargpt.fileio import os_reason, shown

EXIT_ERROR = 1


# --- subcommands ------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    import time

    from chargpt.data.preparation import prepare

    t0 = time.perf_counter()
    sources = args.input if len(args.input) > 1 else args.input[0]
    meta = prepare(sources, Path(args.out), val_fraction=args.val_fraction,
                   test_fraction=args.test_fraction, unit=args.unit, separator=args.separator,
                   progress=True, overwrite=args.overwrite)
    test = f" / {meta['test_tokens']:,} test" if meta["test_tokens"] else ""
    print(
        f"prepared {meta['total_chars']:,} {args.unit}s ({meta['vocab_size']} distinct) from "
        f"{len(meta['sources'])} file(s) in {time.perf_counter() - t0:.1f}s: "
        f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val{test} tokens "
        f"({meta['dtype']}) -> {shown(args.out)}"
    )
    return 0


def _print_sample(run_path: Path, chars: int, seed: int) -> tuple[int, str]:
    """Stream a sample from the best checkpoint (or last); returns its step and text."""
    from chargpt.runs.run import load_run

    run = load_run(run_path, device="auto")
    print(f"--- sample from {run.checkpoint} (step {run.step}, seed {seed}) ---")
    text, write = [], _stdout_writer()
    for ch in run.stream("", chars, seed=seed):
        write(ch)
        sys.stdout.flush()
        text.append(ch)
    print()
    return run.step, "".join(text)


def cmd_train(args: argparse.Namespace) -> int:
    from chargpt.runs.rundir import RunDir
    from chargpt.training.launch import train

    overrides = config_overrides(args)
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--preset and --config cannot be combined with --resume")
        result = train(resume=args.resume, overrides=overrides)
    else:
        cfg = resolve_config(args.preset, args.config, _auto_size_default(args, overrides))
        if cfg.train.init_from:
            cfg = _finetune_config(cfg, args.config, overrides)
        result = train(cfg, auto_resume=args.auto_resume)
    if result.interrupted_by is not None:
        return 128 + result.interrupted_by
    print(f"done: {result.step} steps in {result.elapsed:.1f}s, best val loss "
          f"{result.best_val_loss:.4f} -> {result.run_dir / 'best'}")
    cfg = RunDir(result.run_dir).read_config()
    tc = cfg.train
    if tc.sample_chars:
        step, text = _print_sample(result.run_dir, tc.sample_chars, seed=tc.seed)
        if tc.log_to:
            from chargpt.training.trackers import log_sample

            log_sample(cfg, result.run_dir, step, text)
    print(f"sample more with: chargpt sample {result.run_dir} --prompt \"ROMEO:\"")
    return 0


def _auto_size_default(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with size 'auto' when only a time budget was given: no preset, no config
    file, no size, no model to start from, no value the size would choose."""
    from chargpt.config.resolve import SIZED_KEYS
    from chargpt.config.sizing import load_rule

    train = overrides.get("train") or {}
    shaped = any(k in (overrides.get(section) or {}) for section, keys in SIZED_KEYS.items()
                 for k in keys)
    if (not train.get("time_budget") or args.preset or args.config or "size" in train
            or train.get("init_from") or shaped or load_rule().forecast is None):
        return overrides
    return {**overrides, "train": {**train, "size": "auto"}}


def _finetune_config(cfg: Config, config_file: str | None,
                     overrides: dict[str, Any]) -> Config:
    from chargpt.training import finetune

    with finetune.source(cfg.train.init_from) as src:
        given = finetune.explicit_values(config_file, overrides)
        return finetune.finetune_config(cfg, src.config, cfg.train.init_from, given)


def cmd_sample(args: argparse.Namespace) -> int:
    from chargpt.generation.loop import check_lengths
    from chargpt.generation.settings import SamplingSettings
    from chargpt.runs.run import load_run
    from chargpt.text.textfiles import read_text_file

    if args.prompt is not None and args.prompt_file:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    prompt = read_text_file(args.prompt_file) if args.prompt_file else (args.prompt or "")
    check_lengths(args.num_samples, args.max_new_tokens)  # before the model is loaded
    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed,
                                use_cache=not args.no_kv_cache, compile=args.compile,
                                native=not args.no_native, weight_format=args.weight_format)
    run = load_run(args.run_dir, args.checkpoint, device=args.device)
    ids = run.encode_prompt(prompt, args.unknown)  # checked before anything is printed
    # all samples decode as one batch; the first streams, the others follow when it is done
    rest: list[list[str]] = [[] for _ in range(args.num_samples - 1)]
    samples = run.stream_samples(ids, args.max_new_tokens, settings, args.num_samples)
    write = _stdout_writer()
    write(prompt)
    for chars in samples:
        write(chars[0])
        sys.stdout.flush()
        for text, ch in zip(rest, chars[1:], strict=True):
            text.append(ch)
    for text in rest:
        write(f"\n---\n{prompt}{''.join(text)}")
    write("\n")
    return 0


def _stdout_writer() -> Callable[[str], None]:
    """sys.stdout.write for text a terminal's encoding may lack (a legacy Windows console,
    PYTHONIOENCODING=ascii): such characters are written as escapes (\\xe9) and a warning says
    so once, rather than a traceback halfway through a sample or a silent change."""
    warned = False

    def write(text: str) -> None:
        nonlocal warned
        try:
            sys.stdout.write(text)  # encoded whole before anything is written
        except UnicodeEncodeError:
            encoding = sys.stdout.encoding or "ascii"
            if not warned:
                errors.warn(f"stdout's encoding ({encoding}) cannot show some characters; "
                            "they are written as escapes such as \\xe9 (set "
                            "PYTHONIOENCODING=utf-8 to see them)")
                warned = True
            sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding))

    return write


def cmd_eval(args: argparse.Namespace) -> int:
    from chargpt.model.evaluate import bits_per_char
    from chargpt.runs.run import load_run
    from chargpt.runs.rundir import RunDir
    from chargpt.text.textfiles import encode_file
    from chargpt.text.tokenizer import check_same_vocab

    run = load_run(args.run_dir, args.checkpoint, device=args.device)
    if args.input:
        # eval has no --unknown replace: a replaced character would be scored as if written
        tokens = encode_file(args.input, run.tokenizer, unknown=args.unknown,
                             hint="use --unknown skip to leave them out of the text scored")
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
    from chargpt.config.schema import apply_overrides
    from chargpt.data.datasets import DATASETS
    from chargpt.model.flops import check_throughput, report
    from chargpt.runs.safety import check_bounds

    cfg = resolve_config(args.preset, args.config, config_overrides(args))
    check_throughput(args.gpus, args.mfu)
    if cfg.train.time_budget and cfg.data.input:
        if args.vocab_size is not None or args.corpus_chars is not None:
            raise ConfigError("--vocab-size and --corpus-chars are --input's own with --time; "
                              "leave them out")
        print(_forecast(cfg, args))
        return 0
    # The named dataset's sizes, unless the run reads the user's own text.
    named = not (cfg.data.input or cfg.data.data_dir)
    vocab, chars = DATASETS[cfg.data.dataset if named else "shakespeare"].estimate_sizes
    vocab = vocab if args.vocab_size is None else args.vocab_size
    if vocab < 1:  # 0 is the config's "not known yet", which the estimate cannot price
        raise ConfigError(f"--vocab-size must be >= 1, got {vocab}")
    cfg = apply_overrides(cfg, {"model": {"vocab_size": vocab}}, "command line")
    check_bounds(cfg.model, "command line", why="")  # sizes no model has, before any count
    print(report(cfg, gpu=args.gpu or "A100", gpus=args.gpus, mfu=args.mfu,
                 corpus_chars=chars if args.corpus_chars is None else args.corpus_chars))
    return 0


def _forecast(cfg: Config, args: argparse.Namespace) -> str:
    """What `train --input FILE --time T` would choose, timed here (or on --gpu)."""
    import tempfile

    import torch

    from chargpt.config.schema import apply_overrides
    from chargpt.data.preparation import prepare
    from chargpt.data.prepared import load_prepared
    from chargpt.data.stats import corpus_stats
    from chargpt.device import pick_device, precision
    from chargpt.distributed import DistEnv
    from chargpt.runs.rundir import RunDir
    from chargpt.training import autosize

    dc = cfg.data
    with tempfile.TemporaryDirectory(prefix="chargpt-estimate-") as tmp:
        prepare(dc.input, Path(tmp) / "data", val_fraction=dc.val_fraction,
                test_fraction=dc.test_fraction, unit=dc.unit, progress=True)
        data = load_prepared(Path(tmp) / "data")
        device = torch.device("cpu") if args.gpu else pick_device(cfg.train.device)
        # timed in the precision `train` would resolve for a new run here
        cfg = apply_overrides(cfg, {"model": {"vocab_size": data.tokenizer.vocab_size},
                                    "train": {"dtype": precision(device, cfg.train.dtype)}},
                              "the corpus")
        times = (autosize.gpu_step_seconds(cfg, args.gpu, args.gpus, args.mfu) if args.gpu
                 else None)
        _, choice, _ = autosize.auto_size(cfg, RunDir(Path(tmp) / "run"), data, DistEnv(),
                                          device, times)
        body = autosize.block_params_of(cfg)
        stats = corpus_stats(data)
    # a small model's GPU step is kernel launches more than arithmetic: its MFU is far lower
    where = (f"{args.gpus} x {args.gpu} at {args.mfu:.0%} MFU (from FLOPs, not timed; the "
             "small sizes reach far less on a GPU, where `train` times every size)"
             if args.gpu else f"this machine ({device}), timed")
    return (f"{choice.describe(cfg.train.time_budget)}\n\nstep times: {where}; corpus: "
            f"{stats.train_tokens:,} training tokens, vocabulary {stats.vocab_size}, "
            f"{stats.bits_per_char:.2f} bits/char under lzma\n\n"
            f"{autosize.forecast_table(choice, body, stats)}")


def cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from chargpt.model.build import build_model

    for name in preset_names():
        cfg = resolve_config(name, overrides={"model": {"vocab_size": 65}})
        with torch.device("meta"):
            n = build_model(cfg.model).num_params()
        marker = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:<18} {n / 1e6:7.2f} M params at vocab 65  {preset_description(name)}"
              f"{marker}")
    return 0


def cmd_ladder(args: argparse.Namespace) -> int:
    from chargpt.ladder import rungs as ladder
    from chargpt.ladder.runner import run_ladder

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
    from chargpt.plots import plot_attention_grid
    from chargpt.runs.run import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device)
    if not args.prompt:
        raise ConfigError("--prompt must not be empty")
    prompt_ids = run.encode_prompt(args.prompt, args.unknown)
    ids = prompt_ids[-run.block_size :]
    maps = run.attention_maps(ids)  # (n_layer, n_head, T, T)
    if len(prompt_ids) > len(ids):
        errors.warn(f"the prompt has {len(prompt_ids)} characters; drawing its last {len(ids)} "
                    "(the model's block_size)")
    chars = [run.tokenizer.decode([i]) for i in ids]
    title = f"attention maps of {Path(args.run_dir).resolve().name} at step {run.step}"
    plot_attention_grid(maps, chars, args.out, title=title)
    print(f"wrote {args.out}: {maps.shape[0]} layers x {maps.shape[1]} heads over "
          f"{len(ids)} characters")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from chargpt.serve import require_extra, serve

    require_extra()  # before torch is imported: a missing extra is a one-line error at once
    from chargpt.serve.api import Limits

    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_new_tokens=args.max_new_tokens,
                    max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent,
                    max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                    request_timeout=args.request_timeout)
    serve(args.run_dir, args.host, args.port, limits=limits, checkpoint=args.checkpoint,
          device=args.device, threads=args.threads, name=args.name, log_level=args.log_level,
          weight_format=args.weight_format)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from chargpt.interop.hf_export import export_run

    fmt, out = args.to
    if fmt != "hf":
        raise ConfigError(f"unknown export format {fmt!r} (known: hf)")
    r = export_run(args.run_dir, out, checkpoint=args.checkpoint)
    print(f"exported {r.checkpoint} (step {r.step}) as {r.architecture} -> {r.out_dir} "
          f"(largest logit difference from chargpt {r.max_logit_diff:.1e} over "
          f"{r.checked_tokens} tokens)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from chargpt.interop.importer import import_model

    imported, out = import_model(args.src, args.out, meta=args.meta)
    m = imported.config
    print(f"imported {imported.source['format']} model from {args.src} -> {out}: "
          f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}, "
          f"vocab {m.vocab_size}")
    print(f"sample with: chargpt sample {out}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
    "ladder": cmd_ladder, "attention": cmd_attention, "estimate": cmd_estimate,
    "presets": cmd_presets, "serve": cmd_serve, "export": cmd_export, "import": cmd_import,
}


def main(argv: list[str] | None = None) -> int:
    # A path given as bytes that are not UTF-8 prints as those bytes, whatever the locale
    # (under a C or C.UTF-8 locale Python already does this; elsewhere print would raise).
    if callable(reconfigure := getattr(sys.stdout, "reconfigure", None)):
        reconfigure(errors="surrogateescape")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors and --help: argparse has printed what it had to say
        return int(e.code or 0)
    try:
        return COMMANDS[args.command](args)
    except ChargptError as e:
        errors.report(e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("chargpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file chargpt could not read or write: its path, then why
        where = f"{shown(e.filename)}: " if e.filename else ""
        errors.report(ChargptError(f"{where}{os_reason(e)}"))
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
