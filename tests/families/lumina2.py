"""Lumina-Image 2.0: Lumina2Transformer2DModel (refiners, then ``layers``); cond and uncond as two unnamed calls."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, kl_vae, masked_text_inputs

FAMILY = "lumina2"


def tiny_lumina2_pipeline(seed: int = 0):
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=4, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
        cap_feat_dim=16)
    # the pipeline hard-codes vae_scale_factor = 8: a 4-level VAE
    return finish(Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                  vae=kl_vae(levels=4), text_encoder=None, tokenizer=None))


def lumina2_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    return masked_text_inputs(seed + 17000, batch, cfg, tokens, 4.0, height=64, width=64)


CASES = {"lumina2": Case(tiny_lumina2_pipeline, lumina2_inputs, threshold=0.1, record=0.1)}
