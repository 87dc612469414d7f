"""Z-Image (Turbo / base): ZImageTransformer2DModel.layers over ONE unified [image, caption] sequence (block arg `x`).
Batched CFG: the pipeline passes lists of per-sample tensors; cond and uncond samples ride in one call."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, kl_vae

FAMILY = "z-image"
ZIMAGE_BLOCKS = 4


def tiny_zimage_pipeline(seed: int = 0):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=ZIMAGE_BLOCKS,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    return finish(ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=kl_vae(),
                                 text_encoder=None, tokenizer=None, transformer=transformer))


def zimage_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 8) -> dict:
    """Z-Image-Turbo runs without CFG (guidance_scale 0); ``cfg=True`` is the base model's batched CFG."""
    g = gen(seed + 8000)
    kwargs = {"prompt_embeds": [torch.randn(tokens, 16, generator=g) for _ in range(batch)],
              "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 4.0 if cfg else 0.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = [torch.randn(tokens - 2, 16, generator=g) for _ in range(batch)]
    return kwargs


CASES = {
    "zimage": Case(tiny_zimage_pipeline, zimage_inputs, threshold=0.8, record=0.8),
    # Z-Image base with CFG: cond + uncond as one batched call (list inputs)
    "zimage_cfg": Case(tiny_zimage_pipeline, partial(zimage_inputs, cfg=True)),
}
