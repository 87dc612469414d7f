"""The cached transformer forward: one cache-step definition (embed → Fn → decide → middle or cache → Bn → output)
and its three lowerings.

Segments (pure functions of tensors; the compiled lowerings wrap them):

* ``head``: embeddings, the first Fn blocks, the Fn residual and its relative L1 diff to the stored one;
* ``miss``: store the Fn residual, run the middle blocks, update the cached middle residual (TaylorSeer ladder),
  then the last Bn blocks and the output projection;
* ``hit``: add the cached (or forecast) middle residual, then Bn and the output projection.

Lowerings:

* ``eager``: the segments run as plain PyTorch; one host read of (predicate, diff) per step whose gates allow a hit.
* ``segments``: ``head`` / ``miss`` / ``hit`` are each ``torch.compile(fullgraph=True)`` graphs (CUDA-graphed by
  cudagraph trees under ``reduce-overhead`` / ``max-autotune`` on CUDA); the host picks the path with the same single
  read as eager, and skips it on steps the gates force to compute.
* ``cond``: the whole forward is ONE ``torch.compile(fullgraph=True)`` graph; the decision is ``torch.cond`` on a
  device predicate, the counters live on the device, state is carried functionally and copied into the static
  buffers after the cond. No host sync per step, no graph break, exportable; Inductor disables CUDA graphs for any
  graph with a cond (torch 2.11–2.14), which :func:`dbcache_compile.summary` reports.
* ``regional``: each transformer block is compiled (``fullgraph=True``; one graph per block class, reused by every
  block of that class), the glue between blocks runs as plain PyTorch, and on CUDA with a CUDA-graph mode each
  segment is captured by hand as one CUDA graph (:mod:`dbcache_compile.cudagraphs`). Same host logic as
  ``segments``; compiles in seconds where whole-segment graphs of the FLUX-size model take minutes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .adapters import Adapter
from .config import DBCacheConfig
from .cudagraphs import SegmentGraphs
from .decision import DIFF_ALWAYS_HIT, cache_allowed, hit_predicate, read_decision_sync, relative_l1
from .state import BranchState, taylor_coefficients_tensor, taylor_forecast, taylor_update

__all__ = ["CachedTransformer", "LOWERINGS", "CUDAGRAPH_MODES", "fold_records", "initial_counters", "no_views",
           "regional_options", "standard_strides", "transformer_output"]

LOWERINGS = ("eager", "segments", "cond", "regional")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# device counters of the cond lowering, one int64 vector per branch
_CACHED, _CONSECUTIVE, _HAS_PREV, _LAST_COMPUTE, _VALID, _LAST_CACHED = range(6)


def _call_block(block: torch.nn.Module, hidden: torch.Tensor, encoder: torch.Tensor,
                block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One block, ``(encoder, hidden)`` out (ForwardPattern_1)."""
    return block(hidden_states=hidden, encoder_hidden_states=encoder, **block_kwargs)


def standard_strides(out: Any) -> Any:
    """A region's outputs copied into standard-strided tensors (inside the compiled region, so fused into the
    producing kernel). FLUX single blocks return slices of one tensor (with batch 1 they even count as contiguous,
    but their batch stride differs and Dynamo guards on it); without the copy the next block of the class would
    recompile. With this, one graph per block class serves every block."""
    if isinstance(out, tuple):
        return tuple(standard_strides(t) for t in out)
    return out.clone(memory_format=torch.contiguous_format) if isinstance(out, torch.Tensor) else out


def no_views(t: Any) -> Any:
    """A view (e.g. a batch-1 linear's output) makes Dynamo guard on its base, which a later non-view input fails (a
    recompile): regions get plain tensors (one copy, only when needed)."""
    return t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t


def _call_block_contiguous(block: torch.nn.Module, hidden: torch.Tensor, encoder: torch.Tensor,
                           block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled region of the ``regional`` lowering: one block, standard-strided outputs."""
    return standard_strides(_call_block(block, hidden, encoder, block_kwargs))


def regional_options(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` options of the block regions: CUDA graphs are captured around whole segments instead (by
    hand), so the regions themselves are compiled without cudagraph trees."""
    opts = dict(options)
    if "backend" not in opts and opts.get("mode") in CUDAGRAPH_MODES:
        opts["mode"] = "max-autotune-no-cudagraphs" if opts["mode"] == "max-autotune" else "default"
    return opts


def _input_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes/dtypes of the tensor inputs: buffers and shape checks are keyed on it."""
    items = list(enumerate(args)) + sorted(kwargs.items())
    return tuple((k, tuple(v.shape), v.dtype) for k, v in items if isinstance(v, torch.Tensor))


def transformer_output(sample: torch.Tensor, return_dict: bool) -> Any:
    """What a diffusers transformer's forward returns: ``Transformer2DModelOutput`` or the ``(sample,)`` tuple."""
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    return Transformer2DModelOutput(sample=sample)


def initial_counters(device: torch.device) -> torch.Tensor:
    """Device counters of a fresh generation (cond lowering and packages): nothing cached, no compute yet."""
    init = [0] * 6
    init[_LAST_COMPUTE] = init[_LAST_CACHED] = -1
    return torch.tensor(init, dtype=torch.int64, device=device)


def fold_records(branches: list[BranchState], records: list[list[tuple[int, torch.Tensor, torch.Tensor]]]) -> None:
    """Move per-call device records ``(step, hit predicate, diff or NaN)`` into the branches' host lists, with one
    device-to-host copy per branch, and clear them."""
    for branch, branch_records in zip(branches, records):
        if not branch_records:
            continue
        values = torch.stack([torch.stack([p.to(torch.float64), d.to(torch.float64)]) for _, p, d in branch_records])
        for (step, _, _), (hit, diff) in zip(branch_records, values.tolist()):
            if hit:
                branch.cached_steps.append(step)
            if not math.isnan(diff):
                branch.diffs[step] = diff
        branch_records.clear()


class CachedTransformer:
    """DBCache runtime of one transformer instance: block split, per-branch state, step counting, forward.

    ``forward`` is installed as the transformer instance's ``forward`` by :func:`dbcache_compile.optimize`.
    Calls are counted per generation (:meth:`reset` starts one); with separate CFG, call ``2k`` is the conditional
    branch of step ``k`` and call ``2k+1`` its unconditional branch.
    """

    def __init__(self, transformer: torch.nn.Module, adapter: Adapter, config: DBCacheConfig,
                 lowering: str = "eager", mode: Optional[str] = None,
                 compile_options: Optional[dict[str, Any]] = None) -> None:
        if lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
        blocks = adapter.blocks(transformer)
        config.validate_for(len(blocks), type(transformer).__name__)
        self.transformer = transformer
        self.adapter = adapter
        self.config = config
        fn, bn = config.Fn_compute_blocks, config.Bn_compute_blocks
        self.fn_blocks = blocks[:fn]
        self.mid_blocks = blocks[fn:len(blocks) - bn]
        self.bn_blocks = blocks[len(blocks) - bn:] if bn else []
        self.num_blocks = len(blocks)
        self.branches = [BranchState(config.taylorseer_terms) for _ in range(2)]
        self.separate_cfg = bool(config.enable_separate_cfg)
        self.lowering = lowering
        self.quantized: Optional[str] = None
        self.attention: Optional[str] = None
        self.fused_qkv = False
        self.mode = mode if lowering != "eager" else None
        self.calls = 0
        self.input_keys: list[Optional[tuple]] = [None, None]
        # cond lowering: per-branch device counters and per-call (pred, diff) records read lazily by summary()
        self.counters: list[Optional[torch.Tensor]] = [None, None]
        self.records: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[], []]
        self._block: Callable = _call_block
        self._head: Callable = self.head
        self._miss: Callable = self.miss
        self._hit: Callable = self.hit
        self._cond_step: Callable = self.cond_step
        # regional lowering: hand-captured CUDA graphs of the segments (created at the first CUDA forward)
        self.graphs: Optional[SegmentGraphs] = None
        if lowering != "eager":
            opts = dict(compile_options or {})
            opts.setdefault("fullgraph", True)
            if lowering == "segments":
                self._head = torch.compile(self.head, **opts)
                self._miss = torch.compile(self.miss, **opts)
                self._hit = torch.compile(self.hit, **opts)
            elif lowering == "regional":
                self._block = torch.compile(_call_block_contiguous, **regional_options(opts))
            else:
                self._cond_step = torch.compile(self.cond_step, **opts)

    @property
    def cache_config(self) -> DBCacheConfig:
        return self.config

    # ----------------------------------------------------------------------------------------------- bookkeeping
    def reset(self, separate_cfg: Optional[bool] = None) -> None:
        """Start a new generation. ``separate_cfg`` (from the adapter, per pipeline call) applies unless the config
        forces it."""
        if self.config.enable_separate_cfg is not None:
            self.separate_cfg = self.config.enable_separate_cfg
        elif separate_cfg is not None:
            self.separate_cfg = separate_cfg
        self.calls = 0
        self.input_keys = [None, None]
        self.records = [[], []]
        for branch in self.branches:
            branch.reset()
        for counters in self.counters:
            if counters is not None:
                counters.copy_(initial_counters(counters.device))

    def _position(self) -> tuple[int, int]:
        """(denoising step, CFG branch) of the current call."""
        if self.separate_cfg:
            return self.calls // 2, self.calls % 2
        return self.calls, 0

    def _check_inputs(self, step: int, branch: int, args: tuple, kwargs: dict) -> None:
        """Remember the input shapes at step 0; a change later in the same generation is a user error."""
        key = _input_key(args, kwargs)
        expected = self.input_keys[branch]
        if expected is None or step == 0:
            self.input_keys[branch] = key
        elif expected != key:
            raise ValueError(
                f"input shape changed in the middle of a generation (step {step}: {key}; the generation started "
                f"with {expected}). Pipelines reset automatically per call; when driving the transformer "
                f"yourself call dbcache_compile.reset(transformer) before each new generation"
                + ("" if self.separate_cfg else "; if the pipeline calls the transformer twice per step (separate "
                   "CFG), leave enable_separate_cfg=None or set it to True"))

    def _ensure_buffers(self, state: BranchState, args: tuple, kwargs: dict) -> None:
        """Allocate the branch's static buffers for these inputs. The stream shapes after the Fn blocks are learnt
        by running the eager head once per new input shape (the encoder stream can be broadcast by the first block,
        e.g. FLUX with ``prompt_embeds`` and ``num_images_per_prompt > 1``)."""
        key = _input_key(args, kwargs)
        if state.key == key:
            return
        hidden, encoder, _, _, _ = self.head(None, *args, **kwargs)
        state.ensure_buffers(hidden, encoder)
        static = [state.fn_residual, *state.ladder_h, *state.ladder_e, *state.step_scalars]
        if self.lowering == "segments":
            for buf in static:
                torch._dynamo.mark_static_address(buf)
        if self.graphs is not None and not self.graphs.emulate and hidden.device.type != "cuda":
            self.graphs = None  # the transformer moved off CUDA: no graphs there
        if self.lowering == "regional" and self.graphs is None and self.uses_cudagraphs():
            self.graphs = SegmentGraphs()
        if self.graphs is not None:
            self.graphs.mark_static(static)
        state.key = key

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        """``regional``: run the segments as hand-captured CUDA graphs (done automatically on CUDA with a CUDA-graph
        mode). ``emulate=True`` runs the same capture/replay bookkeeping without CUDA (tests)."""
        if self.lowering != "regional":
            raise ValueError(f"segment graphs belong to the regional lowering, not {self.lowering!r}")
        if self.graphs is None or self.graphs.emulate != emulate:
            self.graphs = SegmentGraphs(emulate=emulate)
            for state in self.branches:
                state.key = None  # re-register the buffers with the new graphs at the next forward
        return self.graphs

    def _run_blocks(self, blocks: list[torch.nn.Module], hidden: torch.Tensor, encoder: torch.Tensor,
                    block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lowering == "regional":
            hidden, encoder = no_views(hidden), no_views(encoder)
        for block in blocks:
            encoder, hidden = self._block(block, hidden, encoder, block_kwargs)
        return hidden, encoder

    # -------------------------------------------------------------------------------------------------- segments
    def head(self, fn_residual: Optional[torch.Tensor], *args: Any, **kwargs: Any):
        """Embeddings + Fn blocks → (hidden, encoder, Fn residual, diff to ``fn_residual`` or None, Embedded)."""
        emb = self.adapter.embed(self.transformer, *args, **kwargs)
        hidden, encoder = self._run_blocks(self.fn_blocks, emb.hidden, emb.encoder, emb.block_kwargs)
        residual = hidden - emb.hidden
        diff = None if fn_residual is None else relative_l1(fn_residual, residual)
        return hidden, encoder, residual, diff, (emb.block_kwargs, emb.out_kwargs)

    def tail(self, hidden: torch.Tensor, encoder: torch.Tensor, kw: tuple[dict, dict]) -> torch.Tensor:
        """Bn blocks and the output projection."""
        hidden, encoder = self._run_blocks(self.bn_blocks, hidden, encoder, kw[0])
        return self.adapter.project(self.transformer, hidden, kw[1])

    def middle(self, hidden: torch.Tensor, encoder: torch.Tensor, kw: tuple[dict, dict]):
        mid_h, mid_e = self._run_blocks(self.mid_blocks, hidden, encoder, kw[0])
        return mid_h.contiguous(), mid_e.contiguous()

    def miss(self, fn_residual: torch.Tensor, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor],
             hidden: torch.Tensor, encoder: torch.Tensor, residual: torch.Tensor, kw: tuple[dict, dict],
             window: Any, n_derivatives: Any) -> torch.Tensor:
        """Compute step: store the Fn residual, run the middle blocks, cache their residual (in place), Bn, output."""
        fn_residual.copy_(residual)
        mid_h, mid_e = self.middle(hidden, encoder, kw)
        for buf, new in zip(ladder_h, taylor_update(ladder_h, mid_h - hidden, window, n_derivatives)):
            buf.copy_(new)
        for buf, new in zip(ladder_e, taylor_update(ladder_e, mid_e - encoder, window, n_derivatives)):
            buf.copy_(new)
        return self.tail(mid_h, mid_e, kw)

    def hit(self, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor], hidden: torch.Tensor,
            encoder: torch.Tensor, kw: tuple[dict, dict], coeffs: Any) -> torch.Tensor:
        """Cached step: add the cached (TaylorSeer: forecast) middle residual, then Bn + output."""
        hidden = (taylor_forecast(ladder_h, coeffs) + hidden).contiguous()
        encoder = (taylor_forecast(ladder_e, coeffs) + encoder).contiguous()
        return self.tail(hidden, encoder, kw)

    # ------------------------------------------------------------------------------------- eager and segments
    def _host_step(self, step: int, state: BranchState, args: tuple, kwargs: dict) -> torch.Tensor:
        """One step with host counters; reads the device at most once (only when the gates allow a hit).

        Graphs (compiled segments, segment CUDA graphs) take the per-step numbers (TaylorSeer window, derivative
        count, forecast coefficients) in the branch's static scalar tensors, filled by kernel launches: no
        host-to-device copy (a stream sync) and no recompile or recapture per value."""
        graphs = self.graphs
        scalars_on_device = self.lowering == "segments" or graphs is not None
        if graphs is not None:
            hidden, encoder, residual, diff, kw = graphs("head", self.head, (state.fn_residual, *args), kwargs)
        else:
            hidden, encoder, residual, diff, kw = self._head(state.fn_residual, *args, **kwargs)
        use_cache = False
        if cache_allowed(self.config, step, len(state.cached_steps), state.consecutive, state.has_prev):
            use_cache, diff_value = read_decision_sync(hit_predicate(self.config, True, diff), diff)
            state.diffs[step] = DIFF_ALWAYS_HIT if self.config.residual_diff_threshold >= 1.0 else diff_value
        if use_cache:
            state.record_hit(step)
            coeffs: Any = state.forecast_coefficients(step)
            if scalars_on_device:
                coeffs = state.fill_coefficients(coeffs)
            hit_args = (state.ladder_h, state.ladder_e, hidden, encoder, kw, coeffs)
            return graphs("hit", self.hit, hit_args) if graphs is not None else self._hit(*hit_args)
        n = state.derivatives_for_update(step)
        window: Any = step - state.last_compute
        n_arg: Any = n
        if scalars_on_device:
            window, n_arg = state.fill_update_scalars(window, n)
        miss_args = (state.fn_residual, state.ladder_h, state.ladder_e, hidden, encoder, residual, kw, window, n_arg)
        if graphs is not None:
            out = graphs("miss", self.miss, miss_args, mutated=[state.fn_residual, *state.ladder_h, *state.ladder_e])
        else:
            out = self._miss(*miss_args)
        state.record_compute(step, n)
        return out

    # ------------------------------------------------------------------------------------------------------ cond
    def cond_step_functional(self, step: torch.Tensor, counters: torch.Tensor, fn_residual: torch.Tensor,
                             ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor], *args: Any, **kwargs: Any):
        """The whole cached forward as a pure function (the ``cond`` lowering; what :func:`dbcache_compile.export`
        exports): returns ``(output, hit predicate, diff or NaN when not computed, new counters, new fn_residual,
        new ladder_h, new ladder_e)``. The cond branches only return the middle residuals (no mutation, no alias).
        """
        cfg, terms = self.config, self.config.taylorseer_terms
        hidden, encoder, residual, diff, kw = self.head(fn_residual, *args, **kwargs)
        consecutive = torch.where(counters[_LAST_CACHED] == step - 1, counters[_CONSECUTIVE], 0)
        allowed = cache_allowed(cfg, step, counters[_CACHED], consecutive, counters[_HAS_PREV])
        pred = hit_predicate(cfg, allowed, diff)
        coeffs = taylor_coefficients_tensor(step - counters[_LAST_COMPUTE], counters[_VALID], terms)

        def hit_fn(h, e, coeffs, ladder_h, ladder_e):
            dh, de = taylor_forecast(ladder_h, coeffs), taylor_forecast(ladder_e, coeffs)
            return (dh.clone(), de.clone()) if terms == 1 else (dh, de)

        def miss_fn(h, e, coeffs, ladder_h, ladder_e):
            mid_h, mid_e = self.middle(h, e, kw)
            # both branches must return the same layout; block outputs can be strided slices (FLUX single blocks)
            return (mid_h - h).contiguous(), (mid_e - e).contiguous()

        dh, de = torch.cond(pred, hit_fn, miss_fn, (hidden, encoder, coeffs, list(ladder_h), list(ladder_e)))
        out = self.tail((hidden + dh).contiguous(), (encoder + de).contiguous(), kw)

        n = torch.where(step > 2, torch.clamp(counters[_VALID], max=terms - 1), 0)
        window = (step - counters[_LAST_COMPUTE]).to(torch.float32)
        new_h = [torch.where(pred, old, new) for old, new in zip(ladder_h, taylor_update(ladder_h, dh, window, n))]
        new_e = [torch.where(pred, old, new) for old, new in zip(ladder_e, taylor_update(ladder_e, de, window, n))]
        new_fn = torch.where(pred, fn_residual, residual)
        one = torch.ones_like(counters[_CACHED])
        on_hit = torch.stack([counters[_CACHED] + 1, consecutive + 1, counters[_HAS_PREV],
                              counters[_LAST_COMPUTE], counters[_VALID], step * one])
        on_miss = torch.stack([counters[_CACHED], consecutive, one, step * one, 1 + n, counters[_LAST_CACHED]])
        new_counters = torch.where(pred, on_hit, on_miss)
        if cfg.residual_diff_threshold >= 1.0:
            diff = torch.full_like(diff, DIFF_ALWAYS_HIT)
        diff = torch.where(allowed, diff, torch.full_like(diff, math.nan))
        return out, pred, diff, new_counters, new_fn, new_h, new_e

    def cond_step(self, step: torch.Tensor, counters: torch.Tensor, fn_residual: torch.Tensor,
                  ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor], *args: Any, **kwargs: Any):
        """:meth:`cond_step_functional` with the new state copied into the static buffers (in the same graph)."""
        out, pred, diff, new_counters, new_fn, new_h, new_e = self.cond_step_functional(
            step, counters, fn_residual, ladder_h, ladder_e, *args, **kwargs)
        for buf, value in zip([counters, fn_residual, *ladder_h, *ladder_e], [new_counters, new_fn, *new_h, *new_e]):
            buf.copy_(value)
        return out, pred, diff

    def _device_step(self, step: int, branch: int, state: BranchState, args: tuple, kwargs: dict) -> torch.Tensor:
        device = state.fn_residual.device
        if self.counters[branch] is None or self.counters[branch].device != device:
            self.counters[branch] = initial_counters(device)
            torch._dynamo.mark_static_address(self.counters[branch])
        step_t = torch.tensor(step, dtype=torch.int64, device=device)
        out, pred, diff = self._cond_step(step_t, self.counters[branch], state.fn_residual, state.ladder_h,
                                          state.ladder_e, *args, **kwargs)
        self.records[branch].append((step, pred, diff))
        return out

    def sync_records(self) -> None:
        """cond lowering: fold the device-side (predicate, diff) records into the host lists (one sync)."""
        fold_records(self.branches, self.records)

    # --------------------------------------------------------------------------------------------------- forward
    def uses_cudagraphs(self) -> bool:
        """Whether this runtime's steps are CUDA-graph replays (segments or regional, a cudagraph mode, CUDA), or
        emulated ones (tests)."""
        if self.graphs is not None:
            return True
        device = next(self.transformer.parameters()).device
        return self.lowering in ("segments", "regional") and device.type == "cuda" and self.mode in CUDAGRAPH_MODES

    def cudagraph_status(self) -> str:
        """Human-readable CUDA-graph status for :func:`dbcache_compile.summary`."""
        device = next(self.transformer.parameters()).device
        if self.lowering == "eager":
            return "off (eager)"
        if self.graphs is not None:
            kind = "emulated" if self.graphs.emulate else "captured"
            return (f"{kind} by hand: one CUDA graph per segment and input shape ({self.graphs.captures} captured, "
                    f"{self.graphs.replays} replays)")
        if device.type != "cuda":
            return f"n/a ({device.type})"
        if self.mode not in CUDAGRAPH_MODES:
            return f"off (mode={self.mode})"
        if self.lowering == "cond":
            return "skipped: Inductor disables CUDA graphs for graphs with torch.cond (torch 2.11-2.14)"
        if self.lowering == "regional":
            return "not captured yet (each segment is captured at its first use)"
        from torch._dynamo.utils import counters
        skips = counters["inductor"]["cudagraph_skips"]
        return "captured (cudagraph trees, 0 skips)" if skips == 0 else f"skipped for {skips} graph(s): see logs"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        step, branch = self._position()
        state = self.branches[branch]
        self._check_inputs(step, branch, args, kwargs)
        self._ensure_buffers(state, args, kwargs)
        if self.lowering == "cond":
            out = self._device_step(step, branch, state, args, kwargs)
        else:
            state.begin_step(step)
            if self.lowering == "segments" and self.uses_cudagraphs():
                torch.compiler.cudagraph_mark_step_begin()
            out = self._host_step(step, state, args, kwargs)
            if self.uses_cudagraphs():
                # a CUDA-graph output lives in the graph's pool and is overwritten by the next replay (e.g. the
                # unconditional call of the same step): hand the pipeline its own copy
                out = out.clone()
        self.calls += 1
        return transformer_output(out, return_dict)
