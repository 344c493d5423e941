"""The model layer: what fluxserve knows about a model without running it. Imports no torch, diffusers or
transformers (a test proves it), so the HTTP layer, the catalog, the LoRA library and the Ray ingress use it
freely.

* :mod:`.spec` — :class:`~.spec.ModelSpec` (one registry entry: source, licence, defaults, presets) and the
  family defaults for models outside the registry;
* :mod:`.descriptor` — :class:`~.descriptor.FamilyDescriptor`: everything about one family of pipelines that
  can be said without running it (tasks, edit modes, tokenizers and their limits, guidance parameter, LoRA
  key signatures, demo adapters, which optimizations apply, and where its runner lives);
* :mod:`.families` — one descriptor module per family;
* :mod:`.registry` — the families and the built-in model keys, and how a name resolves;
* :mod:`.handle` — :class:`~.handle.ModelHandle`: a loaded model as every layer above the engine sees it,
  whether it runs in this process, in a worker process or on a Ray replica;
* :mod:`.devices` — :class:`~.devices.DevicePlan`: where and in which precision a model runs;
* :mod:`.sources` — :class:`~.sources.ModelSources`: whether this server can load a model now (built offline, a
  local directory, the hub cache, or a download the hub allows);
* :mod:`.aliases` — other names for models (what OpenAI clients send).

The family *runners* (the stage API over the diffusers pipelines, tiny and full-size builders) live in
``fluxserve.engine.families``; each descriptor names its runner by import path, so this layer never imports
the engine.
"""
