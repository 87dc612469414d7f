"""torchao quantization stacked with the cache (CPU: int8 variants; fp8 on CUDA only)."""

import pytest
import torch

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.quantize import default_filter
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

CONFIG = "F1B0_W2M0MC2_T0O1_R0.45"


def run(pipe, steps=10):
    return pipe(**flux_inputs(), num_inference_steps=steps, generator=generator()).images


def test_default_filter_keeps_embedders_modulation_and_output_in_full_precision():
    """The default quantization filter picks the attention and MLP linears inside the blocks and keeps embedders,
    norm/modulation linears and the output projection in full precision."""
    pipe = tiny_flux_pipeline()
    keep = default_filter(("transformer_blocks", "single_transformer_blocks"))
    chosen = [n for n, m in pipe.transformer.named_modules() if keep(m, n)]
    assert "transformer_blocks.0.attn.to_q" in chosen and "single_transformer_blocks.0.proj_mlp" in chosen
    assert "single_transformer_blocks.0.proj_out" in chosen  # the block's own output linear is a main matmul
    assert not any("norm" in n or n.startswith(("x_embedder", "context_embedder", "time_text_embed", "proj_out"))
                   for n in chosen)


@pytest.mark.parametrize("name", ["int8", "int8-wo"])
def test_int8_eager_cache_stays_close_to_full_precision(name):
    """quantize='int8' / 'int8-wo' keeps the cache's decisions, stays within 0.05 of full precision, shows in
    summary(), and disable() warns the weights stay quantized."""
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG)
    reference = run(pipe)
    cached_steps = dbc.summary(pipe).cached_steps
    dbc.disable(pipe)
    dbc.optimize(pipe, cache=CONFIG, quantize=name)
    quantized = run(pipe)
    summary = dbc.summary(pipe)
    assert summary.quantized.startswith(f"{name} (") and "quantized=" in str(summary)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight.data) is not torch.Tensor
    assert summary.cached_steps == cached_steps
    assert not torch.equal(quantized, reference)
    torch.testing.assert_close(quantized, reference, atol=0.05, rtol=0)
    with pytest.warns(UserWarning, match="stays quantized"):
        dbc.disable(pipe)


def test_int8_compiles_with_cache_without_graph_breaks_and_matches_eager_quantized():
    """segments and regional (cond cannot take tensor-subclass weights: a clear error)."""
    from torch._dynamo.utils import counters

    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG, quantize="int8")
    eager = run(pipe)
    eager_steps = dbc.summary(pipe).cached_steps
    with pytest.warns(UserWarning):
        dbc.disable(pipe)
    torch._dynamo.reset()
    counters.clear()
    with pytest.raises(NotImplementedError, match="torch.cond has no rule for tensor subclasses"):
        dbc.optimize(pipe, cache=CONFIG, mode="default", graph="cond")
    dbc.optimize(pipe, cache=CONFIG, mode="default")  # auto picks segments for quantized weights
    compiled = run(pipe)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = run(pipe)
    summary = dbc.summary(pipe)
    assert summary.lowering == "segments" and summary.cached_steps == eager_steps
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 3
    torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=0)
    assert torch.equal(compiled, again)
    with pytest.warns(UserWarning):
        dbc.disable(pipe)
    # regional: int8 blocks as regions, segment graphs emulated (as captured by hand on CUDA)
    torch._dynamo.reset()
    counters.clear()
    dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional")
    dbc.runtime_of(pipe).use_segment_graphs(emulate=True)
    regional = run(pipe)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(run(pipe), regional)
    assert dbc.summary(pipe).cached_steps == eager_steps
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(regional, eager, atol=2e-3, rtol=0)
    with pytest.warns(UserWarning):
        dbc.disable(pipe)


def test_quantize_errors_are_clear():
    """Bad quantize requests (fp8 without a capable GPU, unknown name, a filter selecting nothing, nothing to do)
    raise clear ValueErrors and quantize nothing."""
    pipe = tiny_flux_pipeline()
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*Use quantize='int8'"):
        dbc.optimize(pipe, cache=CONFIG, mode="max-autotune", quantize="fp8")
    with pytest.raises(ValueError, match=r"one of \('fp8', 'fp8-row', 'fp8-tensor', 'fp8-mix', 'fp8-wo', 'int8', "
                                         r"'int8-wo'\)"):
        dbc.optimize(pipe, cache=CONFIG, quantize="int4")
    with pytest.raises(ValueError, match="selected no linear"):
        dbc.optimize(pipe, cache=CONFIG, quantize="int8", quantize_filter=lambda m, n: False)
    with pytest.raises(ValueError, match="would do nothing"):
        dbc.optimize(pipe, cache=None)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight.data) is torch.Tensor


def test_fp8_granularities_are_named_configs_and_the_mix_is_a_per_layer_plan():
    """``"fp8"`` is ``"fp8-row"`` (per-row scales, the measured default), ``"fp8-tensor"`` one scale per tensor,
    ``"fp8-mix"`` a plan: per-tensor for every attention Q/K/V projection (separate or fused, image and text streams),
    per-row for every other linear the filter selects (planned on the real tiny FLUX without quantizing: torchao
    refuses fp8 activations off a capable GPU). Every fp8 name is refused on a CPU with the reason and what to use."""
    from torchao.quantization import PerRow, PerTensor

    from dbcache_compile.quantize import QuantizationPlan, named_config, plan_layers
    def kinds(config):  # torchao normalizes the granularity to (activation, weight)
        return {type(g) for g in config.granularity}

    row, tensor = named_config("fp8"), named_config("fp8-tensor")
    assert kinds(row) == kinds(named_config("fp8-row")) == {PerRow} and kinds(tensor) == {PerTensor}
    assert not row.set_inductor_config and not tensor.set_inductor_config
    mix = named_config("fp8-mix")
    assert isinstance(mix, QuantizationPlan)
    assert [kinds(r.config) for r in mix.rules] == [{PerTensor}, {PerRow}]
    pipe = tiny_flux_pipeline()
    keep = default_filter(("transformer_blocks", "single_transformer_blocks"))
    plan = plan_layers(pipe.transformer, mix, keep)
    assert set(plan) == {n for n, m in pipe.transformer.named_modules() if keep(m, n)}
    per_tensor = {n for n, label in plan.items() if "per-tensor" in label}
    assert per_tensor == {n for n in plan if n.rsplit(".", 1)[-1] in
                          ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    assert "transformer_blocks.0.attn.add_k_proj" in per_tensor and "single_transformer_blocks.0.attn.to_v" in per_tensor
    assert plan["transformer_blocks.0.ff.net.2"] == plan["single_transformer_blocks.0.proj_mlp"] == "fp8 per-row"
    pipe.transformer.fuse_qkv_projections()
    fused = plan_layers(pipe.transformer, mix, lambda m, n: keep(m, n) and n.endswith(("to_qkv", "to_added_qkv")))
    assert fused and all("per-tensor" in label for label in fused.values())
    for name in ("fp8-row", "fp8-tensor", "fp8-mix"):
        with pytest.raises(ValueError, match=rf"quantize='{name}' needs a CUDA GPU.*on cpu\. Use quantize='int8'"):
            dbc.optimize(tiny_flux_pipeline(), cache=CONFIG, mode="max-autotune", quantize=name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 needs a CUDA GPU with compute capability >= 8.9 (none here)")
@pytest.mark.parametrize("graph,quantize", [("regional", "fp8"), ("segments", "fp8"), ("regional", "fp8-tensor"),
                                            ("regional", "fp8-mix")])
def test_fp8_compiled_on_gpu(graph, quantize):
    """fp8 on a capable GPU is refused without a compile mode; with reduce-overhead (regional or segments) it
    caches, gives finite images and captures CUDA graphs; per-tensor and the per-layer mix too."""
    pipe = tiny_flux_pipeline().to("cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="without torch.compile"):
        dbc.optimize(pipe, cache=CONFIG, quantize=quantize)
    dbc.optimize(pipe, cache=CONFIG, mode="reduce-overhead", quantize=quantize, graph=graph)
    inputs = {k: v.to("cuda", torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    out = pipe(**inputs, num_inference_steps=10, generator=torch.Generator("cuda").manual_seed(0)).images
    summary = dbc.summary(pipe)
    assert torch.isfinite(out).all() and summary.cached_steps and summary.lowering == graph
    assert summary.cudagraphs.startswith("captured"), summary.cudagraphs


def test_a_rejected_optimize_leaves_the_transformer_untouched():
    """An optimize() rejected for its quantize filter applies no attention backend, QKV fusion or forward override,
    so the pipeline can still be optimized."""
    pipe = tiny_flux_pipeline()
    attn = pipe.transformer.transformer_blocks[0].attn
    with pytest.raises(ValueError, match="selected no linear"):
        dbc.optimize(pipe, cache=CONFIG, quantize="int8", quantize_filter=lambda m, n: False, attention="native")
    with pytest.raises(ValueError, match="selected no linear"):
        dbc.optimize(pipe, cache=CONFIG, quantize="int8", quantize_filter=lambda m, n: False, fuse_qkv=True)
    assert not getattr(attn, "fused_projections", False) and not hasattr(attn, "to_qkv")
    assert "forward" not in vars(pipe.transformer)
    dbc.optimize(pipe, cache=CONFIG)  # and it can still be optimized
    dbc.disable(pipe)
