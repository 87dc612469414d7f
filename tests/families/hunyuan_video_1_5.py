"""HunyuanVideo 1.5: HunyuanVideo15Transformer3DModel.transformer_blocks (one list, (hidden, encoder)); CFG by a
ClassifierFreeGuidance guider: separate calls in cache_context("pred_cond"/"pred_uncond")."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, glyph_prompt

FAMILY = "hunyuan-video-1.5"
HUNYUAN_VIDEO15_BLOCKS = 4


def tiny_hunyuan_video15_pipeline(seed: int = 0, guided: bool = True):
    from diffusers import AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, HunyuanVideo15Pipeline
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=4 + 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=HUNYUAN_VIDEO15_BLOCKS, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v")
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=4)
    guider = ClassifierFreeGuidance(guidance_scale=6.0, enabled=guided)
    return finish(HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                         scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None,
                                         tokenizer_2=None, guider=guider))


def hunyuan_video15_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, glyph_tokens: int = 4,
                           frames: int = 5) -> dict:
    return {**glyph_prompt(gen(seed + 13000), batch, tokens, glyph_tokens, glyphs=True, cfg=cfg),
            "height": 32, "width": 32, "num_frames": frames, "output_type": "pt"}


CASES = {
    "hunyuan_video15": Case(tiny_hunyuan_video15_pipeline, hunyuan_video15_inputs, threshold=0.35, record=0.35),
    # guider disabled: 1 call per step, adapter says has_separate_cfg=True
    "hunyuan_video15_no_cfg": Case(partial(tiny_hunyuan_video15_pipeline, guided=False),
                                   partial(hunyuan_video15_inputs, cfg=False), threshold=0.35, separate_cfg=False),
}
