"""Sana: SanaTransformer2DModel.transformer_blocks returning the hidden stream; batched CFG."""

from __future__ import annotations

import torch

from . import Case
from ._common import finish, image, masked_text_inputs

FAMILY = "sana"


def tiny_sana_pipeline(seed: int = 0):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler as Sched, SanaPipeline
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        upsample_block_type="interpolate", downsample_block_type="Conv",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    return finish(SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=Sched(shift=3.0)))


def tiny_sana_controlnet_pipeline(seed: int = 0):
    """Sana ControlNet: a tiny ``SanaControlNetModel`` (2 blocks: its residual k is added after transformer block k + 1
    of the 4, i.e. after blocks 1 and 2) in the real ``SanaControlNetPipeline``; its residuals are new tensors at
    every step."""
    from diffusers import SanaControlNetModel, SanaControlNetPipeline

    base = tiny_sana_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnet = SanaControlNetModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, patch_size=1)
    # a trained ControlNet's zero-initialised projections have learned weights: random ones, so that the residuals
    # are not all zero
    for linear in (controlnet.input_block, *controlnet.controlnet_blocks):
        torch.nn.init.normal_(linear.weight, std=0.1)
    return finish(SanaControlNetPipeline(controlnet=controlnet, **base.components))


def sana_controlnet_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    kwargs = sana_inputs(batch, seed, cfg, tokens)
    kwargs["control_image"] = image(seed, 32)
    kwargs["controlnet_conditioning_scale"] = 1.0
    return kwargs


def sana_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    """Also the inputs of PixArt-Sigma and AuraFlow (other seeds and guidance)."""
    return masked_text_inputs(seed + 18000, batch, cfg, tokens, 4.5, height=32, width=32,
                              use_resolution_binning=False,
                              negative_prompt=None)  # defaults to "" (a text to encode) in these pipelines


CASES = {
    "sana": Case(tiny_sana_pipeline, sana_inputs, threshold=0.05, record=0.05),
    # ControlNet residuals added after blocks by index (an index-added input): tests/test_index_added.py (cache-dit
    # 1.5.3 runs it without the residuals: checked there, so no parity threshold here)
    "sana_controlnet": Case(tiny_sana_controlnet_pipeline, sana_controlnet_inputs),
}
