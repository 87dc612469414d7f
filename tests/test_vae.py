"""``optimize`` compiles the pipeline's VAE decode too (``compile_vae``): images within tolerance of the uncompiled
decode, ``disable`` restores the original decode exactly, ``summary()`` says what was compiled. CPU, the tiny FLUX
pipeline's real ``AutoencoderKL``."""

import pytest
import torch

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline, tiny_qwen_pipeline
from dbcache_compile.vae import HOOK_NAME, prepare

CONFIG = "F1B0_W2M0MC2_T0O1_R0.45"
EAGER_BACKEND = {"backend": "eager"}  # Dynamo without Inductor: the wiring tests, fast


def latents(pipe):
    return torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=generator(3))


def test_compiled_decoder_matches_and_undo_restores_the_decode_exactly():
    """With Inductor (mode ``default``), the decoder runs compiled in channels_last and decodes within 1e-4 of the
    original; undo releases it, removes the hook and the registry it created, and gives the original weights'
    memory format back: the decode is then bit-identical to before."""
    pipe = tiny_flux_pipeline()
    z = latents(pipe)
    with torch.no_grad():
        before = pipe.vae.decode(z).sample
    plan = prepare(pipe, "default", True, None)
    description, undo = plan.apply()
    assert description == "AutoencoderKL.decoder compiled (default, channels_last)"
    decoder = pipe.vae.decoder
    assert decoder._diffusers_hook.get_hook(HOOK_NAME) is not None
    assert decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        compiled = pipe.vae.decode(z).sample
        again = pipe.vae.decode(z).sample
    torch.testing.assert_close(compiled, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled, again)
    undo()
    assert not hasattr(decoder, "_diffusers_hook") and "forward" not in vars(decoder)
    assert all(p.is_contiguous() for p in decoder.parameters())
    with torch.no_grad():
        assert torch.equal(pipe.vae.decode(z).sample, before)


def test_optimize_compiles_the_vae_when_asked_reports_it_and_disable_removes_it():
    """``compile_vae=True`` compiles the pipeline's AutoencoderKL decoder with the transformer's compile options
    (here Dynamo's eager backend); summary() names it; the pipeline's images equal an uncompiled VAE's; disable()
    removes it. By default (``None``) only a VAE on CUDA is compiled: on this CPU the VAE is left alone, as with
    ``compile_vae=False``; eager optimize compiles nothing."""
    pipe = tiny_flux_pipeline()
    run = lambda: pipe(**flux_inputs(), num_inference_steps=6, generator=generator()).images  # noqa: E731
    dbc.optimize(pipe, cache=CONFIG, mode="default", compile_options=EAGER_BACKEND)
    reference = run()
    summary = dbc.summary(pipe)
    assert summary.vae is None and "VAE: not compiled" in str(summary)
    dbc.disable(pipe)
    dbc.optimize(pipe, cache=CONFIG, mode="default", compile_options=EAGER_BACKEND, compile_vae=True)
    summary = dbc.summary(pipe)
    assert summary.vae == "AutoencoderKL.decoder compiled (backend eager, channels_last)"
    assert "VAE: AutoencoderKL.decoder compiled" in str(summary)
    assert summary.recipe == "torchao_flags=off, gemm_autotune=n/a (mode=default)"
    torch.testing.assert_close(run(), reference, rtol=1e-5, atol=1e-5)
    dbc.disable(pipe)
    assert not hasattr(pipe.vae.decoder, "_diffusers_hook")
    assert all(p.is_contiguous() for p in pipe.vae.parameters())
    dbc.optimize(pipe, cache=CONFIG)
    assert dbc.summary(pipe).vae is None and dbc.summary(pipe).recipe is None
    dbc.disable(pipe)


def test_compile_vae_errors_and_other_vaes():
    """``compile_vae=True`` without a mode, on a bare transformer, or a value that is not a bool / mode: clear
    errors before anything changes. A VAE class outside the tested ones (Qwen-Image's) is left alone by default,
    and compiled when asked by name."""
    pipe = tiny_flux_pipeline()
    with pytest.raises(ValueError, match="needs a compile mode"):
        dbc.optimize(pipe, cache=CONFIG, compile_vae=True)
    with pytest.raises(ValueError, match="no VAE decoder to compile on a bare transformer"):
        dbc.optimize(pipe.transformer, cache=CONFIG, mode="default", compile_vae=True)
    with pytest.raises(ValueError, match="compile_vae must be"):
        dbc.optimize(pipe, cache=CONFIG, mode="default", compile_vae="fast")
    assert not hasattr(pipe.vae.decoder, "_diffusers_hook") and not hasattr(pipe.transformer, "_diffusers_hook")
    qwen = tiny_qwen_pipeline()
    dbc.optimize(qwen, cache=CONFIG, mode="default", compile_options=EAGER_BACKEND)
    assert dbc.summary(qwen).vae is None
    dbc.disable(qwen)
    dbc.optimize(qwen, cache=CONFIG, mode="default", compile_options=EAGER_BACKEND, compile_vae=True)
    assert dbc.summary(qwen).vae.startswith("AutoencoderKLQwenImage.decoder compiled")
    dbc.disable(qwen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default VAE compile is for CUDA (no GPU here)")
def test_default_compiles_the_vae_on_cuda():
    """On CUDA with a CUDA-graph mode, ``optimize`` compiles the AutoencoderKL decoder by default (Inductor's
    default kernels, no cudagraph trees): the decode stays within bf16 tolerance of the original, the pipeline runs
    through it, and ``disable`` restores the original decode exactly."""
    pipe = tiny_flux_pipeline().to("cuda", torch.bfloat16)
    z = latents(pipe).to("cuda", torch.bfloat16)
    with torch.no_grad():
        before = pipe.vae.decode(z).sample
    inputs = {k: v.to("cuda", torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    dbc.optimize(pipe, cache=CONFIG, mode="reduce-overhead")
    assert dbc.summary(pipe).vae == "AutoencoderKL.decoder compiled (default, channels_last)"
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.decode(z).sample, before, rtol=0, atol=3e-2)
    images = pipe(**inputs, num_inference_steps=6, generator=torch.Generator("cuda").manual_seed(0)).images
    assert torch.isfinite(images).all()
    dbc.disable(pipe)
    assert not hasattr(pipe.vae.decoder, "_diffusers_hook")
    with torch.no_grad():
        assert torch.equal(pipe.vae.decode(z).sample, before)
