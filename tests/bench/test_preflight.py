"""bench/preflight.py passes where everything is installed and names what is missing where it is not."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _preflight() -> Any:
    return runpy.run_path(str(ROOT / "bench" / "preflight.py"))["main"]


def test_preflight_passes_here(capsys: pytest.CaptureFixture[str]) -> None:
    assert _preflight()() == 0
    out = capsys.readouterr().out
    assert "fastapi=" in out and "openai=" in out


def test_preflight_names_a_missing_package(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # "import openai" now raises ImportError, as where it is missing
    assert _preflight()() == 1
    assert "import openai" in capsys.readouterr().err
