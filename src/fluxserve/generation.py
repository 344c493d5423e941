"""What a generation is, shared by every layer: parameters, one job's request, its result, the errors.

This module is the contract between the HTTP layer, the scheduler and the engine. It imports neither
torch nor diffusers (a test proves it), so the HTTP layer and the scheduler can use these types
without loading the engine. Pixels travel as NumPy arrays (``uint8``, ``H×W×3``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

MAX_SEED = 2**53 - 1
"""The largest seed (JavaScript's ``Number.MAX_SAFE_INTEGER``): every seed a client sends or gets back is a
number JavaScript clients, whose numbers are doubles, hold exactly."""
MAX_PARTIAL_IMAGES = 3
"""The most partial images one streamed request may ask for (OpenAI's limit)."""

Task = Literal["generate", "img2img", "inpaint", "edit"]
"""What the pipeline is asked to do: text to image, image to image, fill a masked area, or follow an
instruction on reference images."""


@dataclass(frozen=True)
class GenerationParams:
    """Parameters shared by every request of a batch (the batching key)."""

    model: str
    width: int
    height: int
    steps: int
    guidance: float
    max_sequence_length: int
    allow_fallback: bool = True
    task: Task = "generate"
    strength: float | None = None
    """img2img / inpaint only: how far from the input image the result may move (0–1)."""
    loras: tuple[tuple[str, float], ...] = ()
    """Adapters (name, scale) active for this batch; part of the batching key."""
    inputs: str | None = None
    """Edits only: a digest of the input images and mask (see ``fluxserve.storage.inputs.inputs_digest``).
    Part of the batching key, so jobs with input images share a batch only with jobs whose inputs are
    byte-identical (every request of a pipeline call then edits the same pixels)."""

    def scaled(self, factor: float, multiple: int, minimum: int) -> GenerationParams | None:
        """A smaller size with (as near as the multiple allows) the same aspect ratio, on the model's
        multiple. Steps, guidance and everything else stay as they are: a fallback never raises the step
        count. None when a side would fall under ``minimum`` or nothing would shrink."""
        width = max(multiple, round(self.width * factor / multiple) * multiple)
        height = max(multiple, round(self.height * factor / multiple) * multiple)
        if width < minimum or height < minimum or width * height >= self.width * self.height:
            return None
        return replace(self, width=width, height=height)

    @property
    def megapixel_steps(self) -> float:
        """Compute one image of these parameters costs, in megapixels × steps."""
        return self.width * self.height / 1e6 * self.steps


@dataclass
class ImageRequest:
    """What one job asks the engine for: a prompt, one seed per image, and any input images."""

    prompt: str
    seeds: list[int]
    negative_prompt: str | None = None
    is_cancelled: Callable[[], bool] = lambda: False
    on_progress: Callable[[int, int, np.ndarray | None], None] | None = None
    """Called after each step with (step, total, partial image or None)."""
    partial_images: int = 0
    """How many partial images the client streams (0–3): the intermediate image decoded at full size at the
    steps :func:`partial_image_steps` picks, handed to ``on_progress``."""
    images: list[np.ndarray] = field(default_factory=list)
    """Input images for edits (``uint8`` H×W×3, already at the output size for img2img/inpaint)."""
    mask: np.ndarray | None = None
    """Inpainting: ``uint8`` H×W, 255 where the image may change, 0 where it must be kept."""


@dataclass
class ImageResult:
    images: list[np.ndarray]
    seeds: list[int]
    params: GenerationParams
    timings: dict[str, float]
    batch_size: int
    fallback_applied: bool = False
    fallback_reason: str | None = None
    original_params: GenerationParams | None = None
    cancelled: bool = False


def pick_seed() -> int:
    """A fresh random seed (never a constant), within 0 ≤ seed ≤ :data:`MAX_SEED` (exact in JavaScript)."""
    return secrets.randbelow(MAX_SEED + 1)


def seeds_for(first: int, n: int) -> list[int]:
    """Image *i* uses ``(first + i) mod 2**53`` (past :data:`MAX_SEED` it wraps to 0), so each can be
    reproduced alone and every seed stays exact in JavaScript."""
    return [(first + i) % (MAX_SEED + 1) for i in range(n)]


def partial_image_steps(total: int, partial_images: int) -> frozenset[int]:
    """The steps (1-based, of ``total``) after which a partial image is made: evenly spaced, never the
    last step (that one is the final image)."""
    if partial_images <= 0 or total <= 1:
        return frozenset()
    count = min(partial_images, MAX_PARTIAL_IMAGES, total - 1)
    return frozenset(max(1, round(total * (i + 1) / (count + 1))) for i in range(count))


# --- what the engine raises (the scheduler maps each to an HTTP status) -------------------------------
class EngineError(Exception):
    """Base of the errors an engine raises for a batch."""


class GenerationCancelled(EngineError):
    """Every request of the batch was cancelled; the pipeline was interrupted between steps."""


class OutOfMemory(EngineError):
    """Out of memory even after the recovery ladder; ``reason`` says what was tried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadOutput(EngineError):
    """The pipeline kept producing NaN or black images after the retry."""


class AdapterError(EngineError):
    """A LoRA adapter of the batch could not be loaded or activated on this model (the message says why)."""


class WorkerUnresponsive(EngineError):
    """The worker process running the batch sent no heartbeat for FLUX_WORKER_HEARTBEAT_TIMEOUT seconds: it
    was killed and is being replaced (the scheduler answers 503 ``worker_unresponsive``)."""


class ModelLockTimeout(TimeoutError):
    """Waited longer than FLUX_MODEL_LOCK_TIMEOUT for another load of the same model."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""

