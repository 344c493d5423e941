"""bench/preflight.py passes where everything is installed and names what is missing where it is not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "preflight.py")], env=env, capture_output=True,
                          text=True, timeout=240)


def test_preflight_passes_here() -> None:
    done = _run(dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "fastapi=" in done.stdout and "openai=" in done.stdout


def test_preflight_names_a_missing_package(tmp_path: Path) -> None:
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "__init__.py").write_text("import httpx_that_is_not_installed\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = _run(env)
    assert done.returncode == 1
    assert "httpx_that_is_not_installed" in done.stderr
