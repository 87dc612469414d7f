"""Hand-captured segment graphs (dbcache_compile.cudagraphs): the capture/replay bookkeeping on CPU with the
emulated graph, the same checks with real CUDA graphs when CUDA exists, the regional lowering on CUDA (graphs
captured, one device-to-host sync per step whose gates allow a hit, images equal to eager), and the host side of
that sync rule on CPU (one decision read per free step, none on forced steps)."""

import warnings

import pytest
import torch

import dbcache_compile as dbc
from dbcache_compile.cudagraphs import SegmentGraphs

CUDA = torch.cuda.is_available()
DEVICES = ["cpu-emulated"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="real CUDA graphs need a CUDA device (none here)")


def _setup(device_name):
    device = "cuda" if device_name == "cuda" else "cpu"
    return SegmentGraphs(emulate=device == "cpu"), device


def _step(state, x):  # a "miss": updates the static state in place, returns a new tensor
    state.add_(x)
    return state * 2


@pytest.mark.parametrize("device_name", DEVICES)
def test_warmup_leaves_no_trace_and_outputs_are_static(device_name):
    """Capturing a segment leaves no trace of its warm-up calls in the cache state, and each replay writes into the
    same captured output tensor (one capture, then replays)."""
    graphs, device = _setup(device_name)
    state = torch.zeros(4, device=device)
    graphs.mark_static([state])
    out = graphs("step", _step, (state, torch.ones(4, device=device)), mutated=[state])
    # two warm-up calls ran (and an emulated capture): only the replay may have updated the state
    assert state.tolist() == [1.0] * 4 and out.tolist() == [2.0] * 4
    out2 = graphs("step", _step, (state, torch.full((4,), 3.0, device=device)), mutated=[state])
    assert out2 is out, "a replay writes into the captured output; callers must copy what they keep"
    assert state.tolist() == [4.0] * 4 and out.tolist() == [8.0] * 4
    assert graphs.captures == 1 and graphs.replays == 2


@pytest.mark.parametrize("device_name", DEVICES)
def test_static_tensors_are_read_in_place_and_dynamic_inputs_copied(device_name):
    """Static tensors (cache state, captured outputs) are read in place by later segments without copies, while new
    input tensors are copied into the graph's own inputs."""
    graphs, device = _setup(device_name)
    state = torch.zeros(4, device=device)
    graphs.mark_static([state])
    head = graphs("head", lambda x: x + 1, (torch.ones(4, device=device),))
    # a captured output is static for the next segment: no copy, the same storage
    graphs("miss", _step, (state, head), mutated=[state])
    entry = next(e for key, e in graphs.entries.items() if key[0] == "miss")
    assert entry.dynamic == [] and entry.inputs[1] is head
    # a new input tensor is copied into the graph-owned one: the graph sees its values
    graphs("head", lambda x: x + 1, (torch.full((4,), 5.0, device=device),))
    assert head.tolist() == [6.0] * 4
    graphs("miss", _step, (state, head), mutated=[state])
    assert state.tolist() == [2.0 + 6.0] * 4


@pytest.mark.parametrize("device_name", DEVICES)
def test_new_shape_or_constant_captures_a_new_graph(device_name):
    """A call with a new input shape or a new non-tensor constant captures a new graph; an identical call replays
    the existing one."""
    graphs, device = _setup(device_name)
    fn = lambda x, scale: x * scale  # noqa: E731
    graphs("f", fn, (torch.ones(4, device=device), 2.0))
    graphs("f", fn, (torch.ones(4, device=device), 2.0))
    assert graphs.captures == 1
    graphs("f", fn, (torch.ones(8, device=device), 2.0))
    graphs("f", fn, (torch.ones(4, device=device), 3.0))
    assert graphs.captures == 3


def _count_syncs(fn):
    """Run ``fn`` with torch's CUDA sync debug mode on; return (result, number of synchronizing calls)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # only the per-operation warning: switching the mode on also warns once per process that the mode "is a
    # prototype feature" (which a substring "synchroniz" would count as a sync of the first step measured)
    return result, sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@needs_cuda
@pytest.mark.parametrize("graph", ["regional", "segments"])
def test_cuda_graphs_on_cuda_with_one_sync_per_free_step(graph):
    """On CUDA with reduce-overhead (the test is about capture, not kernels): every step is a few CUDA-graph replays
    (head, miss, hit hand-captured: 3 graphs, whether the blocks are compiled regions or the segments compiled
    whole), a step whose gates allow a hit reads the device exactly once, a forced step never, and the cached steps
    and images equal the eager runtime's."""
    from torch._dynamo.utils import counters

    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    config = "F1B0_W2M0MC2_T1O1_R0.35"
    steps = 10
    pipe = tiny_flux_pipeline().to("cuda")
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    run = lambda: pipe(**inputs, num_inference_steps=steps,  # noqa: E731
                       generator=torch.Generator("cuda").manual_seed(0)).images
    dbc.optimize(pipe, cache=config)
    reference, ref_summary = run(), dbc.summary(pipe)
    dbc.disable(pipe)

    torch._dynamo.reset()
    counters.clear()
    dbc.optimize(pipe, cache=config, mode="reduce-overhead", graph=graph)
    try:
        run()  # compile and capture
        transformer = pipe.transformer
        runtime = dbc.runtime_of(transformer)
        forward = transformer.forward
        syncs = []

        def counting_forward(*args, **kwargs):
            out, n = _count_syncs(lambda: forward(*args, **kwargs))
            syncs.append(n)
            return out

        transformer.forward = counting_forward
        with torch.compiler.set_stance("fail_on_recompile"):
            images = run()
        transformer.forward = forward
        summary = dbc.summary(pipe)
        assert summary.cached_steps == ref_summary.cached_steps and summary.cached_steps
        torch.testing.assert_close(images, reference, rtol=2e-3, atol=2e-3)
        free_steps = sorted(ref_summary.residual_diffs)  # the steps whose gates allowed a hit (a diff was read)
        assert syncs == [1 if step in free_steps else 0 for step in range(steps)], syncs
        assert summary.cudagraphs.startswith("captured by hand") and runtime.graphs.captures == 3
    finally:
        dbc.disable(pipe)


#: families that run their own forward, on CPU with emulated graphs (one per shape of the chain layout: one list
#: with only a hidden stream, batched CFG, two chains, two chains with both streams); on CUDA every such family
FAMILY_GRAPH_CASES = ["wan", "sd35", "flux2", "hunyuan_video"]


def _family_graph_cases():
    from families import RECORDS, case_family
    names = [n for n in RECORDS if not case_family(n).has_prologue]
    cases = [("cpu-emulated", name) for name in FAMILY_GRAPH_CASES]
    return cases + ([("cuda", name) for name in names] if CUDA else [])


@pytest.mark.parametrize("device_name, family", _family_graph_cases())
def test_every_family_replays_hand_captured_group_graphs_on_its_hits(device_name, family):
    """A family that runs its own forward: each group of blocks (the Fn group, a list's middle group on a computed
    step, the cached residual on a hit, the Bn group) is one hand-captured graph, so a cached step is a few graph
    replays around the model's own glue; images equal eager, the same cached steps, hits replayed from graphs.
    (On CUDA: real CUDA graphs of Dynamo-traced regions, every family; on CPU: the emulated bookkeeping.)"""
    from families import CASES

    device = "cuda" if device_name == "cuda" else "cpu"
    case = CASES[family]
    builder, make_inputs = case.builder, case.inputs
    config = f"F1B0_W2M0MC2_T0O1_R{case.record}"

    def run(pipe):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make_inputs().items()}
        return pipe(**inputs, num_inference_steps=6, generator=torch.Generator(device).manual_seed(0))[0]

    pipe = builder().to(device)
    dbc.optimize(pipe, cache=config)
    reference, ref_summary = run(pipe), dbc.summary(pipe)
    dbc.disable(pipe)
    dbc.optimize(pipe, cache=config, mode="default", graph="regional", compile_options={"backend": "eager"})
    try:
        runtime = dbc.runtime_of(pipe)
        if not runtime.grouped:
            pytest.skip(f"{family} runs block by block (ungroupable): no group graphs")
        graphs = runtime.use_segment_graphs(emulate=device == "cpu")
        run(pipe)  # capture
        replays = graphs.replays
        images, summary = run(pipe), dbc.summary(pipe)
        assert (summary.cached_steps, summary.cfg_cached_steps) == (ref_summary.cached_steps,
                                                                    ref_summary.cfg_cached_steps)
        assert summary.cached_steps or summary.cfg_cached_steps, "the record threshold must make the run hit"
        hits = [key for key in graphs.entries if ".hit" in key[0]]
        assert hits and graphs.replays > replays and summary.cudagraphs.startswith(
            "emulated by hand" if device == "cpu" else "captured by hand")
        torch.testing.assert_close(images, reference, rtol=1e-4, atol=1e-4)
    finally:
        dbc.disable(pipe)


@needs_cuda
def test_uncached_baseline_on_cuda_is_one_hand_captured_graph():
    """On CUDA, optimize(cache=None, mode='reduce-overhead') picks the regional lowering and captures the whole
    uncached forward as one real CUDA graph, with images matching eager."""
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    pipe = tiny_flux_pipeline().to("cuda")
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    run = lambda: pipe(**inputs, num_inference_steps=6,  # noqa: E731
                       generator=torch.Generator("cuda").manual_seed(0)).images
    reference = run()
    torch._dynamo.reset()
    dbc.optimize(pipe, cache=None, mode="reduce-overhead")  # auto: regional on CUDA
    try:
        run()
        images = run()
        runtime = dbc.runtime_of(pipe)
        assert runtime.regional_blocks and runtime.graphs.captures == 1 and not runtime.graphs.emulate
        torch.testing.assert_close(images, reference, rtol=2e-3, atol=2e-3)
    finally:
        dbc.disable(pipe)


@needs_cuda
def test_device_move_and_model_cpu_offload_on_cuda():
    """On a real GPU: a pipeline optimized and run on the CPU, then moved with pipe.to("cuda"), caches on CUDA with
    hand-captured graphs and the eager cache's image; enable_model_cpu_offload() runs regional without CUDA graphs
    (weights back on the CPU between calls, same image twice), and with a CUDA-graph mode is refused (graphs would
    replay the addresses of weights the offload has moved)."""
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    config = "F1B0_W2M0MC2_T0O1_R0.4"
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    run = lambda p: p(**inputs, num_inference_steps=6,  # noqa: E731
                      generator=torch.Generator("cuda").manual_seed(0)).images
    reference_pipe = tiny_flux_pipeline().to("cuda")
    dbc.optimize(reference_pipe, cache=config)
    reference, reference_steps = run(reference_pipe), dbc.summary(reference_pipe).cached_steps
    dbc.disable(reference_pipe)
    del reference_pipe
    torch._dynamo.reset()

    moved = tiny_flux_pipeline()
    dbc.optimize(moved, cache=config, mode="reduce-overhead", graph="regional")
    try:
        moved(**flux_inputs(), num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # on the CPU
        moved.to("cuda")
        torch.testing.assert_close(run(moved), reference, rtol=2e-3, atol=2e-3)
        assert dbc.summary(moved).cached_steps == reference_steps and dbc.runtime_of(moved).graphs.captures >= 3
    finally:
        dbc.disable(moved)
    del moved
    torch._dynamo.reset()

    offloaded = tiny_flux_pipeline()
    offloaded.enable_model_cpu_offload(device="cuda")
    with pytest.raises(ValueError, match="enable_model_cpu_offload\\(\\) with mode='reduce-overhead'"):
        dbc.optimize(offloaded, cache=config, mode="reduce-overhead", graph="regional")
    dbc.optimize(offloaded, cache=config, mode="max-autotune-no-cudagraphs", graph="regional")
    try:
        for _ in range(2):
            torch.testing.assert_close(run(offloaded), reference, rtol=2e-3, atol=2e-3)
            assert next(offloaded.transformer.parameters()).device.type == "cpu"  # offloaded after the call
    finally:
        dbc.disable(offloaded)


# last in the file: a failed capture may leave the CUDA context unusable for later tests in the process
@needs_cuda
def test_a_host_sync_inside_a_segment_fails_capture_with_a_clear_error():
    """A host sync inside a segment makes CUDA-graph capture fail with a RuntimeError naming the segment."""
    graphs = SegmentGraphs()
    with pytest.raises(RuntimeError, match="capturing the 'bad' segment"):
        graphs("bad", lambda x: x * float(x.sum().item()), (torch.ones(4, device="cuda"),))


@pytest.mark.parametrize("graph", ["eager", "regional"])
def test_one_decision_read_per_free_step_and_none_when_forced(monkeypatch, graph):
    """The host side of the sync rule, on CPU: one device read per step whose gates allow a hit, none on steps the
    warm-up (W2) or the MC2 limit force to compute. (The CUDA test above counts the real syncs.)"""
    import dbcache_compile.step as step_module
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    reads = []
    real_read = step_module.read_decision_sync
    monkeypatch.setattr(step_module, "read_decision_sync", lambda p, d: reads.append(1) or real_read(p, d))
    pipe = tiny_flux_pipeline()
    if graph == "eager":
        dbc.optimize(pipe, cache="F1B0_W2M0MC2_T1O1_R0.45")
    else:
        dbc.optimize(pipe, cache="F1B0_W2M0MC2_T1O1_R0.45", mode="default", graph="regional",
                     compile_options={"backend": "eager"})
        dbc.runtime_of(pipe).use_segment_graphs(emulate=True)
    forward, per_call = pipe.transformer.forward, []

    def counting_forward(*args, **kwargs):
        before = len(reads)
        out = forward(*args, **kwargs)
        per_call.append(len(reads) - before)
        return out

    pipe.transformer.forward = counting_forward
    try:
        pipe(**flux_inputs(), num_inference_steps=10, generator=torch.Generator().manual_seed(0))
        cached = set(dbc.summary(pipe).cached_steps)
    finally:
        pipe.transformer.forward = forward
        dbc.disable(pipe)
    forced = [s < 2 or (s - 1 in cached and s - 2 in cached) for s in range(10)]
    assert any(forced[2:]), "the scenario must hit the MC2 limit"
    assert per_call == [0 if f else 1 for f in forced]
