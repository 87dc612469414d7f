"""Mochi: MochiTransformer3DModel.transformer_blocks; batched CFG."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, masked_text_inputs

FAMILY = "mochi"


def tiny_mochi_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLMochi, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=4, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=16, time_embed_dim=8, max_sequence_length=8)
    # its GroupNorms have 32 groups: 32 channels is the narrowest VAE possible
    vae = AutoencoderKLMochi(latent_channels=12, encoder_block_out_channels=(32, 32, 32, 32),
                             decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
                             add_attention_block=(False,) * 5)
    return finish(MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                tokenizer=None, transformer=transformer))


def mochi_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8, frames: int = 7) -> dict:
    return masked_text_inputs(seed + 15000, batch, cfg, tokens, 4.5, height=32, width=32, num_frames=frames)


CASES = {"mochi": Case(tiny_mochi_pipeline, mochi_inputs, threshold=0.05, record=0.35)}
