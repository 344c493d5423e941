"""Other names for models: what tools with a hard-coded OpenAI model name send.

``FLUX_MODEL_ALIASES`` is a list of ``name=model`` entries (``gpt-image-1=schnell``); a bare ``name``
means the active model. By default every OpenAI image model name is such a bare alias, so a client
that insists on ``dall-e-3`` gets the model this server runs, and each image's ``model`` says which.
Imports nothing of fluxserve, so settings can validate with it.
"""

from __future__ import annotations

OPENAI_IMAGE_MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "dall-e-2", "dall-e-3")
"""OpenAI's image model names, aliases of the active model unless FLUX_MODEL_ALIASES says otherwise."""

_URL_BY_DEFAULT = "dall-e-"
"""OpenAI answers ``dall-e-*`` requests without ``response_format`` with a url (gpt-image-* with b64)."""


def parse_model_aliases(entries: list[str]) -> dict[str, str | None]:
    """``["gpt-image-1=schnell", "dall-e-3"]`` → ``{"gpt-image-1": "schnell", "dall-e-3": None}``
    (None: the active model). Raises ValueError naming the entry that cannot be read."""
    aliases: dict[str, str | None] = {}
    for entry in entries:
        name, sep, target = (part.strip() for part in entry.partition("="))
        if not name or (sep and not target):
            raise ValueError(f"entries look like name=model or name, got {entry!r}")
        if name in aliases:
            raise ValueError(f"alias {name!r} is given twice")
        aliases[name] = target or None
    chained = sorted(name for name, target in aliases.items() if target in aliases)
    if chained:
        raise ValueError(f"alias target(s) must be models, not other aliases: {chained}")
    return aliases


def default_response_format(model: str | None, fallback: str) -> str:
    """``response_format`` for a request that sent none: ``url`` for dall-e-* names, as OpenAI does."""
    if model and model.strip().lower().startswith(_URL_BY_DEFAULT):
        return "url"
    return fallback
