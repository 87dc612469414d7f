"""Compiled lowerings on CPU (tiny FLUX and Qwen-Image, Inductor): zero graph breaks, the golden graph counts
(graphs/<scenario>-<lowering>.json), zero recompiles after warm-up, and the same decisions and images as the eager
runtime. Each compile costs tens of seconds here, so every (scenario, lowering) is compiled once per session. The
other families' records: tests/test_family_records.py."""

import json

import pytest
import torch

import dbcache_compile as dbc
from tools.graph_records import LOWERINGS, SCENARIOS, UPDATE_HINT, record_path

SCENARIO_RUNS = [(s, lo) for s in SCENARIOS for lo in LOWERINGS]


@pytest.mark.parametrize("scenario, lowering", SCENARIO_RUNS)
def test_graph_structure_matches_golden_record(compiled_run, scenario, lowering):
    """Every (scenario, lowering) compiles with zero graph breaks and zero recompiles after warm-up, and its graph
    structure equals the checked-in golden record, so a structural change cannot slip in unreviewed."""
    record = compiled_run(scenario, lowering).record
    assert record["graph_breaks"] == 0
    assert record["recompiles_after_warmup"] == 0
    golden = json.loads(record_path(scenario, lowering).read_text())
    assert record == golden, UPDATE_HINT.format(scenario)


@pytest.mark.parametrize("scenario, lowering", SCENARIO_RUNS)
def test_compiled_decisions_and_images_match_eager(compiled_run, eager_run, scenario, lowering):
    """A compiled lowering takes the eager runtime's cached steps (both CFG branches) and diffs and gives its
    images, on a scenario that exercises warm-up, hits, misses and the MC limit."""
    run = compiled_run(scenario, lowering)
    eager_images, eager_summaries = eager_run(scenario)
    for img, summary, ref_img, ref in zip(run.images, run.summaries, eager_images, eager_summaries):
        assert summary.lowering == lowering and summary.mode == "default"
        assert summary.cached_steps == ref.cached_steps and summary.cfg_cached_steps == ref.cfg_cached_steps
        assert summary.residual_diffs.keys() == ref.residual_diffs.keys()
        for k, v in ref.residual_diffs.items():
            assert summary.residual_diffs[k] == pytest.approx(v, rel=1e-4, abs=1e-6)
        torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    first = eager_summaries[0]
    # the scenario must exercise what the records claim: warmup, hits, misses, the MC=2 limit and a forecast
    assert first.cached_steps and first.compute_steps[:2] == [0, 1]
    assert any(s - 1 in first.cached_steps and s - 2 in first.cached_steps for s in first.compute_steps)
    if scenario == "qwen-image":
        assert first.separate_cfg and first.cfg_cached_steps


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_new_resolution_or_batch_costs_at_most_one_recompile(lowering):
    """A new resolution or batch size compiles at most one step's worth of new graphs (cond 1, segments 3, regional
    2), and going back to a shape already seen recompiles nothing."""
    from torch._dynamo.utils import counters

    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    torch._dynamo.reset()
    pipe = tiny_flux_pipeline()
    # Dynamo's graph structure only (backend eager): the graph count does not depend on Inductor
    dbc.optimize(pipe, cache="F1B0_W2M0MC2_T0O1_R0.35", mode="default", graph=lowering,
                 compile_options={"backend": "eager"})
    try:
        pipe(**flux_inputs(), num_inference_steps=4, generator=torch.Generator().manual_seed(0))
        before = counters["stats"]["unique_graphs"]
        out = pipe(**dict(flux_inputs(), height=48, width=48), num_inference_steps=4,
                   generator=torch.Generator().manual_seed(0)).images
        added = counters["stats"]["unique_graphs"] - before
        assert out.shape[-1] == 48
        per_step_graphs = {"cond": 1, "segments": 3, "regional": 2}[lowering]  # regional: one per block class
        assert added <= per_step_graphs, f"{added} new graphs for one new resolution"
        before = counters["stats"]["unique_graphs"]
        out = pipe(**flux_inputs(batch=2), num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
        added = counters["stats"]["unique_graphs"] - before
        assert out.shape[0] == 2 and added <= per_step_graphs, f"{added} new graphs for one new batch size"
        with torch.compiler.set_stance("fail_on_recompile"):  # back to the first shape: already compiled
            pipe(**flux_inputs(), num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    finally:
        dbc.disable(pipe)


def test_summary_reports_lowering_and_cudagraph_status(compiled_run):
    """summary() names the lowering and mode and the CUDA-graph status: 'n/a (cpu)' for cond on CPU, the emulated
    hand-captured segment graphs for regional."""
    summary = compiled_run("flux", "cond").summaries[-1]
    assert "lowering=cond" in str(summary) and "mode=default" in str(summary)
    assert summary.cudagraphs == "n/a (cpu)"
    regional = compiled_run("flux", "regional").summaries[-1]
    assert "lowering=regional" in str(regional)
    assert regional.cudagraphs.startswith("emulated by hand") and "(3 captured" in regional.cudagraphs


@pytest.mark.parametrize("config", ["F4B0_W2M0MC2_T0O1_R0.45", "F3B1_W2M0MC2_T1O2_R0.45"])
def test_cond_with_fn_ending_inside_single_blocks(config):
    """FLUX single blocks return strided slices; both cond branches must still agree on layout (regression)."""
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    run = lambda: pipe(**flux_inputs(), num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images
    dbc.optimize(pipe, cache=config)
    eager, eager_steps = run(), dbc.summary(pipe).cached_steps
    dbc.disable(pipe)
    dbc.optimize(pipe, cache=config, mode="default", graph="cond", compile_options={"backend": "eager"})
    try:
        torch.testing.assert_close(run(), eager, rtol=1e-4, atol=1e-4)
        assert dbc.summary(pipe).cached_steps == eager_steps and eager_steps
    finally:
        dbc.disable(pipe)


def test_cond_runs_steps_masks_and_fn_in_the_single_blocks_and_reconfigures_without_recompiling():
    """graph='cond' used to accept, then crash on, a steps mask (SCM: "Could not extract specialized integer from
    data-dependent expression") and an Fn reaching into FLUX's single blocks (F3 on the tiny model: "cond_true might
    be aliasing the input or the output"). Compiled with aot_eager (it checks cond's aliasing as Inductor does), one
    graph now runs both, and every other threshold / warm-up / limit / mask through reconfigure(): the eager cache's
    cached steps and images, 0 graph breaks, no recompile."""
    from torch._dynamo.utils import counters

    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    configs = ["F3B0_W1MC2_R0.6_SCM10100110", "F3B0_W0_R0.4_SCM0000000000111", "F3B0_W1I2M3MC1_R0.5", "F3B0_W2_R1.5",
               "F3B0_W0_R0", "F3B0_W3_R0.6_SCM1"]
    pipe = tiny_flux_pipeline()
    run = lambda: pipe(**flux_inputs(), num_inference_steps=9, generator=torch.Generator().manual_seed(0)).images
    eager = {}
    for config in configs:
        dbc.optimize(pipe, cache=config)
        eager[config] = run(), dbc.summary(pipe).cached_steps
        dbc.disable(pipe)
    assert eager[configs[0]][1] and eager[configs[1]][1]  # the masks leave steps to cache: the gates are exercised
    torch._dynamo.reset()
    counters.clear()
    dbc.optimize(pipe, cache=configs[0], mode="default", graph="cond", compile_options={"backend": "aot_eager"})
    try:
        for i, config in enumerate(configs + configs[:1]):
            if i:
                dbc.runtime_of(pipe).reconfigure(config)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                images = run()
            torch.testing.assert_close(images, eager[config][0], rtol=1e-4, atol=1e-4)
            assert dbc.summary(pipe).cached_steps == eager[config][1], config
        assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0
        with pytest.raises(ValueError, match="keeps the block split"):
            dbc.runtime_of(pipe).reconfigure("F2B0_W0_R0.4")
    finally:
        dbc.disable(pipe)


def test_export_traces_steps_masks_and_fn_in_the_single_blocks():
    """export() traces CacheStep.cond_step_functional with the config's gates as constants; it failed the same two
    ways as graph='cond' (the mask when tracing, the aliasing when lowering to ATen as AOTInductor does first). Now
    one cond node, and the program follows the mask: with R >= 1 every step the gates allow is a hit, so SCM0110
    gives compute, compute (mask), compute (mask), hit, hit (past the mask)."""
    from dbcache_compile.config import DBCacheConfig
    from dbcache_compile.export import capture_transformer_inputs
    from dbcache_compile.state import BranchState
    from dbcache_compile.step import CacheStep, initial_counters
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    kwargs = {k: v for k, v in capture_transformer_inputs(pipe, **flux_inputs()).items() if k != "return_dict"}
    from dbcache_compile.families import family_for
    step_fns = CacheStep(pipe.transformer, family_for(pipe.transformer),
                         DBCacheConfig.from_string("F3B0_W0_R1.5_SCM0110"))
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    class Step(torch.nn.Module):
        def forward(self, step, counters, fn_residual, ladder_h, ladder_e, *tensors):
            inputs = dict(kwargs, **dict(zip(names, tensors)))
            out, pred, _, counters, fn_residual, (ladder_h,), (ladder_e,) = step_fns.cond_step_functional(
                step, counters, fn_residual, [ladder_h], [ladder_e], **inputs)
            return out, pred, counters, fn_residual, ladder_h, ladder_e

    state = BranchState(1)
    with torch.no_grad():
        hidden, encoder, _, _ = step_fns.head(**kwargs)
        state.allocate(hidden, encoder)
        carried = [initial_counters(hidden.device), state.fn_residual, state.ladder_h[0], state.ladder_e[0]]
        tensors = [kwargs[k] for k in names]
        program = torch.export.export(Step(), (torch.tensor(0), *carried, *tensors), strict=False)
        program = program.run_decompositions()  # what AOTInductor runs first
        assert sum(n.target is torch.ops.higher_order.cond for n in program.graph.nodes) == 1
        hits = []
        for step in range(5):
            _, pred, *carried = program.module()(torch.tensor(step), *carried, *tensors)
            hits.append(bool(pred))
    assert hits == [False, False, False, True, True]


def test_uncached_compiled_baseline_on_a_pipeline():
    """optimize(cache=None, mode=...) compiles the uncached pipeline with unchanged images; summary() refuses it
    naming cache=None, and disable() removes the forward override."""
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    run = lambda: pipe(**flux_inputs(), num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    reference = run()
    dbc.optimize(pipe, cache=None, mode="default", compile_options={"backend": "eager"})
    torch.testing.assert_close(run(), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache=None"):
        dbc.summary(pipe)
    dbc.disable(pipe)
    assert "forward" not in vars(pipe.transformer)


def test_uncached_regional_baseline_compiles_two_regions_and_replays_one_graph():
    """optimize(cache=None, graph="regional"): the baseline built like the cached runs (block regions + one
    hand-captured graph of the whole forward, emulated here); disable gives the blocks their forward back."""
    from torch._dynamo.utils import counters

    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    run = lambda: pipe(**flux_inputs(), num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    reference = run()
    torch._dynamo.reset()
    counters.clear()
    dbc.optimize(pipe, cache=None, mode="default", graph="regional")
    graphs = dbc.runtime_of(pipe).use_segment_graphs(emulate=True)
    try:
        torch.testing.assert_close(run(), reference, rtol=1e-4, atol=1e-4)
        with torch.compiler.set_stance("fail_on_recompile"):
            torch.testing.assert_close(run(), reference, rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == 2 and sum(counters["graph_break"].values()) == 0
        assert graphs.captures == 1 and graphs.replays == 8
        with pytest.raises(ValueError, match="needs a cache"):
            dbc.optimize(tiny_flux_pipeline(), cache=None, mode="default", graph="cond")
    finally:
        dbc.disable(pipe)
    assert all("forward" not in vars(b) for b in pipe.transformer.single_transformer_blocks)
    assert torch.equal(run(), reference)
