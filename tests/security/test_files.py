"""Files: everything written stays under FLUX_OUTPUT_DIR with generated names; /v1/images/files/{id}
serves only ids it issued (path traversal, encoded slashes, symlinks); writes are atomic, and a crash
in the middle of one leaves no partial image."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .helpers import assert_openai_error

GEN = "/v1/images/generations"
NAME = re.compile(r"^img-\d{8}-\d{6}-[0-9a-f]{12}\.(png|jpg|webp|json)$")


@pytest.fixture(scope="module")
def issued(live_client: Any) -> str:
    """The path of one file the server issued (response_format=url)."""
    response = live_client.post(GEN, json={"prompt": "a file", "size": "64x64", "num_inference_steps": 1,
                                           "response_format": "url"})
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    return "/" + url.split("/", 3)[3]


def test_issued_file_is_served(live_client: Any, issued: str) -> None:
    response = live_client.get(issued)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("raw", [
    "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%252e%252e%252fetc%252fpasswd",
    "..%5C..%5Cetc%5Cpasswd", "%2Fetc%2Fpasswd", "....%2F%2F....%2F%2Fetc%2Fpasswd", "%00", "file_%00.png",
    "%EF%BC%8E%EF%BC%8E%EF%BC%8Fetc", "file_" + "A" * 30 + ".png%2F..%2F..%2Fetc%2Fpasswd",
    "file_" + "A" * 30, "file_" + "A" * 30 + ".png", "file_" + "A" * 10 + "..png", "pyproject.toml", "conftest.py",
    ".", "..", "%2e", "%2e%2e", "file_..%2F..%2F" + "a" * 30,
])
def test_only_issued_ids_resolve(live_client: Any, raw: str) -> None:
    response = live_client.get("/v1/images/files/" + raw)
    assert response.status_code in (400, 404), (raw, response.status_code)
    assert b"root:" not in response.content and b"[project]" not in response.content
    assert_openai_error(response, response.status_code)


def test_issued_id_with_another_extension_or_suffix_is_refused(live_client: Any, issued: str) -> None:
    file_id = issued.rsplit("/", 1)[1].split(".")[0]
    for name in (file_id + ".jpg", file_id + ".png.png", file_id + ".png%2F..", file_id + "x.png",
                 file_id[:-1] + ".png", file_id.upper() + ".png"):
        assert live_client.get("/v1/images/files/" + name).status_code == 404, name
    assert live_client.get("/v1/images/files/" + file_id).status_code == 200  # the bare id is fine


def test_symlinks_named_like_ids_are_not_followed(live_client: Any, live_settings: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are looked up among ids issued in this process, never on disk: a planted symlink (in the
    output directory or the working directory) named like an id resolves to nothing."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret", encoding="utf-8")
    name = "file_" + "S" * 32
    out = Path(live_settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for where in (out, tmp_path):
        (where / name).symlink_to(secret)
        (where / (name + ".png")).symlink_to(secret)
    monkeypatch.chdir(tmp_path)
    for path in (name, name + ".png"):
        response = live_client.get("/v1/images/files/" + path)
        assert response.status_code == 404 and b"secret" not in response.content


@pytest.mark.parametrize("fields", [
    {"user": "../../../../tmp/owned", "request_id": "..-..-etc-passwd"},
    {"prompt": "../../../../etc/cron.d/x\n/etc/passwd", "output_format": "jpeg"},
    {"prompt": "C:\\Windows\\system32", "output_format": "webp", "user": "/etc/shadow"},
])
def test_saved_files_get_generated_names_under_the_output_dir(live_client: Any, live_settings: Any,
                                                              fields: dict[str, Any]) -> None:
    body = {"prompt": "x", "size": "64x64", "num_inference_steps": 1, "store_local": True, "write_metadata": True,
            **fields}
    response = live_client.post(GEN, json=body)
    assert response.status_code == 200, response.text[:300]
    item = response.json()["data"][0]
    root = Path(live_settings.output_dir).resolve()
    image, meta = root / item["saved_path"], root / item["metadata_path"]  # relative to the output directory
    for path in (image, meta):
        assert path.resolve().parent.parent == root, path  # <output_dir>/<day>/<generated name>
        assert NAME.match(path.name), path.name
        for key, value in fields.items():
            assert key == "output_format" or str(value) not in str(path)
    metadata = json.loads(meta.read_text(encoding="utf-8"))
    assert metadata["image"] == image.name and metadata["seed"] == item["seed"]
    with Image.open(image) as img:
        img.load()  # complete, decodable
        assert img.size == (64, 64)
    assert not [p for p in root.rglob("*") if p.is_file() and not NAME.match(p.name)
                and not p.name.startswith("file_")]  # (file_* are the symlinks planted above)


def test_a_symlink_inside_the_output_dir_cannot_lead_writes_outside(tmp_path: Path) -> None:
    import time

    from fluxserve.storage.outputs import OutputStore

    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    (root / day).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the output directory"):
        OutputStore(root).save_image(b"\x89PNG data", "png", {"prompt": "x"})
    assert list(outside.iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxserve.storage import outputs

    store = outputs.OutputStore(tmp_path / "out")

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.save_image(b"\x89PNG" + b"x" * 100_000, "png", {"prompt": "x"})
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


_CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from fluxserve.storage import outputs

    def die(fd):  # the process is killed after the bytes are written, before they are synced and renamed
        os.kill(os.getpid(), signal.SIGKILL)

    store = outputs.OutputStore(Path(sys.argv[1]))
    store.save_image(b"\\x89PNG complete image", "png")  # one complete image first
    outputs.os.fsync = die
    store.save_image(b"\\x89PNG" + b"x" * 1_000_000, "png", {"prompt": "x"})
""")


def test_a_crash_mid_write_leaves_no_partial_image(tmp_path: Path) -> None:
    from fluxserve.storage.outputs import OutputStore

    root = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(root)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    files = [p for p in root.rglob("*") if p.is_file()]
    images = [p for p in files if not p.name.startswith(".tmp-")]
    assert len(images) == 1 and images[0].read_bytes() == b"\x89PNG complete image"
    assert len(files) == 2  # plus the temporary the crash left, which no reader ever takes for an image
    assert OutputStore(root).cleanup_temporaries() == 1  # (the runtime does this at start-up)
    assert [p for p in root.rglob("*") if p.is_file()] == images
    assert os.listdir(root)  # the complete image is untouched


def test_sidecar_metadata_matches_the_image(live_client: Any) -> None:
    body = {"prompt": "meta", "size": "64x64", "num_inference_steps": 2, "seed": 1234, "store_local": True,
            "write_metadata": True, "output_format": "webp"}
    item = live_client.post(GEN, json=body).json()["data"][0]
    out = Path(live_client.app.state.runtime.settings.output_dir)
    metadata = json.loads((out / item["metadata_path"]).read_text(encoding="utf-8"))
    assert metadata["prompt"] == "meta" and metadata["seed"] == 1234 and metadata["format"] == "webp"
    assert metadata["params"]["num_inference_steps"] == 2
    with Image.open(out / item["saved_path"]) as img:
        assert img.format == "WEBP" and img.size == (metadata["params"]["width"], metadata["params"]["height"])


def test_bare_app_uses_only_its_output_dir(bare_client: Callable[..., Any], tmp_path: Path) -> None:
    with bare_client(output_dir=tmp_path / "configured") as client:
        runtime = client.fastapi_app.state.runtime
        assert runtime.outputs.root == (tmp_path / "configured").resolve()
