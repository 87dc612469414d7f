"""Tiny configs of the real diffusers pipelines (random weights, seeded), built without text encoders: callers pass
prompt embeddings. Used by the test suite, the golden graph records (``python tools/graph_records.py``) and by
anyone who wants to check a cache config on CPU in seconds. Nothing here is mocked: these are the diffusers classes."""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel)

FLUX_BLOCKS = 2 + 6
QWEN_BLOCKS = 6


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=6, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def flux_inputs(batch: int = 1, seed: int = 0, tokens: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed + 1000)
    return {"prompt_embeds": torch.randn(batch, tokens, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 32, generator=g),
            "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 3.5}


def tiny_qwen_pipeline(seed: int = 0) -> QwenImagePipeline:
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=QWEN_BLOCKS, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def qwen_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed + 2000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_mask": torch.ones(batch, tokens, dtype=torch.long),
              "height": 32, "width": 32, "output_type": "pt"}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens - 2, 16, generator=g)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(batch, tokens - 2, dtype=torch.long)
        kwargs["true_cfg_scale"] = 4.0
    else:
        kwargs["true_cfg_scale"] = 1.0
    return kwargs
