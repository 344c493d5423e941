"""fluxserve: a self-hosted, OpenAI-compatible image-generation server on diffusers."""

__version__ = "0.1.0"
