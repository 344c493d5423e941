"""LoRA adapters on a loaded model: load from the library, keep up to FLUX_LORA_CACHE, activate per batch.

Adapter state lives in the modules (PEFT layers inside the transformer and text encoders), and every
pipeline view of a model shares those modules. So activation is serialized per model by an
:class:`AdapterGate`: batches whose adapter set (names and scales) is the one active run side by side
(FLUX_MAX_CONCURRENT views); a batch with another set waits until the running ones finish, then switches.
A switch never happens under a running generation, and newcomers of the current set queue behind a
waiting switch (no starvation).

Two ways to switch:

- eager (FLUX_COMPILE=off): each adapter is its own PEFT adapter, loaded once (``load_lora_weights``) and
  kept (LRU, FLUX_LORA_CACHE); activating a set does what ``set_adapters(names, scales)`` does to each PEFT
  layer (active adapters, enabled, ``set_scale``), on layers collected once, and no set disables the layers
  (``disable_lora()``). Never a reload. PEFT's own ``set_adapter`` also resets ``requires_grad`` by walking
  each layer's modules; inference never needs that, and it was most of a switch's time.
- compiled (FLUX_COMPILE=regional/full): ``enable_lora_hotswap(target_rank=FLUX_LORA_MAX_RANK)`` before
  the model is compiled, and FLUX_MAX_LORAS_PER_REQUEST fixed *slots*. An adapter's converted state dict
  is read from disk once and kept on the device (LRU). The first time an adapter goes into a slot, diffusers'
  hotswap (``load_lora_weights(hotswap=True)``) puts it there, and what it wrote is read back and kept
  (:class:`_SlotContents`: the adapter's part of each padded ``lora_A``/``lora_B`` weight and each layer's
  ``alpha / rank``). Every later switch copies those tensors into the slot in place with batched
  ``torch._foreach_*`` calls (zero the slot, copy, write the scales): the same numbers as the hotswap, without
  its ``state_dict()`` of the whole model and module-tree walks on every switch. Unused slots get scale 0.
  Shapes and Python state never change, so the compiled graphs stay valid: no recompilation after the first
  adapter has been put into a slot. diffusers pads only the first slot it creates to the target rank; every
  later slot is padded here when it is created (PEFT's own padding), so that every slot keeps one shape.

Locks, in the order they may be taken (never the reverse):

1. the gate's condition (:class:`AdapterGate`) — guards only its counters and the active set. Nothing
   slow happens under it: a switch, and a load or drop outside a batch (:meth:`AdapterGate.alone`), first
   mark the gate *busy*, release the condition, do their work, and take it again to record the outcome.
   While the gate is busy no batch enters and no other switch starts;
2. :data:`~fluxserve.engine.construction.MODEL_BUILD_LOCK` — taken by a busy gate's work around
   ``load_lora_weights`` (PEFT patches process-global state), so a switch may wait for a model that is
   loading elsewhere in the process; batches of other models are not held up by that, and batches of
   this model wait on the condition, not on a lock;
3. ``AdapterState._lock`` — a short lock around the table of loaded adapters.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxserve.engine.construction import MODEL_BUILD_LOCK
from fluxserve.generation import AdapterError
from fluxserve.loras import BASE_MODEL_KEY, FAMILY_KEY, LoraInfo
from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.spec import ModelSpec

log = logging.getLogger(__name__)

LoraSet = tuple[tuple[str, float], ...]
UNKNOWN_SET: LoraSet = (("", float("nan")),)
"""The gate's active set after a failed switch: equal to no set (NaN ≠ NaN), so the next batch switches."""


class AdapterGate:
    """Lets batches of one adapter set in together; a different set waits for the model to be idle.

    Switching to another set, and loading or dropping adapters outside a batch (:meth:`alone`), need the
    model to themselves: they wait until no batch is in, make the gate busy, and do their work without
    the gate's lock (see the module doc). Batches that arrive meanwhile wait, and newcomers of the active
    set queue behind a waiting switch or :meth:`alone` (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: LoraSet = ()
        self._users = 0
        self._busy = False
        """A switch or an :meth:`alone` section has the model."""
        self._waiting: dict[LoraSet, int] = {}
        self._alone_waiting = 0

    @property
    def active(self) -> LoraSet:
        """The adapter set the model has now (changes only while the gate is busy)."""
        with self._cond:
            return self._active

    @property
    def users(self) -> int:
        """Batches in now."""
        with self._cond:
            return self._users

    @contextmanager
    def use(self, wanted: LoraSet, switch: Callable[[LoraSet], None]) -> Iterator[None]:
        """Hold the model with ``wanted`` active; ``switch`` runs (alone on the model) when it must change."""
        with self._cond:
            self._waiting[wanted] = self._waiting.get(wanted, 0) + 1
            self._cond.notify_all()  # wait_for_waiters watchers
            try:
                self._cond.wait_for(lambda: self._may_enter(wanted))
            finally:
                self._waiting[wanted] -= 1
                if not self._waiting[wanted]:
                    del self._waiting[wanted]
            must_switch = wanted != self._active
            if must_switch:
                self._busy = True  # nobody else is in, and nobody comes in: the modules are ours
            else:
                self._users += 1
        if must_switch:
            try:
                switch(wanted)
            except BaseException:
                # The modules may hold part of the new set now: the next batch must switch, whatever its set.
                self._settle(UNKNOWN_SET, enter=False)
                raise
            self._settle(wanted, enter=True)
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        """Have the model with no batch in and no switch under way, for loading or dropping adapters outside
        a batch; :meth:`set_active` records a change of the active set made inside."""
        with self._cond:
            self._alone_waiting += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._users == 0 and not self._busy)
            finally:
                self._alone_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def set_active(self, loras: LoraSet) -> None:
        """Inside :meth:`alone`: the model's active set is now ``loras``."""
        with self._cond:
            assert self._busy, "set_active outside AdapterGate.alone()"
            self._active = loras

    def _may_enter(self, wanted: LoraSet) -> bool:
        """Under the condition: the active set's batches join those in unless someone else waits (a switch
        to another set, an :meth:`alone` section); another set waits until the model is idle."""
        if self._busy:
            return False
        if wanted == self._active:
            return not self._alone_waiting and not any(n for s, n in self._waiting.items() if s != self._active)
        return self._users == 0

    def _settle(self, active: LoraSet, *, enter: bool) -> None:
        """A switch is over: record the set the model has, and let the switching batch in (or not)."""
        with self._cond:
            self._active = active
            self._busy = False
            if enter:
                self._users += 1
            self._cond.notify_all()

    def wait_for_waiters(self, count: int, timeout: float) -> bool:
        """Tests: block until ``count`` batches (or :meth:`alone` callers) wait at the gate (True) or
        ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: sum(self._waiting.values()) + self._alone_waiting >= count, timeout)


@dataclass
class _Slot:
    """One hot-swap slot's tensors in the model, collected when the slots change (never per switch)."""

    weights: list[torch.Tensor]
    """Every LoRA tensor of the slot (each layer's padded ``lora_A``/``lora_B`` weights)."""
    rank_dims: list[int]
    """Per weight, the dimension the slot pads to FLUX_LORA_MAX_RANK: the rows of ``lora_A`` (rank × in), the
    columns of ``lora_B`` (out × rank)."""
    scalings: list[torch.Tensor]
    """Each adapted layer's scaling tensor for the slot (what the forward multiplies by)."""


@dataclass
class _SlotContents:
    """An adapter as the hotswap put it into one slot, read back once and copied in on every later switch.

    Applying it: zero every weight of the slot, copy ``sources`` into ``targets``, copy ``scalings`` into the
    slot's scalings and multiply them by the request's scale. The slot then holds exactly what the hotswap
    wrote (the padding is zero, and so is every layer the adapter does not adapt)."""

    targets: list[torch.Tensor]
    """Views of the slot's weights: the leading rows (``lora_A``) or columns (``lora_B``) up to the last one that
    is not zero; the rest of each weight is the zero padding."""
    sources: list[torch.Tensor]
    """The adapter's values for ``targets`` (a copy, same shapes)."""
    scalings: list[torch.Tensor]
    """Per layer of :attr:`_Slot.scalings`: the adapter's ``alpha / rank`` there (0 where it adapts nothing)."""


@dataclass
class _Loaded:
    info: LoraInfo
    seconds: float
    state_dict: dict[str, torch.Tensor] | None = None
    """Compiled mode: the converted tensors, on the device, hot-swapped into a slot the first time it takes them."""
    in_slots: dict[int, _SlotContents] = field(default_factory=dict)
    """Compiled mode: what the adapter is in each slot it has been in (copied in on a switch)."""


@dataclass
class AdapterState:
    """One model's adapters: what is loaded, what is active, and the gate that serializes switching."""

    pipe: Any
    capacity: int
    hotswap: bool = False
    """Compiled mode: adapters go into fixed slots by hotswap (see the module docstring)."""
    slots: int = 1
    max_rank: int = 64
    gate: AdapterGate = field(default_factory=AdapterGate)
    _loaded: OrderedDict[str, _Loaded] = field(default_factory=OrderedDict)
    _slot_filled: list[bool] = field(default_factory=list)
    _slot_tensors: list[_Slot] = field(default_factory=list)
    _tuner_layers: list[Any] | None = None
    """Eager mode: the pipeline's PEFT layers, collected on the first switch after adapters were loaded or
    dropped."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    switches: int = 0
    last_switch_seconds: float = 0.0

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def text_encoder_set(self, loras: LoraSet) -> bool:
        """Whether any adapter of ``loras`` adapts a text encoder (the prompt-cache key then includes them)."""
        with self._lock:
            return any(name in self._loaded and self._loaded[name].info.text_encoder for name, _ in loras)

    @contextmanager
    def use(self, loras: LoraSet, resolve: Callable[[str], LoraInfo | None]) -> Iterator[None]:
        """Hold the model with exactly ``loras`` active (loading what is missing) for one batch."""
        with self.gate.use(loras, lambda wanted: self._switch(wanted, resolve)):
            yield

    # --- loading -------------------------------------------------------------------------------------
    def preload(self, info: LoraInfo) -> float:
        """Load ``info`` now (POST /v1/loras/load); returns the seconds it took (0 when already loaded)."""
        with self.gate.alone():
            active = self.gate.active
            seconds = self._ensure(info, keep=frozenset(n for n, _ in active))
            if self.hotswap and self._slot_filled and self._slot_filled[0]:
                self._contents(info.name, 0)  # read into the first slot now, so that a switch to it only copies
            self._activate(active)  # load_lora_weights activates what it loads: restore the set
            return seconds

    def unload(self, name: str) -> bool:
        """Drop ``name`` from the model (POST /v1/loras/unload); False when it was not loaded."""
        with self.gate.alone():
            with self._lock:
                if name not in self._loaded:
                    return False
            if any(n == name for n, _ in self.gate.active):
                self._activate(())
                self.gate.set_active(())
            self._drop(name)
            return True

    def _ensure(self, info: LoraInfo, keep: frozenset[str]) -> float:
        with self._lock:
            current = self._loaded.get(info.name)
            if current is not None and current.info.path == info.path and current.info.mtime == info.mtime:
                self._loaded.move_to_end(info.name)
                return 0.0
        if current is not None:  # the file changed on disk: load the new one
            self._drop(info.name)
        if self.hotswap and info.rank > self.max_rank:
            raise AdapterError(f"adapter {info.name!r} has rank {info.rank}, above FLUX_LORA_MAX_RANK="
                               f"{self.max_rank} that compiled models pad adapters to")
        started = time.perf_counter()
        try:
            if self.hotswap:
                state = self.pipe.lora_state_dict(str(info.path))
                state = state[0] if isinstance(state, tuple) else state
                device = getattr(self.pipe, "device", None) or "cpu"  # the pipeline's execution device
                state = {k: v.to(device) for k, v in state.items()}
                entry = _Loaded(info, 0.0, state)
            else:
                self._tuner_layers = None  # the load may wrap more layers
                with MODEL_BUILD_LOCK, _quiet_loader():  # PEFT patches process-global state while it loads
                    self.pipe.load_lora_weights(str(info.path), adapter_name=_peft_name(info.name))
                entry = _Loaded(info, 0.0)
        except AdapterError:
            raise
        except Exception as exc:  # a file that does not fit this model: a clear error, the model unchanged
            log.warning("could not load LoRA %s: %s: %s", info.name, type(exc).__name__, exc)
            self._forget_partial(info.name)
            raise AdapterError(f"adapter {info.name!r} does not fit this model ({type(exc).__name__})") from None
        entry.seconds = time.perf_counter() - started
        with self._lock:
            self._loaded[info.name] = entry
            over = [n for n in self._loaded if n not in keep and n != info.name][: max(0, len(self._loaded)
                                                                                      - self.capacity)]
        for name in over:  # LRU: the least recently used first
            self._drop(name)
        log.info("LoRA loaded", extra={"ctx": {"lora": info.name, "seconds": round(entry.seconds, 3),
                                               "rank": info.rank, "hotswap": self.hotswap}})
        return entry.seconds

    def _forget_partial(self, name: str) -> None:
        if self.hotswap:
            return
        try:
            if _peft_name(name) in _adapter_names(self.pipe):
                self.pipe.delete_adapters(_peft_name(name))
        except Exception:
            log.exception("could not remove a partly loaded LoRA")

    def _drop(self, name: str) -> None:
        with self._lock:
            entry = self._loaded.pop(name, None)
        if entry is None or self.hotswap:
            return  # hotswap: the slots keep their shapes; the cached tensors go with the entry
        self._tuner_layers = None
        self.pipe.delete_adapters(_peft_name(name))

    # --- switching -----------------------------------------------------------------------------------
    def _switch(self, wanted: LoraSet, resolve: Callable[[str], LoraInfo | None]) -> None:
        started = time.perf_counter()
        keep = frozenset(name for name, _ in wanted)
        for name, _ in wanted:
            info = resolve(name)
            if info is None:
                raise AdapterError(f"adapter {name!r} is no longer in the LoRA library")
            self._ensure(info, keep)
        self._activate(wanted)
        self.switches += 1
        self.last_switch_seconds = time.perf_counter() - started

    def _activate(self, wanted: LoraSet) -> None:
        if self.hotswap:
            self._activate_slots(wanted)
            return
        if not wanted:
            if _adapter_names(self.pipe):  # disable_lora() on every layer
                for layer in self._layers():
                    layer._disable_adapters = True
            return
        # What enable_lora() + set_adapters(names, adapter_weights=scales) do to each PEFT layer, without
        # PEFT's set_adapter, which also walks each layer's modules to reset requires_grad (frozen here).
        names = [_peft_name(n) for n, _ in wanted]
        for layer in self._layers():
            layer._active_adapter = names
            layer._disable_adapters = False
            for peft_name, (_, scale) in zip(names, wanted, strict=True):
                layer.set_scale(peft_name, scale)  # scale * lora_alpha / r, as set_adapters writes it

    def _layers(self) -> list[Any]:
        """Eager mode: the PEFT layers of every component diffusers' ``set_adapters`` reaches."""
        if self._tuner_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            components = [getattr(self.pipe, name, None) for name in getattr(self.pipe, "_lora_loadable_modules", ())]
            self._tuner_layers = [module for component in components if isinstance(component, torch.nn.Module)
                                  for module in component.modules() if isinstance(module, BaseTunerLayer)]
        return self._tuner_layers

    def _activate_slots(self, wanted: LoraSet) -> None:
        """Put each adapter's tensors into its slot and set the scales, all *in place*.

        ``set_adapters`` would write Python floats into PEFT's ``scaling`` (one recompile per scale value),
        so after the slots exist scales are only ever written into the scaling tensors that
        ``enable_lora_hotswap`` made: the adapter's ``alpha / rank``, multiplied by the request's scale."""
        if len(wanted) > self.slots:
            raise AdapterError(f"{len(wanted)} adapters at once, but compiled models have {self.slots} slots "
                               "(FLUX_MAX_LORAS_PER_REQUEST)")
        while len(self._slot_filled) < self.slots:
            self._slot_filled.append(False)
        # 1. A slot no adapter has been in yet is created by loading this one (once per slot, the only time
        #    the modules change): every slot on, scales as tensors; what was read back from the slots is stale.
        created = False
        for index, (name, _) in enumerate(wanted):
            if not self._slot_filled[index]:
                self._hotswap_into(name, index, create=True)
                self._slot_filled[index] = True
                created = True
        if created:
            self._turn_filled_slots_on()
            self._collect_slots()
        # 2. Each adapter as it is in its slot (the hotswap reads it in the first time, then it is kept).
        contents = [self._contents(name, index) for index, (name, _) in enumerate(wanted)]
        # 3. Copy it in: a few batched calls per slot, whatever the number of layers.
        with torch.no_grad():
            for index, slot in enumerate(self._slot_tensors):
                if not slot.weights:
                    continue  # a slot on no layer at all
                if index >= len(wanted):
                    torch._foreach_zero_(slot.scalings)  # an unused slot: the model without it
                    continue
                torch._foreach_zero_(slot.weights)
                if contents[index].targets:
                    torch._foreach_copy_(contents[index].targets, contents[index].sources)
                torch._foreach_copy_(slot.scalings, contents[index].scalings)
                torch._foreach_mul_(slot.scalings, wanted[index][1])

    def _turn_filled_slots_on(self) -> None:
        """After a new slot (once per slot, the only time the modules change): every filled slot on, and the
        scales as tensors, so that later scale changes are writes, never a recompile."""
        from peft.utils.hotswap import _convert_scalings_to_tensor

        filled = [_slot(i) for i, full in enumerate(self._slot_filled) if full]
        self.pipe.set_adapters(filled, adapter_weights=[1.0] * len(filled))
        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                _convert_scalings_to_tensor(component)

    def _hotswap_into(self, name: str, index: int, *, create: bool) -> None:
        """diffusers' own load of adapter ``name`` into slot ``index`` (creating the slot when ``create``)."""
        with self._lock:
            state = self._loaded[name].state_dict
        assert state is not None
        # A copy: load_lora_weights pops from the dict it gets.
        with MODEL_BUILD_LOCK, _quiet_loader():  # PEFT patches process-global state while it loads
            self.pipe.load_lora_weights(dict(state), adapter_name=_slot(index), hotswap=not create)
            if create:
                pad_new_slots(self.pipe, self.max_rank)

    def _collect_slots(self) -> None:
        """Find every slot's tensors in the model, and forget what was read back from the old ones."""
        from peft.tuners.lora import LoraLayer

        layers = [m for component in self.pipe.components.values() if isinstance(component, torch.nn.Module)
                  for m in component.modules() if isinstance(m, LoraLayer)]
        self._slot_tensors = []
        for index, filled in enumerate(self._slot_filled):
            if not filled:  # slots fill from the first: the rest are empty
                break
            slot = _slot(index)
            weights: list[torch.Tensor] = []
            rank_dims: list[int] = []
            for layer in layers:
                for attribute in layer.adapter_layer_names:  # lora_A, lora_B, and the kinds Flux has none of
                    holder = getattr(layer, attribute)
                    if slot not in holder:
                        continue
                    part = holder[slot]
                    for parameter in part.parameters() if isinstance(part, torch.nn.Module) else [part]:
                        weights.append(parameter)
                        rank_dims.append(1 if attribute.endswith("_B") and parameter.dim() >= 2 else 0)
            scalings = [layer.scaling[slot] for layer in layers
                        if isinstance(layer.scaling.get(slot), torch.Tensor)]
            self._slot_tensors.append(_Slot(weights, rank_dims, scalings))
        with self._lock:
            for entry in self._loaded.values():
                entry.in_slots.clear()

    def _contents(self, name: str, index: int) -> _SlotContents:
        """Adapter ``name`` as it is in slot ``index``: read back after diffusers' hotswap put it there, once."""
        with self._lock:
            entry = self._loaded[name]
        known = entry.in_slots.get(index)
        if known is not None:
            return known
        slot = self._slot_tensors[index]
        if slot.scalings:
            with torch.no_grad():
                torch._foreach_zero_(slot.scalings)  # layers the adapter leaves out keep 0, not an earlier value
        self._hotswap_into(name, index, create=False)
        targets, sources = [], []
        used_lengths = _used_lengths(slot.weights, slot.rank_dims)
        for weight, dim, used in zip(slot.weights, slot.rank_dims, used_lengths, strict=True):
            if used:
                target = weight.detach().narrow(dim, 0, used)
                targets.append(target)
                sources.append(target.clone())
        contents = _SlotContents(targets, sources, [s.detach().clone() for s in slot.scalings])
        entry.in_slots[index] = contents
        return contents


def pad_new_slots(pipe: Any, rank: int) -> None:
    """Pad every LoRA weight of ``pipe`` to ``rank`` (a no-op for those already padded). diffusers pads only the
    adapter loaded first after ``enable_lora_hotswap``; a slot created later would keep its first adapter's rank,
    and an adapter of a higher rank would change its shapes (a recompile), one of a lower rank its arithmetic."""
    from peft.utils.hotswap import _pad_lora_weights

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _pad_lora_weights(component, target_rank=rank)


def _used_lengths(weights: list[torch.Tensor], dims: list[int]) -> list[int]:
    """For each weight, how many leading slices along its dimension in ``dims`` hold anything but +0.0 (a -0.0
    counts as used), so that zeroing the rest gives back the weight bit for bit: what is left out is the zero
    padding, and it would be correct whatever was left out. One device sync for all of them."""
    if not weights:
        return []
    flags = []
    for weight, dim in zip(weights, dims, strict=True):
        w = weight.detach()
        nonzero = (w != 0) | torch.signbit(w)
        flags.append(nonzero.movedim(dim, 0).reshape(w.shape[dim], -1).any(dim=1))
    lengths = [int(f.numel()) for f in flags]
    flat = torch.cat(flags).cpu()
    used = []
    offset = 0
    for length in lengths:
        rows = torch.nonzero(flat[offset:offset + length])
        used.append(int(rows[-1]) + 1 if rows.numel() else 0)
        offset += length
    return used


@contextmanager
def _quiet_loader() -> Iterator[None]:
    """diffusers warns on every load that an adapter has no text-encoder part ("No LoRA keys associated to
    CLIPTextModel ..."): true of most adapters, and one line per switch under hotswap."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _slot(index: int) -> str:
    return f"fluxserve_slot{index}"


def _peft_name(name: str) -> str:
    """The PEFT adapter name of library adapter ``name``; two library names never share one.

    PEFT adapter names become module keys, which may not hold dots. ASCII letters, digits and ``-`` stay;
    every other character, ``_`` included, is written as ``_<hex code point>_``: ``style.v1`` →
    ``lora_style_2e_v1``, ``style_v1`` → ``lora_style_5f_v1``, ``flux/dup`` → ``lora_flux_2f_dup``. The
    encoding reads back unambiguously, so it is one-to-one: a request can only ever get the weights of the
    adapter it named (a lossy name once let ``style.v1`` and ``style_v1`` share one adapter and its weights)."""
    kept = (ch if ch == "-" or (ch.isascii() and ch.isalnum()) else f"_{ord(ch):x}_" for ch in name)
    return "lora_" + "".join(kept)


def _adapter_names(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


# --- tiny adapters built offline ------------------------------------------------------------------------
TINY_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def build_tiny_lora(model_dir: Path, path: Path, *, family: str, base_model: str, seed: int, rank: int = 4,
                    std: float = 0.2, targets: tuple[str, ...] = TINY_TARGETS) -> Path:
    """A random-weight PEFT LoRA for a tiny model's transformer, saved with the pipeline's
    ``save_lora_weights`` as ``.safetensors`` (so it loads through the same path as a downloaded one)."""
    import tempfile

    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    index = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    transformer_class = getattr(diffusers, index["transformer"][1])
    with MODEL_BUILD_LOCK:  # from_pretrained and PEFT patch process-global state while they build
        transformer = transformer_class.from_pretrained(Path(model_dir) / "transformer")
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)),
                                adapter_name="tiny")
        state = get_peft_model_state_dict(transformer, adapter_name="tiny")
    gen = torch.Generator().manual_seed(seed)
    # The names diffusers' save_lora_weights writes: the PEFT keys under the pipeline component's prefix.
    tensors = {f"transformer.{k}": (torch.randn(v.shape, generator=gen) * std).contiguous()
               for k, v in sorted(state.items())}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        import os

        os.close(handle)
        save_file(tensors, tmp, metadata={"format": "pt", FAMILY_KEY: family, BASE_MODEL_KEY: base_model})
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ensure_demo_lora(library_dir: Path, spec: ModelSpec, family: FamilyDescriptor, model_dir: Path) -> Path | None:
    """Serving a tiny model with a demo adapter (``FamilyDescriptor.demo_adapters``) writes it into the library
    once, under the family's folder (like the model itself)."""
    demo = family.demo_adapter(spec.key)
    if demo is None:
        return None
    path = Path(library_dir) / family.name / f"{demo.name}.safetensors"
    if not path.is_file():
        build_tiny_lora(model_dir, path, family=family.name, base_model=spec.key, seed=demo.seed,
                        std=0.5)  # visibly strong
        log.info("wrote the demo LoRA %s for %s", demo.name, spec.key)
    return path
