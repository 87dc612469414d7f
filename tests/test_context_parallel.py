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

from cp_harness import RankError, RankTimeout, run_ranks
from dbcache_compile.parallel import check_plan, plan_conflicts
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
    """Without our cache, diffusers' Ulysses-2 on 2 gloo ranks puts its CP hooks where documented and gives both
    ranks identical images equal to one process's within ATOL."""
    ref = single_process(model)
    results = run_ranks(_cp_rank, 2, args=(model, {"ulysses_degree": 2}), timeout=120, collective_timeout=60)
    for r in results:
        assert r["hooks"] == EXPECTED_HOOKS[model]
        assert r["images"].shape == ref.shape
        torch.testing.assert_close(r["images"], ref, rtol=0, atol=ATOL)
    assert torch.equal(results[0]["images"], results[1]["images"])


@pytest.mark.parametrize("model", ["flux", "qwen"])
def test_ring_needs_return_lse_which_native_attention_lacks(model):
    """Ring-2 context parallelism fails on CPU with diffusers' own error: native attention cannot return the LSE
    that ring attention needs."""
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
    """On a CPU-only machine enable_parallelism() divides by a zero accelerator count; the harness's patched count
    of 1 lets both ranks enable it."""
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
    """The all-reduced relative L1 diff (compiled fullgraph) equals the single-process diff bit for bit on every
    rank, so all ranks take one decision; the local-shard diffs would differ."""
    r0, r1 = run_ranks(_relative_l1_rank, 2, timeout=120, collective_timeout=60)
    assert r0["diff"] == r1["diff"] == r0["eager"] == r1["eager"]  # bit-identical: one decision for all ranks
    assert r0["hit"] == r1["hit"]
    assert r0["diff"] == pytest.approx(r0["full"], rel=1e-6)
    assert r0["local"] != r1["local"]  # deciding on the local shard alone would split the ranks


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_harness_kills_ranks_past_the_timeout():
    """The CP test harness kills ranks running past its timeout and raises RankTimeout naming them (no hang)."""
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"ranks \[0, 1\]"):
        run_ranks(_sleep, 2, timeout=3, collective_timeout=30)
    assert time.monotonic() - start < 60  # the ranks sleep 600 s


# ------------------------------------------------------------------------------------------ our cache under CP
# thresholds chosen per case so that the diffs keep a margin from them (checked in the test)
CACHED_CONFIGS = {("flux", 1): "F1B0_W2M0MC2_T1O1_R0.36", ("flux", 2): "F1B0_W2M0MC2_T1O1_R0.34",
                  ("qwen", 1): "F1B1_W2M0MC2_T0O1_R0.345", ("qwen-1branch", 1): "F1B1_W2M0MC2_T0O1_R0.345"}
CACHED_STEPS = 8
# Dynamo graphs per rank in the first generation, the same as one process (measured with the same configs): FLUX
# regional = one region per block class, segments = head_diff / miss / hit, cond = one step graph; Qwen-Image twice
# each, as on one process: true CFG's negative prompt has 6 tokens against the prompt's 8, so the second branch
# recompiles each graph once with a dynamic text length (under Ulysses-2 the shards have 3 and 4 tokens).
# "qwen-1branch" is Qwen-Image without true CFG (the same prompt, so the same decisions as "qwen"'s cond branch).
EXPECTED_GRAPHS = {("flux", "eager"): 0, ("flux", "regional"): 2, ("flux", "segments"): 3, ("flux", "cond"): 1,
                   ("qwen", "eager"): 0, ("qwen", "regional"): 2, ("qwen", "segments"): 6, ("qwen", "cond"): 2,
                   ("qwen-1branch", "segments"): 3}


def _cached_inputs(model: str, batch: int) -> tuple:
    if model == "flux":
        return tiny_flux_pipeline(), flux_inputs(batch=batch)
    # true CFG (two branches) unless "qwen-1branch"
    return tiny_qwen_pipeline(), qwen_inputs(batch=batch, cfg=model == "qwen", tokens=QWEN_TOKENS)


def _cached_run(model: str, lowering: str, order: str, batch: int, cp: bool) -> dict:
    """One generation with our cache (and context parallelism when ``cp``), a second one that may not compile
    anything, then ``disable()`` and one uncached generation: images, decisions, diffs, graph counts."""
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
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        again = generate()
    summary = dbc.summary(pipe)
    fallbacks = dict(dbc.runtime_of(pipe).compile_fallbacks)
    dbc.disable(pipe)
    return {"images": images, "again": again, "cached": summary.cached_steps, "cfg_cached": summary.cfg_cached_steps,
            "diffs": summary.residual_diffs, "cfg_diffs": summary.cfg_residual_diffs, "uncached": generate(),
            "breaks": sum(counters["graph_break"].values()), "graphs": graphs,
            "graphs_again": counters["stats"]["unique_graphs"] - graphs, "fallbacks": fallbacks}


def _cached_rank(rank: int, world_size: int, model: str, lowering: str, order: str, batch: int) -> dict:
    return _cached_run(model, lowering, order, batch, cp=True)


@pytest.fixture(scope="module")
def single_process_cached():
    """The single-process reference of a cached config: the eager lowering (the compiled lowerings take the same
    decisions and give the same images on one process: tests/test_compiled.py), run once per model and batch."""
    cache = {}

    def get(model: str, batch: int) -> dict:
        if (model, batch) not in cache:
            cache[model, batch] = _cached_run(model, "eager", "", batch, cp=False)
        return cache[model, batch]

    return get


@pytest.mark.parametrize("model, lowering, order, batch", [
    ("flux", "eager", "cp-first", 1), ("flux", "eager", "optimize-first", 2), ("qwen", "eager", "cp-first", 1),
    ("qwen", "eager", "optimize-first", 1), ("flux", "regional", "cp-first", 1), ("qwen", "regional", "cp-first", 1),
    ("flux", "segments", "cp-first", 1), ("flux", "cond", "optimize-first", 1), ("qwen", "cond", "cp-first", 1),
    # one CFG branch: half the graphs to compile (CI time); with true CFG it compiles 6 per rank as on one process
    ("qwen-1branch", "segments", "optimize-first", 1)])
def test_cached_ulysses_takes_the_single_process_decisions_on_every_rank(model, lowering, order, batch,
                                                                        single_process_cached):
    """Ulysses-2 on 2 gloo ranks with our cache: the relative L1 diff is reduced over the ranks inside the step (one
    functional all-reduce), so both ranks take the same decisions, the same as one process, in both CFG branches
    (TaylorSeer on FLUX, true CFG's two branches and Bn=1 on Qwen-Image, batch 2), with the gathered images equal to
    one process's within float32 rounding. Every lowering compiles as many graphs per rank as on one process, with
    no graph break and no uncompiled fallback, and a second generation compiles nothing (no recompile); after
    disable() the ranks run diffusers' own context parallelism again (the root split hook is back). Both orders of
    enable_parallelism and optimize work. Qwen-Image with graph="cond" used to fail in Dynamo (torch.cond could not
    merge the strides of a shard of a dynamic text length), with graph="regional" it compiled 4 graphs instead of 2
    (block 0's split hook hands its region a chunk view with the full tensor's strides)."""
    ref = single_process_cached(model, batch)
    threshold = dbc.DBCacheConfig.from_string(CACHED_CONFIGS[model, batch]).residual_diff_threshold
    margin = min(abs(d - threshold) for d in [*ref["diffs"].values(), *ref["cfg_diffs"].values()])
    assert ref["cached"] and margin > 1e-3, "the config must cache with margin from the threshold to mean anything"
    assert (model != "qwen") or (ref["cfg_cached"] and ref["cfg_diffs"]), "Qwen-Image's uncond branch must decide"
    results = run_ranks(_cached_rank, 2, args=(model, lowering, order, batch), timeout=240, collective_timeout=120)
    for r in results:
        assert r["cached"] == ref["cached"] and r["cfg_cached"] == ref["cfg_cached"]
        for key in ("diffs", "cfg_diffs"):  # both CFG branches decide on the whole tensor
            assert r[key].keys() == ref[key].keys(), key
            for step, diff in ref[key].items():
                assert r[key][step] == pytest.approx(diff, rel=1e-5), (key, step)
        torch.testing.assert_close(r["images"], ref["images"], rtol=0, atol=ATOL)
        torch.testing.assert_close(r["uncached"], ref["uncached"], rtol=0, atol=ATOL)
        assert torch.equal(r["again"], r["images"]) and r["breaks"] == 0
        # as many graphs as on one process, none after warm-up, nothing run uncompiled
        assert (r["graphs"], r["graphs_again"], r["fallbacks"]) == (EXPECTED_GRAPHS[model, lowering], 0, {})
    assert results[0]["diffs"] == results[1]["diffs"]  # bit-identical: one decision on every rank
    assert results[0]["cfg_diffs"] == results[1]["cfg_diffs"]
    assert torch.equal(results[0]["images"], results[1]["images"])


def _mismatched_rank(rank: int, world_size: int) -> str:
    from diffusers import ContextParallelConfig

    pipe, inputs = _cached_inputs("flux", 1)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    dbc.optimize(pipe, cache="F1B0_W2_R0.3" if rank == 0 else "F1B0_W2_R0.4")
    pipe(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    return "ran"


def test_ranks_with_different_configs_fail_clearly_instead_of_hanging():
    """Ranks optimized with different cache configs raise a ValueError saying so ('run different cache configs')
    instead of hanging in a collective."""
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


# ------------------------------------------------------------------------------------------ bad input: a rank fails
COLLECTIVE_TIMEOUT = 10  # seconds: the process group's timeout in the tests of a stalled or dead rank


def _failing_rank(rank: int, world_size: int, how: str) -> str:
    """A cached Ulysses-2 generation whose rank 1, after step 2 (a cached step), dies (``how="exit"``:
    ``os._exit(1)``, nothing reported) or stalls (``how="stall"``: alive, but never joins another collective)."""
    import os

    from diffusers import ContextParallelConfig

    pipe, inputs = _cached_inputs("flux", 1)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    dbc.optimize(pipe, cache=CACHED_CONFIGS["flux", 1])

    def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if rank == 1 and step == 2:
            if how == "exit":
                os._exit(1)
            time.sleep(600)
        return callback_kwargs

    pipe(**inputs, num_inference_steps=CACHED_STEPS, generator=torch.Generator().manual_seed(0),
         callback_on_step_end=step_end)
    return "finished"


def test_a_rank_that_dies_mid_generation_fails_the_survivor_without_hanging():
    """A rank that dies silently during a cached generation (here ``os._exit(1)`` after step 2): the surviving rank
    must get an error from its next collective instead of waiting forever, and the run reports the dead rank with
    its exit code. The harness gives the survivor ``grace`` seconds (longer than the collective timeout) to report:
    without an error there, no note would name it."""
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 died without reporting \(exit code 1\)") as info:
        run_ranks(_failing_rank, 2, args=("exit",), timeout=120, collective_timeout=COLLECTIVE_TIMEOUT,
                  grace=COLLECTIVE_TIMEOUT + 20)
    notes = getattr(info.value, "__notes__", [])
    assert any(n.startswith("(rank 0 failed after it: ") for n in notes), notes  # the survivor's own error
    assert time.monotonic() - start < COLLECTIVE_TIMEOUT + 50  # bounded (a cold fork server takes seconds)


def test_a_stalled_rank_releases_the_survivor_at_the_process_group_timeout():
    """A rank that stays alive but stops joining collectives (here: sleeps after step 2 of a cached generation):
    the other rank is blocked in its next collective and only the process group's timeout
    (``init_process_group(timeout=...)``, the harness's ``collective_timeout``) releases it, with gloo's
    "Timed out" error re-raised in the parent with the rank's traceback; the stalled rank is then killed. Without
    that timeout the run would hang until the harness's wall-clock ``timeout`` (a RankTimeout, not this error)."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"Timed out waiting {COLLECTIVE_TIMEOUT * 1000}ms") as info:
        run_ranks(_failing_rank, 2, args=("stall",), timeout=COLLECTIVE_TIMEOUT + 80,
                  collective_timeout=COLLECTIVE_TIMEOUT, grace=1)
    elapsed = time.monotonic() - start
    assert info.value.__cause__.rank == 0 and "_failing_rank" in info.value.__cause__.tb
    assert COLLECTIVE_TIMEOUT <= elapsed < COLLECTIVE_TIMEOUT + 50


# ------------------------------------------------------------------------------------------ bad input: the CP plan
def _block_chains(transformer: torch.nn.Module, fn: int, bn: int) -> list[tuple[list, int, int]]:
    """``(blocks, Fn, Bn)`` of each chain the cache would build for ``transformer`` (its family's chains)."""
    from dbcache_compile.families import family_for
    chains = family_for(transformer).chains
    return [([b for name in chain for b in getattr(transformer, name)], fn, bn) for chain in chains]


def _gather_and_resplit_plan(transformer: torch.nn.Module) -> dict:
    """A user-supplied FLUX plan that still runs uncached (measured: the images equal one process's within 5.1e-7):
    diffusers' own, plus a gather of the last double block's outputs and a re-split at the first single block."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    split = ContextParallelInput(split_dim=1, expected_dims=3)
    return {**type(transformer)._cp_plan,
            "transformer_blocks.1": [ContextParallelOutput(gather_dim=1, expected_dims=3)] * 2,
            "single_transformer_blocks.0": {"hidden_states": split, "encoder_hidden_states": split}}


@pytest.mark.parametrize("family", ["flux", "flux2", "qwen", "wan", "ltx"])
def test_diffusers_own_cp_plans_keep_the_cached_blocks_whole(family):
    """The context-parallel plans diffusers 0.42.1 ships for the supported families split the streams before the
    cache's first block (FLUX, FLUX.2, LTX: root; Qwen-Image, Wan: block 0's inputs) and gather after the last
    (``proj_out``); Qwen-Image's per-block splits are of its mask and modulate index, not the streams. So even the
    strictest split (F1B0: every block after the first is cached) passes the check (docs/context_parallel.md)."""
    from tests.families import CASES
    pipe = {"flux": tiny_flux_pipeline, "flux2": CASES["flux2"].builder, "qwen": tiny_qwen_pipeline,
            "wan": CASES["wan"].builder, "ltx": CASES["ltx"].builder}[family]()
    transformer = pipe.transformer
    assert type(transformer)._cp_plan
    for blocks, fn, bn in _block_chains(transformer, 1, 0):
        assert plan_conflicts(transformer, blocks, fn, bn) == []


def _plan_check_rank(rank: int, world_size: int) -> dict:
    from diffusers import ContextParallelConfig

    def check(model: str, plan: bool, fn: int, bn: int, enable: bool = True) -> str:
        pipe, _ = _cached_inputs(model, 1)
        if plan:
            pipe.transformer._cp_plan = _gather_and_resplit_plan(pipe.transformer)  # on the instance: the user's
        if enable:
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        try:
            check_plan(pipe.transformer, _block_chains(pipe.transformer, fn, bn))
        except ValueError as exc:
            return str(exc)
        return "ok"

    def through_optimize() -> str:
        import dbcache_compile as dbc
        pipe, inputs = _cached_inputs("flux", 1)
        pipe.transformer._cp_plan = _gather_and_resplit_plan(pipe.transformer)
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        dbc.optimize(pipe, cache="F2B0_W0_R0.4")
        try:
            pipe(**inputs, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        except ValueError as exc:
            return str(exc)
        finally:
            dbc.disable(pipe)
        return "ok"

    return {"flux": check("flux", False, 1, 0), "qwen": check("qwen", False, 1, 0),
            "F2B0": check("flux", True, 2, 0), "F1B6": check("flux", True, 1, 6), "F1B7": check("flux", True, 1, 7),
            "F2B0 before enable": check("flux", True, 2, 0, enable=False), "F2B0 optimize": through_optimize()}


def test_a_cache_split_across_a_context_parallel_boundary_is_refused():
    """A block split whose Fn or middle blocks contain a point where the context-parallel plan splits or gathers a
    stream is refused with the modules named: its residuals would subtract a shard from a whole tensor (measured
    with this plan and F2B0: "The size of tensor a (64) must match the size of tensor b (32)" at the first step).
    Checked on 2 gloo ranks against the hooks enable_parallelism registered, and from the instance's ``_cp_plan``
    before enable_parallelism (optimize first); diffusers' own FLUX and Qwen-Image plans pass. Points in the Bn
    blocks are fine (they run every step): with 6 of FLUX's 8 blocks in Bn the re-split is safe but the gather of
    block 1 is still in the cached middle; with 7 both are in Bn."""
    r0, r1 = run_ranks(_plan_check_rank, 2, timeout=120, collective_timeout=60)
    assert r0 == r1
    assert r0["flux"] == r0["qwen"] == r0["F1B7"] == "ok"
    for key in ("F2B0", "F2B0 before enable", "F2B0 optimize"):  # the last: raised by the first generation
        assert "context-parallel plan of FluxTransformer2DModel" in r0[key]
        assert "'transformer_blocks.1' gathers its outputs: it is block 1 of the chain, one of the first 2" in r0[key]
        assert "'single_transformer_blocks.0' splits its inputs encoder_hidden_states, hidden_states" in r0[key]
    assert "'transformer_blocks.1' gathers its outputs: it is block 1 of the chain, one of the middle" in r0["F1B6"]
    assert "single_transformer_blocks.0" not in r0["F1B6"]
