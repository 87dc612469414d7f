"""Public API: ``optimize``, ``disable``, ``reset``, ``summary``, ``runtime_of``.

``optimize`` validates everything first, then applies attention backend / fused QKV / quantization, builds the
runtime (the lowering chosen once) and registers it as a hook in the transformer's diffusers :class:`HookRegistry`
(:mod:`dbcache_compile.runtime`). Neither the model's nor the pipeline's class is touched; ``disable`` removes the
hook and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Optional, Union

import torch

from .adapters import Adapter, adapter_for, supported_models
from .checks import check_optimize_arguments, refuse_module_hooks
from .config import DBCacheConfig
from .lowerings import build_lowering
from .quantize import count_selected, default_filter, quantize_transformer, resolve_quantization
from .generic import GENERIC_LOWERINGS, GenericAdapter, GenericRuntime, generic_adapter
from .runtime import (HOOK_NAME, Applied, CachedRuntime, CacheHook, GenerationWatch, HookRegistry, Runtime,
                      refuse_forward_replacing_hooks, refuse_offload, refuse_offload_with_cuda_graphs,
                      UncachedHook, UncachedRuntime)
from .stats import CacheSummary

__all__ = ["optimize", "disable", "reset", "summary", "runtime_of", "is_optimized", "COMPILE_MODES", "GRAPHS"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHS = ("auto", "segments", "cond", "regional")
#: attention backends that run without CUDA (everything else needs a CUDA GPU and its kernels)
_CPU_ATTENTION = ("native", "_native_math", "flex")


def _split(obj: Any) -> tuple[Optional[Any], torch.nn.Module]:
    """(pipeline or None, transformer) from a pipeline or a bare transformer."""
    if isinstance(obj, torch.nn.Module):
        return None, obj
    transformer = getattr(obj, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"{type(obj).__name__} is neither a transformer module nor a pipeline with a "
                         f"`.transformer`; dbcache_compile.optimize() accepts e.g. FluxPipeline, QwenImagePipeline "
                         f"or their transformers")
    return obj, transformer


def _hook(transformer: torch.nn.Module) -> Any:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(HOOK_NAME) if registry is not None else None


def is_optimized(pipe_or_transformer: Any) -> bool:
    """Whether :func:`optimize` attached a runtime (or :func:`dbcache_compile.load` put a package in place)."""
    _, transformer = _split(pipe_or_transformer)
    return isinstance(transformer, Runtime) or _hook(transformer) is not None


def runtime_of(pipe_or_transformer: Any) -> Runtime:
    """The runtime ``optimize`` attached (or a package loaded with :func:`dbcache_compile.load`): its ``lowering``,
    ``mode``, ``cache_config``, ``graphs`` (hand-captured segment graphs), ``use_segment_graphs()``, ``summary()``.
    Raises ``ValueError`` when the transformer is not optimized."""
    _, transformer = _split(pipe_or_transformer)
    if isinstance(transformer, Runtime):  # a LoadedCachedTransformer is its own runtime
        return transformer
    hook = _hook(transformer)
    if hook is None:
        raise ValueError(f"{type(pipe_or_transformer).__name__} is not optimized by dbcache_compile (call "
                         f"optimize() first)")
    return hook.runtime


def _resolve_adapter(transformer: torch.nn.Module, name: Optional[str]) -> Adapter:
    """The explicit adapter registered for the transformer's class, else the generic one (``name="generic"`` forces
    it); a clear error when neither applies."""
    if name not in (None, "generic"):
        raise ValueError(f"adapter must be None (automatic) or 'generic', got {name!r}")
    if name is None:
        try:
            return adapter_for(transformer)
        except ValueError:
            pass
    adapter = generic_adapter(transformer)
    if adapter is None:
        from .families import supported_models as families
        supported = "; ".join(f"{row['family']} ({row['transformer']})" for row in families())
        raise ValueError(
            f"dbcache_compile does not support {type(transformer).__name__}: it is in no supported family, has no "
            f"adapter file, and none of its block lists is made of blocks that diffusers describes in "
            f"diffusers.hooks._helpers.TransformerBlockRegistry (what the generic adapter needs). Supported families "
            f"(dbcache_compile.supported_models()): {supported}. To add one, see README 'Models' > 'Adding a model "
            f"family' (the adapter contract: block lists per chain, each block class's stream contract, CFG mode)")
    return adapter


def _check_attention(attention: Optional[str], device: torch.device) -> Optional[str]:
    """The diffusers backend name ``attention`` resolves to on ``device`` (``None``: leave the model's)."""
    if attention is None:
        return None
    if attention == "auto":
        if device.type != "cuda":
            return "native"
        return "_native_cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "_native_flash"
    from diffusers.models.attention_dispatch import AttentionBackendName
    valid = [b.value for b in AttentionBackendName]
    if attention not in valid:
        raise ValueError(f"attention must be None, 'auto' or a diffusers attention backend ({', '.join(valid)}), "
                         f"got {attention!r}")
    if device.type != "cuda" and attention not in _CPU_ATTENTION:
        raise ValueError(f"attention={attention!r} needs a CUDA GPU; the transformer is on {device.type} (use "
                         f"'auto', or one of {', '.join(_CPU_ATTENTION)})")
    return attention


def _has_subclass_weights(transformer: torch.nn.Module) -> bool:
    """Whether some weight is a tensor subclass (e.g. a torchao quantized weight)."""
    return any(type(p.data) is not torch.Tensor for p in transformer.parameters())


def _resolve_graph(graph: str, mode: Optional[str], device: torch.device, quantized: bool) -> str:
    """The lowering ``graph`` means for this mode / device / quantization (errors for impossible combinations).

    ``auto``: ``regional`` on CUDA (block regions compile in seconds where whole-segment graphs of the FLUX-size
    model take minutes, and the hand-captured segment graphs keep every step a CUDA-graph replay; docs/design.md),
    ``segments`` elsewhere (on CPU as fast as ``cond`` and faster than ``regional``, and its graphs hit Inductor's
    on-disk cache: bench/results/lowerings_cpu.md). ``cond`` is for no-host-sync and export."""
    if mode is None:
        if graph != "auto":
            raise ValueError(f"graph={graph!r} is a compiled lowering and needs a compile mode (mode='default', "
                             f"'max-autotune', ...); without one the cache runs eagerly (leave graph='auto')")
        return "eager"
    if graph == "cond" and quantized:
        raise NotImplementedError(
            "graph='cond' cannot run quantized (tensor-subclass) weights: torch.cond has no rule for tensor "
            "subclasses in torch 2.11-2.14 ('no rule registered for HOP cond and subclass'); use graph='regional' "
            "or graph='segments'")
    if graph == "auto":
        return "regional" if device.type == "cuda" else "segments"
    return graph


def optimize(pipe: Any, cache: Union[DBCacheConfig, str, None] = "F1B0_W4MC2_R0.2", mode: Optional[str] = None,
             graph: str = "auto", quantize: Any = None, compile_options: Optional[dict[str, Any]] = None,
             quantize_filter: Optional[Callable[[torch.nn.Module, str], bool]] = None,
             attention: Optional[str] = None, fuse_qkv: bool = False, adapter: Optional[str] = None) -> Any:
    """Make a diffusers pipeline (or bare transformer) faster with DBCache, ``torch.compile`` and quantization.

    Args:
        pipe: a pipeline with a ``.transformer`` (FluxPipeline, QwenImagePipeline, ...) or the transformer itself.
            With a bare transformer outside a pipeline, call :func:`reset` before each new generation.
        cache: a :class:`DBCacheConfig`, its string form (``"F8B0_W8M0MC0_T0O1_R0.08"``) or ``None`` (no cache: the
            original forward, compiled per ``graph`` — ``regional`` blocks, captured whole as one CUDA graph on CUDA
            with a CUDA-graph mode, or one fullgraph compile — the baseline to measure cached runs against).
        mode: ``None`` for eager, or a ``torch.compile`` mode.
        graph: how the cached step is lowered when compiling: ``"regional"`` (each block class compiled once, each
            segment captured by hand as a CUDA graph on CUDA with ``reduce-overhead``/``max-autotune``: fast compile
            and graphs), ``"segments"`` (head/miss/hit compiled as whole graphs, CUDA-graphed by cudagraph trees),
            ``"cond"`` (one graph with ``torch.cond``, no host sync, no CUDA graphs, exportable) or ``"auto"``
            (``regional`` on CUDA, ``segments`` elsewhere). Move the transformer to its device before ``optimize``
            for ``auto`` to see it. Without ``mode`` only ``"auto"`` (eager) is accepted.
        quantize: ``None``, ``"fp8"`` (dynamic per-row, needs SM >= 8.9 and a compile mode), ``"fp8-wo"``,
            ``"int8"`` (dynamic), ``"int8-wo"`` or a torchao config object. Quantization is not undone by
            :func:`disable`.
        quantize_filter: ``(module, fqn) -> bool`` choosing the linears to quantize; default: attention and MLP
            linears of the blocks (no embedders, modulation or output projection).
        attention: ``None`` (leave the transformer's attention backend alone), ``"auto"`` (cuDNN SDPA on Hopper and
            newer, torch's flash SDPA on other CUDA GPUs, native elsewhere) or a diffusers attention backend name
            (``transformer.set_attention_backend``); reported by :func:`summary` and reset by :func:`disable`.
        fuse_qkv: fuse each attention's Q/K/V (and added Q/K/V) linears into one (diffusers
            ``fuse_qkv_projections``; before quantization, so the fused linear is quantized). Off by default: it is
            measured per model and card (``python -m bench steps --fuse-qkv``), not assumed to help. Undone by
            :func:`disable`.
        adapter: ``None`` (the model family's adapter file if there is one, else the generic adapter) or
            ``"generic"``: run the model's own forward with the middle blocks skipped on a hit, through block hooks
            and diffusers' ``TransformerBlockRegistry`` (lowerings ``eager`` and ``regional``).
        compile_options: extra ``torch.compile`` arguments as a dict (e.g. ``{"dynamic": True}``); with a
            ``backend`` the ``mode`` only selects compiling and is not passed on. ``fullgraph=True`` is always set.

    Returns the same object, modified in place. Everything is validated before the transformer is touched: a
    refused call leaves it exactly as it was.
    """
    check_optimize_arguments(mode, graph, compile_options, quantize_filter, attention, fuse_qkv, adapter,
                             COMPILE_MODES, GRAPHS)
    if cache is None and mode is None and quantize is None:
        raise ValueError("optimize() with cache=None, mode=None and quantize=None would do nothing")
    pipeline, transformer = _split(pipe)
    transformers = [transformer] + ([] if pipeline is None else _extra_transformers(pipeline))
    watch = GenerationWatch(pipeline) if pipeline is not None else None
    # validate every transformer before changing any
    apply = [_prepare(pipeline, t, watch, cache, mode, graph, quantize, compile_options, quantize_filter, attention,
                      fuse_qkv, adapter) for t in transformers]
    with _model_offload_paused(pipeline):
        for step in apply:
            step()
    return pipe


@contextlib.contextmanager
def _model_offload_paused(pipeline: Any) -> Iterator[None]:
    """diffusers' ``enable_model_cpu_offload()`` wraps each model's forward in accelerate hooks and re-installs them
    after every call (``maybe_free_model_hooks``), restoring the forward it saw first: a cache hook attached beneath
    them would silently vanish after the first generation, one removed beneath them would come back. So take the
    offload hooks off, attach or remove ours, and enable the offload again on the same device."""
    if pipeline is None or not getattr(pipeline, "_all_hooks", None):
        yield
        return
    device = pipeline._offload_device
    pipeline.remove_all_hooks()
    try:
        yield
    finally:
        pipeline.enable_model_cpu_offload(device=device)


def _extra_transformers(pipeline: Any) -> list[torch.nn.Module]:
    """A pipeline's other denoisers (Wan 2.2 A14B's ``transformer_2``, switched in at a boundary step): each gets
    its own runtime and cache state, with local step counts (as cache-dit counts them)."""
    extra = getattr(pipeline, "transformer_2", None)
    return [extra] if isinstance(extra, torch.nn.Module) else []


def _prepare(pipeline: Any, transformer: torch.nn.Module, watch: Optional[GenerationWatch], cache: Any,
             mode: Optional[str], graph: str, quantize: Any, compile_options: Optional[dict],
             quantize_filter: Optional[Callable], attention: Optional[str], fuse_qkv: bool,
             adapter_name: Optional[str]) -> Callable[[], None]:
    """Validate everything for one transformer and build its runtime (nothing changes yet); returns the function
    that applies it."""
    if _hook(transformer) is not None:
        raise ValueError("this transformer is already optimized; call dbcache_compile.disable() first")
    if getattr(transformer, "_cache_config", None) is not None:
        raise ValueError(f"{type(transformer).__name__} has a diffusers cache enabled "
                         f"({type(transformer._cache_config).__name__}); two caches cannot share one forward: call "
                         f"transformer.disable_cache() first")
    adapter = _resolve_adapter(transformer, adapter_name)
    config = None if cache is None else DBCacheConfig.coerce(cache)
    if config is not None:
        config.validate_for(len(adapter.blocks(transformer)), type(transformer).__name__)
    device = next(transformer.parameters()).device
    lowering = _resolve_graph(graph, mode, device, quantize is not None or _has_subclass_weights(transformer))
    generic = isinstance(adapter, GenericAdapter)
    if generic and config is not None:
        if graph == "auto" and lowering != "eager":
            lowering = "regional"
        if lowering not in GENERIC_LOWERINGS:
            raise ValueError(f"{type(transformer).__name__} runs through the generic adapter (no adapter file), which "
                             f"supports the lowerings {', '.join(GENERIC_LOWERINGS)}; graph={graph!r} needs an explicit "
                             f"adapter (explicit: {', '.join(supported_models())})")
    refuse_forward_replacing_hooks(transformer, "at optimize()")
    refuse_offload(transformer, pipeline, "at optimize()")
    refuse_offload_with_cuda_graphs(transformer, pipeline, mode, "at optimize()")
    if config is None and lowering == "cond":
        raise ValueError("graph='cond' needs a cache (the cond is the cache decision); without one use "
                         "graph='regional' or 'segments' (a whole-forward compile)")
    refuse_module_hooks(transformer, mode, "at optimize()")
    ao_config = None if quantize is None else resolve_quantization(quantize, device, mode)
    quant_filter = quantize_filter or default_filter(adapter.block_lists)
    if quantize is not None and not fuse_qkv:  # with fusion the filter may select the fused linears only
        count_selected(transformer, quant_filter)
    if fuse_qkv and not (adapter.fused_qkv and hasattr(transformer, "fuse_qkv_projections")):
        raise ValueError(f"fuse_qkv=True: {type(transformer).__name__}'s attention processors do not use fused QKV "
                         f"projections in this diffusers version (fusing would only cost memory); leave it off")
    backend = _check_attention(attention, device)
    options = None
    if mode is not None:
        options = dict(compile_options or {})
        if "backend" not in options:
            options["mode"] = mode
        options["fullgraph"] = True
    attn_modules = [m for m in transformer.modules() if hasattr(m, "fuse_projections")]
    had_fused_attr = {id(m): "fused_projections" in vars(m) for m in attn_modules}

    def undo() -> None:
        if fuse_qkv:
            transformer.unfuse_qkv_projections()
            for module in attn_modules:  # unfusing leaves `fused_projections = False` behind where there was none
                if not had_fused_attr[id(module)] and "fused_projections" in vars(module):
                    del module.fused_projections
        if backend is not None:
            transformer.reset_attention_backend()

    applied = Applied(attention=backend, fused_qkv=fuse_qkv, undo=undo,
                      created_registry=not hasattr(transformer, "_diffusers_hook"))
    # the runtime is built before anything changes (building it validates the block layout and touches nothing)
    if config is None:
        rt: Any = UncachedRuntime(transformer, adapter.blocks(transformer), mode, options, lowering, applied,
                                 watch)
        hook: Any = UncachedHook(rt)
    elif generic:
        rt = GenericRuntime(transformer, adapter, config, lowering, mode, options, applied, watch, pipeline)
        hook = CacheHook(rt)
    else:
        rt = CachedRuntime(transformer, adapter, config,
                           build_lowering(lowering, transformer, adapter, config, mode, options), applied, watch)
        hook = CacheHook(rt)

    def apply() -> None:
        if backend is not None:
            transformer.set_attention_backend(backend)
        try:
            if fuse_qkv:
                transformer.fuse_qkv_projections()
            if quantize is not None:
                count = quantize_transformer(transformer, ao_config, quant_filter)
                name = quantize if isinstance(quantize, str) else type(quantize).__name__
                applied.quantized = f"{name} ({count} linears)"
        except Exception:
            undo()
            raise
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(hook, HOOK_NAME)
        for block, block_hook in rt.block_hooks.items():
            HookRegistry.check_if_exists_or_initialize(block).register_hook(block_hook, rt.block_hook_name)
        registry.invalidate_child_registries_cache()

    return apply


def disable(pipe: Any) -> Any:
    """Undo :func:`optimize`: the hook removed, attention backend and fused projections reset, nothing left
    behind (quantized weights stay quantized, with a warning). On a pipeline, every optimized denoiser
    (``transformer``, ``transformer_2``)."""
    pipeline, transformer = _split(pipe)
    if isinstance(transformer, Runtime):
        raise ValueError("this pipeline runs a package loaded with dbcache_compile.load(), which replaced "
                         "pipe.transformer; assign your original transformer back to pipe.transformer instead")
    if pipeline is None and type(getattr(transformer, "_hf_hook", None)).__name__ == "CpuOffload":
        raise ValueError("this transformer carries model CPU offload hooks (enable_model_cpu_offload): call "
                         "dbcache_compile.disable(pipe) on the pipeline, so the offload hooks are re-installed around "
                         "the original forward")
    with _model_offload_paused(pipeline):
        for extra in [] if pipeline is None else _extra_transformers(pipeline):
            if _hook(extra) is not None:
                _disable(extra)
        _disable(transformer)
    return pipe


def _disable(transformer: torch.nn.Module) -> None:
    rt = runtime_of(transformer)
    rt.release()
    rt.applied.undo()
    if _has_subclass_weights(transformer):
        warnings.warn("dbcache_compile.disable(): the transformer stays quantized (torchao weights); reload it "
                      "for the original weights", stacklevel=2)
    registry = transformer._diffusers_hook
    _remove(transformer, HOOK_NAME, rt.applied.created_registry)
    for block in rt.block_hooks:
        _remove(block, rt.block_hook_name, created_registry=True)
    registry.invalidate_child_registries_cache()


def _remove(module: torch.nn.Module, name: str, created_registry: bool) -> None:
    """Remove hook ``name``; when no hook is left, also what registering left on the instance (the registry we
    created, and the ``forward`` attribute that only re-binds the class's own method)."""
    registry = module._diffusers_hook
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    forward = vars(module).get("forward")
    if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
        del module.forward
    if created_registry:
        del module._diffusers_hook


def reset(pipe_or_transformer: Any) -> None:
    """Start a new generation at the next forward (pipelines do this themselves; a bare transformer driven by your
    own loop needs it between generations)."""
    runtime_of(pipe_or_transformer).reset()


def summary(pipe_or_transformer: Any) -> CacheSummary:
    """Cache decisions of the last (or current) generation. A pipeline with a second denoiser (Wan 2.2's
    ``transformer_2``) reports it under ``.transformers["transformer_2"]``, with its own local step indices."""
    result = runtime_of(pipe_or_transformer).summary()
    pipeline, _ = _split(pipe_or_transformer)
    if pipeline is not None:
        for name, extra in (("transformer_2", t) for t in _extra_transformers(pipeline)):
            if _hook(extra) is not None:
                result.transformers[name] = runtime_of(extra).summary()
    return result
