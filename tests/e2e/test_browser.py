"""The web studio in a real headless Chromium (Debian's package, driven by Playwright) against real
``fluxserve serve`` processes on loopback (the browser and the shared studio server: tests/e2e/conftest.py).

The page keeps its strict Content-Security-Policy during these tests, so anything inline (scripts,
handlers, styles) would show up as a CSP violation and fail the test that loaded it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.conftest import ARTIFACTS, ROOT, ServerProcess
from tests.e2e.conftest import CHROMIUM, SLOW_STEPS

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PHONE = {"width": 390, "height": 844}
GENERATION_TIMEOUT_MS = 30_000


def _web_dir() -> Path:
    """src/fluxserve/web, found without importing fluxserve (that would import torch)."""
    spec = importlib.util.find_spec("fluxserve")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "web"


def use_model(server: ServerProcess, model: str) -> None:
    response = httpx.post(server.base_url + "/v1/models/select", json={"model": model}, timeout=120)
    assert response.status_code == 200, response.text


def open_studio(page: Page, url: str) -> None:
    page.goto(url)
    expect(page).to_have_title("fluxserve studio")
    expect(page.locator("#device-badge")).to_have_text("cpu · float32")
    expect(page.get_by_label("Model", exact=True)).to_be_enabled()


def latest_reply(page: Page) -> Locator:
    return page.locator(".bubble-reply").last


def test_generate_from_a_preset(studio_server: ServerProcess, studio_outputs: Path, page: Page) -> None:
    server = studio_server
    use_model(server, "tiny-flux")
    open_studio(page, server.base_url + "/")
    expect(page.get_by_label("Model", exact=True)).to_have_value("tiny-flux")

    page.locator(".segment", has_text="low").click()
    expect(page.get_by_role("radio", name=re.compile("low"))).to_be_checked()
    expect(page.get_by_label("Width", exact=True)).to_have_value("64")
    expect(page.get_by_label("Height", exact=True)).to_have_value("64")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("2")

    prompt = "a red fox in the snow, watercolor"
    page.get_by_label("Prompt", exact=True).fill(prompt)
    counts = httpx.post(server.base_url + "/v1/tokenize", json={"prompt": prompt, "model": "tiny-flux"}).json()
    expected = f"CLIP {counts['counts']['tokenizer']}/77 · T5 {counts['counts']['tokenizer_2']}/256"
    expect(page.locator("#token-count")).to_have_text(f"Tokens: {expected}")  # the server's count, not a guess

    expect(page.get_by_label("Store locally")).not_to_be_checked()  # follows FLUX_STORE_LOCAL (default off)
    page.get_by_label("Store locally").check()
    page.get_by_label("Save metadata").check()
    with page.expect_request(re.compile(r".*/v1/images/generations$")) as sent:
        page.get_by_label("Prompt", exact=True).press("Control+Enter")
    body = json.loads(sent.value.post_data or "{}")
    assert body["stream"] is True and body["stream_progress"] is True  # progress events: an extension, asked for
    reply = latest_reply(page)
    expect(reply).to_have_attribute("data-state", "done", timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator(".turn").last).to_have_attribute("data-previews", "1")  # streamed partial image
    image = reply.locator(".shot img")
    expect(image).to_be_visible()
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    seed = reply.locator(".seed-value").inner_text()
    assert re.fullmatch(r"\d+", seed), seed
    expect(page.locator(".turn").last.locator(".chips")).to_contain_text("64×64")
    expect(reply.locator(".timing-list")).to_contain_text("Denoise")
    expect(reply.get_by_role("link", name="Download")).to_have_attribute("download", re.compile(rf"-{seed}\.png$"))
    expect(page.locator("#gallery li")).to_have_count(1)
    shown = reply.locator(".saved").get_attribute("title") or ""
    assert shown and not Path(shown).is_absolute(), shown  # relative to the output directory: no server paths
    saved = studio_outputs / shown
    assert saved.is_file(), saved  # store_local + write_metadata
    assert prompt in saved.with_suffix(".json").read_text()
    curl = page.locator("#curl")
    expect(curl).to_contain_text(server.base_url + "/v1/images/generations")
    expect(curl).to_contain_text('"prompt":"a red fox in the snow, watercolor"')
    expect(curl).to_contain_text('"width":64,"height":64,"num_inference_steps":2')

    # "Same seed again" repeats the request with that seed: the page keeps seeds beyond 2**53 exact.
    reply.get_by_role("button", name="Same seed again").click()
    expect(page.locator(".bubble-reply[data-state=done]")).to_have_count(2, timeout=GENERATION_TIMEOUT_MS)
    expect(latest_reply(page).locator(".seed-value")).to_have_text(seed)
    expect(curl).to_contain_text(f'"seed":{seed}')
    page.locator(".bubble-reply").first.get_by_role("button", name="Vary").click()
    expect(page.locator(".bubble-reply[data-state=done]")).to_have_count(3, timeout=GENERATION_TIMEOUT_MS)
    expect(latest_reply(page).locator(".seed-value")).not_to_have_text(seed)
    expect(page.locator("#gallery li")).to_have_count(3)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-studio.png"))
    page.set_viewport_size(PHONE)
    expect(page.get_by_role("button", name="Show")).to_be_visible()  # parameters fold away on a phone
    page.screenshot(path=str(ARTIFACTS / "web-studio-phone.png"))


def test_pick_a_lora_adapter(studio_server: ServerProcess, page: Page) -> None:
    """The picker lists the library's adapters for the model's family (serving tiny-flux wrote the demo one);
    the chosen adapter and scale go into the request, the curl, the chips and the gallery's parameters."""
    server = studio_server
    use_model(server, "tiny-flux")
    open_studio(page, server.base_url + "/")
    picker = page.locator("#lora-field")
    expect(picker).to_be_visible()
    page.locator(".segment", has_text="low").click()
    page.get_by_label("tiny-flux-demo", exact=True).check()
    page.get_by_label("Scale of tiny-flux-demo").fill("0.5")
    expect(page.locator(".lora-row .lora-value")).to_have_text("0.50")
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    reply = latest_reply(page)
    expect(reply).to_have_attribute("data-state", "done", timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator("#curl")).to_contain_text('"loras":[{"name":"tiny-flux-demo","scale":0.5}]')
    expect(page.locator(".turn").last.locator(".chips")).to_contain_text("LoRA tiny-flux-demo ×0.5")
    page.locator("#gallery li button").first.click()
    expect(page.locator("#viewer-params")).to_contain_text("tiny-flux-demo ×0.5")
    page.keyboard.press("Escape")
    listing = httpx.get(server.base_url + "/v1/loras", timeout=30).json()
    assert next(a for a in listing["data"] if a["name"] == "tiny-flux-demo")["loaded"] == ["tiny-flux@cpu"]

    use_model(server, "tiny-qwen")  # the demo adapter fits only tiny-flux: no picker for qwen
    page.reload()
    expect(page.get_by_label("Model", exact=True)).to_have_value("tiny-qwen")
    expect(picker).to_be_hidden()


def test_cancel_a_slow_generation(studio_server: ServerProcess, page: Page) -> None:
    server = studio_server
    open_studio(page, server.base_url + "/")
    page.get_by_label("Width", exact=True).fill("256")
    page.get_by_label("Height", exact=True).fill("256")
    page.get_by_label("Steps", exact=True).fill(str(SLOW_STEPS))
    page.get_by_label("Prompt", exact=True).fill("a very slow painting")
    page.get_by_role("button", name="Generate").click()

    running = page.locator(".bubble-reply").nth(0)
    expect(running.locator(".state-label")).to_have_text(re.compile(rf"Running · step [1-9]\d* / {SLOW_STEPS}"),
                                                          timeout=GENERATION_TIMEOUT_MS)
    page.get_by_label("Prompt", exact=True).fill("waiting in line")
    page.get_by_role("button", name="Generate").click()  # a second request queues behind the first
    queued = page.locator(".bubble-reply").nth(1)
    expect(queued.locator(".state-label")).to_have_text(re.compile(r"^Queued · position [1-9]"))
    expect(page.locator("#cancel")).to_have_text("Cancel (2)")

    page.locator("#cancel").click()  # cancels every request of this tab
    for reply in (running, queued):
        expect(reply).to_have_attribute("data-state", "cancelled", timeout=GENERATION_TIMEOUT_MS)
        expect(reply.get_by_role("button", name="Try again")).to_be_visible()
    expect(running.locator(".state-label")).to_have_text(re.compile(rf"^Cancelled · at step [1-9]\d* / {SLOW_STEPS}$"))
    expect(queued.locator(".state-label")).to_have_text("Cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    deadline = time.monotonic() + 10  # the worker is free again (it stops within a step)
    while (queue := httpx.get(server.base_url + "/v1/models").json()["runtime"]["queue"])["jobs_in_flight"]:
        assert time.monotonic() < deadline, queue
        time.sleep(0.05)


def test_switch_model_see_the_servers_error_and_free_memory(studio_server: ServerProcess, page: Page) -> None:
    server = studio_server
    use_model(server, "tiny-flux")
    open_studio(page, server.base_url + "/")
    held: list[Any] = []
    page.route("**/v1/models/select", lambda route: held.append(route))  # hold the request to see the loading state
    page.get_by_label("Model", exact=True).select_option("tiny-qwen")
    expect(page.locator("#model-status")).to_have_text("Loading tiny-qwen…")
    expect(page.get_by_label("Model", exact=True)).to_be_disabled()
    expect(page.get_by_role("button", name="Generate")).to_be_disabled()
    for _ in range(200):  # the route handler runs while Playwright waits
        if held:
            break
        page.wait_for_timeout(25)
    held[0].continue_()
    expect(page.locator("#model-status")).to_have_text(re.compile(r"^tiny-qwen ready"), timeout=60_000)
    expect(page.get_by_label("Model", exact=True)).to_have_value("tiny-qwen")
    expect(page.get_by_label("True CFG scale")).to_have_value("4")
    expect(page.get_by_label("Negative prompt")).to_be_visible()
    assert httpx.get(server.base_url + "/v1/models").json()["active_key"] == "tiny-qwen"
    page.get_by_label("Prompt", exact=True).fill("a sign that says hello")
    expect(page.locator("#token-count")).to_have_text(re.compile(r"^Tokens: Qwen \d+/128$"))

    page.get_by_label("Width", exact=True).fill("100")
    page.get_by_role("button", name="Generate").click()
    reply = latest_reply(page)
    expect(reply).to_have_attribute("data-state", "error")
    answer = httpx.post(server.base_url + "/v1/images/generations",
                        json={"prompt": "x", "model": "tiny-qwen", "width": 100, "height": 128}).json()["error"]
    assert answer["param"] == "width"
    expect(reply.locator(".error-message")).to_have_text(answer["message"])
    expect(reply.locator(".error-param")).to_have_text("width")
    expect(reply.locator(".error-code")).to_have_text("invalid_size")
    expect(page.get_by_label("Width", exact=True)).to_have_attribute("aria-invalid", "true")

    # Free memory asks first, then drops every pipeline but the active one (tiny-flux here).
    page.get_by_role("button", name="Free memory").click()
    dialog = page.get_by_role("dialog", name="Free memory?")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Keep").click()
    expect(dialog).to_be_hidden()
    page.get_by_role("button", name="Free memory").click()
    dialog.get_by_role("button", name="Free memory").click()
    expect(page.locator(".toast")).to_contain_text("dropped tiny-flux")
    expect(page.get_by_role("option", name=re.compile(r"^tiny-flux · not loaded$"))).to_have_count(1)



def test_picker_shows_licences_and_few_step_presets_per_family(studio_server: ServerProcess, page: Page) -> None:
    """Families are grouped; non-commercial and gated models say so; a few-step family resets to its defaults."""
    server = studio_server
    use_model(server, "tiny-flux")
    open_studio(page, server.base_url + "/")
    picker = page.get_by_label("Model", exact=True)
    expect(picker.locator("optgroup[label='klein'] option")).to_have_count(4)
    expect(page.get_by_role("option", name=re.compile(r"^klein-9b · not loaded · non-commercial$"))).to_have_count(1)
    expect(page.get_by_role("option", name=re.compile(r"^dev · not loaded · non-commercial · gated$"))).to_have_count(1)
    picker.select_option("tiny-zimage")
    expect(page.locator("#model-status")).to_have_text(re.compile(r"^tiny-zimage ready"), timeout=60_000)
    expect(page.locator("#model-description")).to_contain_text("Licence: Apache-2.0")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("4")
    expect(page.get_by_label("Guidance", exact=True)).to_have_value("0")


@pytest.fixture
def static_site() -> Iterator[str]:
    """The page's files served from another origin (a plain static file server on another port)."""
    handler = functools.partial(_QuietHandler, directory=str(_web_dir()))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_other_origin_with_api_key(server_factory: Callable[..., ServerProcess], static_site: str, page: Page) -> None:
    api = server_factory({"FLUX_API_KEYS": "k-browser-test", "FLUX_CORS_ORIGINS": static_site})
    page.goto(static_site + "/static/index.html")
    dialog = page.get_by_role("dialog", name="Connection")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("No fluxserve API answered")

    page.get_by_label("API base URL").fill(api.base_url)
    page.get_by_role("button", name="Save and connect").click()
    expect(dialog).to_contain_text("requires an API key")  # 401 from the server
    page.get_by_label("API key", exact=True).fill("k-browser-test")
    page.get_by_label("API key", exact=True).press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#device-badge")).to_have_text("cpu · float32")

    page.reload()  # the API base is remembered; the key too, for this tab's session
    expect(page.locator("#device-badge")).to_have_text("cpu · float32")
    page.locator(".segment", has_text="low").click()
    page.get_by_label("Prompt", exact=True).fill("cross-origin fox")
    page.get_by_role("button", name="Generate").click()
    expect(latest_reply(page)).to_have_attribute("data-state", "done", timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator("#curl")).to_contain_text("Authorization: Bearer $FLUX_API_KEY")
    expect(page.locator("#curl")).not_to_contain_text("k-browser-test")


def test_ensure_chromium_script_is_idempotent() -> None:
    script = ROOT / "scripts" / "ensure-chromium.sh"
    assert os.access(script, os.X_OK)
    if not CHROMIUM.exists() or shutil.which("bash") is None:
        pytest.skip("needs chromium already installed (the script would install it)")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, check=True)
    assert "already installed" in out.stdout
