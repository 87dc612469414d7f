"""FLUX.1 (the tiny pipeline of :mod:`dbcache_compile.testing`) and FLUX.1 Kontext: the FLUX.1 transformer; Kontext
appends the reference image's tokens to the hidden sequence."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

from . import Case
from ._common import finish, flux_like_transformer, gen, image, kl_vae

FAMILY = "flux"


def tiny_flux_kontext_pipeline(seed: int = 0):
    """FLUX.1 Kontext: the FLUX.1 transformer; the reference image's tokens are appended to the hidden sequence."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = flux_like_transformer(FluxTransformer2DModel, pooled_projection_dim=16, guidance_embeds=True)
    return finish(FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(), text_encoder=None,
                                      tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer))


def flux_kontext_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 8) -> dict:
    """``max_area`` and ``_auto_resize=False`` keep output and reference image at 32x32 (the pipeline would rescale
    both to ~1 MP)."""
    g = gen(seed + 14000)
    kwargs = {"image": image(seed, 32), "prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 16, generator=g), "height": 32, "width": 32,
              "output_type": "pt", "guidance_scale": 2.5, "max_area": 32 * 32, "_auto_resize": False}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
        kwargs["true_cfg_scale"] = 2.0
    return kwargs


CASES = {
    # the tiny FLUX.1 of dbcache_compile.testing: the graph records' "flux" scenario (graphs/flux-<lowering>.json)
    # and test_parity's model
    "flux": Case(tiny_flux_pipeline, flux_inputs, threshold=0.35),
    "flux_kontext": Case(tiny_flux_kontext_pipeline, flux_kontext_inputs, threshold=0.35),
    # FLUX.1 Kontext with true CFG: 2 calls per step without a cache context (told apart by their conditioning
    # tensors), the Flux adapter says has_separate_cfg=False
    "flux_kontext_true_cfg": Case(tiny_flux_kontext_pipeline, partial(flux_kontext_inputs, cfg=True), threshold=0.35,
                                  separate_cfg=True),
}
