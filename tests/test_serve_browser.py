"""The serve page end to end in a real headless Chromium, driven by Playwright.

Uses the system's Chromium (Debian's `chromium` package), never a downloaded browser, and skips
only when no Chromium binary can be found. A tiny model is trained for the test; setting
CHARGPT_SERVE_RUN to a run directory serves that model instead, and CHARGPT_SERVE_SCREENSHOTS
to a folder saves the screenshots there (that is how docs/images/serve*.png are made).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SERVE_CORPUS, tiny_flags, train_serve_run, write

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from chargpt.cli.commands import main  # noqa: E402
from chargpt.runs.run import load_run  # noqa: E402
from chargpt.serve.app import Limits, create_app  # noqa: E402
from chargpt.serve.background import BackgroundServer  # noqa: E402

pytestmark = pytest.mark.timeout(150)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    explicit = os.environ.get("CHARGPT_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None and os.environ.get("CI"):
        pytest.fail("no Chromium binary found, and CI must run the browser test (.ci/run "
                    "installs Debian's chromium)")
    if path is None:
        pytest.skip("no Chromium binary found (looked for /usr/bin/chromium, chromium on PATH "
                    "and $CHARGPT_CHROMIUM); install Debian's chromium package")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `chargpt serve` does on two cores; restored below
    run_dir = os.environ.get("CHARGPT_SERVE_RUN")
    if not run_dir:
        run_dir = str(train_serve_run(tmp_path_factory.mktemp("browser")))
    run = load_run(run_dir, device="cpu")
    limits = Limits(max_new_tokens=100_000, max_concurrent=2, request_timeout=60)
    try:
        with BackgroundServer(create_app(run, limits)) as srv:
            yield srv, run
    finally:
        torch.set_num_threads(threads)


def active_generations(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())["active"]


def test_page_generates_streams_stops_and_shows_attention(chromium, served, tmp_path,
                                                          monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    srv, run = served
    # The native loop writes 600 characters in a few ms, faster than the server's 30 ms
    # batches: paced to a character a millisecond, the text must arrive in many pieces.
    stream_ids = type(run).stream_ids

    def paced(self, *args, **kwargs):
        for text in stream_ids(self, *args, **kwargs):
            time.sleep(0.001)
            yield text

    monkeypatch.setattr(type(run), "stream_ids", paced)
    shots = Path(os.environ.get("CHARGPT_SERVE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    cfg = run.config.model
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 860})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(20_000)
            external: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(srv.url) else
                    external.append(r.url))
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text)
                    if m.type == "error" else None)
            page.goto(srv.url + "/")

            # The model's name, size, steps and val loss are shown.
            expect(page.locator("#info-name")).to_contain_text(run.checkpoint.parent.name)
            params = f"{run.model.num_params() / 1e6:.2f} M"
            expect(page.locator("#info-params")).to_have_text(params)
            expect(page.locator("#info-step")).to_have_text(f"{run.step:,}")
            expect(page.locator("#info-val")).to_have_text(f"{run.val_loss:.4f}")

            # Type a prompt, generate, and watch the text arrive in several pieces.
            page.evaluate("""() => {
                window.__pieces = 0;
                new MutationObserver((ms) => { window.__pieces += ms.length; })
                    .observe(document.getElementById('out-text'), {childList: true});
            }""")
            prompt = page.locator("#prompt")
            prompt.fill("")
            prompt.press_sequentially("ROMEO:")
            page.locator("#seed").fill("1")
            page.locator("#max-new-tokens").fill("600")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("done:", timeout=60_000)
            expect(page.locator("#out-prompt")).to_have_text("ROMEO:")
            text = page.locator("#out-text").text_content()
            assert len(text) == 600
            assert page.evaluate("window.__pieces") >= 2, "the text arrived in one piece"
            expected = run.generate("ROMEO:", 600, seed=1, temperature=0.8, top_k=50)
            assert text == expected
            out_box = page.locator("#output").bounding_box()
            assert out_box is not None
            page.screenshot(path=str(shots / "serve.png"), clip={
                "x": 0, "y": 0, "width": 1280, "height": out_box["y"] + out_box["height"] + 20})

            # The attention view: one heatmap per layer and head, hover shows a weight.
            page.locator("#attention").click()
            expect(page.locator("#attention-section")).to_be_visible()
            expect(page.locator("#attn-grid canvas")).to_have_count(cfg.n_layer * cfg.n_head)
            big = page.locator("#attn-big")
            box = big.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.9)
            expect(page.locator("#attn-hover")).to_contain_text("attends to")
            expect(page.locator("#attn-hover")).to_contain_text("with weight")
            first = page.locator("#attn-grid canvas").first
            first.click()
            expect(page.locator("#attn-focus-title")).to_contain_text("layer 1, head 1")
            first.hover()
            expect(page.locator("#attn-hover")).to_contain_text("layer 1 head 1")
            page.locator("#attention-section").screenshot(path=str(shots /
                                                                   "serve_attention.png"))

            # Stop: a long generation is cut off and the server's thread ends too.
            page.locator("#max-new-tokens").fill("100000")
            page.locator("#seed").fill("")
            page.locator("#generate").click()
            expect(page.locator("#stop")).to_be_enabled()
            expect(page.locator("#status")).to_contain_text("generating… ", timeout=20_000)
            page.locator("#stop").click()
            expect(page.locator("#status")).to_contain_text("stopped after")
            deadline = time.monotonic() + 5
            while active_generations(srv.url):
                assert time.monotonic() < deadline, "the stopped generation kept running"
                time.sleep(0.05)

            # Model text and errors are text, never markup: an unknown-character error that
            # echoes "<b>" stays a string in the status line.
            prompt.fill("<b>bold</b> é")
            page.locator("#max-new-tokens").fill("5")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("not in the vocabulary")
            assert page.locator("#status b").count() == 0
            assert external == [], f"the page fetched outside the server: {external}"
            assert console_errors == [] or all("400" in m for m in console_errors)
        finally:
            context.close()
    assert (shots / "serve.png").stat().st_size > 10_000


def test_attention_after_a_byte_models_generation(chromium, tmp_path):
    """A byte model samples bytes that are not UTF-8, which the page shows as U+FFFD; the
    Attention button still draws the maps, over the text's bytes."""
    from playwright.sync_api import expect, sync_playwright

    corpus = write(tmp_path / "corpus.txt", SERVE_CORPUS[:4000] + "café crème\n" * 100)
    flags = tiny_flags(block_size=32, max_steps=5, log_interval=5, warmup_steps=1,
                       sample_chars=0, unit="byte")
    assert main(["train", "--input", str(corpus), "--out", str(tmp_path / "run"), *flags]) == 0
    run = load_run(tmp_path / "run", device="cpu")
    assert "\ufffd" in run.generate("café", 12, seed=1, temperature=0.8, top_k=50)
    cfg = run.config.model
    with BackgroundServer(create_app(run, Limits(max_new_tokens=1000))) as srv, \
            sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(20_000)
            page.goto(srv.url + "/")
            expect(page.locator("#info-name")).to_contain_text("run")
            page.locator("#prompt").fill("café")
            page.locator("#seed").fill("1")
            page.locator("#max-new-tokens").fill("12")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("done:")
            assert "\ufffd" in page.locator("#out-text").text_content()
            page.locator("#attention").click()
            expect(page.locator("#status")).to_contain_text("attention over the last")
            expect(page.locator("#status")).to_contain_text("bytes")
            expect(page.locator("#attn-grid canvas")).to_have_count(cfg.n_layer * cfg.n_head)
        finally:
            context.close()
