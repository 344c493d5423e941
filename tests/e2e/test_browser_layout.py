"""The studio fits its page, measured in a real headless Chromium against a real server at a phone's and at
desktop widths: nothing is wider than its panel, nothing scrolls sideways, no band of bare page lies below the
columns, no panel cuts its content off, and no text breaks in the middle of a word.

Each width is checked twice: as the page first loads (placeholders showing) and in use (a LoRA chosen, an image
made, an image loaded for editing). Screenshots of both go to test-artifacts/ for a person to look at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import FilePayload, Page, ViewportSize, expect

from tests.conftest import ARTIFACTS, ServerProcess
from tests.e2e.test_browser import GENERATION_TIMEOUT_MS, latest_reply, open_studio, use_model
from tests.e2e.test_browser_edits import photo_png

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PHONE_MAX_WIDTH = 760  # the stylesheet's phone breakpoint: one column, the page itself scrolls
VIEWPORTS = [
    pytest.param(ViewportSize(width=390, height=844), id="390x844"),
    pytest.param(ViewportSize(width=1366, height=900), id="1366x900"),
    pytest.param(ViewportSize(width=1920, height=1080), id="1920x1080"),
    pytest.param(ViewportSize(width=1280, height=1600), id="1280x1600"),
    pytest.param(ViewportSize(width=1024, height=768), id="1024x768"),  # two columns: all panels share the left one
]

# Runs in the page; returns a list of problems, each naming the element.
FIT_PROBLEMS = (Path(__file__).parent / "fit_problems.js").read_text()


def fit_problems(tab: Page, *, skip_words_in: str | None = None) -> list[str]:
    problems: Any = tab.evaluate(FIT_PROBLEMS, {"phoneMaxWidth": PHONE_MAX_WIDTH, "skipWordsIn": skip_words_in})
    return list(problems)


def screenshot(tab: Page, name: str) -> None:
    """What the window shows; on a phone, whose page scrolls, the whole page too."""
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    if tab.viewport_size and tab.viewport_size["width"] <= PHONE_MAX_WIDTH:
        tab.screenshot(path=str(ARTIFACTS / f"{name}-full.png"), full_page=True)


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_the_studio_fits_its_page(studio_server: ServerProcess, page: Page,
                                  viewport: ViewportSize) -> None:
    use_model(studio_server, "tiny-flux")
    page.set_viewport_size(viewport)
    open_studio(page, studio_server.base_url + "/")
    size = f"{viewport['width']}x{viewport['height']}"
    if viewport["width"] <= PHONE_MAX_WIDTH:
        page.get_by_role("button", name="Show").click()  # the parameters fold away on a phone
    expect(page.locator("#lora-field")).to_be_visible()  # the demo adapter's row: the widest in the panel
    expect(page.locator("#curl")).to_have_text("Generate something to see the request as a curl command.")
    screenshot(page, f"layout-{size}")
    problems = fit_problems(page)
    assert not problems, f"as first loaded at {size}:\n" + "\n".join(problems)

    # In use: a LoRA at scale 1.00, an image made, an image loaded for editing (mask and its tools showing).
    page.get_by_label("tiny-flux-demo", exact=True).check()
    expect(page.locator(".lora-row .lora-value")).to_have_text("1.00")
    page.locator(".segment", has_text="low").click()
    page.get_by_label("Prompt", exact=True).fill("a lighthouse on a cliff at dusk, oil painting")
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    expect(latest_reply(page)).to_have_attribute("data-state", "done", timeout=GENERATION_TIMEOUT_MS)
    page.locator("#edit-files").set_input_files([FilePayload(name="photo.png", mimeType="image/png",
                                                             buffer=photo_png())])
    expect(page.locator("#mask-tools")).to_be_visible()
    screenshot(page, f"layout-{size}-in-use")
    # The curl command holds a JSON body with no spaces: it may wrap anywhere, but only where it must.
    assert page.locator("#curl").evaluate("el => getComputedStyle(el).overflowWrap") == "anywhere"
    problems = fit_problems(page, skip_words_in="#curl")
    assert not problems, f"in use at {size}:\n" + "\n".join(problems)
