"""Serving speed: `chargpt serve`'s app over real HTTP on 127.0.0.1, for a small trained run.

Trains a short run (see bench_resume.make_run), serves it from a background thread with the
default limits and one torch thread (what `chargpt serve` picks on a 2-core machine), then
measures: sequential non-streaming generations (characters per second, HTTP included), several
streaming generations at once (total characters per second, and /health's median and slowest
latency while they run), the attention endpoint and /health (median latency). Prints a
Markdown table.

    python benchmarks/bench_serve.py [--chars 300] [--clients 8]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_resume import SHAKESPEARE, make_run  # noqa: E402

from chargpt.runs.run import load_run  # noqa: E402
from chargpt.serve.app import Limits, create_app  # noqa: E402
from chargpt.serve.background import BackgroundServer  # noqa: E402

SEQUENTIAL = 10  # requests timed one after another


def post(srv: BackgroundServer, path: str, body: dict) -> bytes:
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return data
    finally:
        c.close()


def latency_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def health(srv: BackgroundServer) -> None:
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        c.request("GET", "/health")
        c.getresponse().read()
    finally:
        c.close()


def streams(srv: BackgroundServer, body: dict, clients: int,
            health_ms: list[float] | None = None) -> float:
    """Seconds for `clients` streaming generations at once; with `health_ms`, /health is
    polled while they run and each answer's latency appended to it."""
    threads = [threading.Thread(target=post, args=(srv, "/api/generate",
                                                   {**body, "seed": i, "stream": True}))
               for i in range(clients)]
    running = threading.Event()

    def poll() -> None:
        while running.is_set():
            health_ms.append(latency_ms(lambda: health(srv), 1))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    running.set()
    t0 = time.perf_counter()
    for t in threads if health_ms is None else [*threads, poller]:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    running.clear()
    if health_ms is not None:
        poller.join()
    return seconds


def measure_serve(chars: int, clients: int, input_path: Path = SHAKESPEARE) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = load_run(make_run(Path(tmp), input_path=input_path), device="cpu")
        limits = Limits(max_new_tokens=10_000, max_concurrent=2, max_queue=clients)
        app = create_app(run, limits)
        gc.freeze()  # as `chargpt serve` does once its app is built
        with BackgroundServer(app) as srv:
            body = {"prompt": "ROMEO:", "max_new_tokens": chars, "seed": 1}
            # warm-up, at full length: the first streaming response imports anyio's asyncio
            # backend (~0.3 s), and the first long generation pays ~0.2 s more; one-time costs
            # that would otherwise land in the measures
            for stream in (False, True):
                post(srv, "/api/generate", {**body, "stream": stream})
            t0 = time.perf_counter()
            for i in range(SEQUENTIAL):
                post(srv, "/api/generate", {**body, "seed": i})
            sequential = SEQUENTIAL * chars / (time.perf_counter() - t0)
            concurrent = clients * chars / streams(srv, body, clients)
            under_load: list[float] = []
            streams(srv, body, clients, under_load)  # a round of its own: polling costs time
            attention = latency_ms(lambda: post(srv, "/api/attention",
                                                {"prompt": "ROMEO: to be or not"}), 10)
            health_ms = latency_ms(lambda: health(srv), 50)
    return {"sequential": sequential, "concurrent": concurrent, "attention_ms": attention,
            "health_ms": health_ms, "health_streaming_ms": statistics.median(under_load),
            "health_streaming_max_ms": max(under_load)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=300, help="characters per generation")
    ap.add_argument("--clients", type=int, default=8, help="streams running at once")
    ap.add_argument("--input", type=Path, default=SHAKESPEARE)
    args = ap.parse_args()
    r = measure_serve(args.chars, args.clients, args.input)
    print(f"torch {torch.__version__}, 1 torch thread, {args.chars} characters per request")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| sequential /api/generate, chars/s | {r['sequential']:,.0f} |")
    print(f"| {args.clients} concurrent streams, total chars/s | {r['concurrent']:,.0f} |")
    print(f"| /health while they stream, median / max ms | {r['health_streaming_ms']:.1f} / "
          f"{r['health_streaming_max_ms']:.1f} |")
    print(f"| /api/attention median ms | {r['attention_ms']:.1f} |")
    print(f"| /health median ms | {r['health_ms']:.2f} |")


if __name__ == "__main__":
    main()
