"""CogVideoX: CogVideoXTransformer3DModel.transformer_blocks, blocks return (hidden, encoder); batched CFG."""

from __future__ import annotations

import torch

from . import Case
from ._common import finish, text_inputs

FAMILY = "cogvideox"
COGVIDEOX_BLOCKS = 4


def tiny_cogvideox_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=COGVIDEOX_BLOCKS, sample_width=4, sample_height=4, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    return finish(CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                    scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing")))


def cogvideox_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8, frames: int = 9) -> dict:
    """CogVideoX pads the text to ``max_text_seq_length`` tokens (8 here) and needs ``frames - 1`` divisible by 4."""
    return text_inputs(seed + 11000, batch, cfg, tokens, 6.0, num_frames=frames)


CASES = {"cogvideox": Case(tiny_cogvideox_pipeline, cogvideox_inputs, threshold=0.2, record=0.2)}
