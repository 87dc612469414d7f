"""Context parallelism of diffusers 0.42.1 (Ulysses / Ring) on 2 CPU ranks over gloo, WITHOUT our cache: the
baseline a cached context-parallel runtime must reproduce (issue #15; docs/context_parallel.md).

* Ulysses-2: the tiny FLUX and Qwen-Image pipelines give the same images on both ranks (bit-identical: the output is
  all-gathered after ``proj_out``) as one process, within ``ATOL`` (measured max abs pixel difference on this
  CPU: FLUX 5.1e-7, Qwen-Image 8.0e-7; images are in [0, 1]).
* The CP split / gather hooks sit where docs/context_parallel.md says (root module for FLUX, first block and
  ``pos_embed`` for Qwen-Image, ``proj_out`` for both).
* Ring-2 fails on CPU: the only context-parallel attention backend that runs on a CPU is ``native`` (SDPA), whose
  forward op refuses ``return_lse=True``, which ring attention needs to merge the partial softmaxes.
* The recommended cross-rank decision diff (one all-reduce of ``[sum|prev - cur|, sum|prev|]``) equals the
  single-process relative L1 and is bit-identical on every rank, inside ``torch.compile(fullgraph=True)``.
* The harness fails fast instead of hanging.

Rank functions are module-level (the ranks import this module by name); the processes come from
``cp_harness.run_ranks`` (forkserver: torch, diffusers and this module are imported once per session).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import dbcache_compile as dbc

from cp_harness import RankTimeout, run_ranks
from dbcache_compile.testing import flux_inputs, qwen_inputs, tiny_flux_pipeline, tiny_qwen_pipeline

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

STEPS = 3
ATOL = 1e-5  # measured (see the module docstring): 5.1e-7 (FLUX), 8.0e-7 (Qwen-Image)
# Qwen-Image's text stream is split on the sequence dim (EquipartitionSharder: length divisible by the CP degree),
# so the prompt gets 8 tokens instead of qwen_inputs' default 7.
QWEN_TOKENS = 8

# where diffusers 0.42.1 registers the CP hooks (module name -> hook names, in registration order)
EXPECTED_HOOKS = {
    "flux": {"": ["cp_input---"], "proj_out": ["cp_output---proj_out"]},
    "qwen": {"transformer_blocks.0": ["cp_input---transformer_blocks.0", "cp_input---transformer_blocks.*"],
             **{f"transformer_blocks.{i}": ["cp_input---transformer_blocks.*"] for i in range(1, 6)},
             "pos_embed": ["cp_input---pos_embed"], "proj_out": ["cp_output---proj_out"]},
}


def _generate(model: str) -> tuple:
    if model == "flux":
        pipe, inputs = tiny_flux_pipeline(), flux_inputs()
    else:
        pipe, inputs = tiny_qwen_pipeline(), qwen_inputs(tokens=QWEN_TOKENS)

    def generate() -> torch.Tensor:
        return pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images

    return pipe, generate


def _cp_hooks(transformer: torch.nn.Module) -> dict[str, list[str]]:
    return {name: list(m._diffusers_hook._hook_order) for name, m in transformer.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook._hook_order}


def _cp_rank(rank: int, world_size: int, model: str, cp: dict) -> dict:
    from diffusers import ContextParallelConfig

    pipe, generate = _generate(model)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(**cp))
    start = time.perf_counter()
    images = generate()
    return {"images": images, "hooks": _cp_hooks(pipe.transformer), "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def single_process():
    cache = {}

    def get(model: str) -> torch.Tensor:
        if model not in cache:
            cache[model] = _generate(model)[1]()
        return cache[model]

    return get


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_ulysses_matches_single_process(model, single_process):
    ref = single_process(model)
    results = run_ranks(_cp_rank, 2, args=(model, {"ulysses_degree": 2}), timeout=120, collective_timeout=60)
    for r in results:
        assert r["hooks"] == EXPECTED_HOOKS[model]
        assert r["images"].shape == ref.shape
        torch.testing.assert_close(r["images"], ref, rtol=0, atol=ATOL)
    assert torch.equal(results[0]["images"], results[1]["images"])


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_ring_needs_return_lse_which_native_attention_lacks(model):
    # TemplatedRingAttention (diffusers/models/attention_dispatch.py) calls the backend's forward op with
    # return_lse=True to merge the per-chunk softmaxes; _native_attention_forward_op raises for it. The backends
    # that return an LSE (flash, cuDNN, sage, ...) need CUDA.
    with pytest.raises(ValueError, match="Native attention does not support return_lse=True"):
        run_ranks(_cp_rank, 2, args=(model, {"ring_degree": 2}), timeout=120, collective_timeout=60, grace=10)


def _enable_only(rank: int, world_size: int) -> str:
    from diffusers import ContextParallelConfig

    pipe = tiny_flux_pipeline()
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    return "enabled"


@pytest.mark.skipif(torch.accelerator.device_count() > 0, reason="the division by zero needs a CPU-only machine")
def test_enable_parallelism_divides_by_the_accelerator_count_on_cpu():
    # ModelMixin._resolve_parallel_config: rank % torch.accelerator.device_count(); the harness patches the count to 1
    with pytest.raises(ZeroDivisionError):
        run_ranks(_enable_only, 2, timeout=60, collective_timeout=30, patch_device_count=False)
    assert run_ranks(_enable_only, 2, timeout=60, collective_timeout=30) == ["enabled", "enabled"]


def _relative_l1_rank(rank: int, world_size: int) -> dict:
    import torch.distributed._functional_collectives as funcol

    g = torch.Generator().manual_seed(0)
    prev_full, cur_full = torch.randn(1, 64, 32, generator=g), torch.randn(1, 64, 32, generator=g)
    prev, cur = prev_full.chunk(world_size, 1)[rank], cur_full.chunk(world_size, 1)[rank]  # the CP shards
    group = dist.group.WORLD

    def global_relative_l1(prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.stack([(prev - cur).abs().sum(), prev.abs().sum()]).float()
        sums = funcol.all_reduce(sums, "sum", group)
        diff = sums[0] / sums[1]
        return diff, diff.to(torch.float64) < 1.25

    compiled = torch.compile(global_relative_l1, backend="eager", fullgraph=True)
    diff, hit = compiled(prev, cur)
    eager_diff, _ = global_relative_l1(prev, cur)
    return {"diff": diff.item(), "eager": eager_diff.item(), "hit": bool(hit),
            "local": ((prev - cur).abs().mean() / prev.abs().mean()).item(),
            "full": ((prev_full - cur_full).abs().mean() / prev_full.abs().mean()).item()}


def test_all_reduced_relative_l1_is_the_single_process_diff_on_every_rank():
    r0, r1 = run_ranks(_relative_l1_rank, 2, timeout=120, collective_timeout=60)
    assert r0["diff"] == r1["diff"] == r0["eager"] == r1["eager"]  # bit-identical: one decision for all ranks
    assert r0["hit"] == r1["hit"]
    assert r0["diff"] == pytest.approx(r0["full"], rel=1e-6)
    assert r0["local"] != r1["local"]  # deciding on the local shard alone would split the ranks


def _fail_or_wait(rank: int, world_size: int) -> None:
    if rank == 1:
        raise KeyError("rank 1 broke")
    dist.barrier()  # rank 0 waits for a rank that is gone


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_harness_reraises_a_rank_error_with_its_traceback_without_hanging():
    start = time.monotonic()
    with pytest.raises(KeyError, match="rank 1 broke") as info:
        run_ranks(_fail_or_wait, 2, timeout=60, collective_timeout=30, grace=1)
    assert "_fail_or_wait" in info.value.__cause__.tb and info.value.__cause__.rank == 1
    assert time.monotonic() - start < 60  # a cold fork server (first test run) takes seconds to import


def test_harness_kills_ranks_past_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"ranks \[0, 1\]"):
        run_ranks(_sleep, 2, timeout=3, collective_timeout=30)
    assert time.monotonic() - start < 60  # the ranks sleep 600 s


# ------------------------------------------------------------------------------------------ our cache under CP
# thresholds chosen per case so that the diffs keep a margin from them (checked in the test)
CACHED_CONFIGS = {("flux", 1): "F1B0_W2M0MC2_T1O1_R0.36", ("flux", 2): "F1B0_W2M0MC2_T1O1_R0.34",
                  ("qwen", 1): "F1B1_W2M0MC2_T0O1_R0.345"}
CACHED_STEPS = 8


def _cached_inputs(model: str, batch: int) -> tuple:
    if model == "flux":
        return tiny_flux_pipeline(), flux_inputs(batch=batch)
    return tiny_qwen_pipeline(), qwen_inputs(batch=batch, cfg=True, tokens=QWEN_TOKENS)  # true CFG: two branches


def _cached_run(model: str, lowering: str, order: str, batch: int, cp: bool) -> dict:
    """One generation with our cache (and context parallelism when ``cp``), then ``disable()`` and one uncached
    generation: images, decisions, diffs."""
    import dbcache_compile as dbc
    from diffusers import ContextParallelConfig

    pipe, inputs = _cached_inputs(model, batch)
    kwargs = {} if lowering == "eager" else dict(mode="default", graph=lowering, compile_options={"backend": "eager"})

    def generate() -> torch.Tensor:
        return pipe(**inputs, num_inference_steps=CACHED_STEPS, generator=torch.Generator().manual_seed(0)).images

    if cp and order == "cp-first":
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    dbc.optimize(pipe, cache=CACHED_CONFIGS[model, batch], **kwargs)
    if lowering == "regional":
        dbc.runtime_of(pipe).use_segment_graphs(emulate=True)
    if cp and order == "optimize-first":
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    from torch._dynamo.utils import counters
    counters.clear()
    images = generate()
    with torch.compiler.set_stance("fail_on_recompile"):
        again = generate()
    summary = dbc.summary(pipe)
    dbc.disable(pipe)
    return {"images": images, "again": again, "cached": summary.cached_steps, "cfg_cached": summary.cfg_cached_steps,
            "diffs": summary.residual_diffs, "cfg_diffs": summary.cfg_residual_diffs, "uncached": generate(),
            "breaks": sum(counters["graph_break"].values())}


def _cached_rank(rank: int, world_size: int, model: str, lowering: str, order: str, batch: int) -> dict:
    return _cached_run(model, lowering, order, batch, cp=True)


@pytest.mark.parametrize("model, lowering, order, batch", [
    ("flux", "eager", "cp-first", 1), ("flux", "eager", "optimize-first", 2), ("qwen", "eager", "cp-first", 1),
    ("qwen", "eager", "optimize-first", 1), ("flux", "regional", "cp-first", 1), ("qwen", "regional", "cp-first", 1),
    ("flux", "segments", "cp-first", 1), ("flux", "cond", "optimize-first", 1)])
def test_cached_ulysses_takes_the_single_process_decisions_on_every_rank(model, lowering, order, batch):
    """Ulysses-2 on 2 gloo ranks with our cache: the relative L1 diff is reduced over the ranks inside the step (one
    functional all-reduce), so both ranks take the same decisions, the same as one process (TaylorSeer on FLUX,
    true CFG's two branches and Bn=1 on Qwen-Image, batch 2), with the gathered images equal to one process's
    within float32 rounding, a second generation identical without recompiles or graph breaks (compiled lowerings:
    Dynamo with the eager backend); after disable() the ranks run diffusers' own context parallelism again (the
    root split hook is back). Both orders of enable_parallelism and optimize work."""
    ref = _cached_run(model, lowering, order, batch, cp=False)
    threshold = dbc.DBCacheConfig.from_string(CACHED_CONFIGS[model, batch]).residual_diff_threshold
    margin = min(abs(d - threshold) for d in [*ref["diffs"].values(), *ref["cfg_diffs"].values()])
    assert ref["cached"] and margin > 1e-3, "the config must cache with margin from the threshold to mean anything"
    results = run_ranks(_cached_rank, 2, args=(model, lowering, order, batch), timeout=240, collective_timeout=120)
    for r in results:
        assert r["cached"] == ref["cached"] and r["cfg_cached"] == ref["cfg_cached"]
        assert r["diffs"].keys() == ref["diffs"].keys()
        for step, diff in ref["diffs"].items():
            assert r["diffs"][step] == pytest.approx(diff, rel=1e-5)
        torch.testing.assert_close(r["images"], ref["images"], rtol=0, atol=ATOL)
        torch.testing.assert_close(r["uncached"], ref["uncached"], rtol=0, atol=ATOL)
        assert torch.equal(r["again"], r["images"]) and r["breaks"] == 0  # no recompile, no graph break
    assert results[0]["diffs"] == results[1]["diffs"]  # bit-identical: one decision on every rank
    assert torch.equal(results[0]["images"], results[1]["images"])


def _mismatched_rank(rank: int, world_size: int) -> str:
    from diffusers import ContextParallelConfig

    pipe, inputs = _cached_inputs("flux", 1)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    dbc.optimize(pipe, cache="F1B0_W2_R0.3" if rank == 0 else "F1B0_W2_R0.4")
    pipe(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    return "ran"


def test_ranks_with_different_configs_fail_clearly_instead_of_hanging():
    with pytest.raises(ValueError, match="run different cache configs"):
        run_ranks(_mismatched_rank, 2, timeout=120, collective_timeout=60, grace=10)


def _uncached_rank(rank: int, world_size: int, graph: str) -> torch.Tensor:
    from diffusers import ContextParallelConfig

    pipe, inputs = _cached_inputs("flux", 1)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    dbc.optimize(pipe.transformer, cache=None, mode="default", graph=graph, compile_options={"backend": "eager"})
    return pipe(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("graph", ["segments", "regional"])
def test_uncached_compiled_baseline_keeps_the_context_parallel_split(graph):
    """The uncached baseline compiles the class forward; diffusers' root split hook sits inside our hook and must
    still run (it used to be bypassed: 128 tokens for 64 on each rank)."""
    pipe, inputs = _cached_inputs("flux", 1)
    ref = pipe(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    for images in run_ranks(_uncached_rank, 2, args=(graph,), timeout=120, collective_timeout=60):
        torch.testing.assert_close(images, ref, rtol=0, atol=ATOL)
