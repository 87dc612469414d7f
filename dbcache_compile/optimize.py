"""Public API: ``optimize``, ``disable``, ``reset``, ``summary``.

``optimize`` attaches a :class:`~dbcache_compile.step.CachedTransformer` to the transformer instance by setting
the instance's ``forward`` (the class is never edited), and, for a pipeline, swaps the pipeline instance's class for
a same-named subclass whose ``__call__`` resets the cache state first. ``disable`` undoes both and leaves nothing
behind.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Optional, Union

import torch

from .adapters import adapter_for
from .config import DBCacheConfig
from .quantize import count_selected, default_filter, quantize_transformer, resolve_quantization
from .stats import CacheSummary
from .cudagraphs import SegmentGraphs
from .step import (CUDAGRAPH_MODES, CachedTransformer, no_views, regional_options, standard_strides,
                   transformer_output)

__all__ = ["optimize", "disable", "reset", "summary", "COMPILE_MODES", "GRAPHS"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHS = ("auto", "segments", "cond", "regional")
_ATTR = "_dbcache_compile"


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


def _runtime(obj: Any) -> CachedTransformer:
    _, transformer = _split(obj)
    if getattr(transformer, "lowering", None) == "aoti":  # a LoadedCachedTransformer is its own runtime
        return transformer
    runtime = getattr(transformer, _ATTR, None)
    if runtime is None:
        raise ValueError(f"{type(obj).__name__} is not optimized by dbcache_compile (call optimize() first)")
    return runtime


def _wrap_pipeline(pipe: Any, runtime: CachedTransformer) -> None:
    original_cls = type(pipe)
    signature = inspect.signature(original_cls.__call__)

    @functools.wraps(original_cls.__call__)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(self, *args, **kwargs)
        call_kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
        call_kwargs.update(call_kwargs.pop("kwargs", {}) or {})
        runtime.reset(runtime.adapter.separate_cfg(call_kwargs))
        return original_cls.__call__(self, *args, **kwargs)

    cached_cls = type(original_cls.__name__, (original_cls,),
                      {"__call__": __call__, "__module__": original_cls.__module__,
                       "__qualname__": original_cls.__qualname__, "_dbcache_original_class": original_cls})
    pipe.__class__ = cached_cls


def optimize(pipe: Any, cache: Union[DBCacheConfig, str, None] = "F1B0_W4MC2_R0.2", mode: Optional[str] = None,
             graph: str = "auto", quantize: Any = None, compile_options: Optional[dict[str, Any]] = None,
             quantize_filter: Optional[Callable[[torch.nn.Module, str], bool]] = None,
             attention: Optional[str] = None, fuse_qkv: bool = False) -> Any:
    """Make a diffusers pipeline (or bare transformer) faster with DBCache, ``torch.compile`` and quantization.

    Args:
        pipe: a pipeline with a ``.transformer`` (FluxPipeline, QwenImagePipeline, ...) or the transformer itself.
            With a bare transformer, call :func:`reset` before each new generation.
        cache: a :class:`DBCacheConfig`, its string form (``"F8B0_W8M0MC0_T0O1_R0.08"``) or ``None`` (no cache: the
            original forward, compiled per ``graph`` — ``regional`` blocks, captured whole as one CUDA graph on CUDA
            with a CUDA-graph mode, or one fullgraph compile — the baseline to measure cached runs against).
        mode: ``None`` for eager, or a ``torch.compile`` mode.
        graph: how the cached step is lowered when compiling: ``"regional"`` (each block compiled once per block
            class, each segment captured by hand as a CUDA graph on CUDA with ``reduce-overhead``/``max-autotune``:
            fast compile and graphs), ``"segments"`` (head/miss/hit compiled as whole graphs, CUDA-graphed by
            cudagraph trees), ``"cond"`` (one graph with ``torch.cond``, no host sync, no CUDA graphs, exportable)
            or ``"auto"`` (``regional`` on CUDA, ``segments`` elsewhere). The transformer must be on its device
            before ``optimize`` for ``auto`` to see it.
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
            measured per model and card (``python -m bench.steps --fuse-qkv``), not assumed to help. Undone by
            :func:`disable`.
        compile_options: extra ``torch.compile`` arguments (e.g. ``{"dynamic": True}``); with a ``backend`` the
            ``mode`` only selects compiling and is not passed on. ``fullgraph=True`` is always set.

    Returns the same object, modified in place.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if cache is None and mode is None and quantize is None:
        raise ValueError("optimize() with cache=None, mode=None and quantize=None would do nothing")
    pipeline, transformer = _split(pipe)
    if getattr(transformer, _ATTR, None) is not None:
        raise ValueError("this transformer is already optimized; call dbcache_compile.disable() first")
    adapter = adapter_for(transformer)
    config = None if cache is None else DBCacheConfig.coerce(cache)
    if config is not None:
        config.validate_for(len(adapter.blocks(transformer)), type(transformer).__name__)
    # validate everything before touching the transformer, so that a bad argument leaves it as it was
    ao_config = None if quantize is None else resolve_quantization(quantize, next(transformer.parameters()).device,
                                                                   mode)
    quant_filter = quantize_filter or default_filter(adapter.block_lists)
    if quantize is not None and not fuse_qkv:  # with fusion the filter may select the fused linears only
        count_selected(transformer, quant_filter)
    if fuse_qkv and not (adapter.fused_qkv and hasattr(transformer, "fuse_qkv_projections")):
        raise ValueError(f"fuse_qkv=True: {type(transformer).__name__}'s attention processors do not use fused QKV "
                         f"projections in this diffusers version (fusing would only cost memory); leave it off")
    backend = _set_attention(transformer, attention)
    quantized = None
    try:
        if fuse_qkv:
            transformer.fuse_qkv_projections()
        if quantize is not None:
            count = quantize_transformer(transformer, ao_config, quant_filter)
            quantized = f"{quantize if isinstance(quantize, str) else type(quantize).__name__} ({count} linears)"
    except Exception:
        if fuse_qkv:
            transformer.unfuse_qkv_projections()
        if backend is not None:
            transformer.reset_attention_backend()
        raise
    options = None
    if mode is not None:
        options = dict(compile_options or {})
        if "backend" not in options:
            options["mode"] = mode
        options["fullgraph"] = True
    lowering = "eager" if mode is None else _resolve_graph(graph, transformer)
    if config is None:
        if lowering == "cond":
            raise ValueError("graph='cond' needs a cache (the cond is the cache decision); without one use "
                             "graph='regional' or 'segments' (a whole-forward compile)")
        runtime: Any = UncachedRuntime(transformer, adapter.blocks(transformer), mode, options, lowering)
    else:
        runtime = CachedTransformer(transformer, adapter, config, lowering, mode, options)
    runtime.quantized = quantized
    runtime.attention = backend
    runtime.fused_qkv = fuse_qkv
    setattr(transformer, _ATTR, runtime)
    transformer.forward = runtime.forward
    if pipeline is not None and config is not None:  # uncached: no per-call state to reset
        _wrap_pipeline(pipeline, runtime)
    return pipe


def _block_region(forward: Callable, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The compiled region of an uncached ``regional`` forward: the block class's ``forward``, standard-strided
    outputs."""
    return standard_strides(forward(block, *args, **kwargs))


def _regional_block_forward(region: Callable, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Installed as a block instance's ``forward``: plain (non-view) tensors into the compiled region."""
    return region(type(block).forward, block, *[no_views(a) for a in args],
                  **{k: no_views(v) for k, v in kwargs.items()})


class UncachedRuntime:
    """``optimize(cache=None, ...)``: the original forward, compiled and/or quantized; the baseline that cached runs
    are measured against, built like them: ``graph="regional"`` (``auto`` on CUDA) compiles each block as a region
    (the block instances' ``forward`` is replaced until :func:`disable`) and, on CUDA with a CUDA-graph mode,
    captures the whole forward as one CUDA graph by hand; otherwise the whole forward is one fullgraph compile."""

    lowering = "uncached"
    attention: Optional[str] = None
    quantized: Optional[str] = None
    fused_qkv = False

    def __init__(self, transformer: torch.nn.Module, blocks: list[torch.nn.Module], mode: Optional[str],
                 options: Optional[dict], graph: str) -> None:
        self.mode = mode
        self.transformer = transformer
        self.graphs: Optional[SegmentGraphs] = None
        self.regional_blocks: list[torch.nn.Module] = []
        original = type(transformer).forward.__get__(transformer)
        if mode is None:
            self._forward = original
        elif graph == "regional":
            region = torch.compile(_block_region, **regional_options(options or {}))
            for block in blocks:
                block.forward = functools.partial(_regional_block_forward, region, block)
                self.regional_blocks.append(block)
            self._forward = original
        else:
            self._forward = torch.compile(original, **options)

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        """``regional``: run the forward as a hand-captured CUDA graph (automatic on CUDA with a CUDA-graph mode);
        ``emulate=True`` runs the same bookkeeping without CUDA (tests)."""
        if not self.regional_blocks:
            raise ValueError("segment graphs belong to the regional lowering (optimize(..., graph='regional'))")
        if self.graphs is None or self.graphs.emulate != emulate:
            self.graphs = SegmentGraphs(emulate=emulate)
        return self.graphs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.graphs is None and self.regional_blocks and self.mode in CUDAGRAPH_MODES:
            if next(self.transformer.parameters()).device.type == "cuda":
                self.graphs = SegmentGraphs()
        if self.graphs is None:
            return self._forward(*args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        out = self.graphs("forward", self._forward, args, dict(kwargs, return_dict=False))[0].clone()
        return transformer_output(out, return_dict)

    def undo(self) -> None:
        """Give the blocks their own ``forward`` back."""
        for block in self.regional_blocks:
            del block.forward
        self.regional_blocks = []

    def reset(self, separate_cfg: Optional[bool] = None) -> None:
        """No cache state to reset."""


def _set_attention(transformer: torch.nn.Module, attention: Optional[str]) -> Optional[str]:
    """Apply the attention backend choice; returns the diffusers backend name set (None: untouched)."""
    if attention is None:
        return None
    if attention == "auto":
        device = next(transformer.parameters()).device
        if device.type != "cuda":
            attention = "native"
        else:
            attention = "_native_cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "_native_flash"
    from diffusers.models.attention_dispatch import AttentionBackendName
    valid = [b.value for b in AttentionBackendName]
    if attention not in valid:
        raise ValueError(f"attention must be None, 'auto' or a diffusers attention backend ({', '.join(valid)}), "
                         f"got {attention!r}")
    transformer.set_attention_backend(attention)
    return attention


def _has_subclass_weights(transformer: torch.nn.Module) -> bool:
    """Whether some weight is a tensor subclass (e.g. a torchao quantized weight)."""
    return any(type(p.data) is not torch.Tensor for p in transformer.parameters())


def _resolve_graph(graph: str, transformer: torch.nn.Module) -> str:
    """``auto``: ``regional`` on CUDA (block regions compile in seconds where whole-segment graphs of the FLUX-size
    model took 91-148 s on an H100, and the hand-captured segment graphs keep every step a CUDA-graph replay;
    DESIGN.md §3), ``segments`` elsewhere (on CPU as fast as ``cond`` and faster than ``regional``, while its
    graphs hit Inductor's on-disk cache: warm first call 6 s vs 33 s for ``cond`` on the digits model,
    bench/results/lowerings_cpu.md). ``cond`` is for no-host-sync and export."""
    if graph == "cond" and _has_subclass_weights(transformer):
        raise NotImplementedError(
            "graph='cond' cannot run quantized (tensor-subclass) weights: torch.cond has no rule for tensor "
            "subclasses in torch 2.11-2.14 ('no rule registered for HOP cond and subclass'); use graph='regional' "
            "or graph='segments'")
    if graph == "auto":
        return "regional" if next(transformer.parameters()).device.type == "cuda" else "segments"
    return graph


def disable(pipe: Any) -> Any:
    """Undo :func:`optimize`: the original ``forward`` and pipeline class, no attribute left behind."""
    pipeline, transformer = _split(pipe)
    runtime = _runtime(transformer)
    if runtime is transformer:
        raise ValueError("this pipeline runs a package loaded with dbcache_compile.load(), which replaced "
                         "pipe.transformer; assign your original transformer back to pipe.transformer instead")
    if runtime.attention is not None:
        transformer.reset_attention_backend()
    if runtime.fused_qkv:
        transformer.unfuse_qkv_projections()
    if _has_subclass_weights(transformer):
        warnings.warn("dbcache_compile.disable(): the transformer stays quantized (torchao weights); reload it "
                      "for the original weights", stacklevel=2)
    if isinstance(runtime, UncachedRuntime):
        runtime.undo()
    del transformer.forward
    delattr(transformer, _ATTR)
    if pipeline is not None and hasattr(type(pipeline), "_dbcache_original_class"):
        pipeline.__class__ = type(pipeline)._dbcache_original_class
    return pipe


def reset(pipe_or_transformer: Any) -> None:
    """Start a new generation for a bare transformer (pipelines do this at every call)."""
    _runtime(pipe_or_transformer).reset()


def summary(pipe_or_transformer: Any) -> CacheSummary:
    """Cache decisions of the last (or current) generation."""
    rt = _runtime(pipe_or_transformer)
    if isinstance(rt, UncachedRuntime):
        raise ValueError("this pipeline was optimized with cache=None: there are no cache decisions to summarize")
    rt.sync_records()
    calls_per_step = 2 if rt.separate_cfg else 1
    cond, uncond = rt.branches
    config = rt.cache_config
    return CacheSummary(
        config=str(config), num_steps=-(-rt.calls // calls_per_step),
        cached_steps=list(cond.cached_steps), cfg_cached_steps=list(uncond.cached_steps) if rt.separate_cfg else [],
        residual_diffs=dict(cond.diffs), cfg_residual_diffs=dict(uncond.diffs) if rt.separate_cfg else {},
        separate_cfg=rt.separate_cfg, lowering=rt.lowering, mode=rt.mode, num_blocks=rt.num_blocks,
        Fn=config.Fn_compute_blocks, Bn=config.Bn_compute_blocks, cudagraphs=rt.cudagraph_status(),
        quantized=rt.quantized, attention=rt.attention, fused_qkv=rt.fused_qkv)
