"""The cached transformer forward: one cache-step definition (embed → Fn → decide → middle or cache → Bn → output).

This module holds the eager lowering; the compiled lowerings reuse its three segments:

* ``head``: embeddings, the first Fn blocks, the Fn residual and its relative L1 diff to the stored one;
* ``miss``: store the Fn residual, run the middle blocks, update the cached middle residual (TaylorSeer ladder),
  then the last Bn blocks and the output projection;
* ``hit``: add the cached (or forecast) middle residual, then Bn and the output projection.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .adapters import Adapter, Embedded
from .config import DBCacheConfig
from .decision import DIFF_ALWAYS_HIT, cache_allowed, hit_predicate, read_decision_sync, relative_l1
from .state import BranchState, taylor_forecast, taylor_update

__all__ = ["CachedTransformer"]


def _run_blocks(blocks: list[torch.nn.Module], hidden: torch.Tensor, encoder: torch.Tensor,
                block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    for block in blocks:
        encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, **block_kwargs)
    return hidden, encoder


class CachedTransformer:
    """DBCache runtime of one transformer instance: block split, per-branch state, step counting, forward.

    ``forward`` is installed as the transformer instance's ``forward`` by :func:`dbcache_compile.optimize`.
    Calls are counted per generation (:meth:`reset` starts one); with separate CFG, call ``2k`` is the conditional
    branch of step ``k`` and call ``2k+1`` its unconditional branch.
    """

    def __init__(self, transformer: torch.nn.Module, adapter: Adapter, config: DBCacheConfig) -> None:
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
        self.calls = 0
        self.input_shapes: list[Optional[tuple[torch.Size, torch.Size]]] = [None, None]

    # ----------------------------------------------------------------------------------------------- bookkeeping
    def reset(self, separate_cfg: Optional[bool] = None) -> None:
        """Start a new generation. ``separate_cfg`` (from the adapter, per pipeline call) applies unless the config
        forces it."""
        if self.config.enable_separate_cfg is not None:
            self.separate_cfg = self.config.enable_separate_cfg
        elif separate_cfg is not None:
            self.separate_cfg = separate_cfg
        self.calls = 0
        self.input_shapes = [None, None]
        for branch in self.branches:
            branch.reset()

    def _position(self) -> tuple[int, int]:
        """(denoising step, CFG branch) of the current call."""
        if self.separate_cfg:
            return self.calls // 2, self.calls % 2
        return self.calls, 0

    def _check_shapes(self, step: int, branch: int, emb: Embedded) -> None:
        """Remember the input shapes at step 0; a change later in the same generation is a user error."""
        shapes = (emb.hidden.shape, emb.encoder.shape)
        expected = self.input_shapes[branch]
        if expected is None or step == 0:
            self.input_shapes[branch] = shapes
        elif expected != shapes:
            raise ValueError(
                f"input shape changed in the middle of a generation (step {step}: hidden {tuple(shapes[0])}, "
                f"encoder {tuple(shapes[1])}; the generation started with {tuple(expected[0])}, "
                f"{tuple(expected[1])}). Pipelines reset automatically per call; when driving the transformer "
                f"yourself call dbcache_compile.reset(transformer) before each new generation"
                + ("" if self.separate_cfg else "; if the pipeline calls the transformer twice per step (separate "
                   "CFG), leave enable_separate_cfg=None or set it to True"))

    # -------------------------------------------------------------------------------------------------- segments
    def head(self, emb: Embedded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fn blocks → (hidden, encoder, Fn residual of the hidden stream)."""
        hidden, encoder = _run_blocks(self.fn_blocks, emb.hidden, emb.encoder, emb.block_kwargs)
        return hidden, encoder, hidden - emb.hidden

    def tail(self, emb: Embedded, hidden: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        """Bn blocks and the output projection."""
        hidden, encoder = _run_blocks(self.bn_blocks, hidden, encoder, emb.block_kwargs)
        return self.adapter.project(self.transformer, hidden, emb.out_kwargs)

    def miss(self, state: BranchState, emb: Embedded, hidden: torch.Tensor, encoder: torch.Tensor,
             residual: torch.Tensor, window: int, n_derivatives: int) -> torch.Tensor:
        """Compute step: store the Fn residual, run the middle blocks, cache their residual, then Bn + output."""
        state.fn_residual.copy_(residual)
        mid_h, mid_e = _run_blocks(self.mid_blocks, hidden, encoder, emb.block_kwargs)
        mid_h, mid_e = mid_h.contiguous(), mid_e.contiguous()
        for buf, new in zip(state.ladder_h, taylor_update(state.ladder_h, mid_h - hidden, window, n_derivatives)):
            buf.copy_(new)
        for buf, new in zip(state.ladder_e, taylor_update(state.ladder_e, mid_e - encoder, window, n_derivatives)):
            buf.copy_(new)
        return self.tail(emb, mid_h, mid_e)

    def hit(self, state: BranchState, emb: Embedded, hidden: torch.Tensor, encoder: torch.Tensor,
            coeffs: list[float]) -> torch.Tensor:
        """Cached step: add the cached (TaylorSeer: forecast) middle residual, then Bn + output."""
        hidden = (taylor_forecast(state.ladder_h, coeffs) + hidden).contiguous()
        encoder = (taylor_forecast(state.ladder_e, coeffs) + encoder).contiguous()
        return self.tail(emb, hidden, encoder)

    # --------------------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        step, branch = self._position()
        state = self.branches[branch]
        emb = self.adapter.embed(self.transformer, *args, **kwargs)
        self._check_shapes(step, branch, emb)
        state.begin_step(step)
        hidden, encoder, residual = self.head(emb)
        state.ensure_buffers(hidden, encoder)
        use_cache = False
        allowed = cache_allowed(self.config, step, len(state.cached_steps), state.consecutive, state.has_prev)
        if allowed:
            diff = relative_l1(state.fn_residual, residual)
            use_cache, diff_value = read_decision_sync(hit_predicate(self.config, True, diff), diff)
            state.diffs[step] = DIFF_ALWAYS_HIT if self.config.residual_diff_threshold >= 1.0 else diff_value
        if use_cache:
            state.record_hit(step)
            out = self.hit(state, emb, hidden, encoder, state.forecast_coefficients(step))
        else:
            n_derivatives = state.derivatives_for_update(step)
            out = self.miss(state, emb, hidden, encoder, residual, step - state.last_compute, n_derivatives)
            state.record_compute(step, n_derivatives)
        self.calls += 1
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=out)
