"""The fluxserve command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY_LIBRARIES = ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "starlette")


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "fluxserve", *args], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def generated_seed(done: subprocess.CompletedProcess[str]) -> int:
    """The seed a successful ``fluxserve generate`` reported, with where it ran and its stage timings."""
    assert done.returncode == 0, done.stderr
    assert "device=cpu" in done.stdout and "dtype=float32" in done.stdout and "denoise=" in done.stdout
    return int(next(p for p in done.stdout.split() if p.startswith("seed=")).removeprefix("seed="))


def test_a_fresh_seed_is_reported_and_reproduces_the_file(cache_dir: Path, tmp_path: Path) -> None:
    """Without --seed each run draws a fresh seed and prints it; passing the printed seed back gives the same
    file byte for byte. The command has no family-specific code: one family here (test_make_tiny_model runs
    it on a qwen pipeline)."""
    env = {"FLUX_CACHE_DIR": str(cache_dir)}

    def generate(name: str, *seed: str) -> int:
        return generated_seed(run_cli(["generate", "a red fox", "--model", "tiny-flux", "--size", "64x64", *seed,
                                       "-o", name], env, tmp_path))

    first = generate("a.png")
    assert generate("b.png", "--seed", str(first)) == first
    output = (tmp_path / "a.png").read_bytes()
    assert output == (tmp_path / "b.png").read_bytes()
    assert output[:8] == b"\x89PNG\r\n\x1a\n"
    assert generate("c.png") != first  # fresh again


def test_float16_on_cpu_is_refused_naming_the_variable(tmp_path: Path) -> None:
    done = run_cli(["serve"], {"FLUX_DTYPE": "float16", "FLUX_DEVICE": "cpu", "FLUX_MODEL": "tiny-flux"}, tmp_path,
                   timeout=60)
    assert done.returncode == 2
    assert "FLUX_DTYPE" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_cuda_is_refused(tmp_path: Path) -> None:
    done = run_cli(["serve", "--device", "cuda:3", "--model", "tiny-flux"], {}, tmp_path, timeout=60)
    assert done.returncode == 2
    assert "FLUX_DEVICE=cuda:3" in done.stderr


def test_invalid_setting_is_refused(tmp_path: Path) -> None:
    done = run_cli(["serve"], {"FLUX_OFFLOAD": "disk"}, tmp_path, timeout=60)
    assert done.returncode == 2
    assert "FLUX_OFFLOAD='disk'" in done.stderr


def test_make_tiny_model(tmp_path: Path) -> None:
    done = run_cli(["make-tiny-model", str(tmp_path / "tq"), "--family", "qwen"], {}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tq" / "model_index.json").is_file()
    # ...and the directory serves as a model by path, through the same from_pretrained path.
    done = run_cli(["generate", "hi", "--model", str(tmp_path / "tq"), "--seed", "7", "--size", "64x64", "--steps",
                    "1", "-o", "p.png"], {"FLUX_ALLOW_ANY_MODEL": "1"}, tmp_path)
    assert generated_seed(done) == 7
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_exits_with_its_code_and_what_it_left_alive_frozen(tmp_path: Path) -> None:
    """``run`` (the command's entry point) exits with main's code, with what main left alive frozen, so the
    interpreter's final garbage collections do not walk it again."""
    script = ("import atexit, gc\nfrom fluxserve import cli\ncli.main = lambda: 3\n"
              "atexit.register(lambda: print('frozen:', gc.get_freeze_count() > 0))\ncli.run()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "frozen: True"


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level names of every module that ``python -X importtime`` reports as imported."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["generate", "--help"]])
def test_help_is_plain_text_and_imports_no_model_or_web_library(args: list[str], tmp_path: Path) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "fluxserve", *args], env=full, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = imported_modules(done.stderr)
    assert "fluxserve" in modules and "argparse" in modules  # the parse really saw the imports
    assert not modules & set(HEAVY_LIBRARIES), sorted(modules & set(HEAVY_LIBRARIES))
    assert "``" not in done.stdout and ":class:" not in done.stdout  # plain text, not reStructuredText
    assert "docs/settings.md" in done.stdout


def test_serve_help_lists_the_models_and_warns_about_the_default_download(tmp_path: Path) -> None:
    from fluxserve.models.registry import BUILTIN_MODELS

    done = run_cli(["serve", "--help"], {}, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.index("Start the HTTP server") < text.index("options:")  # a description first
    listed = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()
              and line.split()[0] in BUILTIN_MODELS}
    assert set(listed) == set(BUILTIN_MODELS)
    assert all(("offline" in line) == key.startswith("tiny-") for key, line in listed.items())
    assert "default schnell" in text and "large download" in text
    assert "FLUX_*" in text and "docs/settings.md" in text
