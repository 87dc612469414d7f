"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel.transformer_blocks (JointTransformerBlock, returns (encoder, hidden);
the last block is context_pre_only and returns encoder None). Batched CFG (one call on [uncond, cond])."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, image, kl_vae

FAMILY = "sd3"
SD3_BLOCKS = 4
#: width of the image-encoder tokens the tiny SD3 IP-Adapter projects
SD3_IP_EMBED_DIM = 24


def tiny_sd3_pipeline(seed: int = 0, sd35: bool = False):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=SD3_BLOCKS, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        out_channels=4, pos_embed_max_size=16, **extra)
    vae = kl_vae(shift_factor=0.0609, scaling_factor=1.5305)
    return finish(StableDiffusion3Pipeline(transformer=transformer,
                                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                           text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                           text_encoder_3=None, tokenizer_3=None))


def tiny_sd3_controlnet_pipeline(seed: int = 0):
    """SD3 ControlNet: a tiny ``SD3ControlNetModel`` (2 blocks: residual k is added after blocks 2k and 2k+1 of the 4)
    in the real ``StableDiffusion3ControlNetPipeline``; its residuals are new tensors at every step."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    base = tiny_sd3_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnet = SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16)
    # a trained ControlNet's zero-initialised output projections have learned weights: random ones, so that the
    # residuals are not all zero
    for block in controlnet.controlnet_blocks:
        torch.nn.init.normal_(block.weight, std=0.05)
    return finish(StableDiffusion3ControlNetPipeline(controlnet=controlnet, **base.components))


def sd3_controlnet_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    kwargs = sd3_inputs(batch, seed, cfg, tokens)
    kwargs["control_image"] = image(seed, 32)
    kwargs["controlnet_conditioning_scale"] = 1.0
    return kwargs


def tiny_sd3_ip_adapter_pipeline(seed: int = 0, sd35: bool = False):
    """StableDiffusion3Pipeline around the tiny SD3 with one IP-Adapter loaded through diffusers' own loader,
    ``pipe.load_ip_adapter(state_dict, image_encoder_folder=None)``: the state dict (InstantX SD3.5 IP-Adapter layout:
    ``image_proj`` = an IPAdapterTimeImageProjection, ``ip_adapter`` = each attention processor's norm_ip / to_k_ip /
    to_v_ip) is taken from modules of those classes drawn here (seeded, no download); the loader puts
    SD3IPAdapterJointAttnProcessor2_0 on every block and the projection into ``transformer.image_proj``. No image
    encoder: calls pass ``ip_adapter_image_embeds`` (:func:`sd3_ip_adapter_inputs`). ``sd35=True``: on the tiny SD3.5
    (the loader puts the processor on the dual-attention ``attn2`` layers too)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    pipe = tiny_sd3_pipeline(seed, sd35=sd35)
    transformer = pipe.transformer
    inner = transformer.config.attention_head_dim * transformer.config.num_attention_heads
    torch.manual_seed(seed + 3)
    # the loader reads heads = to_q rows // 64 (a 64-wide projection) and builds the default depth of 4 layers
    image_proj = IPAdapterTimeImageProjection(embed_dim=SD3_IP_EMBED_DIM, output_dim=inner, hidden_dim=64, heads=1,
                                              num_queries=4, timestep_in_dim=32)
    ip_adapter = {}
    for k in range(len(transformer.attn_processors)):
        processor = SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner,
                                                      head_dim=transformer.config.attention_head_dim,
                                                      timesteps_emb_dim=64)
        for name, value in processor.state_dict().items():
            # a trained adapter's AdaLayerNorm modulation is not zero: random weights everywhere
            ip_adapter[f"{k}.{name}"] = torch.randn_like(value) * 0.2 if value.ndim == 2 else value
    state = {name: torch.randn_like(value) * 0.2 if value.ndim >= 2 else value
             for name, value in image_proj.state_dict().items()}
    pipe.load_ip_adapter({"image_proj": state, "ip_adapter": ip_adapter}, image_encoder_folder=None,
                         low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(1.0)  # the processors' default is 0.5
    return finish(pipe)


def sd3_ip_adapter_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    """:func:`sd3_inputs` plus ``ip_adapter_image_embeds`` (image-encoder tokens: with CFG the negative ones first,
    as the pipeline chunks them)."""
    kwargs = sd3_inputs(batch, seed, cfg, tokens)
    g = gen(seed + 5500)
    kwargs["ip_adapter_image_embeds"] = torch.randn((2 if cfg else 1) * batch, 5, SD3_IP_EMBED_DIM, generator=g)
    return kwargs


def tiny_sd35_pipeline(seed: int = 0):
    """SD3.5 (Medium-style): qk RMSNorm and MMDiT-X dual-attention layers (extra attn2 on the hidden stream)."""
    return tiny_sd3_pipeline(seed, sd35=True)


def sd3_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    g = gen(seed + 5000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 16, generator=g),
              "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 5.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
    return kwargs


CASES = {
    "sd3": Case(tiny_sd3_pipeline, sd3_inputs),
    "sd35": Case(tiny_sd35_pipeline, sd3_inputs, threshold=0.2, record=0.35),
    # SD3 without CFG (guidance_scale 1): batch 1 instead of 2
    "sd3_no_cfg": Case(tiny_sd3_pipeline, partial(sd3_inputs, cfg=False)),
    # ControlNet residuals added after blocks by index (an index-added input): block by block through compiled regions
    # (segments refuses those calls); cache-dit 1.5.3 crashes on it (tests/test_index_added.py)
    "sd3_controlnet": Case(tiny_sd3_controlnet_pipeline, sd3_controlnet_inputs, record=0.3,
                           record_lowerings=("regional",)),
}
