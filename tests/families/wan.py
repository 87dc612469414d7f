"""Wan 2.1 / 2.2 (WanPipeline, WanImageToVideoPipeline): WanTransformer3DModel.blocks, blocks return hidden only
(Wan VACE and Wan Animate: wan_vace.py, wan_animate.py)."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import WAN_TEXT_DIM, clip_image_encoder, finish, image, text_inputs, wan_vae

FAMILY = "wan"
WAN_BLOCKS = 4


def _wan_transformer(in_channels: int = 4, out_channels: int = 4, layers: int = WAN_BLOCKS, image_dim=None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=WAN_TEXT_DIM,
                                 freq_dim=32, ffn_dim=32, num_layers=layers, image_dim=image_dim,
                                 rope_max_seq_len=32)


def tiny_wan_pipeline(seed: int = 0):
    """Wan 2.1 T2V: one transformer, separate cond/uncond calls when guidance_scale > 1."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    transformer = _wan_transformer()
    vae = wan_vae()
    return finish(WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer))


def tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.875):
    """Wan 2.2 A14B T2V: ``transformer`` (high noise, t >= boundary_ratio * 1000) then ``transformer_2``."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    transformer = _wan_transformer()
    transformer_2 = _wan_transformer()
    vae = wan_vae()
    return finish(WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                              transformer_2=transformer_2, boundary_ratio=boundary_ratio))


def wan_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 5,
               size: int = 32) -> dict:
    return text_inputs(seed + 3000, batch, cfg, tokens, 5.0, size, num_frames=frames)


def tiny_wan22_i2v_pipeline(seed: int = 0, boundary_ratio: float = 0.9):
    """Wan 2.2 A14B I2V: no image encoder; the transformer input is [noise latents, mask, VAE(image)] on channels."""
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(seed)
    # in_channels = z_dim (noisy latents) + 4 (temporal mask) + z_dim (encoded first frame)
    transformer = _wan_transformer(in_channels=4 + 4 + 4)
    transformer_2 = _wan_transformer(in_channels=4 + 4 + 4)
    vae = wan_vae()
    return finish(WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          transformer=transformer, transformer_2=transformer_2,
                                          boundary_ratio=boundary_ratio))


def wan_i2v_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, **kw) -> dict:
    """Wan I2V (2.1 and 2.2) and ChronoEdit: the Wan inputs plus the first frame."""
    kwargs = wan_inputs(batch, seed, cfg, **kw)
    kwargs["image"] = image(seed, kwargs["height"])
    return kwargs


def tiny_wan_i2v_pipeline(seed: int = 0):
    """Wan 2.1 I2V: a tiny CLIP vision encoder adds 'image tokens' in front of the text tokens (image_dim)."""
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(seed)
    transformer = _wan_transformer(in_channels=4 + 4 + 4, image_dim=16)
    vae = wan_vae()
    image_encoder, processor = clip_image_encoder()
    return finish(WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          image_processor=processor, image_encoder=image_encoder,
                                          transformer=transformer))


CASES = {
    # segments: recorded on Wan 2.2 (its transformer_2 is a second runtime with graphs of its own)
    "wan": Case(tiny_wan_pipeline, wan_inputs, threshold=0.1, record=0.1, record_lowerings=("regional",)),
    "wan_i2v": Case(tiny_wan_i2v_pipeline, wan_i2v_inputs, threshold=0.05, record=0.05,
                    record_lowerings=("regional",)),
    "wan22": Case(tiny_wan22_pipeline, wan_inputs, threshold=0.05, record=0.05),
    "wan22_i2v": Case(tiny_wan22_i2v_pipeline, wan_i2v_inputs, threshold=0.05, record=0.05,
                      record_lowerings=("regional",)),
    # 1 call per step, cache-dit's Wan adapter says has_separate_cfg=True
    "wan_no_cfg": Case(tiny_wan_pipeline, partial(wan_inputs, cfg=False), threshold=0.1, separate_cfg=False),
}
