"""Fixtures of this package. Real servers are started once and shared by its modules (a start costs seconds on two
cores): one for the studio's browser tests (test_browser*.py) and one for the API tests (the openai client,
edits, LoRAs, every family, clients people already use). Each is started by the first test of a test process
that needs it and kept until that process ends: with the suite in parallel processes, modules of other packages
run between this package's modules, and a package-scoped server was stopped and started again around each of
them. The browser tests also get a real headless Chromium (Debian's package, driven by Playwright) per module,
and a fresh tab per test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Playwright, ViewportSize, expect, sync_playwright

from fluxserve.models.registry import BUILTIN_MODELS
from tests.conftest import ARTIFACTS, ServerProcess

CHROMIUM = Path(os.environ.get("FLUX_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP: ViewportSize = {"width": 1440, "height": 900}
SLOW_STEPS = 100_000  # at 256x256: many minutes of work, even for a fast CPU


@pytest.fixture(scope="module")  # not longer: a started sync Playwright is a running event loop for asyncio
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it; a silent skip there would hide a broken setup
        pytest.skip(message)
    expect.set_options(timeout=10_000)  # a loaded 2-core machine is slow; the default 5 s flakes
    manager = sync_playwright().start()
    yield manager
    manager.stop()


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh desktop-sized tab. Fails the test on uncaught script errors and CSP violations."""
    context = browser.new_context(viewport=DESKTOP, color_scheme="light", locale="en-US")
    context.set_default_timeout(15_000)
    page = context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            problems.append(f"CSP: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.suppress(Error):  # only a debugging aid: the page may be gone after a hard failure
        page.screenshot(path=str(ARTIFACTS / f"browser-{request.node.name}.png"))
    context.close()
    assert not problems, "the page reported errors:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def studio_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studio") / "outputs"


@pytest.fixture(scope="session")
def studio_server(cache_dir: Path, studio_outputs: Path) -> Iterator[ServerProcess]:
    """One real server (tiny-flux, plus tiny-qwen on demand) for the browser tests that need no special
    settings, in every module.

    Tests select the model they need first (``use_model``), so they do not depend on their order or their
    module. Steps may go high enough that a generation or an edit can be cancelled long before it would
    end. It declares hub downloads (and a token) so its picker offers every registry model, as a server
    with hub access does: the picker's labels for gated and non-commercial models are under test; no test
    selects a model that would download.
    """
    server = ServerProcess({"FLUX_MODEL": "tiny-flux", "FLUX_CACHE_DIR": str(cache_dir), "FLUX_DEVICE": "cpu",
                            "FLUX_OUTPUT_DIR": str(studio_outputs), "FLUX_WARMUP_SIZES": "64x64",
                            "FLUX_STATE_DIR": str(studio_outputs.parent / "state"),  # its own job store
                            "FLUX_MAX_STEPS": str(SLOW_STEPS), "FLUX_MAX_MEGAPIXEL_STEPS": "1e9",
                            "FLUX_HUB_DOWNLOADS": "on", "HF_TOKEN": "hf_placeholder_for_the_picker"},
                           studio_outputs.parent / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared API server's own files: its log, outputs, job store and LoRA library (``loras/``)."""
    return tmp_path_factory.mktemp("e2e-api")


@pytest.fixture(scope="session")
def live(cache_dir: Path, live_dir: Path) -> Iterator[ServerProcess]:
    """One real server on tiny-flux for the API tests of every module here that need no settings of their own.

    Requests may name every tiny family (FLUX_MODELS); the models the edit and client tests use first are
    loaded at start; its job store is its own (never the user's state directory, which another server may
    hold), and so is its LoRA library (it holds only the demo adapter serving tiny-flux writes until a test
    adds one); logs are structured (JSON lines) for the tests that read access records; steps and
    compute limits are raised so that a job can run long enough to be cancelled. A test that switches the
    active model switches it back; a test that releases memory leaves models to load again on demand.
    """
    out = live_dir
    tiny = [key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None]
    server = ServerProcess({"FLUX_MODEL": "tiny-flux", "FLUX_MODELS": ",".join(tiny),
                            "FLUX_PRELOAD_MODELS": "tiny-qwen,tiny-kontext,tiny-qwen-edit",
                            "FLUX_CACHE_DIR": str(cache_dir), "FLUX_DEVICE": "cpu", "FLUX_WARMUP_SIZES": "64x64",
                            "FLUX_OUTPUT_DIR": str(out / "outputs"), "FLUX_STATE_DIR": str(out / "state"),
                            "FLUX_LORA_DIR": str(out / "loras"), "FLUX_STRUCTURED_LOGS": "1",
                            "FLUX_MAX_STEPS": "100000", "FLUX_MAX_MEGAPIXEL_STEPS": "1e9"},
                           out / "server.log")
    try:
        server.wait_ready(timeout=300)
    except BaseException:
        server.stop()
        raise
    yield server
    assert server.stop() == 0
