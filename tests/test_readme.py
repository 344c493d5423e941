"""The README, to the letter: every shell command in it works as written, in a fresh shell (no activated
virtualenv, nothing of the project on PATH).

Each command of the README's ``bash`` blocks is checked: its program exists, ``./run`` verbs are known and
``fluxserve`` subcommands answer ``--help``. Every command of "Use it" really runs, in order, in one directory,
against a running ``./run demo`` (on a free port instead of 8000); a ``./run demo --port N`` there starts that
second server (on another free port) for the commands after it. ``./run`` is used as is, pointed at this test
run's virtualenv with FLUXSERVE_VENV and FLUXSERVE_SKIP_SETUP=1 (set-up itself needs the package registries).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
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
BUILD_WORDS = re.compile(r"\.\./shared|\bissues? #?\d|the issue (says|asks)|\bsessions?\b|device (call|time|minutes)"
                         r"|integrator|/work/|/tmp/[a-z]|\bhelpers?\b|\bthe lead\b", re.I)


def section(title: str, text: str = README) -> str:
    """The text of one ``## title`` section, up to the next ``## `` heading."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def blocks(text: str, *languages: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) if m.group(1) in languages]


def commands(text: str = README) -> list[str]:
    """Each shell command of the text's ``bash`` blocks: continuation lines joined, a here-document kept with the
    command that reads it (body and end marker included), comments and blank lines dropped."""
    found = []
    for block in blocks(text, "bash", "sh", "shell"):
        lines = block.replace("\\\n", " ").splitlines()
        while lines:
            line = lines.pop(0)
            if not shlex.split(line, comments=True):
                continue
            heredoc = re.search(r"<<-?\s*'?(\w+)'?", line)
            if heredoc:
                end = lines.index(heredoc.group(1))
                line = "\n".join([line, *lines[:end + 1]])
                del lines[:end + 1]
            found.append(line.strip())
    return found


def program(command: str) -> list[str]:
    """The words of the command's first line after any leading VAR=value assignments."""
    words = shlex.split(command.splitlines()[0], comments=True)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        substituted = re.match(r"^[A-Za-z_][A-Za-z0-9_]*=\$\((.+)$", words[0])  # id=$(curl ...): the program is curl
        if substituted:
            words[0] = substituted.group(1)
            break
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


def test_the_readme_is_short_and_speaks_of_the_project_alone() -> None:
    starts = {tuple(program(c)[:2]) for c in commands()}
    assert ("./run", "demo") in starts and ("./run", "test") in starts
    assert not BUILD_WORDS.search(README), BUILD_WORDS.search(README)
    lines = README.splitlines()
    assert len(lines) <= 180, f"{len(lines)} lines: a newcomer reads the README in five minutes"
    assert [n for n, line in enumerate(lines, 1) if len(line) > 120] == []
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):  # every relative link leads somewhere
        assert (ROOT / link).exists(), link


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
    assert checked >= 10


class Demo:
    """A ``./run demo`` command line in a real subprocess (its own process group), ready once it says so."""

    def __init__(self, command: str, env: dict[str, str], log_path: Path) -> None:
        port = re.search(r"--port (\d+)", command)
        assert port, command
        self.port = int(port.group(1))
        self.readiness = ReadinessSocket()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["bash", "-c", command], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**env, "NOTIFY_SOCKET": self.readiness.address}, start_new_session=True)
        self.readiness.wait_ready(self.proc, self.logs)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)
        self._log.close()
        self.readiness.close()


def demo_env(cache_dir: Path, tmp_path: Path) -> dict[str, str]:
    return fresh_env(cache_dir, FLUX_WARMUP_SIZES="64x64", FLUX_OUTPUT_DIR=str(tmp_path / "out"))


@pytest.fixture
def demo(cache_dir: Path, tmp_path: Path) -> Iterator[Demo]:
    """`./run demo` itself, on a free port instead of 8000."""
    server = Demo(f"{ROOT / 'run'} demo --port {free_port()}", demo_env(cache_dir, tmp_path), tmp_path / "demo.log")
    try:
        yield server
    finally:
        server.stop()


def localize(command: str, ports: dict[str, int]) -> str:
    """The command as this test runs it: ``./run`` by its path, the README's ports by the test servers' ones."""
    command = re.sub(r"(^|\s)\./run ", lambda m: f"{m.group(1)}{ROOT / 'run'} ", command)
    command = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports.get(m.group(1), m.group(1))}", command)
    return re.sub(r"--port (\d+)", lambda m: f"--port {ports.get(m.group(1), m.group(1))}", command)


def check_answer(words: list[str], stdout: str, cwd: Path) -> None:
    """What each kind of command must leave: an answer with images, a file of the size asked for."""
    if words[0] == "curl":
        try:
            answer: Any = json.loads(stdout)
        except json.JSONDecodeError:  # headers through grep, server-sent events
            assert stdout.strip() and '"error"' not in stdout, stdout[-2000:]
        else:
            assert "error" not in answer and answer["data"], answer
    elif words[:2] == ["./run", "generate"]:
        with Image.open(cwd / words[words.index("-o") + 1]) as image:
            assert image.size == tuple(int(v) for v in words[words.index("--size") + 1].split("x"))


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_every_use_it_command_works_pasted_in_order(demo: Demo, cache_dir: Path, tmp_path: Path) -> None:
    assert f"ready — open http://127.0.0.1:{demo.port}/" in demo.logs()  # the line the README says to wait for
    ports = {"8000": demo.port}
    env = fresh_env(cache_dir)
    outputs: list[str] = []
    others: list[Demo] = []
    use_it = commands(section("Use it"))
    try:
        for command in use_it:
            words = program(command)
            if words[:2] == ["./run", "demo"]:  # another server: pasted as written, it needs a port of its own
                assert "--port" in words, f"{command!r} would start a second server on port 8000"
                readme_port = words[words.index("--port") + 1]
                assert readme_port not in ports, f"{command!r}: port {readme_port} is taken by an earlier server"
                ports[readme_port] = free_port()
                others.append(Demo(localize(command, ports), demo_env(cache_dir, tmp_path),
                                   tmp_path / f"demo{len(others) + 1}.log"))
                continue
            done = subprocess.run(["bash", "-o", "pipefail", "-c", localize(command, ports)], capture_output=True,
                                  text=True, cwd=tmp_path, env=env, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stdout[-1000:]}\n{done.stderr[-2000:]}"
            check_answer(words, done.stdout, tmp_path)
            outputs.append(done.stdout)
        assert len(outputs) + len(others) == len(use_it) >= 10
        assert len(others) == 2  # the multi-image edit and the CORS example, each on a port of its own

        # What the README says these commands show.
        assert any(re.search(r"^iVBOR\S* 7$", out, re.M) for out in outputs)  # the SDK's PNG and the seed sent
        assert any("image_generation.completed" in out.split() for out in outputs)  # the stream's last event
        with Image.open(tmp_path / "lighthouse.png") as image:
            assert image.size == (64, 64)
        with Image.open(tmp_path / "mask.png") as mask:
            assert mask.mode == "RGBA" and mask.getpixel((0, 0))[3] == 255 and mask.getpixel((0, 63))[3] == 0

        # The SDK example of docs/api.md runs too (next to the photo.png made above).
        for index, example in enumerate(blocks((ROOT / "docs" / "api.md").read_text(), "python")):
            script = tmp_path / f"example{index}.py"
            script.write_text(localize(example, ports))
            done = subprocess.run([str(ROOT / "run"), "python", script.name], capture_output=True, text=True,
                                  cwd=tmp_path, env=env, timeout=300)
            assert done.returncode == 0, f"{example}\n{done.stderr[-2000:]}"
    finally:
        for server in others:
            server.stop()

