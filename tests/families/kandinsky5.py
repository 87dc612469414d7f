"""Kandinsky 5 (T2V): Kandinsky5Transformer3DModel, text blocks then the visual blocks (the chain); cond and uncond
as two unnamed calls."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, hunyuan_video_vae

FAMILY = "kandinsky5"


def tiny_kandinsky5_pipeline(seed: int = 0):
    from diffusers import Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=4, axes_dims=(4, 6, 6))
    # its modulation layers are zero-initialised (as in training): every block would be the identity, the Fn
    # residual 0 and cache-dit's relative diff 0/0 = nan. Random weights like a trained model's instead.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "modulation.out_layer" in name:
                param.normal_(0.0, 0.05)
    vae = hunyuan_video_vae()
    return finish(Kandinsky5T2VPipeline(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None,
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0)))


def kandinsky5_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 5) -> dict:
    g = gen(seed + 20000)
    kwargs = {"prompt_embeds_qwen": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_clip": torch.randn(batch, 8, generator=g),
              "prompt_cu_seqlens": torch.arange(batch + 1, dtype=torch.int32) * tokens,
              "height": 32, "width": 32, "num_frames": frames, "output_type": "pt",
              "guidance_scale": 5.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds_qwen"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_prompt_embeds_clip"] = torch.randn(batch, 8, generator=g)
        kwargs["negative_prompt_cu_seqlens"] = torch.arange(batch + 1, dtype=torch.int32) * tokens
    return kwargs


CASES = {"kandinsky5": Case(tiny_kandinsky5_pipeline, kandinsky5_inputs, threshold=0.1, record=0.35)}
