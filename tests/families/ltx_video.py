"""LTX-Video (0.9.x): LTXVideoTransformer3DModel.transformer_blocks, cross-attention blocks returning hidden only;
batched CFG (one call on [uncond, cond], cache_context "cond_uncond")."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, masked_text_inputs

FAMILY = "ltx-video"
LTX_BLOCKS = 4


def tiny_ltx_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=LTX_BLOCKS, caption_channels=16)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False), patch_size=1,
                                patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return finish(LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=transformer))


def ltx_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 9) -> dict:
    return masked_text_inputs(seed + 10000, batch, cfg, tokens, 3.0, height=32, width=32, num_frames=frames)


CASES = {"ltx": Case(tiny_ltx_pipeline, ltx_inputs, threshold=0.05, record=0.05)}
