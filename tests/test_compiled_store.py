"""The process-wide store of compiled functions (dbcache_compile.compiled): an optimize -> generate -> disable sweep
of configs compiles once, another pipeline of the same model class and config reuses the graphs, the store is
bounded and can be cleared, and summary() says what was reused."""

import gc

import pytest
import torch

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.compiled import STORE
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline, tiny_qwen_pipeline, qwen_inputs

#: twelve configs with one block split: thresholds, warm-up, cached-step limits and the steps mask change
SWEEP = ["F1B0_W2M0MC2_R0.6", "F1B0_W2M0MC3_R0.35", "F1B0_W3M0MC2_R0.4", "F1B0_W2M4MC2_R0.45",
         "F1B0_W4M0MC1_R0.3", "F1B0_W2M0MC4_R0.5", "F1B0_W3M3MC2_R0.25", "F1B0_W2M0MC2_R0.3",
         "F1B0_W1M0MC2_R0.35", "F1B0_W2M5MC3_R0.4", "F1B0_W3M0MC3_R0.5", "F1B0_W2M0MC1_R0.2_SCM11001"]


def run(pipe, steps=6):
    return pipe(**flux_inputs(), num_inference_steps=steps, generator=generator()).images


@pytest.fixture(autouse=True)
def empty_store():
    dbc.clear_compiled()
    yield
    dbc.clear_compiled()


@pytest.mark.parametrize("graph", ["segments", "regional"])
def test_a_config_sweep_compiles_once(graph):
    """Twelve optimize -> generate -> disable cycles that change only the threshold, W, M, MC or the steps mask: no
    Dynamo graph is compiled after the first cycle (which computes and hits, so every segment compiles; each cycle
    used to compile ~2.7 new graphs), and the later cycles' images equal a fresh eager run of their config."""
    from torch._dynamo.utils import counters

    pipe = tiny_flux_pipeline()
    graphs_after = []
    for i, config in enumerate(SWEEP):
        dbc.optimize(pipe, cache=config, mode="default", graph=graph, compile_options={"backend": "eager"})
        images = run(pipe)
        summary = dbc.summary(pipe)
        dbc.disable(pipe)
        graphs_after.append(counters["stats"]["unique_graphs"])
        if i:
            assert summary.compiled_graphs["compiled"] == 0 and summary.compiled_graphs["reused"] > 0, (i, summary)
            assert "reused from the compile store" in str(summary)
        if i in (1, len(SWEEP) - 1):
            dbc.optimize(pipe, cache=config)
            assert torch.equal(run(pipe), images) and dbc.summary(pipe).cached_steps == summary.cached_steps
            dbc.disable(pipe)
    assert len(set(graphs_after[1:])) == 1, graphs_after


def test_another_pipeline_of_the_same_model_class_and_config_reuses_the_graphs():
    """A second pipeline built from the same transformer class and config (other weights) takes the first one's
    graphs (the weights are graph inputs) and computes its own image."""
    first, second = tiny_flux_pipeline(seed=0), tiny_flux_pipeline(seed=1)
    for pipe in (first, second):
        dbc.optimize(pipe, cache=SWEEP[0], mode="default", graph="segments", compile_options={"backend": "eager"})
    try:
        run(first)
        image = run(second)
        assert dbc.summary(second).compiled_graphs == {"reused": 3, "compiled": 0}
    finally:
        dbc.disable(first)
        dbc.disable(second)
    dbc.optimize(second, cache=SWEEP[0])
    assert torch.equal(run(second), image)
    dbc.disable(second)


def test_another_model_or_block_split_compiles_its_own_graphs():
    """The store's key holds what changes a graph: another block split or another model class compiles anew (the
    shared block regions excepted: they depend on the block class only)."""
    pipe = tiny_flux_pipeline()
    for config, reused in (("F1B0_W2M0MC2_R0.6", 0), ("F2B1_W2M0MC2_R0.6", 0), ("F1B0_W2M0MC3_R0.5", 3)):
        dbc.optimize(pipe, cache=config, mode="default", graph="segments", compile_options={"backend": "eager"})
        run(pipe)
        assert dbc.summary(pipe).compiled_graphs["reused"] == reused, config
        dbc.disable(pipe)
    qwen = tiny_qwen_pipeline()
    dbc.optimize(qwen, cache="F1B0_W2M0MC2_R0.3", mode="default", graph="segments",
                 compile_options={"backend": "eager"})
    qwen(**qwen_inputs(), num_inference_steps=4, generator=generator())
    assert dbc.summary(qwen).compiled_graphs["reused"] == 0
    dbc.disable(qwen)


def test_the_store_is_bounded_and_cleared():
    """The store keeps at most compile_store_limit() compiled functions (least recently used dropped first, their
    graphs released); clear_compiled() empties it; a limit of 0 keeps nothing and disable() then drops the runtime's
    graphs; a bad limit is a clear error."""
    limit = dbc.compile_store_limit()
    pipe = tiny_flux_pipeline()
    try:
        dbc.compile_store_limit(2)
        dbc.optimize(pipe, cache=SWEEP[0], mode="default", graph="segments", compile_options={"backend": "eager"})
        run(pipe)
        assert len(STORE) == 2
        dbc.disable(pipe)
        dbc.clear_compiled()
        assert len(STORE) == 0
        dbc.compile_store_limit(0)
        dbc.optimize(pipe, cache=SWEEP[0], mode="default", graph="segments", compile_options={"backend": "eager"})
        run(pipe)
        items = list(dbc.runtime_of(pipe).impl.compiled_fns.items)
        assert len(STORE) == 0 and sum(c.graphs for c in items) == 3
        dbc.disable(pipe)
        gc.collect()
        assert sum(c.graphs for c in items) == 0
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="limit must be an int >= 0"):
                dbc.compile_store_limit(bad)
    finally:
        dbc.compile_store_limit(limit)


def test_blocks_of_one_class_but_another_structure_get_their_own_region():
    """A block region is keyed by the block's structure, not only its class (``step.block_structure``): SD3's last
    block (``context_pre_only``) and SD3.5's dual-attention blocks are ``JointTransformerBlock`` s built otherwise.
    Keyed by class, every structure of every model in the process was a guard failure of one compiled function, so
    a process running SD3 and SD3.5 (the test suite's order found it) ran out of that function's recompile budget and
    ran blocks uncompiled (``compile_fallbacks``). With a budget of 2 recompiles both models now run compiled."""
    from tests.families import CASES
    from dbcache_compile.step import block_structure

    dbc.clear_compiled()
    with torch._dynamo.config.patch(recompile_limit=2):
        for name in ("sd3", "sd35"):
            case = CASES[name]
            pipe = case.builder()
            blocks = list(pipe.transformer.transformer_blocks)
            assert len({block_structure(b) for b in blocks}) >= 2  # the last block at least differs
            dbc.optimize(pipe, cache="F1B0_W2M0MC2_R0.3", mode="default", graph="regional",
                         compile_options={"backend": "eager"})
            pipe(**case.inputs(), num_inference_steps=4, generator=generator())
            assert dbc.summary(pipe).compile_fallbacks == {}, name
            dbc.disable(pipe)
    dbc.clear_compiled()
