"""Tiny random-weight pipelines built offline, saved in diffusers format.

Each family's runner builds its own tiny pipeline (``FamilyRunner.tiny_pipeline`` in ``engine/families/``, with
the offline tokenizers of ``engine/families/tokenizers.py``); this module saves it (atomically) and knows whether
it is built already (a marker file).

They exist so that the demo and the tests run the exact code path of a real model (``from_pretrained``
of a diffusers directory) on a machine with no hub access. Weights come from fixed seeds, so every
machine builds the same model and the same seed gives the same image everywhere.

The shapes keep the real models' structure where it matters to the server: FLUX's VAE downsamples by
8 and the transformer packs 2×2 patches (sizes are multiples of 16), T5 pads to ``max_sequence_length``
and the Qwen-Image prompt template is tokenized exactly as with the real tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from fluxserve.engine.families import runner_for
from fluxserve.models.registry import tiny_families

log = logging.getLogger(__name__)

TINY_FORMAT_VERSION = 1
_MARKER = "fluxserve_tiny.json"


def build_tiny_pipeline(family: str) -> Any:
    """Build (in memory) the tiny pipeline of ``family`` with fixed-seed float32 weights."""
    known = tiny_families()
    if family not in known:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of: {', '.join(known)}")
    pipe = runner_for(family).tiny_pipeline()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them: no dropout
    return pipe


def is_tiny_model_dir(path: Path, family: str) -> bool:
    """True when ``path`` holds a complete tiny model of ``family`` in the current format."""
    marker = path / _MARKER
    if not (marker.is_file() and (path / "model_index.json").is_file()):
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(meta.get("family") == family and meta.get("version") == TINY_FORMAT_VERSION)


def write_tiny_model(path: Path, family: str) -> Path:
    """Build the tiny pipeline and save it to ``path`` with ``save_pretrained``.

    Written to a temporary sibling directory and renamed, so a crash never leaves half a model that
    a later start would try to load.
    """
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(family)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MARKER).write_text(json.dumps({"family": family, "version": TINY_FORMAT_VERSION}))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote tiny %s model to %s", family, path)
    return path


def ensure_tiny_model(path: Path, family: str) -> Path:
    """Return ``path``, building the tiny model there first if it is missing or outdated."""
    if not is_tiny_model_dir(path, family):
        write_tiny_model(path, family)
    return path
