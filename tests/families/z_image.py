"""Z-Image (Turbo / base): ZImageTransformer2DModel.layers over ONE unified [image, caption] sequence (block arg `x`).
Batched CFG: the pipeline passes lists of per-sample tensors; cond and uncond samples ride in one call."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, image, kl_vae

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


def tiny_zimage_controlnet_pipeline(seed: int = 0):
    """Z-Image ControlNet: a tiny ``ZImageControlNetModel`` (control layers at places 0, 1, 2: its hint for layer i is
    added after ``layers[i]``) sharing the transformer's embedders and refiners (``from_transformer``, as the
    pipeline does), in the real ``ZImageControlNetPipeline``; its hints are new tensors at every step."""
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

    base = tiny_zimage_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnet = ZImageControlNetModel(
        control_layers_places=[0, 1, 2], control_refiner_layers_places=[0], control_in_dim=4, all_patch_size=(2,),
        all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2)
    # a trained ControlNet's zero-initialised projections have learned weights: random ones, so that the hints are
    # not all zero
    for layer in controlnet.control_layers:
        for linear in (getattr(layer, "before_proj", None), layer.after_proj):
            if linear is not None:
                torch.nn.init.normal_(linear.weight, std=0.1)
    components = {k: v for k, v in base.components.items()}
    return finish(ZImageControlNetPipeline(controlnet=controlnet, **components))


def zimage_controlnet_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 8) -> dict:
    kwargs = zimage_inputs(batch, seed, cfg, tokens)
    kwargs["control_image"] = image(seed, 32)
    kwargs["controlnet_conditioning_scale"] = 1.0
    return kwargs


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
    # ControlNet hints added after layers by index (an index-added input): tests/test_index_added.py (cache-dit 1.5.3's
    # Z-Image ControlNet patch fails on diffusers 0.42.1: checked there, so no parity threshold here)
    "zimage_controlnet": Case(tiny_zimage_controlnet_pipeline, zimage_controlnet_inputs),
}
