"""CogView4: CogView4Transformer2DModel.transformer_blocks."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, kl_vae, text_inputs

FAMILY = "cogview4"


def tiny_cogview4_pipeline(seed: int = 0):
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel

    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, pos_embed_max_size=16, sample_size=16,
        rope_axes_dim=(8, 8))
    return finish(CogView4Pipeline(tokenizer=None, text_encoder=None, vae=kl_vae(shift_factor=None),
                                   transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()))


def cogview4_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 16) -> dict:
    return text_inputs(seed + 16000, batch, cfg, tokens, 5.0)


CASES = {"cogview4": Case(tiny_cogview4_pipeline, cogview4_inputs, threshold=0.2, record=0.2)}
