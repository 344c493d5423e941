"""The output store: a byte quota that refuses new saves (never deletes old ones), the checks /ready
reports (naming no path), and the relative names clients see."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fluxserve.storage.outputs import OutputQuotaExceeded, OutputStore, save_error_code


def test_saves_past_the_quota_are_refused_and_old_images_are_kept(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out", max_bytes=10_000)
    first, _ = store.save_image(b"a" * 6000, "png")
    with pytest.raises(OutputQuotaExceeded) as refused:
        store.save_image(b"b" * 6000, "png")
    assert save_error_code(refused.value) == "output_dir_full" and str(tmp_path) not in str(refused.value)
    assert first.read_bytes() == b"a" * 6000  # nothing was deleted to make room
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == [first]
    assert store.space_warning() is None  # 6000 of 10000 used
    store.save_image(b"c" * 4000, "png")  # exactly up to the quota is fine
    assert "FLUX_OUTPUT_MAX_BYTES" in (store.space_warning() or "")
    assert store.problem() is None  # full is a warning on /ready, not a reason to be unready


def test_files_removed_by_the_operator_free_the_quota(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out", max_bytes=10_000)
    first, _ = store.save_image(b"a" * 8000, "png")
    first.unlink()
    store.save_image(b"b" * 8000, "png")  # recounted when the running count says "full"


def test_sidecars_count_against_the_quota(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out", max_bytes=5000)
    with pytest.raises(OutputQuotaExceeded):
        store.save_image(b"a" * 4000, "png", {"prompt": "p" * 2000})
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # refused before writing either


def test_no_quota_when_zero(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out", max_bytes=0)
    for _ in range(3):
        store.save_image(b"x" * 100_000, "png")
    assert store.problem() is None and store.space_warning() is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_directory_is_reported_without_its_path(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    root.chmod(0o500)
    try:
        problem = OutputStore(root).problem()
    finally:
        root.chmod(0o700)
    assert problem is not None and "not writable" in problem and str(tmp_path) not in problem


def test_a_plain_file_where_the_directory_should_be_is_reported(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a directory")
    problem = OutputStore(tmp_path / "out").problem()
    assert problem == "output directory is not writable (FLUX_OUTPUT_DIR)"


def test_a_missing_and_a_present_directory_read_the_same(tmp_path: Path) -> None:
    """Errors must not tell whether a directory exists: both are simply writable (created on demand)."""
    present = tmp_path / "present"
    present.mkdir()
    assert OutputStore(present).problem() is None and OutputStore(tmp_path / "absent" / "deeper").problem() is None
    assert save_error_code(FileNotFoundError(2, "No such file or directory", str(present))) == \
        save_error_code(PermissionError(13, "Permission denied", str(present))) == "output_dir_unwritable"
    assert save_error_code(OSError(28, "No space left on device")) == "output_dir_full"


def test_clients_see_names_relative_to_the_output_dir(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out")
    image, meta = store.save_image(b"png", "png", {"prompt": "p"})
    assert meta is not None
    name = store.relative(image)
    assert not Path(name).is_absolute() and (tmp_path / "out" / name).read_bytes() == b"png"
    assert store.relative(meta) == name.removesuffix(".png") + ".json"
