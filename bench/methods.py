"""What a row runs: the uncached baseline, our DBCache, or a peer, attached to the pipeline and removed again.

* ``uncached``: eager, or ``dbcache_compile.optimize(pipe, cache=None, mode=...)`` (the whole forward compiled with
  ``fullgraph=True``): the baseline every speedup of the same mode is measured against.
* ``ours``: ``dbcache_compile.optimize(pipe, cache=config, mode=..., graph=...)``.
* ``cache-dit``: cache-dit's DBCache with the same config (``cache_dit.enable_cache``); in compiled modes the blocks
  are compiled with diffusers' regional compile, ``transformer.compile_repeated_blocks(fullgraph=True)`` (Inductor
  default mode), with Dynamo's recompile limits raised to 96 / 2048 for the row, as cache-dit's own benchmarks do.
  ``--cache-dit-stack best`` is its stack as cache-dit 1.5.3's examples build it (``cache_dit/_utils/utils.py``):
  ``cache_dit.set_compile_configs()`` (its Inductor flags: coordinate descent in all directions, no epilogue
  fusion, ``conv_1x1_as_mm``, raised recompile limits), ``torch.set_float32_matmul_precision("high")``,
  ``compile_repeated_blocks(fullgraph=True, mode=...)`` with ``max-autotune-no-cudagraphs`` when our rows use a
  max-autotune mode (its ``--max-autotune`` without ``--cuda-graph``: regional compile and CUDA graphs exclude each
  other there) and the attention backend our row chose; those process-wide settings are restored after the row.
  Its fp8 (``cache_dit.quantize(..., "float8_per_row")``) is torchao's per-row dynamic fp8 through
  ``torch._scaled_mm``, the weights the bench's quantized modes give every row.
* ``diffusers-fbcache``: diffusers' First Block Cache (``transformer.enable_cache(FirstBlockCacheConfig(threshold))``)
  with the config's residual threshold. Its decision is a ``@torch.compiler.disable`` function, so in compiled modes
  the regional compile runs with ``fullgraph=False``.

After a peer's own removal (``cache_dit.disable_cache`` / ``disable_cache()``) the instance attributes of the
pipeline and of every transformer module are restored to what they were before the row: cache-dit 1.5.3 leaves its
patched FLUX ``forward`` on the transformer after ``disable_cache``, and ``nn.Module.compile`` has no undo.

Quantized modes quantize the transformer before any row of the mode (see :mod:`bench.runner`); methods only add the
cache and the compile.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from typing import Any, Optional

import torch

import dbcache_compile as dbc
from dbcache_compile.families import family_for
from dbcache_compile.lowerings import registered

__all__ = ["PEERS", "Method", "Uncached", "Ours", "CacheDit", "FirstBlockCache", "peer_unavailable"]

PEERS = ("cache-dit", "diffusers-fbcache")


def peer_unavailable(peer: str) -> Optional[str]:
    """Why ``peer`` cannot run in this environment, or ``None`` when it can."""
    if peer == "cache-dit":
        if importlib.util.find_spec("cache_dit") is None:
            return "cache-dit is not installed (pip install cache-dit==1.5.3)"
        return None
    if peer == "diffusers-fbcache":
        try:
            from diffusers.hooks import FirstBlockCacheConfig  # noqa: F401
        except ImportError as err:
            return f"this diffusers has no First Block Cache ({err})"
        return None
    raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")


class _InstanceState:
    """The instance attributes of a pipeline and of every module of its transformer, to restore after a peer.

    Module dicts (``_modules``, ``_parameters``, hooks ...) are copied, so replaced submodules come back too."""

    def __init__(self, pipe: Any) -> None:
        self.objects = [pipe, *pipe.transformer.modules()]
        self.saved = [{k: v.copy() if type(v) in (dict, OrderedDict) else v for k, v in vars(obj).items()}
                      for obj in self.objects]

    def restore(self) -> None:
        for obj, saved in zip(self.objects, self.saved):
            vars(obj).clear()
            vars(obj).update(saved)


class Method:
    """One way of running the pipeline. ``split`` is the ``(Fn, Bn)`` computed on a cached step (``None``:
    nothing is cached)."""

    name = "method"
    split: Optional[tuple[int, int]] = None

    def attach(self, pipe: Any) -> None:
        """Install on the pipeline (in place)."""

    def detach(self, pipe: Any) -> None:
        """Remove everything :meth:`attach` installed."""

    def begin_call(self) -> None:
        """Called before each pipeline call."""

    def cached_calls(self, pipe: Any) -> int:
        """Transformer forwards of the last pipeline call served from the cache."""
        return 0

    def details(self, pipe: Any) -> dict[str, Any]:
        """What the results should record about how the row ran (lowering, CUDA graphs, compile flavour)."""
        return {}


class Uncached(Method):
    """No cache: eager (``compile_mode=None``) or ``dbcache_compile.optimize(cache=None, graph=...)``, compiled the
    way our cached rows are (``auto``: block regions + one hand-captured CUDA graph of the forward on CUDA; a
    fullgraph compile of the whole forward elsewhere).

    The compiled baseline is applied to the bare transformer: with ``cache=None`` there is no per-generation state
    for a pipeline wrapper to reset."""

    name = "uncached"

    def __init__(self, compile_mode: Optional[str], graph: str = "auto") -> None:
        self.compile_mode = compile_mode
        self.graph = uncached_graph(graph)

    def attach(self, pipe: Any) -> None:
        if self.compile_mode is not None:
            dbc.optimize(pipe.transformer, cache=None, mode=self.compile_mode, graph=self.graph)

    def detach(self, pipe: Any) -> None:
        if self.compile_mode is not None:
            dbc.disable(pipe.transformer)

    def details(self, pipe: Any) -> dict[str, Any]:
        if self.compile_mode is None:
            return {"compile": "eager"}
        runtime = dbc.runtime_of(pipe.transformer)
        if runtime.regional_blocks:
            graphs = "one hand-captured CUDA graph per shape" if runtime.graphs is not None else "no CUDA graphs"
            return {"compile": f"regional (blocks, mode={self.compile_mode}), {graphs}"}
        return {"compile": f"torch.compile(forward, mode={self.compile_mode}, fullgraph=True)"}


def uncached_graph(graph: str) -> str:
    """What the uncached baseline compiles with for ``--graph graph``: the same lowering, unless it decides on the
    device (its graph's predicate needs a cache): then the one that compiles whole segments, with ``cache=None`` the
    whole forward as one ``fullgraph=True`` graph."""
    lowerings = registered()
    if any(c.name == graph and c.decides_on_device for c in lowerings):
        return next(c.name for c in lowerings if c.compile_segments and not c.decides_on_device)
    return graph


class Ours(Method):
    """``dbcache_compile.optimize(pipe, cache=config, mode=compile_mode, graph=graph, **options)`` (``options``: the
    recipe's ``recipe`` / ``attention`` / ``compile_vae`` / ``fuse_qkv`` arguments)."""

    name = "ours"

    def __init__(self, config: str, compile_mode: Optional[str], graph: str,
                 options: Optional[dict[str, Any]] = None) -> None:
        self.config = dbc.DBCacheConfig.from_string(config)
        self.compile_mode = compile_mode
        self.graph = graph
        self.options = dict(options or {})
        self.split = (self.config.Fn_compute_blocks, self.config.Bn_compute_blocks)

    def attach(self, pipe: Any) -> None:
        dbc.optimize(pipe, cache=self.config, mode=self.compile_mode, graph=self.graph, **self.options)

    def detach(self, pipe: Any) -> None:
        dbc.disable(pipe)

    def cached_calls(self, pipe: Any) -> int:
        summary = dbc.summary(pipe)
        return len(summary.cached_steps) + len(summary.cfg_cached_steps)

    def details(self, pipe: Any) -> dict[str, Any]:
        summary = dbc.summary(pipe)
        details = {"compile": f"mode={summary.mode}, lowering={summary.lowering}", "cudagraphs": summary.cudagraphs}
        details.update({k: v for k, v in (("attention", summary.attention), ("recipe", summary.recipe),
                                          ("vae", summary.vae), ("fused_qkv", summary.fused_qkv or None)) if v})
        return details


class CacheDit(Method):
    """cache-dit's DBCache with the same config; regional compile in compiled modes."""

    name = "cache-dit"

    def __init__(self, config: str, compiled: bool, separate_cfg: bool, stack: str = "regional",
                 block_mode: Optional[str] = None, attention: Optional[str] = None) -> None:
        if stack not in ("regional", "best"):
            raise ValueError(f"cache-dit stack must be 'regional' or 'best', got {stack!r}")
        self.config = dbc.DBCacheConfig.from_string(config)
        self.compiled = compiled
        self.separate_cfg = separate_cfg
        self.stack = stack
        self.block_mode = block_mode
        self.attention = attention
        self._settings: Optional[tuple] = None
        self.split = (self.config.Fn_compute_blocks, self.config.Bn_compute_blocks)
        self._target: Any = None
        self._state: Optional[_InstanceState] = None
        self._limits: Optional[tuple[int, int]] = None

    def attach(self, pipe: Any) -> None:
        import cache_dit
        from cache_dit import BlockAdapterRegister, TaylorSeerCalibratorConfig
        logging.getLogger("cache_dit").setLevel(logging.ERROR)
        cfg = self.config
        cache_config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=cfg.Fn_compute_blocks, Bn_compute_blocks=cfg.Bn_compute_blocks,
            residual_diff_threshold=cfg.residual_diff_threshold, max_warmup_steps=cfg.max_warmup_steps,
            warmup_interval=cfg.warmup_interval, max_cached_steps=cfg.max_cached_steps,
            max_continuous_cached_steps=cfg.max_continuous_cached_steps, enable_separate_cfg=self.separate_cfg,
            steps_computation_mask=list(cfg.steps_computation_mask) if cfg.steps_computation_mask else None)
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=cfg.taylorseer_order) if cfg.taylorseer else None
        self._state = _InstanceState(pipe)
        if BlockAdapterRegister.is_supported(pipe):
            self._target = pipe
        else:  # e.g. the digits pipeline: cache-dit's own adapter for the transformer's family, on this pipeline
            from cache_dit.caching.block_adapters.adapters import flux_adapter, qwenimage_adapter
            family = flux_adapter if family_for(pipe.transformer).name == "flux" else qwenimage_adapter
            self._target = family(pipe)
        cache_dit.enable_cache(self._target, cache_config=cache_config, calibrator_config=calibrator)
        if self.attention is not None:
            pipe.transformer.set_attention_backend(self.attention)
        if self.compiled:
            dynamo = torch._dynamo.config
            self._limits = (dynamo.recompile_limit, dynamo.accumulated_recompile_limit)
            dynamo.recompile_limit, dynamo.accumulated_recompile_limit = 96, 2048
            if self.stack == "best":
                from torch._inductor import config as inductor
                self._settings = (inductor.get_config_copy(), torch.get_float32_matmul_precision())
                cache_dit.set_compile_configs()
                torch.set_float32_matmul_precision("high")
                pipe.transformer.compile_repeated_blocks(fullgraph=True, mode=self.block_mode)
            else:
                pipe.transformer.compile_repeated_blocks(fullgraph=True)

    def detach(self, pipe: Any) -> None:
        import cache_dit
        cache_dit.disable_cache(self._target)
        if self.attention is not None:
            pipe.transformer.reset_attention_backend()
        self._state.restore()
        if self._limits is not None:
            torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = self._limits
        if self._settings is not None:  # set_compile_configs() changed process-wide settings: give them back
            from torch._inductor import config as inductor
            inductor.load_config(self._settings[0])
            torch.set_float32_matmul_precision(self._settings[1])
            self._settings = None

    def cached_calls(self, pipe: Any) -> int:
        import cache_dit
        stats = cache_dit.summary(self._target, logging=False)
        stats = stats[0] if isinstance(stats, list) else stats
        return len(stats.cached_steps) + len(stats.cfg_cached_steps or [])

    def details(self, pipe: Any) -> dict[str, Any]:
        if not self.compiled:
            compile_ = "eager"
        elif self.stack == "best":
            compile_ = (f"set_compile_configs() + compile_repeated_blocks(fullgraph=True, mode={self.block_mode}), "
                        f"float32 matmul precision high")
        else:
            compile_ = "compile_repeated_blocks(fullgraph=True)"
        return {"compile": compile_, **({"attention": self.attention} if self.attention else {})}


class FirstBlockCache(Method):
    """diffusers' First Block Cache at ``threshold``; regional compile (``fullgraph=False``) in compiled modes."""

    name = "diffusers-fbcache"
    split = (1, 0)

    def __init__(self, threshold: float, compiled: bool) -> None:
        self.threshold = threshold
        self.compiled = compiled
        self.decisions: list[bool] = []
        self._state: Optional[_InstanceState] = None

    def attach(self, pipe: Any) -> None:
        from diffusers.hooks import FirstBlockCacheConfig
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
        self._state = _InstanceState(pipe)
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
        head = next(m._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK) for m in pipe.transformer.modules()
                    if hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK))
        decide = head._should_compute_remaining_blocks

        @torch.compiler.disable
        def recording_decision(residual: torch.Tensor) -> bool:
            compute = decide(residual)
            self.decisions.append(compute)
            return compute

        head._should_compute_remaining_blocks = recording_decision
        if self.compiled:
            pipe.transformer.compile_repeated_blocks(fullgraph=False)

    def detach(self, pipe: Any) -> None:
        pipe.transformer.disable_cache()
        self._state.restore()

    def begin_call(self) -> None:
        self.decisions.clear()

    def cached_calls(self, pipe: Any) -> int:
        return sum(1 for compute in self.decisions if not compute)

    def details(self, pipe: Any) -> dict[str, Any]:
        return {"compile": "compile_repeated_blocks(fullgraph=False)" if self.compiled else "eager"}
