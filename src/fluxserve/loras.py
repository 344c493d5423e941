"""The LoRA library: adapter files on disk, what each one is, and the rules a request's ``loras`` follow.

Torch-free (the HTTP layer lists and validates adapters without loading the engine): a ``.safetensors``
file starts with a JSON header naming every tensor and its shape, so name, family, rank, target modules
and size are read from the header alone. The engine (``engine/adapters.py``) loads the file itself with
diffusers' ``load_lora_weights``, which converts kohya and the other trainers' formats.

Layout of ``FLUX_LORA_DIR`` (default ``FLUX_CACHE_DIR/loras``)::

    loras/
      my-style.safetensors          # family read from the file (metadata, or the tensor names: each
                                    # family's descriptor declares its LoRA key signatures)
      flux/tiny-flux-demo.safetensors  # a family subfolder says the family
      qwen/other.safetensors

An adapter's name is its file name without ``.safetensors``; a name found twice keeps the first file
(subfolders sorted, top level first) and the later one is listed under ``<family>/<name>``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxserve.models.registry import FAMILIES, family_of_lora_keys

log = logging.getLogger(__name__)

FAMILY_KEY = "fluxserve.family"
"""``__metadata__`` key of a safetensors file that names the adapter's family (``flux``, ``qwen``, ...)."""
BASE_MODEL_KEY = "fluxserve.base_model"
"""``__metadata__`` key naming the one registry model an adapter fits (the tiny demo adapters: their
shapes fit only the tiny model)."""
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_FILES = 4096
"""Most adapter files the library lists (a budget: listing reads every header)."""

_LAYER = re.compile(r"^(?:transformer\.|unet\.|text_encoder(?:_2)?\.|lora_unet_|lora_te\d?_|diffusion_model\.)?")


class LoraError(Exception):
    """A request's ``loras`` cannot be honoured: ``status`` 400/404/503, ``code``, always ``param="loras"``."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class LoraInfo:
    """One adapter file, as its header describes it."""

    name: str
    path: Path
    family: str | None
    """The family it fits; None when neither the folder, the metadata nor the tensor names say."""
    rank: int
    """The largest LoRA rank of its layers."""
    target_modules: tuple[str, ...]
    """Leaf module names it adapts (``to_q``, ``to_out.0``, ``proj_out``, ...)."""
    size_bytes: int
    format: str
    """``peft`` (diffusers/PEFT ``lora_A``/``lora_B``) or ``kohya`` (``lora_down``/``lora_up``)."""
    text_encoder: bool
    """It also adapts a text encoder: prompt embeddings then depend on it (part of the prompt-cache key)."""
    base_model: str | None = None
    mtime: float = 0.0

    def card(self, loaded_on: Iterable[str] = ()) -> dict[str, Any]:
        """What ``GET /v1/loras`` shows (never the path: clients do not learn where files live)."""
        return {"name": self.name, "object": "lora", "family": self.family, "base_model": self.base_model,
                "rank": self.rank, "target_modules": list(self.target_modules), "size_bytes": self.size_bytes,
                "format": self.format, "text_encoder": self.text_encoder, "loaded": sorted(set(loaded_on))}


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name → dtype/shape/offsets, plus ``__metadata__``)."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"safetensors header of {length} bytes is too large")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    return header


def describe(path: Path, name: str, folder_family: str | None) -> LoraInfo:
    """Read ``path``'s header into a :class:`LoraInfo` (ValueError / OSError for a file that is no adapter)."""
    header = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {key: value for key, value in header.items() if isinstance(value, dict) and "shape" in value}
    down = {k: v for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_down.weight"))}
    if not down:
        raise ValueError("no LoRA tensors (lora_A / lora_down) in the file")
    kohya = any(k.endswith(".lora_down.weight") for k in down)
    rank = max(int(v["shape"][0]) for v in down.values())
    targets = sorted({_leaf(k) for k in down})
    text_encoder = any(k.startswith(("text_encoder", "lora_te")) for k in down)
    family = folder_family or metadata.get(FAMILY_KEY) or family_of_lora_keys(down)
    return LoraInfo(name=name, path=path, family=family, rank=rank, target_modules=tuple(targets),
                    size_bytes=path.stat().st_size, format="kohya" if kohya else "peft", text_encoder=text_encoder,
                    base_model=metadata.get(BASE_MODEL_KEY), mtime=path.stat().st_mtime)


def _leaf(key: str) -> str:
    """``transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight`` → ``to_out.0``; kohya names keep
    their last underscore part (``lora_unet_double_blocks_0_img_attn_qkv`` → ``img_attn_qkv``)."""
    stem = key.rsplit(".lora_", 1)[0]
    if stem.startswith(("lora_unet_", "lora_te")):
        parts = re.split(r"_\d+_", stem)
        return parts[-1]
    parts = _LAYER.sub("", stem).split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]


class LoraLibrary:
    """The adapter files under one directory; re-read when a file changes (headers only), thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[float, int, LoraInfo | None]] = {}

    def _files(self) -> list[tuple[Path, str | None]]:
        if not self.directory.is_dir():
            return []
        found: list[tuple[Path, str | None]] = [(p, None) for p in sorted(self.directory.glob("*.safetensors"))]
        for folder in sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            family = folder.name if folder.name in FAMILIES else None
            found += [(p, family) for p in sorted(folder.glob("*.safetensors"))]
        return found[:MAX_FILES]

    def scan(self) -> dict[str, LoraInfo]:
        """Every readable adapter by name (unreadable files are logged once and skipped)."""
        adapters: dict[str, LoraInfo] = {}
        with self._lock:
            seen: set[Path] = set()
            for path, family in self._files():
                seen.add(path)
                try:
                    stat = path.stat()
                except OSError:
                    continue
                cached = self._cache.get(path)
                if cached is None or cached[:2] != (stat.st_mtime, stat.st_size):
                    name = path.stem
                    try:
                        info: LoraInfo | None = describe(path, name, family)
                    except (OSError, ValueError) as exc:
                        log.warning("skipping %s in the LoRA library: %s", path.name, exc)
                        info = None
                    cached = (stat.st_mtime, stat.st_size, info)
                    self._cache[path] = cached
                info = cached[2]
                if info is None:
                    continue
                name = info.name if info.name not in adapters else f"{path.parent.name}/{info.name}"
                if name in adapters:
                    continue
                adapters[name] = info if name == info.name else _renamed(info, name)
            for gone in set(self._cache) - seen:
                del self._cache[gone]
        return adapters

    def get(self, name: str) -> LoraInfo | None:
        return self.scan().get(name)


def _renamed(info: LoraInfo, name: str) -> LoraInfo:
    from dataclasses import replace

    return replace(info, name=name)


def resolve_loras(library: LoraLibrary, requested: list[tuple[str, float]], *, model_key: str, family: str,
                  max_count: int, max_scale: float, unavailable: str | None = None) -> tuple[tuple[str, float], ...]:
    """Check a request's adapters against the library and the model; the ``(name, scale)`` set (sorted by
    name, so the same set in another order batches together) or :class:`LoraError`."""
    if not requested:
        return ()
    if unavailable:
        raise LoraError(400, f"invalid 'loras': {unavailable}", "loras_unavailable")
    if len(requested) > max_count:
        raise LoraError(400, f"invalid 'loras': at most {max_count} adapters per request "
                             f"(FLUX_MAX_LORAS_PER_REQUEST), got {len(requested)}", "too_many_loras")
    names = [name for name, _ in requested]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise LoraError(400, f"invalid 'loras': adapter {duplicate[:80]!r} is named twice", "invalid_value")
    adapters = library.scan()
    for name, scale in requested:
        if not abs(scale) <= max_scale:  # also refuses NaN
            raise LoraError(400, f"invalid 'loras': scale of {name[:80]!r} must be between {-max_scale:g} and "
                                 f"{max_scale:g} (FLUX_LORA_MAX_SCALE), got {scale:g}", "invalid_value")
        info = adapters.get(name)
        if info is None:
            raise LoraError(404, f"invalid 'loras': no adapter named {name[:80]!r} in the LoRA library "
                                 "(GET /v1/loras lists them)", "lora_not_found")
        if info.family is not None and info.family != family:
            raise LoraError(400, f"invalid 'loras': adapter {name!r} is for {info.family} models; {model_key} is a "
                                 f"{family} model", "lora_family_mismatch")
        if info.base_model is not None and info.base_model != model_key:
            raise LoraError(400, f"invalid 'loras': adapter {name!r} fits only {info.base_model}, not {model_key}",
                            "lora_model_mismatch")
    return tuple(sorted((name, float(scale)) for name, scale in requested))
