"""The README, to the letter: every shell command in it works as written after `./run demo`, in a
fresh shell (no activated virtualenv, nothing of the project on PATH).

Each command of the README's ``bash`` blocks is checked: its program exists, ``./run`` verbs are
known and ``fluxserve`` subcommands answer ``--help``; the cheap ones (``curl`` against a running
``./run demo``, ``./run generate``, the Python example through ``./run python``) really run. ``./run``
is used as is, pointed at this test run's virtualenv with FLUXSERVE_VENV and FLUXSERVE_SKIP_SETUP=1
(set-up itself needs the package registries).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import ReadinessSocket, free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FRESH_PATH = "/usr/local/bin:/usr/bin:/bin"
README_BASE = "http://127.0.0.1:8000"


def blocks(*languages: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.M | re.S) if m.group(1) in languages]


def commands() -> list[str]:
    """Each shell command of the README (continuation lines joined, comments and blank lines dropped)."""
    found = []
    for block in blocks("bash", "sh", "shell", "console"):
        for command in block.replace("\\\n", " ").splitlines():
            if shlex.split(command, comments=True):
                found.append(command.strip())
    return found


def program(command: str) -> list[str]:
    """The words after any leading VAR=value assignments."""
    words = shlex.split(command, comments=True)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)
    return words


def fresh_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": FRESH_PATH, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
           "FLUXSERVE_VENV": sys.prefix, "FLUXSERVE_SKIP_SETUP": "1", "FLUX_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": str(ROOT / "src")}  # this checkout's code, whatever the virtualenv was installed from
    env.update(extra)
    return env


def run_verbs() -> set[str]:
    out = subprocess.run([str(ROOT / "run"), "help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and not out.stderr  # help is an answer, on stdout
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("verbs: ")]
    return set(line.removeprefix("verbs: ").split())


def test_the_readme_has_commands_and_speaks_of_the_project_alone() -> None:
    assert any(program(c)[:2] == ["./run", "demo"] for c in commands())
    assert "../shared" not in README and "single-file" not in README
    assert not re.search(r"\bissue\s*#?\d", README, re.I)


def test_every_command_has_its_program_in_a_fresh_shell(cache_dir: Path, tmp_path: Path) -> None:
    verbs = run_verbs()
    env = fresh_env(cache_dir)
    checked = 0
    for command in commands():
        words = program(command)
        if words[0] != "./run":
            assert shutil.which(words[0], path=FRESH_PATH), f"{words[0]!r} is not installed: {command}"
            continue
        verb = words[1]
        assert verb in verbs, f"./run has no verb {verb!r}: {command}"
        if verb in ("fluxserve", "generate", "demo"):
            sub = {"generate": ["generate"], "demo": ["serve"]}.get(verb, words[2:3])
            argv = [str(ROOT / "run"), "fluxserve", *sub, "--help"]
        elif verb in ("python", "pip"):
            argv = [str(ROOT / "run"), verb, "--version"]
        else:
            argv = [str(ROOT / "run"), verb]  # setup (skipped here), help
        if verb == "test":
            continue  # runs this very suite
        done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert done.returncode == 0, f"{argv} failed for {command!r}:\n{done.stderr[-2000:]}"
        checked += 1
    assert checked >= 5


@pytest.fixture
def demo(cache_dir: Path, tmp_path: Path) -> Iterator[str]:
    """`./run demo` itself, on a free port instead of 8000."""
    port = free_port()
    readiness = ReadinessSocket()
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(ROOT / "run"), "demo", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=fresh_env(cache_dir, FLUX_WARMUP_SIZES="64x64", FLUX_OUTPUT_DIR=str(tmp_path / "out"),
                                          NOTIFY_SOCKET=readiness.address))
    base = f"http://127.0.0.1:{port}"
    try:
        readiness.wait_ready(proc, lambda: (tmp_path / "demo.log").read_text(errors="replace"))
        yield base
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        readiness.close()


@pytest.mark.e2e
def test_the_cheap_commands_really_run(demo: str, cache_dir: Path, tmp_path: Path) -> None:
    env = fresh_env(cache_dir, PATH=f"{ROOT}:{FRESH_PATH}")
    ran: list[str] = []
    for command in commands():
        words = program(command)
        if words[0] == "curl" or words[:2] == ["./run", "generate"]:
            line = command.replace(README_BASE, demo).replace("./run ", f"{ROOT / 'run'} ", 1)
            done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path, env=env,
                                  timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
            if words[0] == "curl":
                answer: dict[str, Any] = json.loads(done.stdout)
                assert "error" not in answer and answer["data"], answer
            else:
                out = tmp_path / words[words.index("-o") + 1]
                with Image.open(out) as image:
                    assert image.size == tuple(int(v) for v in words[words.index("--size") + 1].split("x"))
            ran.append(command)
    assert any(c.startswith("curl") for c in ran) and any("generate" in c for c in ran)

    example, *others = blocks("python")
    assert "./run python fox.py" in README  # how the README says to run it
    (tmp_path / "fox.py").write_text(example.replace(README_BASE, demo))
    done = subprocess.run([str(ROOT / "run"), "python", "fox.py"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    b64_start, seed = done.stdout.split()
    assert b64_start.startswith("iVBOR") and seed == "7"  # a PNG, and the seed the example sent
    for index, other in enumerate(others):  # the other SDK examples run too (in the same folder: photo.png)
        (tmp_path / f"example{index}.py").write_text(other.replace(README_BASE, demo))
        done = subprocess.run([str(ROOT / "run"), "python", f"example{index}.py"], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)
        assert done.returncode == 0, f"{other}\n{done.stderr[-2000:]}"
