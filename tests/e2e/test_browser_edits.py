"""The studio's edit panel in a real headless Chromium against the shared studio server
(tests/e2e/conftest.py): upload, paint a mask with brush, eraser and undo, edit with a strength, see the
result, continue with "Edit this", and cancel."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.conftest import ServerProcess
from tests.e2e.conftest import SLOW_STEPS
from tests.e2e.test_browser import GENERATION_TIMEOUT_MS, open_studio, use_model

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def photo_png(width: int = 64, height: int = 64) -> bytes:
    blocks = np.random.default_rng(0).integers(0, 255, (height // 8, width // 8, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def paint(tab: Page, x0: float, y0: float, x1: float, y1: float) -> None:
    """Drag across the mask canvas, in fractions of its displayed size."""
    box = tab.locator("#mask-canvas").bounding_box()
    assert box is not None
    tab.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    tab.mouse.down()
    for t in np.linspace(0, 1, 8):
        tab.mouse.move(box["x"] + (x0 + (x1 - x0) * t) * box["width"], box["y"] + (y0 + (y1 - y0) * t) * box["height"])
    tab.mouse.up()


def test_upload_paint_a_mask_and_edit(studio_server: ServerProcess, page: Page) -> None:
    use_model(studio_server, "tiny-flux")  # the studio server is shared: its model may have been switched
    open_studio(page, studio_server.base_url + "/")
    expect(page.locator("#model-select")).to_be_enabled()
    page.locator("#edit-files").set_input_files([{"name": "photo.png", "mimeType": "image/png",
                                                  "buffer": photo_png()}])
    expect(page.locator("#edit-thumbs li")).to_have_count(1)
    expect(page.locator("#mask-stage")).to_be_visible()
    expect(page.locator("#generate")).to_contain_text("Edit")
    expect(page.locator("#mask-state")).to_contain_text("No mask")

    page.locator("#brush-size").fill("40")
    paint(page, 0.03, 0.5, 0.45, 0.5)     # across the left half
    expect(page.locator("#mask-state")).to_contain_text("Painted areas change")
    paint(page, 0.6, 0.5, 0.95, 0.5)      # a stroke on the right, then taken back
    page.get_by_role("button", name="Undo").click()
    page.get_by_role("button", name="Eraser").click()
    paint(page, 0.24, 0.5, 0.26, 0.5)     # erase a dot in the middle of the left stroke
    expect(page.get_by_role("button", name="Eraser")).to_have_attribute("aria-pressed", "true")
    page.locator("#strength").fill("0.8")
    expect(page.locator("#strength-value")).to_have_text("0.80")

    page.get_by_label("Prompt", exact=True).fill("a stained glass window")
    page.get_by_label("Seed", exact=True).fill("12")
    with page.expect_response(re.compile(r".*/v1/images/edits$"), timeout=GENERATION_TIMEOUT_MS) as answer:
        page.locator("#generate").click()
    sent = json.loads(answer.value.request.post_data or "{}")
    assert sent["size"] == "auto" and len(sent["image"]) == 1 and sent["mask"].startswith("data:image/png;base64,")
    assert sent["strength"] == 0.8 and sent["stream"] is True and "width" not in sent
    assert sent["stream_progress"] is True  # progress events are an extension the page asks for
    expect(page.locator(".bubble-reply[data-state=done]")).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator(".turn").first).to_have_attribute("data-previews", re.compile(r"^[1-9]"))  # live previews
    stream = answer.value.text()
    assert "image_edit.completed" in stream and '"task": "inpaint"' in stream

    # The mask the page sent: transparent where painted (left), opaque where the stroke was undone (right).
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask"].split(",", 1)[1]))))
    assert mask.shape == (64, 64, 4)
    assert mask[32, 6, 3] == 0 and mask[32, 28, 3] == 0      # painted
    assert mask[32, 16, 3] == 255 and mask[32, 52, 3] == 255  # erased; undone
    assert mask[5, 16, 3] == 255                              # never painted

    result = page.locator(".bubble-reply").last.locator(".shot img")
    expect(result).to_have_count(1)
    expect(page.locator("#gallery li")).to_have_count(1)

    # Continue from the result: it becomes the input, with a fresh mask; no mask now → img2img.
    page.locator(".bubble-reply").last.get_by_role("button", name="Edit this").click()
    expect(page.locator("#edit-thumbs li")).to_have_count(1)
    expect(page.locator("#mask-state")).to_contain_text("No mask")
    with page.expect_response(re.compile(r".*/v1/images/edits$"), timeout=GENERATION_TIMEOUT_MS) as second:
        page.locator("#generate").click()
    expect(page.locator(".bubble-reply[data-state=done]")).to_have_count(2, timeout=GENERATION_TIMEOUT_MS)
    assert '"task": "img2img"' in second.value.text()
    page.get_by_role("button", name="Stop editing").click()
    expect(page.locator("#generate")).to_contain_text("Generate")


def test_cancel_a_slow_edit(studio_server: ServerProcess, page: Page) -> None:
    use_model(studio_server, "tiny-flux")
    open_studio(page, studio_server.base_url + "/")
    expect(page.locator("#model-select")).to_be_enabled()
    page.locator("#edit-files").set_input_files([{"name": "photo.png", "mimeType": "image/png",
                                                  "buffer": photo_png(256, 256)}])
    page.get_by_label("Steps", exact=True).fill(str(SLOW_STEPS))
    page.get_by_label("Prompt", exact=True).fill("a very slow edit")
    page.locator("#generate").click()
    reply = page.locator(".bubble-reply").last
    expect(reply.locator(".state-label")).to_have_text(re.compile(r"Running · step [1-9]\d* / \d+"),
                                                        timeout=GENERATION_TIMEOUT_MS)
    page.locator("#cancel").click()
    expect(reply).to_have_attribute("data-state", "cancelled", timeout=GENERATION_TIMEOUT_MS)
    expect(reply.locator(".state-label")).to_have_text(re.compile(r"^Cancelled · at step [1-9]\d* / \d+$"))
