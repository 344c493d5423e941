"""Each layer gets only its section of the settings: the layers never import ``Settings``, and every section is made
of real settings fields (same names, same values), frozen, built once per settings object."""

from __future__ import annotations

import ast
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from fluxserve.config import SECTIONS, EngineConfig
from fluxserve.settings import Settings

SRC = Path(__file__).resolve().parents[1] / "src" / "fluxserve"
SECTIONED = ("engine", "scheduler", "storage", "api", "webhooks")
"""Packages that receive sections; only the composition roots (runtime.py, api/app.py, server.py, cli.py, the Ray
Serve builders) hold the whole settings."""
COMPOSITION_ROOTS = {SRC / "api" / "app.py"}


def _settings_imports(path: Path) -> list[str]:
    """Where ``path`` imports ``Settings`` (or the settings module, through which it could reach it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "fluxserve.settings":
            found += [f"line {node.lineno}: from fluxserve.settings import {alias.name}"
                      for alias in node.names if alias.name in ("Settings", "*", "load_settings")]
        elif isinstance(node, ast.ImportFrom) and node.module == "fluxserve":
            found += [f"line {node.lineno}: from fluxserve import settings"
                      for alias in node.names if alias.name == "settings"]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {alias.name}"
                      for alias in node.names if alias.name == "fluxserve.settings"]
    return found


def test_the_layers_import_sections_not_settings() -> None:
    modules = [path for package in SECTIONED for path in sorted((SRC / package).rglob("*.py"))
               if path not in COMPOSITION_ROOTS]
    assert len(modules) > 40  # the walk found the packages
    offenders = {str(path.relative_to(SRC)): lines for path in modules if (lines := _settings_imports(path))}
    assert offenders == {}


def test_the_check_sees_an_import_of_settings(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from fluxserve.settings import Settings\n"
                      "from fluxserve.settings import SettingsError, redact_dsn\n", encoding="utf-8")
    assert _settings_imports(module) == ["line 3: from fluxserve.settings import Settings"]


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_a_section_is_made_of_settings_fields(name: str) -> None:
    section = SECTIONS[name]
    fields = [f.name for f in dataclasses.fields(section)]
    assert fields and [f for f in fields if f not in Settings.model_fields] == []
    assert len(set(fields)) == len(fields)
    settings = Settings(_env_file=None, api_keys="sk-a,sk-b", warmup_sizes="64x64")  # type: ignore[call-arg]
    built = getattr(settings, name)
    assert isinstance(built, section)
    for field in fields:
        value = getattr(settings, field)
        assert getattr(built, field) == (tuple(value) if isinstance(value, list) else value), field


def test_sections_are_frozen_and_built_once() -> None:
    settings = Settings(_env_file=None, max_queue=3)  # type: ignore[call-arg]
    assert settings.scheduler is settings.scheduler
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.scheduler.max_queue = 5  # type: ignore[misc]
    copy = settings.model_copy(update={"max_queue": 7})
    assert (settings.scheduler.max_queue, copy.scheduler.max_queue) == (3, 7)
    assert "scheduler" not in settings.model_dump() and "scheduler" not in settings.redacted()


def test_a_section_keeps_the_settings_secrets_out_of_its_repr() -> None:
    settings = Settings(_env_file=None, api_keys="sk-visible-nowhere", admin_keys="sk-admin-nowhere",  # type: ignore[call-arg]
                        hf_token="hf_nowhere", job_store="postgresql://u:pw-nowhere@db/jobs")
    shown = repr(settings.http) + repr(settings.engine) + repr(settings.storage)
    assert not any(secret in shown for secret in ("sk-visible", "sk-admin", "hf_nowhere", "pw-nowhere"))
    assert settings.http.all_api_keys() == settings.all_api_keys() == ["sk-visible-nowhere", "sk-admin-nowhere"]


def test_the_engine_section_travels_to_worker_processes() -> None:
    engine = Settings(_env_file=None, hf_token="hf_x", oom_policy="offload").engine  # type: ignore[call-arg]
    received = pickle.loads(pickle.dumps(engine))
    assert isinstance(received, EngineConfig) and received == engine
    assert received.hf_token_value() == "hf_x" and received.oom_policy == ("offload",)


def test_the_sections_module_needs_no_torch() -> None:
    code = ("import sys, fluxserve.config; "
            "assert not {'torch', 'diffusers', 'fastapi', 'pydantic_settings'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

