"""The user's own torch.compile / transformer.compile() / torch.export around an optimized transformer
(dbcache_compile.usercompile, README "Your own torch.compile / export"): what cannot work is refused with our named
message, under Dynamo with and without fullgraph and under torch.export strict and non-strict, never Dynamo's bare
"Observed exception"; after a refusal the unwrapped transformer still runs the cache unchanged."""

import pytest
import torch

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.usercompile import UserCompileError
from families import CASES

CONFIG = "F1B0_W2M0MC2_T0O1_R0.4"
#: the named message of a refused trace of the cache (dbcache_compile.usercompile.REASONS["cache"])
NAMED = "dbcache_compile: torch.compile / transformer.compile() / torch.export around a transformer optimized"

#: two prologue families (whole steps in our forward) and two hook families (blocks hooked in the model's forward)
FAMILIES = ["flux", "qwen_image", "sd3", "wan"]


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


@pytest.fixture(scope="module", params=FAMILIES)
def optimized(request):
    case = CASES[request.param]
    pipe = case.builder()
    kwargs = first_call(pipe, case.inputs())
    dbc.optimize(pipe, cache=CONFIG)
    yield request.param, pipe, kwargs
    dbc.disable(pipe)
    torch._dynamo.reset()


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


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_the_users_compile_around_an_eager_optimized_transformer_is_refused_by_name(optimized, wrap):
    """Every wrap of an eagerly optimized transformer (prologue and hook families) fails with our message: under
    fullgraph / strict export as Dynamo's Unsupported naming the reason, otherwise as UserCompileError."""
    family, pipe, kwargs = optimized
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        WRAPS[wrap](pipe.transformer, kwargs)
    text = str(info.value)
    assert NAMED in text and "dbcache_compile.optimize(pipe, cache=..., mode=" in text, text[:600]
    assert "Observed exception" not in text
    expected = (torch._dynamo.exc.Unsupported if wrap in ("compile_fullgraph", "module_compile", "export_strict")
                else UserCompileError)
    assert isinstance(info.value, expected), type(info.value)


def test_after_a_refused_wrap_the_transformer_runs_the_cache_unchanged(optimized):
    """A refused trace leaves no state behind: the same call, unwrapped, equals a call on a freshly reset runtime."""
    family, pipe, kwargs = optimized
    dbc.reset(pipe)
    expected = pipe.transformer(**kwargs)[0]
    for wrap in ("compile_fullgraph", "compile"):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="dbcache_compile: torch.compile"):
            WRAPS[wrap](pipe.transformer, kwargs)
    dbc.reset(pipe)
    assert torch.equal(pipe.transformer(**kwargs)[0], expected)


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
