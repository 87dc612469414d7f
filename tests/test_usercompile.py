"""The user's own torch.compile / transformer.compile() / torch.export around an optimized transformer
(dbcache_compile.usercompile, README "Your own torch.compile / export").

* Families with a prologue (FLUX.1, Qwen-Image) trace the cache step in its fullgraph form (torch.cond, device
  counters, the bookkeeping in two custom ops): the same cached steps and images as optimize(graph="cond"), one graph,
  0 graph breaks, no recompile across steps, branches or generations (diffusers' TorchCompileTesterMixin pattern:
  fullgraph=True + error_on_recompile=True; dynamic=True with other shapes).
* What cannot work is refused with our named message, under Dynamo with and without fullgraph and under torch.export
  strict and non-strict, never Dynamo's bare "Observed exception": hook families (SD3, Wan), torch.export, dynamic=True
  without specialize_float, a compiled uncached baseline, a user-compiled hooked block."""

import copy
import dataclasses

import pytest
import torch

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.usercompile import UserCompileError
from families import CASES

CONFIG = "F1B0_W2M0MC2_T0O1_R0.4"
#: the named messages (dbcache_compile.usercompile.REASONS)
NAMED_UNGROUPABLE = "cannot trace the cache of this family: its forward feeds each block of a list"
NAMED_EXPORT = "dbcache_compile: torch.export around a transformer optimized by dbcache_compile is not supported"

#: two prologue families (whole steps in our forward), two hook families (blocks hooked in the model's forward) and
#: the one family whose block lists cannot run a middle group whole (Family.ungroupable)
PROLOGUE, HOOKS, UNGROUPABLE = ["flux", "qwen_image"], ["sd3", "wan"], ["chroma"]


class _Stop(Exception):
    pass


def first_call(pipe, inputs, steps=2):
    """The keyword arguments of the pipeline's first transformer call (captured before optimize)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs, **dict(zip(("hidden_states",), args)))
        raise _Stop

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            pipe(**inputs, num_inference_steps=steps, generator=generator(0))
    finally:
        handle.remove()
    seen["return_dict"] = False
    return seen


def _optimized(family):
    case = CASES[family]
    pipe = case.builder()
    kwargs = first_call(pipe, case.inputs())
    dbc.optimize(pipe, cache=CONFIG)
    yield family, pipe, kwargs
    dbc.disable(pipe)
    torch._dynamo.reset()


@pytest.fixture(scope="module", params=PROLOGUE + HOOKS + UNGROUPABLE)
def optimized(request):
    yield from _optimized(request.param)


@pytest.fixture(scope="module", params=UNGROUPABLE)
def ungroupable(request):
    yield from _optimized(request.param)


def _compile_fullgraph(t, kwargs):
    return torch.compile(t, backend="eager", fullgraph=True)(**kwargs)


def _compile(t, kwargs):
    return torch.compile(t, backend="eager")(**kwargs)


def _module_compile(t, kwargs):
    t.compile(backend="eager", fullgraph=True)
    try:
        return t(**kwargs)
    finally:
        t._compiled_call_impl = None


def _export(strict):
    def export(t, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
        return torch.export.export(t, (), kwargs, strict=strict)
    return export


WRAPS = {"compile_fullgraph": _compile_fullgraph, "compile": _compile, "module_compile": _module_compile,
         "export_strict": _export(True), "export_nonstrict": _export(False)}
FULLGRAPH = ("compile_fullgraph", "module_compile", "export_strict")


def _refused(wrap, t, kwargs, named):
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        WRAPS[wrap](t, kwargs)
    text = str(info.value)
    assert named in text, text[:800]
    assert "Observed exception" not in text
    expected = torch._dynamo.exc.Unsupported if wrap in FULLGRAPH else UserCompileError
    assert isinstance(info.value, expected), type(info.value)
    return text


@pytest.mark.parametrize("wrap", ["compile_fullgraph", "compile", "module_compile"])
def test_the_users_compile_of_an_ungroupable_family_is_refused_by_name(ungroupable, wrap):
    """Chroma feeds each block a modulation of its own (no middle group can be one torch.cond): every compile wrap
    fails with our message (fullgraph: Dynamo's Unsupported showing the reason; otherwise UserCompileError),
    pointing at optimize(mode=...)."""
    family, pipe, kwargs = ungroupable
    text = _refused(wrap, pipe.transformer, kwargs, NAMED_UNGROUPABLE)
    assert "dbcache_compile.optimize(pipe, cache=..., mode=" in text


@pytest.mark.parametrize("wrap", ["export_strict", "export_nonstrict"])
def test_torch_export_around_an_optimized_transformer_is_refused_by_name(optimized, wrap):
    """torch.export (strict and non-strict) of every family points at dbcache_compile.export."""
    family, pipe, kwargs = optimized
    text = _refused(wrap, pipe.transformer, kwargs, NAMED_EXPORT)
    assert "dbcache_compile.export(pipe" in text


def test_after_a_refused_wrap_the_transformer_runs_the_cache_unchanged(optimized):
    """A refused trace leaves no state behind: the same call, unwrapped, equals a call on a freshly reset runtime."""
    family, pipe, kwargs = optimized
    dbc.reset(pipe)
    expected = pipe.transformer(**kwargs)[0]
    for wrap in ("export_strict", "export_nonstrict") + (("compile_fullgraph", "compile") if family in UNGROUPABLE
                                                         else ()):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="dbcache_compile: torch."):
            WRAPS[wrap](pipe.transformer, kwargs)
    dbc.reset(pipe)
    assert torch.equal(pipe.transformer(**kwargs)[0], expected)


# ------------------------------------------------------------------------------------------------ the fullgraph form
def _inputs(family, same_lengths=True):
    kwargs = CASES[family].inputs()
    if family == "qwen_image" and same_lengths:
        # a negative prompt as long as the prompt: one static shape for both branches (with dynamic=False another
        # length is another graph, whatever the cache does; the dynamic test keeps the different lengths)
        g = generator(5)
        kwargs["negative_prompt_embeds"] = torch.randn(1, 7, 16, generator=g)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(1, 7, dtype=torch.long)
    return kwargs


def _run(pipe, family, steps=8, seed=0, same_lengths=True, **overrides):
    return pipe(**dict(_inputs(family, same_lengths), **overrides), num_inference_steps=steps,
                generator=generator(seed))[0]


@pytest.fixture(scope="module", params=PROLOGUE)
def cond_reference(request):
    """optimize(graph="cond") (backend eager): the images and per-branch cached steps the user's compile must give."""
    case = CASES[request.param]
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG, mode="default", graph="cond", compile_options={"backend": "eager"})
    try:
        image = _run(pipe, request.param)
        return request.param, image, dbc.summary(pipe).branches
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


def _wrap_pipeline(pipe, how, **options):
    if how == "module_compile":
        pipe.transformer.compile(backend="eager", fullgraph=True, **options)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True, **options)


@pytest.mark.parametrize("how", ["torch_compile", "module_compile", "torch_compile_before_optimize"])
def test_the_users_fullgraph_compile_runs_the_cond_step(cond_reference, how):
    """FLUX.1 and Qwen-Image (true CFG: the cond and uncond cache contexts) under
    torch.compile(transformer, fullgraph=True) / transformer.compile(fullgraph=True) around an eager optimize (or a
    torch.compile wrapper given to optimize: the hooks go on the module inside): the same
    cached steps per branch and bit-identical images as optimize(graph="cond"); one graph, 0 graph breaks, and
    error_on_recompile holds over two whole generations (no recompile per step or per branch)."""
    from torch._dynamo.utils import counters

    family, expected, branches = cond_reference
    pipe = CASES[family].builder()
    torch._dynamo.reset()
    counters.clear()
    if how == "torch_compile_before_optimize":  # optimize takes the module inside the wrapper
        _wrap_pipeline(pipe, "torch_compile")
        dbc.optimize(pipe, cache=CONFIG)
    else:
        dbc.optimize(pipe, cache=CONFIG)
        _wrap_pipeline(pipe, how)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                image = _run(pipe, family)
                assert dbc.summary(pipe).branches == branches
                assert torch.equal(image, expected)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


def _counting_backend(conds):
    def backend(gm, example_inputs):
        conds.append(sum(node.target is torch.ops.higher_order.cond for node in gm.graph.nodes))
        return gm.forward
    return backend


@pytest.mark.parametrize("family", HOOKS + ["flux_own_forward", "wan_module_compile"])
def test_the_users_fullgraph_compile_of_a_hook_family_runs_a_cond_per_middle_group(family):
    """SD3, Wan (true CFG) and FLUX.1 through its own forward (two block lists) under torch.compile(transformer,
    fullgraph=True) (Wan also transformer.compile(fullgraph=True)) around an eager optimize, compiled before any eager
    step: the model's forward traced, one
    torch.cond per block list's middle group (SD3, Wan: 1; FLUX.1: 2), the same cached steps per branch as the eager
    cache and its images (<= 1e-4: the middle group runs whole), one graph, 0 graph breaks, no recompile over two
    generations."""
    from torch._dynamo.utils import counters

    how = "module_compile" if family.endswith("_module_compile") else "torch_compile"
    family = family.removesuffix("_module_compile")
    case = CASES["flux" if family == "flux_own_forward" else family]
    options = {"prologue": False} if family == "flux_own_forward" else {}
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG, **options)
    expected = pipe(**case.inputs(), num_inference_steps=8, generator=generator(0))[0]
    branches = dbc.summary(pipe).branches
    dbc.disable(pipe)
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG, **options)
    torch._dynamo.reset()
    counters.clear()
    conds = []
    if how == "module_compile":
        pipe.transformer.compile(backend=_counting_backend(conds), fullgraph=True)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=_counting_backend(conds), fullgraph=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                image = pipe(**case.inputs(), num_inference_steps=8, generator=generator(0))[0]
                assert dbc.summary(pipe).branches == branches
                torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)
        assert conds == [2 if family == "flux_own_forward" else 1]
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", PROLOGUE + HOOKS)
def test_dynamic_shapes_under_the_users_compile_need_no_recompile(family):
    """dynamic=True (with specialize_float, see the next test): a generation at another resolution runs the same graph
    (error_on_recompile) with the cached steps and image of the eager cache (<= 1e-4); Qwen-Image's negative prompt
    has another length than its prompt (the uncond branch: the same graph too). Duck sizing is off: the
    tiny pipelines' sizes coincide at 32 px and Dynamo would guard on that (not ours)."""
    case = CASES[family]
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG)
    expected = _run(pipe, family, same_lengths=False, height=48, width=48)
    branches = dbc.summary(pipe).branches
    torch._dynamo.reset()
    _wrap_pipeline(pipe, "torch_compile", dynamic=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True, specialize_float=True), \
                torch.fx.experimental._config.patch(use_duck_shape=False):
            _run(pipe, family, steps=3, same_lengths=False)
            image = _run(pipe, family, same_lengths=False, height=48, width=48)
        assert dbc.summary(pipe).branches == branches
        torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


def test_dynamic_without_specialize_float_is_refused_by_name():
    """dynamic=True makes the blocks' float attributes symbolic, which torch.cond cannot take (torch 2.13): our message
    names the fix instead of torch.cond's operand assertion."""
    case = CASES["flux"]
    pipe = case.builder()
    kwargs = first_call(pipe, case.inputs())
    dbc.optimize(pipe, cache=CONFIG)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(specialize_float=False):
            with pytest.raises(torch._dynamo.exc.Unsupported, match="specialize_float = True"):
                torch.compile(pipe.transformer, backend="eager", fullgraph=True, dynamic=True)(**kwargs)
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


class _Interrupt(Exception):
    pass


_FAIL = {"at": -1, "calls": 0}


@torch.library.custom_op("dbcache_compile_test::fail_at", mutates_args=())
def _fail_at(x: torch.Tensor) -> torch.Tensor:
    """Raises at its ``_FAIL["at"]``-th call (an error at run time inside a compiled graph)."""
    _FAIL["calls"] += 1
    if _FAIL["calls"] == _FAIL["at"]:
        raise _Interrupt
    return x.clone()


@_fail_at.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_interrupted_generation_under_the_users_compile_leaves_the_next_bit_identical():
    """README "When a generation starts" under the user's compile: a generation that a callback interrupts (and one
    whose transformer call raised at run time, inside the compiled graph) is followed by one bit-identical to the
    first, with the same cached steps; no recompile."""
    case = CASES["flux"]
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG)
    torch._dynamo.reset()
    _wrap_pipeline(pipe, "torch_compile")

    def interrupt(pipeline, i, t, kwargs):
        if i == 4:
            raise _Interrupt
        return kwargs

    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            expected = _run(pipe, "flux")
            branches = dbc.summary(pipe).branches
            with pytest.raises(_Interrupt):
                _run(pipe, "flux", seed=3, callback_on_step_end=interrupt)
            assert torch.equal(_run(pipe, "flux"), expected) and dbc.summary(pipe).branches == branches
            # a call that raises between user_begin and user_end (at run time, inside the graph): an op on block 0
            block = pipe.transformer._orig_mod.transformer_blocks[0]
            _FAIL["at"], _FAIL["calls"] = 5, 0

            def fail_at(module, args, kwargs):
                return args, dict(kwargs, hidden_states=torch.ops.dbcache_compile_test.fail_at(kwargs["hidden_states"]))

            handle = block.register_forward_pre_hook(fail_at, with_kwargs=True)
        torch._dynamo.reset()  # the hook changes the graph: a compile of its own
        try:
            with pytest.raises(_Interrupt):
                _run(pipe, "flux", seed=3)
        finally:
            handle.remove()
        torch._dynamo.reset()
        assert torch.equal(_run(pipe, "flux"), expected) and dbc.summary(pipe).branches == branches
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", HOOKS)
def test_an_interrupted_generation_of_a_hook_family_under_the_users_compile_leaves_the_next_bit_identical(family):
    """The generation rule through the model's own forward, compiled: a generation a callback interrupts is followed
    by one bit-identical to the first, with the same cached steps per branch; no recompile."""
    case = CASES[family]
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)

    def interrupt(pipeline, i, t, kwargs):
        if i == 4:
            raise _Interrupt
        return kwargs

    def run(**extra):
        return pipe(**case.inputs(), num_inference_steps=8, generator=generator(0), **extra)[0]

    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            expected = run()
            branches = dbc.summary(pipe).branches
            with pytest.raises(_Interrupt):
                run(callback_on_step_end=interrupt)
            assert torch.equal(run(), expected) and dbc.summary(pipe).branches == branches
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


def test_a_bare_transformer_loop_under_the_users_compile_keeps_the_generation_rule():
    """A bare transformer in the user's own loop, compiled: the generation continues while the same conditioning
    tensors come back (the eager cache's cached steps), a call that raised inside the compiled graph ends it (the next
    call with the same conditioning starts a fresh generation: bit-identical outputs), new conditioning starts one;
    one graph throughout."""
    from torch._dynamo.utils import counters

    case = CASES["flux"]
    pipe = case.builder()
    kwargs = first_call(pipe, case.inputs())
    block = pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(
        lambda m, a, kw: (a, dict(kw, hidden_states=torch.ops.dbcache_compile_test.fail_at(kw["hidden_states"]))),
        with_kwargs=True)
    _FAIL["at"], _FAIL["calls"] = -1, 0
    g = torch.Generator().manual_seed(3)
    base, drift = (torch.randn(kwargs["hidden_states"].shape, generator=g) for _ in range(2))
    latents = [base + 0.02 * i * drift for i in range(6)]  # close steps, as a sampler's: the cache hits
    times = [torch.tensor([1.0 - i / 6]) for i in range(6)]

    def loop(t, n=6):
        return [t(**dict(kwargs, hidden_states=x, timestep=s))[0] for x, s in list(zip(latents, times))[:n]]

    dbc.optimize(pipe, cache=CONFIG)
    try:
        eager = loop(pipe.transformer)
        cached = dbc.summary(pipe).cached_steps
        assert cached
        dbc.reset(pipe)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            expected = loop(compiled)  # the cond form: the eager cache's decisions, its outputs within float rounding
            assert dbc.summary(pipe).cached_steps == cached
            for a, b in zip(expected, eager):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            loop(compiled, 3)  # the same conditioning tensors: this would continue the generation (steps 6..8)
            assert dbc.summary(pipe).num_steps == 9
            _FAIL["at"], _FAIL["calls"] = 1, 0
            with pytest.raises(_Interrupt):
                compiled(**dict(kwargs, hidden_states=latents[0], timestep=times[0]))
            assert all(torch.equal(a, b) for a, b in zip(loop(compiled), expected))
            kwargs = dict(kwargs, encoder_hidden_states=kwargs["encoder_hidden_states"].clone())  # a new prompt
            assert all(torch.equal(a, b) for a, b in zip(loop(compiled), expected))
            assert dbc.summary(pipe).num_steps == 6
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        handle.remove()
        dbc.disable(pipe)
        torch._dynamo.reset()


@pytest.mark.parametrize("graph", ["segments", "regional"])
def test_the_users_compile_around_a_compiled_optimize_runs_the_fullgraph_form(cond_reference, graph):
    """Whatever lowering optimize chose, under the user's compile the fullgraph form runs (the lowering's own graphs
    are not traced): the same cached steps and image as optimize(graph="cond")."""
    family, expected, branches = cond_reference
    pipe = CASES[family].builder()
    dbc.optimize(pipe, cache=CONFIG, mode="default", graph=graph, compile_options={"backend": "eager"})
    torch._dynamo.reset()
    _wrap_pipeline(pipe, "torch_compile")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            image = _run(pipe, family)
        assert dbc.summary(pipe).branches == branches and torch.equal(image, expected)
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_inputs_added_between_blocks_are_refused_by_name_under_the_users_compile(family):
    """A call passing an input the model's forward adds to the hidden stream between blocks (Family.index_added:
    SD3 ControlNet, Wan VACE; block_residual_inputs: FLUX.1 / Qwen-Image ControlNet) is refused by name under the
    user's compile: the traced forms do not run them (simulated here by naming a passed input so)."""
    case = CASES[family]
    pipe = case.builder()
    kwargs = first_call(pipe, case.inputs())
    dbc.optimize(pipe, cache=CONFIG)
    runtime = dbc.runtime_of(pipe)
    if family == "wan":
        runtime.index_added = ("encoder_hidden_states",)
    else:
        runtime.family_record = copy.copy(runtime.family_record)
        runtime.family_record.block_residual_inputs = ("pooled_projections",)
    try:
        text = _refused("compile_fullgraph", pipe.transformer, kwargs, "add to the hidden stream between the blocks")
        assert "dbcache_compile.optimize(pipe, cache=..., mode=...)" in text
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


def test_quantized_weights_under_the_users_compile_are_refused_by_name():
    """torch.cond rejects torchao tensor-subclass weights (torch 2.11-2.14): a quantized optimize under the user's
    compile is refused by name before torch.cond's own error (simulated: the runtime's record of the quantization)."""
    case = CASES["flux"]
    pipe = case.builder()
    kwargs = first_call(pipe, case.inputs())
    dbc.optimize(pipe, cache=CONFIG)
    dbc.runtime_of(pipe).applied = dataclasses.replace(dbc.runtime_of(pipe).applied, quantized="int8-wo")
    try:
        _refused("compile_fullgraph", pipe.transformer, kwargs, "rejects tensor-subclass (torchao) weights")
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


def test_the_users_compile_around_the_uncached_baseline_is_refused_by_name():
    """optimize(cache=None, mode=...) already compiles the forward: a second compile around it is refused by name."""
    case = CASES["flux"]
    pipe = case.builder()
    kwargs = first_call(pipe, case.inputs())
    dbc.optimize(pipe, cache=None, mode="default", compile_options={"backend": "eager"})
    try:
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match="optimize\\(cache=None, ...\\)"):
            torch.compile(pipe.transformer, backend="eager", fullgraph=True)(**kwargs)
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


@pytest.mark.parametrize("family", HOOKS)
def test_blocks_compiled_in_place_after_an_eager_optimize_run_under_the_cache(family):
    """compile_repeated_blocks() (Wan) / block.compile() on every block (SD3 declares no _repeated_blocks) with
    fullgraph=True after an eager optimize: the cache runs around each compiled block (its hook passes through inside
    the compiled call), the same cached steps and bit-identical images, 0 graph breaks, one graph per block
    structure (Wan: 1; SD3: 2, its last block is context_pre_only) and no recompile across blocks, steps or
    generations (error_on_recompile for Wan); disable() gives the blocks the user's compiled call back."""
    from torch._dynamo.utils import counters

    from dbcache_compile.usercompile import CompiledBlockCall

    case = CASES[family]
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG)
    expected = pipe(**case.inputs(), num_inference_steps=8, generator=generator(0))[0]
    branches = dbc.summary(pipe).branches
    t = pipe.transformer
    blocks = list(getattr(t, "blocks", None) or t.transformer_blocks)
    torch._dynamo.reset()
    counters.clear()
    if t._repeated_blocks:
        t.compile_repeated_blocks(backend="eager", fullgraph=True)
    else:
        for block in blocks:
            block.compile(backend="eager", fullgraph=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=family == "wan"):
            for _ in range(2):
                image = pipe(**case.inputs(), num_inference_steps=8, generator=generator(0))[0]
                assert torch.equal(image, expected) and dbc.summary(pipe).branches == branches
        assert counters["stats"]["unique_graphs"] == (1 if family == "wan" else 2) and not counters["graph_break"]
        assert all(isinstance(b._compiled_call_impl, CompiledBlockCall) for b in blocks)
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()
    assert all(b._compiled_call_impl is not None and not isinstance(b._compiled_call_impl, CompiledBlockCall)
               for b in blocks)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_a_hooked_block_compiled_by_the_user_is_refused_by_name(fullgraph):
    """A hook family's block wrapped by torch.compile (our block hook inside it) is refused by name; blocks compiled
    in place (compile_repeated_blocks) are refused before the generation starts (test_runtime)."""
    case = CASES["sd3"]
    pipe = case.builder()
    dbc.optimize(pipe, cache=CONFIG)
    blocks = pipe.transformer.transformer_blocks
    original = blocks[1]
    blocks[1] = torch.compile(original, backend="eager", fullgraph=fullgraph)
    try:
        torch._dynamo.reset()
        with pytest.raises(Exception, match="compile_repeated_blocks\\(\\)") as info:
            pipe(**case.inputs(), num_inference_steps=2, generator=generator(0))
        assert "Observed exception" not in str(info.value)
    finally:
        blocks[1] = original
        dbc.disable(pipe)
        torch._dynamo.reset()
