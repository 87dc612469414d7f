"""Model families: one file per family in this package, each registering one :class:`Family` record with
:func:`register_family` (torchao-style registry: adding a family is its file here plus its tiny pipeline in
``tests/families/``). Everything else — ``optimize``, :func:`supported_models`, the README's model table, the graph
records, the parity tests, the bench — iterates this registry.

A record says, for one transformer class (by name, so no model module is imported before it is used):

* **chains**: block lists that make their own cache decision each step (cache-dit's cache contexts); a chain is a
  tuple of block-list attribute names in forward order (FLUX.1's 19 double + 38 single blocks form one chain of 57).
  Lists in no chain (Z-Image's refiners) always run.
* **contracts**: for block classes diffusers' ``TransformerBlockRegistry`` does not describe (or describes wrongly),
  ``(hidden output index, encoder output index or None, hidden argument, encoder argument or None)``.
* **cfg**: ``"contexts"`` (the pipeline names its cond/uncond calls with ``cache_context``), ``"separate"`` (two calls
  per step without names: they alternate branches while the pipeline's CFG is on) or ``"batched"`` (one call).
* **unsupported**: forward inputs the cache does not implement (refused by name at the call).
* **index_added**: forward inputs that make the model's own forward add something to the hidden stream after block i,
  by index, between the blocks a hit skips (SD3's, Sana's and Z-Image's ControlNet residuals, Wan VACE's hints, Wan
  Animate's face adapter). A call passing one runs its blocks one by one and caches the middle blocks' own residual
  (each block's output minus its input, summed) without those additions, so on a hit the model's own glue adds them
  once, with their current values; with **glue_reads_stream** (the addition is a function of the stream) the cached
  residual holds them and a hit undoes the glue between the middle blocks instead (:mod:`dbcache_compile.runtime`,
  "Index-added inputs"). A family with a prologue runs the blocks itself and names such inputs
  **block_residual_inputs** instead (FLUX.1's and Qwen-Image's ControlNet residuals, added in its own block loop:
  :meth:`Family.block_residuals`, :class:`~dbcache_compile.step.CacheStep`).
* optionally a **prologue / epilogue** (:meth:`Family.embed` / :meth:`Family.project`): the model's forward around
  its blocks written out, so that the whole step (embeddings + Fn blocks, or the output projection after Bn) compiles
  and CUDA-graphs as one segment and the ``cond`` lowering and :func:`dbcache_compile.export` can run. Without it,
  the model's own forward runs and block hooks do the caching.

A transformer in no family whose block classes diffusers describes gets a synthesized record (all its described
block lists as one chain, :func:`generic_family`).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from typing import Any, Optional

import torch

__all__ = ["Family", "Embedded", "register_family", "family_for", "family_named", "families", "supported_models",
           "REFUSED", "CONTROL_INPUTS", "IP_ADAPTER_INPUTS", "REFUSAL_REASONS", "generic_family"]

#: forward inputs that feed blocks by index from outside the cached chain (ControlNet residuals of Chroma / Bria,
#: which no ControlNet of diffusers 0.42.1 produces, SD3's skip-layer guidance): refused at the call by the families
#: that do not name them as ``index_added`` (SD3's, Sana's and Z-Image's ControlNet residuals) or
#: ``block_residual_inputs`` (FLUX.1's and Qwen-Image's, added in their own block loop)
CONTROL_INPUTS = ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states",
                  "skip_layers")
#: IP-Adapter image embeddings reach the blocks through the attention kwargs ("<argument>.<key>"); FLUX.1 runs them
#: (its prologue projects them as the model's forward does), SD3 and Chroma run them (their own forward projects them
#: into the block kwargs); the other families refuse them: their diffusers forward has no IP-Adapter path
IP_ADAPTER_INPUTS = ("joint_attention_kwargs.ip_adapter_image_embeds", "attention_kwargs.ip_adapter_image_embeds")

_IP_ADAPTER_WHY = ("IP-Adapter image embeddings run with the cache on SD3, Chroma and FLUX.1 with its prologue, the "
                   "tested transformers whose diffusers forward projects them")
#: why each refused input cannot run with the cache (the refusal's ``NotImplementedError`` says it; a family's
#: ``refusal_reasons`` override these)
REFUSAL_REASONS: dict[str, str] = {
    "skip_layers": "the forward skips those blocks by index, while the cache needs every block called once per "
                   "forward, in order, and its own skipping would mix with the guidance's",
    "kv_cache": "block i reads (or writes) the i-th cached K/V, which a block the cache skips never does",
    "kv_cache_mode": "block i reads (or writes) the i-th cached K/V, which a block the cache skips never does",
    **{name: _IP_ADAPTER_WHY for name in IP_ADAPTER_INPUTS},
}

#: transformer classes refused at ``optimize`` (their blocks are in diffusers' registry, so a synthesized record would
#: take them): class name -> why. Empty since Wan VACE and Wan Animate became families (``index_added``).
REFUSED: dict[str, str] = {}


class Embedded:
    """What a prologue (:meth:`Family.embed`) returns: the streams entering the first block, the keyword arguments
    every block gets besides the streams, and what the epilogue needs."""

    __slots__ = ("hidden", "encoder", "block_kwargs", "out_kwargs")

    def __init__(self, hidden: torch.Tensor, encoder: torch.Tensor, block_kwargs: dict[str, Any],
                 out_kwargs: dict[str, Any]) -> None:
        self.hidden = hidden
        self.encoder = encoder
        self.block_kwargs = block_kwargs
        self.out_kwargs = out_kwargs


class Family:
    """One transformer class's caching recipe (module doc): ``register_family(Family(name=..., transformer=...,
    pipelines=..., chains=..., ...))`` in a file of this package. A family with a prologue subclasses it, implements
    :meth:`embed`, :meth:`project` and, to allocate its buffers before the first step, sets ``signature`` +
    ``embedder`` (:meth:`stream_shapes`), and decorates the class with :func:`register_family`."""

    #: short name (``"flux"``), the transformer class name, and the diffusers pipelines known to drive it
    name: str = ""
    transformer: str = ""
    pipelines: tuple[str, ...] = ()
    chains: tuple[tuple[str, ...], ...] = ()
    cfg: str = "contexts"
    #: block class name -> (hidden output index, encoder output index or None, hidden argument, encoder argument)
    contracts: dict[str, tuple] = {}
    unsupported: tuple[str, ...] = CONTROL_INPUTS + IP_ADAPTER_INPUTS
    #: input name -> why this family refuses it, where :data:`REFUSAL_REASONS` does not say it for this family
    refusal_reasons: dict[str, str] = {}
    #: forward inputs whose values the forward adds to the hidden stream after blocks, by index (module doc); they
    #: may change at every step (SD3's ControlNet residuals do), so they are not conditioning for the generation rule
    index_added: tuple[str, ...] = ()
    #: whether that added glue reads the hidden stream (Wan Animate's face adapter): then a hit keeps it in the cached
    #: residual and undoes it between the middle blocks instead (:mod:`dbcache_compile.runtime`)
    glue_reads_stream: bool = False
    #: prologue families: forward inputs whose tensors the forward adds to the hidden stream after a block, by
    #: index (ControlNet residuals; :meth:`block_residuals` says which block gets which), and every input only the
    #: written-out forward implements (refused again when the family runs its own forward, ``prologue=False``)
    block_residual_inputs: tuple[str, ...] = ()
    prologue_inputs: tuple[str, ...] = ()
    #: the lowerings this family cannot run, with the reason (every other registered lowering whose needs the
    #: family meets runs: :mod:`dbcache_compile.lowerings`)
    refused_lowerings: dict[str, str] = {}
    #: why the blocks of a group cannot run as one segment (the forward passes each block arguments of its own, or
    #: changes the streams between blocks), or ``""``: then lowerings that need whole groups are refused and the
    #: others run block by block
    ungroupable: str = ""
    #: whether the attention processors use diffusers' fused QKV projections once fused (``optimize(fuse_qkv=True)``)
    fused_qkv: bool = False
    #: the forward's attention-kwargs argument, whose ``"scale"`` entry scales PEFT LoRA layers (``apply_lora_scale``)
    attention_kwargs: str = "joint_attention_kwargs"
    #: ``true_cfg_scale`` of a pipeline call that does not pass one (:meth:`separate_cfg`)
    default_true_cfg_scale: float = 1.0
    #: whether ``tests/families/`` runs a tiny pipeline of the family against cache-dit 1.5.3 (or, where cache-dit
    #: cannot run it, against the uncached model)
    tested: bool = False
    #: prologue families: the forward's positional parameter names and the linear that embeds the hidden stream
    signature: tuple[str, ...] = ()
    embedder: str = ""
    #: a one-line description for the README table's notes (optional)
    note: str = ""
    #: the module of the file that registered the family (set by :func:`register_family`)
    module: str = ""

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            if name.startswith("_") or not hasattr(Family, name) or callable(getattr(Family, name)):
                raise TypeError(f"Family has no field {name!r}")
            setattr(self, name, value)

    # ------------------------------------------------------------------------------------------ structure
    @property
    def has_prologue(self) -> bool:
        """Whether the family writes out the forward around its blocks (:meth:`embed` / :meth:`project`)."""
        return type(self).embed is not Family.embed

    @property
    def block_lists(self) -> tuple[str, ...]:
        return tuple(name for chain in self.chains for name in chain)

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """Every cached block, chain after chain, in forward order."""
        return [block for name in self.block_lists for block in getattr(transformer, name)]

    def contract(self, block_cls: type) -> Optional[tuple]:
        """``(hidden out, encoder out, hidden arg, encoder arg)`` of a block class: the family's entry, else diffusers'
        ``TransformerBlockRegistry``, else ``None``."""
        if block_cls.__name__ in self.contracts:
            return self.contracts[block_cls.__name__]
        from diffusers.hooks._helpers import TransformerBlockRegistry
        try:
            meta = TransformerBlockRegistry.get(block_cls)
        except ValueError:
            return None
        return (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index,
                meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name)

    # ------------------------------------------------------------------------------------------ prologue
    def embed(self, transformer: torch.nn.Module, **kwargs: Any) -> Embedded:
        """The forward up to the first block (prologue families only)."""
        raise NotImplementedError(f"family {self.name!r} declares no prologue: the model's own forward runs")

    def project(self, transformer: torch.nn.Module, hidden: torch.Tensor, out_kwargs: dict[str, Any]) -> torch.Tensor:
        """The forward after the last block (prologue families only)."""
        raise NotImplementedError(f"family {self.name!r} declares no epilogue: the model's own forward runs")

    def control_inputs(self, named: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The call's ControlNet inputs (``block_residual_inputs`` it passes, by name), ``None`` when it passes no
        residual tensors."""
        controls = {k: named[k] for k in self.block_residual_inputs if named.get(k) is not None}
        return controls if any(isinstance(v, (list, tuple)) for v in controls.values()) else None

    def block_residuals(self, transformer: torch.nn.Module,
                        controls: dict[str, Any]) -> Optional[list[Optional[torch.Tensor]]]:
        """Per cached block (chain order), the tensor the model's forward adds to the hidden stream right after it
        for these ControlNet inputs (:meth:`control_inputs`), or ``None`` for none (prologue families with
        ``block_residual_inputs``)."""
        return None

    def named_inputs(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments by name (positional ones named by ``signature``)."""
        return dict(zip(self.signature, args), **kwargs)

    def stream_shapes(self, transformer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple]:
        """``((hidden shape, dtype), (encoder shape, dtype))`` of the streams leaving the Fn blocks for these inputs,
        without running anything (buffers are allocated from it before the first step, so that step runs the same
        compiled code as every later one); ``None`` when the family cannot tell. The default fits dual-stream
        models whose streams keep the width of the ``embedder`` linear and whose first block broadcasts the encoder
        stream to the hidden stream's batch."""
        if not self.embedder:
            return None
        kwargs = self.named_inputs(args, kwargs)
        hidden, encoder = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        width = getattr(transformer, self.embedder).out_features
        batch = max(hidden.shape[0], encoder.shape[0])
        return (((hidden.shape[0], hidden.shape[1], width), hidden.dtype),
                ((batch, encoder.shape[1], width), encoder.dtype))

    def eager_inputs(self, transformer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Inputs a prologue family computes outside the compiled graphs before every step (added to ``kwargs``,
        read by :meth:`embed`). Default: none."""
        return kwargs

    def separate_cfg(self, call_kwargs: dict[str, Any]) -> bool:
        """Whether a pipeline call with these kwargs runs cond and uncond as separate forwards (FLUX.1's and
        Qwen-Image's pipelines: ``true_cfg_scale > 1`` and a negative prompt). The runtime follows the pipeline's
        cache contexts and does not need this; it configures peers that must be told (cache-dit's
        ``enable_separate_cfg`` in the bench and the parity tests)."""
        has_negative = (call_kwargs.get("negative_prompt") is not None
                        or call_kwargs.get("negative_prompt_embeds") is not None)
        return call_kwargs.get("true_cfg_scale", self.default_true_cfg_scale) > 1 and has_negative

    def __repr__(self) -> str:
        return f"<family {self.name} ({self.transformer})>"


_REGISTRY: dict[str, Family] = {}  # transformer class name -> record


def register_family(record: Any) -> Any:
    """Register a family: a :class:`Family` record, or (as a class decorator) a :class:`Family` subclass, of which
    one instance is registered. One family per transformer class. Returns its argument."""
    family = record() if isinstance(record, type) else record
    # the family's file (module name): what tests/families/<module>.py pairs with
    family.module = record.__module__ if isinstance(record, type) else sys._getframe(1).f_globals.get("__name__", "")
    if not isinstance(family, Family) or not family.name or not family.transformer or not family.chains:
        raise TypeError(f"{record!r}: a family is a Family with a name, a transformer and chains")
    if family.cfg not in ("contexts", "separate", "batched"):
        raise TypeError(f"family {family.name}: cfg must be 'contexts', 'separate' or 'batched', got {family.cfg!r}")
    other = _REGISTRY.get(family.transformer)
    if other is not None and other.name != family.name:
        raise TypeError(f"{family.transformer} has two families: {other.name!r} and {family.name!r}")
    _REGISTRY[family.transformer] = family
    return record


def _load() -> None:
    """Import every family file of this package once (each registers itself)."""
    if _REGISTRY:
        return
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        importlib.import_module(f"{__name__}.{module}")


def families() -> list[Family]:
    """Every registered family: prologue families first, then by name."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda f: (not f.has_prologue, f.name))


def family_named(name: str) -> Family:
    _load()
    for family in _REGISTRY.values():
        if family.name == name:
            return family
    raise ValueError(f"no model family named {name!r}; registered: {', '.join(f.name for f in families())}")


def _forward_order(transformer: torch.nn.Module, names: list[str]) -> list[str]:
    """``names`` in the order the model's ``forward`` source first mentions ``self.<name>`` (its block loops), so
    that a list re-assigned after construction (which moves it to the end of ``named_children``) keeps its place;
    definition order where the source is not available. The runtime checks the real call order anyway."""
    try:
        source = inspect.getsource(type(transformer).forward)
    except (OSError, TypeError):
        return names
    positions = {}
    for name in names:
        match = re.search(rf"self\.{re.escape(name)}\b", source)
        positions[name] = match.start() if match else len(source) + names.index(name)
    return sorted(names, key=positions.__getitem__)


class _Synthesized(Family):
    """The record of a transformer in no family whose block lists diffusers' ``TransformerBlockRegistry``
    describes: all of them as one chain (not cache-dit's one context per list), untested."""

    def __init__(self, transformer: str, chains: tuple[tuple[str, ...], ...]) -> None:
        self.name = "generic"
        self.transformer = transformer
        self.chains = chains


def generic_family(transformer: torch.nn.Module) -> Optional[Family]:
    """A synthesized record for a transformer in no family (module doc), or ``None`` when none of its block lists
    is described by diffusers."""
    probe = _Synthesized(type(transformer).__name__, ())
    lists = [name for name, child in transformer.named_children()
             if isinstance(child, torch.nn.ModuleList) and len(child)
             and all(probe.contract(type(block)) is not None for block in child)]
    return _Synthesized(type(transformer).__name__, (tuple(_forward_order(transformer, lists)),)) if lists else None


def family_for(transformer: torch.nn.Module, generic: bool = False) -> Family:
    """The record for ``transformer``: its family's (``generic=True``: a synthesized one, the model's own forward
    with block hooks, even for a prologue family), else a synthesized one; a ``ValueError`` naming every supported
    family when neither applies, or the reason when the model is refused (:data:`REFUSED`)."""
    _load()
    name = type(transformer).__name__
    if name in REFUSED:
        raise ValueError(f"{name}: {REFUSED[name]}. Call optimize() on the supported families only "
                         f"(dbcache_compile.supported_models(); README 'Models')")
    family = _REGISTRY.get(name)
    if family is not None and not generic:
        return family
    if family is not None:
        return _without_prologue(family)
    synthesized = generic_family(transformer)
    if synthesized is None:
        supported = "; ".join(f"{f.name} ({f.transformer})" for f in families())
        raise ValueError(
            f"dbcache_compile does not support {name}: it is in no model family (dbcache_compile/families/) and none "
            f"of its block lists is made of blocks that diffusers describes in diffusers.hooks._helpers."
            f"TransformerBlockRegistry. Supported families (dbcache_compile.supported_models()): {supported}. To add "
            f"one, see README 'Models' > 'Adding a model family'")
    return synthesized


def _without_prologue(family: Family) -> Family:
    """``family`` with its prologue switched off (``optimize(prologue=False)``: the model's own forward)."""
    record = _Synthesized(family.transformer, family.chains)
    for attr in ("name", "pipelines", "cfg", "contracts", "unsupported", "refusal_reasons", "index_added",
                 "glue_reads_stream",
                 "refused_lowerings", "ungroupable", "fused_qkv", "attention_kwargs", "default_true_cfg_scale",
                 "tested"):
        setattr(record, attr, getattr(family, attr))
    # inputs only the written-out forward implements (a hit would add the ControlNet residuals twice in the model's
    # own forward): refused again
    record.unsupported = tuple(dict.fromkeys(family.unsupported + family.prologue_inputs))
    record.refusal_reasons = dict(family.refusal_reasons, **{
        name: "with prologue=False the model's own forward runs under block hooks, where a hit would add the "
              "ControlNet residuals of the skipped blocks twice; untested for the IP-Adapter"
        for name in family.prologue_inputs})
    return record


def supported_models() -> list[dict]:
    """One row per registered family: ``family``, ``transformer`` (class name), ``pipelines``, ``prologue``
    (whether the family writes out the forward around its blocks), ``chains`` (block lists, each its own decision;
    ``"+"`` joins lists of one chain), ``cfg``, ``lowerings`` (what ``optimize(graph=...)`` can run) and ``tested``.
    The README's model table is this list (a test keeps them equal)."""
    from ..lowerings import lowerings_for
    return [{"family": f.name, "transformer": f.transformer, "pipelines": list(f.pipelines),
             "prologue": f.has_prologue, "chains": ["+".join(chain) for chain in f.chains], "cfg": f.cfg,
             "lowerings": list(lowerings_for(f)), "tested": f.tested} for f in families()]
