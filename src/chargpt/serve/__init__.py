"""`chargpt serve`: a local web page and JSON API for one trained model.

The server itself lives in `app.py` and needs the optional `serve` extra (Starlette and
uvicorn); this module stays importable without it, so the CLI can say what to install instead of
failing with a traceback. `serve()` loads a run, sets torch's thread count and runs uvicorn in the
foreground until Ctrl-C.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from chargpt.errors import ChargptError, warn
from chargpt.serve.hosts import is_loopback

if TYPE_CHECKING:
    from chargpt.serve.api import Limits

INSTALL_HINT = "chargpt serve needs the serve extra: pip install 'chargpt[serve]'"
REQUIRED = ("starlette", "uvicorn")


def require_extra() -> None:
    """Raise a one-line ChargptError if the `serve` extra is not installed."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise ChargptError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")


def default_threads(max_concurrent: int) -> int:
    """Torch threads per process: the cores shared out among concurrent generations.

    A small model gains little from intra-op threads, and several generations each asking for
    every core would only fight over them.
    """
    cores = os.cpu_count() or 1
    return max(1, min(4, cores // max(1, max_concurrent)))


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
          limits: Limits | None = None, checkpoint: str | None = None, device: str = "auto",
          threads: int | None = None, name: str | None = None, log_level: str = "info",
          weight_format: str = "float32") -> None:
    """Load `run_dir` and serve it on http://host:port until interrupted; `weight_format` is
    how the native decode loop stores the weight matrices (SamplingSettings.weight_format)."""
    require_extra()
    import torch

    from chargpt.generation.settings import SamplingSettings
    from chargpt.runs.run import load_run
    from chargpt.serve.api import Limits
    from chargpt.serve.app import create_app, model_name
    from chargpt.serve.runner import Server, uvicorn_config

    SamplingSettings(weight_format=weight_format)  # an unknown kind: one line, before loading
    limits = limits or Limits()
    if not 0 <= port <= 65535:
        raise ChargptError(f"--port must be between 0 and 65535, got {port}")
    run = load_run(run_dir, checkpoint, device=device)
    n_threads = threads if threads is not None else default_threads(limits.max_concurrent)
    if n_threads < 1:
        raise ChargptError(f"--threads must be >= 1, got {n_threads}")
    torch.set_num_threads(n_threads)
    # On a loopback address only requests for a loopback name are answered; --host 0.0.0.0
    # opened the server deliberately (and is warned about below), so any Host is accepted.
    app = create_app(run, limits, name=name, weight_format=weight_format,
                     loopback_only=is_loopback(host))
    # What is alive now lives as long as the server: left to the cyclic collector, its full
    # passes over it stall a request by ~0.2 s (benchmarks/bench_serve.py); frozen, never
    gc.freeze()
    # Binding here turns "address already in use" into a one-line error instead of a log.
    sock = bind(host, port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name or model_name(run)} ({run.model.num_params() / 1e6:.2f} M params, "
          f"step {run.step}) at http://{shown}:{port}/ (torch threads: {n_threads}; Ctrl-C "
          "to stop)", flush=True)
    if not is_loopback(host):
        warn(f"listening on {host}, not loopback: anyone who can reach this machine can use the "
             "model")
    config = uvicorn_config(app, log_level=log_level, timeout_graceful_shutdown=3)
    try:
        Server(config, on_shutdown=app.state.server.shutdown).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; stopping is the normal way out
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port, or a one-line ChargptError."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ChargptError(f"cannot resolve --host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ChargptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
