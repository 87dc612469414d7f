"""PixArt-Sigma: PixArtTransformer2DModel.transformer_blocks; batched CFG."""

from __future__ import annotations

import torch

from . import Case
from ._common import finish, kl_vae
from .sana import sana_inputs

FAMILY = "pixart"


def tiny_pixart_sigma_pipeline(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=16, norm_num_groups=2)
    return finish(PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=kl_vae(shift_factor=None),
                                      transformer=transformer, scheduler=DPMSolverMultistepScheduler()))


def pixart_sigma_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    kwargs = sana_inputs(batch, seed + 1000, cfg, tokens)
    kwargs["guidance_scale"] = 4.5 if cfg else 1.0
    return kwargs


CASES = {"pixart_sigma": Case(tiny_pixart_sigma_pipeline, pixart_sigma_inputs, threshold=0.1, record=0.1)}
