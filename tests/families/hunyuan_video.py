"""HunyuanVideo (1.0): 2 double-stream transformer_blocks + 4 single_transformer_blocks, both (hidden, encoder)."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, hunyuan_video_vae

FAMILY = "hunyuan-video"
HUNYUAN_VIDEO_BLOCKS = (2, 4)


def tiny_hunyuan_video_pipeline(seed: int = 0):
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=4, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True)
    vae = hunyuan_video_vae()
    return finish(HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                       tokenizer_2=None))


def hunyuan_video_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 6, frames: int = 5,
                         size: int = 32) -> dict:
    """``guidance_scale`` is the embedded (distilled) guidance; ``cfg=True`` adds true CFG (a second call)."""
    g = gen(seed + 4000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 8, generator=g),
              "prompt_attention_mask": torch.ones(batch, tokens, dtype=torch.long),
              "height": size, "width": size, "num_frames": frames, "output_type": "pt", "guidance_scale": 6.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 8, generator=g)
        kwargs["negative_prompt_attention_mask"] = torch.ones(batch, tokens, dtype=torch.long)
        kwargs["true_cfg_scale"] = 4.0
    return kwargs


CASES = {
    "hunyuan_video": Case(tiny_hunyuan_video_pipeline, hunyuan_video_inputs, threshold=0.2, record=0.2),
    # 2 calls per step (true CFG), cache-dit's HunyuanVideo 1.0 adapter says has_separate_cfg=False
    "hunyuan_video_true_cfg": Case(tiny_hunyuan_video_pipeline, partial(hunyuan_video_inputs, cfg=True),
                                   threshold=0.35, separate_cfg=True),
}
