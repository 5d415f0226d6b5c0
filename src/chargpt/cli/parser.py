"""The `chargpt` command's arguments: one parser block per subcommand, as a declarative table.

`build_parser` says what each subcommand accepts; cli.py says what it does (`cmd_NAME`, found
by the subcommand's name). The `train` and `estimate` config flags are generated from the config
dataclasses (flags.py). A usage error is one line, `chargpt: error: ...`, with exit status 2.
Nothing here imports torch, so `chargpt --help` is instant.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from chargpt import __version__
from chargpt.config.flags import add_config_flags
from chargpt.config.presets import DEFAULT_PRESET, preset_names

__all__ = ["CHECKPOINT_CHOICES", "EXIT_USAGE", "Parser", "build_parser"]

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"chargpt: error: {message} (see '{self.prog} --help')\n")


# rundir.CHECKPOINTS, spelled out so that `chargpt --help` does not load torch (a test checks).
CHECKPOINT_CHOICES = ("best", "last")


def _weights_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", dest="weight_format", default="float32", metavar="KIND",
                   help="how the native decode loop stores weight matrices: float32 (default), "
                   "bfloat16 or int8, which halve or quarter the memory read per token (faster "
                   "for models larger than the CPU's caches; samples may differ from float32's)")


def _checkpoint_flag(p: argparse.ArgumentParser) -> None:
    # Not given (None) differs from a typed "best": a damaged best is then passed over for last
    # with a warning, while a checkpoint the user named is refused (rundir.find_checkpoint).
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default=None,
                   help="which checkpoint of the run; a damaged one is refused (default: best, "
                   "or last, with a warning, when best is missing or damaged)")


def _unknown_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unknown", choices=("error", "skip", "replace"), default="error",
                   help="what to do with prompt characters the model has never seen")


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
    p.add_argument("--overwrite", action="store_true",
                   help="replace prepared data already in --out that came from other text or "
                   "settings (never a run's own data/; the same data is always re-prepared)")

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
    p.add_argument("--compile", action="store_true", help="compile the torch decode step "
                   "with torch.compile, for models the native C loop does not run")
    p.add_argument("--no-native", action="store_true", help="decode with the torch step "
                   "instead of the native C loop (built with the machine's C compiler)")
    _weights_flag(p)
    _checkpoint_flag(p)
    _unknown_flag(p)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the full context "
                   "for each character (slower; for comparison)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("eval", help="loss and bits/char (bits/byte) on a split or any text")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--input", metavar="FILE", help="evaluate on this UTF-8 file instead")
    p.add_argument("--split", choices=("val", "train", "test"), default="val",
                   help="which split of the run's data (default: val); test needs data "
                   "prepared with a test split (--test-fraction, or a benchmark dataset)")
    _checkpoint_flag(p)
    p.add_argument("--unknown", choices=("error", "skip"), default="error",
                   help="what to do with characters of --input the model has never seen")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")

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

    p = sub.add_parser("attention", help="draw a trained model's attention maps for a prompt")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text whose attention to draw")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the image")
    _checkpoint_flag(p)
    _unknown_flag(p)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("estimate", help="parameters, FLOPs, memory and time of a config",
                       description="Estimate what a configuration costs before training it. "
                       "With --input FILE and --time T: the model `chargpt train --input FILE "
                       "--time T` would choose here, and the val loss to expect.")
    p.add_argument("--preset", choices=preset_names(), default=None)
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokens in the vocabulary (default: the config's dataset's, e.g. 65 "
                   "for Tiny Shakespeare)")
    p.add_argument("--corpus-chars", type=int, default=None,
                   help="training tokens, for the time per epoch (default: the config's "
                   "dataset's)")
    p.add_argument("--gpu", default=None,
                   help="GPU model for the time estimate (H100, H200, B200, A100, 4090, ...; "
                   "default A100); with --input and --time, the forecast is for this GPU "
                   "instead of this machine")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="assumed model FLOPs utilisation (default: 0.4; a model of a few M "
                   "parameters reaches far less on a GPU, where launches outlast its arithmetic)")
    add_config_flags(p)

    sub.add_parser("presets", help="list the shipped presets")

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
    _weights_flag(p)
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                   default="info")

    p = sub.add_parser("export", help="write a trained model in another library's format",
                       description="Write a trained model as a Hugging Face transformers "
                       "folder (model, config and character tokenizer); see "
                       "docs/ecosystem.md. Needs the hf extra: pip install 'chargpt[hf]'.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DIR"),
                   help="format (hf) and a new or empty output directory")
    _checkpoint_flag(p)

    p = sub.add_parser("import", help="make a run directory from a Hugging Face or nanoGPT model",
                       description="Bring a Hugging Face GPT-2-shaped character model folder, or "
                       "a nanoGPT ckpt.pt with its meta.pkl, into a chargpt run directory. Only "
                       "tensors and plain data are read; nothing in the files is executed.")
    p.add_argument("src", metavar="SRC", help="Hugging Face folder, or nanoGPT ckpt.pt (or "
                   "the out dir holding it)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="new run directory")
    p.add_argument("--meta", metavar="FILE", default=None, help="nanoGPT meta.pkl with the "
                   "characters (default: next to ckpt.pt, or data/<dataset>/meta.pkl)")
    return parser
