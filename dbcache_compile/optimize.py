"""Public API: ``optimize``, ``disable``, ``reset``, ``summary``, ``runtime_of``.

``optimize`` validates everything first, then applies attention backend / fused QKV / quantization, builds the
runtime (the lowering chosen once) and registers it as a hook in the transformer's diffusers :class:`HookRegistry`
(:mod:`dbcache_compile.runtime`). Neither the model's nor the pipeline's class is touched; ``disable`` removes the
hook and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable, Iterator, Optional, Union

import torch

from .attention import Auto, attach as attach_attention, check as check_attention
from .compile_cache import attach as attach_compile_cache, open_compile_cache
from .checks import check_optimize_arguments, refuse_module_hooks
from .config import DBCacheConfig
from .families import Family, family_for
from .lowerings import GRAPHS, resolve
from .quantize import count_selected, default_filter, quantize_transformer, resolve_quantization
from .recipe import KernelRecipe, attach as attach_recipe, compile_options as recipe_compile_options
from .vae import prepare as prepare_vae
from .runtime import (HOOK_NAME, Applied, BranchedRuntime, CacheHook, CacheRuntime, GenerationWatch, HookRegistry,
                      Runtime, UncachedHook, UncachedRuntime, refuse_forward_replacing_hooks, refuse_offload,
                      refuse_offload_with_cuda_graphs)
from .stats import CacheSummary

__all__ = ["optimize", "disable", "reset", "summary", "runtime_of", "is_optimized", "COMPILE_MODES", "GRAPHS"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _split(obj: Any) -> tuple[Optional[Any], torch.nn.Module]:
    """(pipeline or None, transformer) from a pipeline or a bare transformer; a transformer the user wrapped with
    ``torch.compile`` (an ``OptimizedModule``) stands for the module it wraps: the hooks go on that module and the
    wrapper traces them at its next call (README "Your own torch.compile / export")."""
    if isinstance(obj, torch.nn.Module):
        return None, _unwrapped(obj)
    transformer = getattr(obj, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"{type(obj).__name__} is neither a transformer module nor a pipeline with a "
                         f"`.transformer`; dbcache_compile.optimize() accepts e.g. FluxPipeline, QwenImagePipeline "
                         f"or their transformers")
    return obj, _unwrapped(transformer)


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


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


def _resolve_family(transformer: torch.nn.Module, prologue: Optional[bool]) -> Family:
    """The transformer's family record (``prologue=False``: run the model's own forward with block hooks even where
    the family writes out a prologue); a clear error when no family applies."""
    if prologue not in (None, True, False):
        raise TypeError(f"prologue must be None (the family's choice), True or False, got {prologue!r}")
    family = family_for(transformer, generic=prologue is False)
    if prologue is True and not family.has_prologue:
        raise ValueError(f"prologue=True: the {family.name} family ({type(transformer).__name__}) writes out no "
                         f"prologue; the model's own forward runs (leave prologue=None)")
    return family


def _check_attention(attention: Any, device: torch.device) -> Any:
    """The diffusers backend name ``attention`` resolves to on ``device`` (``None``: leave the model's; an
    :class:`~dbcache_compile.attention.Auto`: measured at the first call): :mod:`dbcache_compile.attention`."""
    return check_attention(attention, device)


def _has_subclass_weights(transformer: torch.nn.Module) -> bool:
    """Whether some weight is a tensor subclass (e.g. a torchao quantized weight)."""
    return any(type(p.data) is not torch.Tensor for p in transformer.parameters())


def optimize(pipe: Any, cache: Union[DBCacheConfig, str, None] = "F1B0_W4MC2_R0.2", mode: Optional[str] = None,
             graph: str = "auto", quantize: Any = None, compile_options: Optional[dict[str, Any]] = None,
             quantize_filter: Optional[Callable[[torch.nn.Module, str], bool]] = None,
             attention: Any = None, fuse_qkv: bool = False, prologue: Optional[bool] = None, recipe: Any = None,
             compile_vae: Union[bool, str, None] = None,
             compile_cache: Union[str, os.PathLike, None] = None) -> Any:
    """Make a diffusers pipeline (or bare transformer) faster with DBCache, ``torch.compile`` and quantization.

    Args:
        pipe: a pipeline with a ``.transformer`` (FluxPipeline, QwenImagePipeline, ...) or the transformer itself.
            A new generation starts when a call passes new conditioning tensors (README "When a generation
            starts"); a model called without any needs :func:`reset` between generations.
        cache: a :class:`DBCacheConfig`, its string form (``"F8B0_W8M0MC0_T0O1_R0.08"``) or ``None`` (no cache: the
            original forward, compiled per ``graph`` — ``regional`` blocks, captured whole as one CUDA graph on CUDA
            with a CUDA-graph mode, or one fullgraph compile — the baseline to measure cached runs against).
        mode: ``None`` for eager, or a ``torch.compile`` mode.
        graph: how the cached step is lowered when compiling (:mod:`dbcache_compile.lowerings`): ``"regional"``
            (each block class compiled once), ``"segments"`` (each segment — the Fn blocks, a list's middle blocks,
            the Bn blocks; whole steps for a family with a prologue — compiled whole), both captured by hand as CUDA
            graphs on CUDA with ``reduce-overhead``/``max-autotune``; ``"cond"`` (one graph with ``torch.cond``, no
            host sync, no CUDA graphs, exportable; families with a prologue) or ``"auto"`` (``regional`` on CUDA,
            ``segments`` elsewhere). Move the transformer to its device before ``optimize`` for ``auto`` to see
            it. Without ``mode`` only ``"auto"`` (eager) is accepted.
        quantize: ``None``, ``"fp8"`` (dynamic per-row, needs SM >= 8.9 and a compile mode), ``"fp8-wo"``,
            ``"int8"`` (dynamic), ``"int8-wo"`` or a torchao config object. Quantization is not undone by
            :func:`disable`.
        quantize_filter: ``(module, fqn) -> bool`` choosing the linears to quantize; default: attention and MLP
            linears of the blocks (no embedders, modulation or output projection).
        attention: ``None`` (leave the transformer's attention backend alone), ``"auto"`` (the fastest exact
            diffusers backend on this device, measured once for the first call's attention shape and cached on disk;
            :class:`dbcache_compile.attention.Auto` for a given shape or to allow numerics-changing backends) or a
            diffusers attention backend name (``transformer.set_attention_backend``); reported by :func:`summary`
            and reset by :func:`disable`.
        fuse_qkv: fuse each attention's Q/K/V (and added Q/K/V) linears into one (diffusers
            ``fuse_qkv_projections``; before quantization, so the fused linear is quantized). Off by default: it is
            measured per model and card (``python -m bench steps --fuse-qkv``), not assumed to help. Undone by
            :func:`disable`.
        prologue: ``None`` (the family's choice: whole steps in our forward where the family writes out its
            prologue, FLUX.1 and Qwen-Image) or ``False``: run the model's own forward with block hooks.
        compile_options: extra ``torch.compile`` arguments as a dict (e.g. ``{"dynamic": True}``); with a
            ``backend`` the ``mode`` only selects compiling and is not passed on. ``fullgraph=True`` is always set.
        recipe: the kernel recipe of this library's compiles (:mod:`dbcache_compile.recipe`): ``None`` /
            ``"default"``, ``"full"`` (torchao's Inductor flags too), a ``KernelRecipe`` or a dict of its parts
            (``torchao_flags``, ``gemm_autotune``, ``inductor``), applied to our graphs only.
        compile_vae: ``None`` (with a mode, compile the pipeline's ``AutoencoderKL`` decoder too when it is on
            CUDA), ``True`` (any VAE decoder, any device), ``False``, or a compile mode of its own
            (:mod:`dbcache_compile.vae`); undone by :func:`disable`, reported by :func:`summary`.
        compile_cache: a directory (str or PathLike, needs a ``mode``) that keeps torch's compile caches across
            processes: Inductor's FX graph and AOTAutograd caches and the compiled kernels are written there as the
            transformer compiles (its forward runs with ``$TORCHINDUCTOR_CACHE_DIR`` pointing there; the previous
            value is restored after each call, so no other compile of the process uses it), and a later process
            with the same directory loads them instead of compiling. Dynamo still traces in every process. Fill it
            ahead of serving with ``python -m dbcache_compile warmup``; see :mod:`dbcache_compile.compile_cache`.

    Returns the same object, modified in place. Everything is validated before the transformer is touched: a
    refused call leaves it exactly as it was.
    """
    check_optimize_arguments(mode, graph, compile_options, quantize_filter, attention, fuse_qkv, prologue,
                             COMPILE_MODES, GRAPHS)
    if cache is None and mode is None and quantize is None:
        raise ValueError("optimize() with cache=None, mode=None and quantize=None would do nothing")
    kernels = KernelRecipe.coerce(recipe)
    compile_options = recipe_compile_options(kernels, mode, compile_options)
    pipeline, transformer = _split(pipe)
    vae = prepare_vae(pipeline, mode, compile_vae, compile_options)
    cache_dir = open_compile_cache(compile_cache, mode, next(transformer.parameters()).device)
    transformers = [transformer] + ([] if pipeline is None else _extra_transformers(pipeline))
    watch = GenerationWatch(pipeline) if pipeline is not None else None
    # validate every transformer before changing any
    apply = [_prepare(pipeline, t, watch, cache, mode, graph, quantize, compile_options, quantize_filter, attention,
                      fuse_qkv, prologue, compile_cache) for t in transformers]
    with _model_offload_paused(pipeline):
        if cache_dir is not None:
            cache_dir.create()
        for step in apply:
            step()
        attach_recipe(runtime_of(transformer).applied, kernels, mode, vae)
        if cache_dir is not None:
            for t in transformers:
                attach_compile_cache(runtime_of(t), cache_dir)
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
    return [_unwrapped(extra)] if isinstance(extra, torch.nn.Module) else []


def _prepare(pipeline: Any, transformer: torch.nn.Module, watch: Optional[GenerationWatch], cache: Any,
             mode: Optional[str], graph: str, quantize: Any, compile_options: Optional[dict],
             quantize_filter: Optional[Callable], attention: Optional[str], fuse_qkv: bool,
             prologue: Optional[bool], compile_cache: Any = None) -> Callable[[], None]:
    """Validate everything for one transformer and build its runtime (nothing changes yet); returns the function
    that applies it."""
    if _hook(transformer) is not None:
        raise ValueError("this transformer is already optimized; call dbcache_compile.disable() first")
    if getattr(transformer, "_cache_config", None) is not None:
        raise ValueError(f"{type(transformer).__name__} has a diffusers cache enabled "
                         f"({type(transformer._cache_config).__name__}); two caches cannot share one forward: call "
                         f"transformer.disable_cache() first")
    family = _resolve_family(transformer, prologue)
    config = None if cache is None else DBCacheConfig.coerce(cache)
    if config is not None:
        config.validate_for(len(family.blocks(transformer)), type(transformer).__name__)
    device = next(transformer.parameters()).device
    lowering = resolve(graph, mode, device, quantize is not None or _has_subclass_weights(transformer), family,
                       cached=config is not None)
    refuse_forward_replacing_hooks(transformer, "at optimize()")
    refuse_offload(transformer, pipeline, "at optimize()")
    refuse_offload_with_cuda_graphs(transformer, pipeline, mode, "at optimize()")
    refuse_module_hooks(transformer, mode, "at optimize()")
    ao_config = None if quantize is None else resolve_quantization(quantize, device, mode)
    quant_filter = quantize_filter or default_filter(family.block_lists)
    if quantize is not None and not fuse_qkv:  # with fusion the filter may select the fused linears only
        count_selected(transformer, quant_filter)
    if fuse_qkv and not (family.fused_qkv and hasattr(transformer, "fuse_qkv_projections")):
        raise ValueError(f"fuse_qkv=True: {type(transformer).__name__}'s attention processors do not use fused QKV "
                         f"projections in this diffusers version (fusing would only cost memory); leave it off")
    backend = _check_attention(attention, device)
    auto, backend = (backend, None) if isinstance(backend, Auto) else (None, backend)
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
    # what changes the compiled graphs besides the functions, their options and the block split: the compile store's
    # key (dbcache_compile.compiled), so that another optimize of the same model class and config reuses them
    store_key = (_model_key(transformer), family.name, family.has_prologue, _quantization_key(quantize), fuse_qkv,
                 backend if auto is None else repr(auto))
    # with compile_cache, what compiles for it must be written into its directory, not taken from graphs another
    # runtime of the process compiled: the directory scopes every key
    scope = () if compile_cache is None else (os.path.abspath(os.fspath(compile_cache)),)
    if config is None:
        rt: Any = UncachedRuntime(transformer, family.blocks(transformer), mode, options, lowering, applied,
                                  store_key, scope, watch)
        hook: Any = UncachedHook(rt)
    else:
        rt = CacheRuntime(transformer, family, config, lowering, mode, options or {}, applied, watch, store_key,
                          scope)
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
        if isinstance(rt, BranchedRuntime):  # the generation rule sees the inputs as the caller passed them
            rt.input_hook = transformer.register_forward_pre_hook(rt.inputs.capture, with_kwargs=True)
        for block, block_hook in rt.block_hooks.items():
            HookRegistry.check_if_exists_or_initialize(block).register_hook(block_hook, rt.block_hook_name)
        registry.invalidate_child_registries_cache()
        if auto is not None:
            attach_attention(transformer, auto, applied)

    return apply


def _model_key(transformer: torch.nn.Module) -> tuple:
    """The transformer's class and a digest of its config: two models with the same key trace the same graphs."""
    import hashlib
    import json
    config = json.dumps(dict(getattr(transformer, "config", {}) or {}), sort_keys=True, default=str)
    cls = type(transformer)
    return cls.__module__, cls.__qualname__, hashlib.sha1(config.encode()).hexdigest()


def _quantization_key(quantize: Any) -> Any:
    if quantize is None or isinstance(quantize, str):
        return quantize
    return type(quantize).__module__, type(quantize).__qualname__, repr(quantize)


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
    if getattr(rt, "input_hook", None) is not None:
        rt.input_hook.remove()
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
    """Start a new generation at the next forward. Rarely needed: a call with new conditioning tensors starts one by
    itself (README "When a generation starts"); a transformer called without any conditioning tensor needs it."""
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
