"""What the tests of inputs the cache runs with (ControlNet residuals, IP-Adapter embeddings: ``test_controlnet.py``,
``test_ip_adapter.py``) share: the two configs, the lowerings they run in, and the never-caching / caching check."""

from __future__ import annotations

import torch

import dbcache_compile as dbc

STEPS = 8
NEVER = "F1B0_W2MC2_R0.0"  # R <= 0: never caches
CACHING = "F1B0_W2MC2_R0.5"  # caches steps 2, 3, 5, 6 on the tiny pipelines of those tests
EAGER_BACKEND = {"backend": "eager"}  # Dynamo's graphs, run without Inductor (CPU time)
LOWERINGS = {
    "eager": {},
    "regional": dict(mode="default", graph="regional", compile_options=EAGER_BACKEND),
    "segments": dict(mode="default", graph="segments", compile_options=EAGER_BACKEND),
    "cond": dict(mode="default", graph="cond", compile_options=EAGER_BACKEND),
    # the hand-captured CUDA graphs of regional / segments, emulated on CPU: step inputs (ControlNet residuals) are
    # copied into the graphs' own input tensors before each replay
    "regional+graphs": dict(mode="default", graph="regional", compile_options=EAGER_BACKEND),
    "segments+graphs": dict(mode="default", graph="segments", compile_options=EAGER_BACKEND),
}


def optimize_in(target, cache: str, lowering: str) -> None:
    """``optimize(target, cache)`` in the named lowering of :data:`LOWERINGS`."""
    dbc.optimize(target, cache=cache, **LOWERINGS[lowering])
    if lowering.endswith("+graphs"):
        dbc.runtime_of(target).use_segment_graphs(emulate=True)


def run(pipe, inputs: dict) -> torch.Tensor:
    return pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images


def never_then_caching(pipe, inputs, lowering: str, reference: torch.Tensor, eager_cached: torch.Tensor):
    """In ``lowering``: :data:`NEVER` gives the uncached ``reference`` (bit for bit eager, 1e-4 compiled), then
    :data:`CACHING` (``reconfigure``: the same graphs) gives the eager cache's images ``eager_cached``, hand-captured
    graphs replaying and nothing falling back to eager. Returns the caching run's summary."""
    optimize_in(pipe, NEVER, lowering)
    try:
        never = run(pipe, inputs())
        assert dbc.summary(pipe).cached_steps == []
        dbc.runtime_of(pipe).reconfigure(CACHING)  # same block split: the same graphs
        cached = run(pipe, inputs())
        summary = dbc.summary(pipe)
        if lowering.endswith("+graphs"):
            assert dbc.runtime_of(pipe).graphs.replays > 0
    finally:
        dbc.disable(pipe)
    if lowering == "eager":
        assert torch.equal(never, reference)
        assert torch.equal(cached, eager_cached)
    else:
        torch.testing.assert_close(never, reference, rtol=0, atol=1e-4)
        torch.testing.assert_close(cached, eager_cached, rtol=0, atol=1e-4)
        assert summary.compile_fallbacks == {}
    return summary
