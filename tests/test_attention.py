"""``optimize(attention="auto")``: the fastest exact diffusers attention backend, measured once through diffusers'
real dispatch for the first call's attention shape, cached on disk, never a numerics-changing one unless asked
(CPU: the CPU backends; the CUDA candidates run in ``python -m bench gpu``)."""

import json

import pytest
import torch

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.attention import (APPROXIMATE, CPU_CANDIDATES, ENV_CACHE, Auto, attention_shape, measure,
                                       pick)
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

CONFIG = "F1B0_W2M0MC2_T0O1_R0.45"


def run(pipe):
    return pipe(**flux_inputs(), num_inference_steps=6, generator=generator()).images


def test_auto_measures_at_the_first_call_caches_the_choice_and_disable_resets_it(tmp_path, monkeypatch):
    """On a CPU ``auto`` times the CPU backends (``native``, ``_native_math``) through
    ``diffusers.models.attention_dispatch.dispatch_attention_fn`` at the first call, for the model's joint attention
    shape (batch, heads, image + text tokens, head dim), sets the fastest on every attention processor, and writes
    the measurement (times, error against float32 SDPA) to the cache file ``$DBCACHE_COMPILE_ATTENTION_CACHE``; a
    second optimize reads it without measuring. Images and cached steps equal the model's own backend's;
    ``disable`` resets the backend and leaves no hook."""
    cache = tmp_path / "attention.json"
    monkeypatch.setenv(ENV_CACHE, str(cache))
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG)
    reference, steps = run(pipe), dbc.summary(pipe).cached_steps
    dbc.disable(pipe)

    dbc.optimize(pipe, cache=CONFIG, attention="auto")
    assert not cache.exists() and dbc.summary(pipe).attention == "auto (chosen at the first call)"
    out = run(pipe)
    summary = dbc.summary(pipe)
    choice = summary.attention.split()[0]
    assert choice in CPU_CANDIDATES and "auto:" in summary.attention and "cached" not in summary.attention
    processor = pipe.transformer.transformer_blocks[0].attn.processor
    assert processor._attention_backend == choice
    assert summary.cached_steps == steps
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    table = json.loads(cache.read_text())
    (key, entry), = table.items()
    config = pipe.transformer.config
    inputs = flux_inputs()
    latent = pipe.vae_scale_factor * 2  # FLUX packs 2x2 latent patches into one token
    tokens = (inputs["height"] // latent) * (inputs["width"] // latent) + inputs["prompt_embeds"].shape[1]
    assert f"|float32|1x{config.num_attention_heads}x{tokens}x{config.attention_head_dim}|" in key
    assert entry["choice"] == choice and set(entry["ms"]) == set(CPU_CANDIDATES) and not entry["skipped"]
    assert all(err < 1e-5 for err in entry["rel_l2"].values())
    assert entry["psnr_vs_sdpa_db"]["native"] is None  # identical to itself
    assert all(db is None or db > 80 for db in entry["psnr_vs_sdpa_db"].values())
    dbc.disable(pipe)
    assert processor._attention_backend is None and not pipe.transformer._forward_pre_hooks

    written = cache.read_text()
    dbc.optimize(pipe, cache=CONFIG, attention="auto")
    run(pipe)
    assert dbc.summary(pipe).attention.startswith(f"{choice} (auto, cached:")
    assert cache.read_text() == written
    dbc.disable(pipe)


def test_auto_with_a_shape_measures_at_optimize_and_explicit_names_are_checked(tmp_path):
    """``Auto(shape=...)`` measures inside ``optimize`` (the backend is set before the first call); bad shapes, a
    GPU-only backend on a CPU and unknown names are clear errors, and a refused call leaves nothing behind."""
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG, attention=Auto(shape=(1, 2, 72, 16), cache=tmp_path / "a.json", repeats=3))
    assert dbc.summary(pipe).attention.split()[0] in CPU_CANDIDATES
    assert pipe.transformer.transformer_blocks[0].attn.processor._attention_backend in CPU_CANDIDATES
    dbc.disable(pipe)
    with pytest.raises(ValueError, match=r"\(batch, heads, tokens, head_dim\)"):
        dbc.optimize(pipe, cache=CONFIG, attention=Auto(shape=(1, 2, 72)))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        dbc.optimize(pipe, cache=CONFIG, attention="_native_cudnn")
    with pytest.raises(ValueError, match="diffusers attention backend"):
        dbc.optimize(pipe, cache=CONFIG, attention="fastest")
    assert not pipe.transformer._forward_pre_hooks and "forward" not in vars(pipe.transformer)


def test_numerics_changing_backends_are_picked_only_when_asked_and_unavailable_ones_are_reported():
    """The pick: fastest first, ties by preference order; SageAttention's int8/fp8 kernels win only with
    ``approximate=True`` (or by name). Through the real dispatch on a CPU, backends that cannot run here (GPU-only,
    package missing) are reported with diffusers' reason instead of failing the measurement."""
    ms = {"_native_cudnn": 1.0, "_native_flash": 1.0, "native": 1.3, "sage": 0.6}
    order = ("_native_cudnn", "_native_flash", "native") + APPROXIMATE
    assert pick(ms, False, order) == "_native_cudnn"
    assert pick(ms, True, order) == "sage"
    with pytest.raises(ValueError, match="approximate=True"):
        pick({"sage": 0.5}, False, order)
    result = measure((1, 2, 40, 16), torch.float32, torch.device("cpu"), repeats=2,
                     names=("native", "_native_flash", "sage"))
    assert result.choice == "native" and set(result.ms) == {"native"}
    assert "CUDA" in result.skipped["_native_flash"] or "float16" in result.skipped["_native_flash"]
    assert "sage" in result.skipped["sage"].lower()


def test_attention_shape_follows_the_first_call():
    """The shape ``auto`` measures: FLUX's packed tokens plus its text tokens (joint attention), at the call's batch
    and dtype."""
    pipe = tiny_flux_pipeline()
    hidden = torch.randn(2, 64, 16)
    shape, dtype = attention_shape(pipe.transformer, (), {"hidden_states": hidden,
                                                          "encoder_hidden_states": torch.randn(2, 8, 32)})
    config = pipe.transformer.config
    assert shape == (2, config.num_attention_heads, 72, config.attention_head_dim) and dtype == torch.float32
