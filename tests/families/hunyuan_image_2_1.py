"""HunyuanImage 2.1: HunyuanImageTransformer2DModel, 2 double + 4 single blocks (both (hidden, encoder)); CFG by a
diffusers guider (AdaptiveProjectedMixGuidance): separate calls in cache_context("pred_cond"/"pred_uncond")."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, glyph_prompt

FAMILY = "hunyuan-image-2.1"
HUNYUAN_IMAGE_BLOCKS = (2, 4)


def tiny_hunyuan_image_pipeline(seed: int = 0, guided: bool = True):
    """``guided=False`` is the distilled model: no guider, one call per step."""
    from diffusers import AdaptiveProjectedMixGuidance, AutoencoderKLHunyuanImage, HunyuanImagePipeline
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=4, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, text_embed_2_dim=8,
        rope_axes_dim=(8, 8))
    # its GroupNorms have 32 groups: 32 channels is the narrowest VAE possible
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32),
                                    layers_per_block=1, spatial_compression_ratio=4, sample_size=32,
                                    scaling_factor=1.0)
    guider = AdaptiveProjectedMixGuidance(guidance_scale=3.5) if guided else None
    return finish(HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), vae=vae,
                                       text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                       transformer=transformer, guider=guider))


def hunyuan_image_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, glyph_tokens: int = 4):
    """``cfg`` must match the pipeline's guider (``tiny_hunyuan_image_pipeline(guided=...)``)."""
    # all-zero ByT5 glyph embeddings = "no text to render" (the pipeline then skips the OCR guider)
    return {**glyph_prompt(gen(seed + 12000), batch, tokens, glyph_tokens, glyphs=False, cfg=cfg),
            "height": 32, "width": 32, "output_type": "pt"}


CASES = {
    "hunyuan_image": Case(tiny_hunyuan_image_pipeline, hunyuan_image_inputs, threshold=0.35, record=0.35),
    # distilled HunyuanImage-2.1: no guider, 1 call per step, adapter says has_separate_cfg=True
    "hunyuan_image_distilled": Case(partial(tiny_hunyuan_image_pipeline, guided=False),
                                    partial(hunyuan_image_inputs, cfg=False), threshold=0.35, separate_cfg=False),
}
