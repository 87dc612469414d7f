"""The kernel recipe (``optimize(recipe=...)``): each part switchable, its Inductor options reach this library's
compiles only, at the (lazy) compile of each graph, and never the user's process."""

import pytest
import torch

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.recipe import (DEFAULT, FULL, OPTIONS_KEY, TORCHAO_FLAGS, KernelRecipe, compile_options,
                                    torch_compile_args)
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

CONFIG = "F1B0_W2M0MC2_T0O1_R0.45"


def test_parts_become_inductor_options_per_mode():
    """``torchao_flags`` adds torchao 0.18's recommended flags; ``gemm_autotune=False`` takes GEMMs (and scaled_mm)
    off max-autotune's search but keeps its pointwise tuning, and means nothing without a max-autotune mode; the
    options ride in the compile options under a private key and become ``torch.compile(options=...)`` with the
    mode's own options (cudagraph trees, max_autotune) merged in, the user's ``options`` kept."""
    assert KernelRecipe.coerce(None) is DEFAULT and KernelRecipe.coerce("full") is FULL
    assert KernelRecipe.coerce({"gemm_autotune": False}) == KernelRecipe(gemm_autotune=False)
    assert DEFAULT.inductor_options("max-autotune") == {}
    assert FULL.inductor_options("reduce-overhead") == TORCHAO_FLAGS
    assert TORCHAO_FLAGS["coordinate_descent_check_all_directions"] and TORCHAO_FLAGS["force_fuse_int_mm_with_mul"]
    off = KernelRecipe(gemm_autotune=False)
    assert off.inductor_options("default") == {}
    assert off.inductor_options("max-autotune-no-cudagraphs") == {"max_autotune": False, "max_autotune_gemm": False,
                                                                   "max_autotune_pointwise": True}
    assert compile_options(DEFAULT, "max-autotune", {"dynamic": True}) == {"dynamic": True}
    assert compile_options(FULL, None, None) is None
    assert compile_options(FULL, "default", {"backend": "eager"}) == {"backend": "eager"}
    attached = compile_options(off, "max-autotune", None)
    assert attached == {OPTIONS_KEY: off.inductor_options("max-autotune")}
    args = torch_compile_args({**attached, "mode": "max-autotune-no-cudagraphs", "fullgraph": True,
                               "options": {"epilogue_fusion": False}})
    assert "mode" not in args and args["fullgraph"] is True
    assert args["options"] == {"coordinate_descent_tuning": True, "epilogue_fusion": False, "max_autotune": False,
                               "max_autotune_gemm": False, "max_autotune_pointwise": True}
    assert torch_compile_args({"mode": "default"}) == {"mode": "default"}
    with pytest.raises(ValueError, match="unknown part"):
        KernelRecipe.coerce({"autotune": True})
    with pytest.raises(ValueError, match="not torch._inductor.config options"):
        KernelRecipe.coerce({"inductor": {"no_such_flag": 1}})
    with pytest.raises(ValueError, match="must be True or False"):
        KernelRecipe.coerce(KernelRecipe(torchao_flags=1))
    with pytest.raises(ValueError, match="recipe must be"):
        dbc.optimize(tiny_flux_pipeline(), cache=CONFIG, recipe="fast")


def test_recipe_options_apply_while_our_graphs_compile_and_nowhere_else():
    """Real Inductor compiles on a CPU (``regional``: one region per FLUX block class): a post-grad pass added
    through the recipe runs inside each of our graphs' compiles, which happen at the first pipeline call (lazily),
    and sees torchao's flags set there; the process-wide Inductor config stays untouched before, during the user's
    own later ``torch.compile`` (the pass is not called for it) and after. summary() shows the recipe."""
    from torch._inductor import config

    seen = []

    def probe(graph: torch.fx.Graph) -> None:
        seen.append((config.coordinate_descent_tuning, config.coordinate_descent_check_all_directions,
                     config.triton.unique_kernel_names))

    pipe = tiny_flux_pipeline()
    recipe = KernelRecipe(torchao_flags=True, inductor={"post_grad_custom_post_pass": probe})
    dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional", recipe=recipe, compile_vae=False)
    assert seen == []  # nothing compiled yet
    assert not config.coordinate_descent_check_all_directions
    out = pipe(**flux_inputs(), num_inference_steps=4, generator=generator()).images
    assert torch.isfinite(out).all()
    assert len(seen) == 2 and all(flags == (True, True, True) for flags in seen)  # two block classes, both patched
    assert not config.coordinate_descent_tuning and not config.coordinate_descent_check_all_directions
    assert config.post_grad_custom_post_pass is None
    summary = dbc.summary(pipe)
    assert summary.recipe.startswith("torchao_flags=on, gemm_autotune=n/a (mode=default), inductor={")
    user = torch.compile(lambda x: torch.relu(x) * 2)
    user(torch.randn(8))
    assert len(seen) == 2
    dbc.disable(pipe)


@pytest.mark.parametrize("gemm_autotune", [True, False])
def test_block_regions_under_max_autotune_tune_scaled_mm_unless_switched_off(gemm_autotune):
    """A block region compiled as ``optimize(mode="max-autotune")`` compiles it (``max-autotune-no-cudagraphs``:
    the segments are captured by hand) sends an fp8 ``torch._scaled_mm`` through Inductor's tuned lowering with
    ``max_autotune`` on, so its GEMM templates are benchmarked (on a GPU; a CPU offers ATen alone);
    ``gemm_autotune=False`` compiles the same region with max_autotune off and pointwise tuning kept."""
    from torch._dynamo.utils import counters
    from torch._inductor import config

    from dbcache_compile.compiled import CompiledSet, regional_options
    seen = []
    recipe = KernelRecipe(gemm_autotune=gemm_autotune, inductor={
        "post_grad_custom_post_pass": lambda graph: seen.append((config.max_autotune, config.max_autotune_pointwise,
                                                                 config.triton.cudagraphs))})
    options = regional_options({**compile_options(recipe, "max-autotune", None), "mode": "max-autotune",
                                "fullgraph": True})

    def region(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledSet().compile("region", region, options)
    a = torch.randn(64, 128).to(torch.float8_e4m3fn)
    b = torch.randn(256, 128).to(torch.float8_e4m3fn).t()
    scale_a, scale_b = torch.rand(64, 1) + 0.5, torch.rand(1, 256) + 0.5  # per-row scales
    torch.testing.assert_close(compiled(a, b, scale_a, scale_b), region(a, b, scale_a, scale_b))
    assert "aten._scaled_mm.default_64_256_128" in counters["aten_mm_info"]
    # (max_autotune, max_autotune_pointwise, cudagraph trees) while the region compiled
    assert seen == [(True, False, False) if gemm_autotune else (False, True, False)]
