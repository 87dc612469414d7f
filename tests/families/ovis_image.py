"""Ovis-Image: OvisImageTransformer2DModel, FLUX-like double and single blocks."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, flux_like_transformer, kl_vae, text_inputs

FAMILY = "ovis-image"


def tiny_ovis_image_pipeline(seed: int = 0):
    from diffusers import OvisImagePipeline, OvisImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = flux_like_transformer(OvisImageTransformer2DModel, out_channels=16)
    return finish(OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(), text_encoder=None,
                                    tokenizer=None, transformer=transformer))


def ovis_image_inputs(batch: int = 1, seed: int = 0, cfg: bool = True) -> dict:
    kwargs = text_inputs(seed + 21000, batch, cfg)
    kwargs["negative_prompt"] = None  # defaults to "" (a text to encode)
    return kwargs


CASES = {"ovis_image": Case(tiny_ovis_image_pipeline, ovis_image_inputs, threshold=0.35, record=0.35)}
