"""Parts several family files share: seeded draws, the pipeline finish, the small VAEs and the common input
shapes. Builders call ``.eval()`` on every module (models built from a config start in training mode) and return
float32 pipelines with the progress bar off."""

from __future__ import annotations

from typing import Any

import torch

#: width of the prompt embeddings of the Wan-architecture families (Wan, SkyReels-V2, ChronoEdit)
WAN_TEXT_DIM = 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def finish(pipe):
    # modules built from a config start in training mode (from_pretrained returns eval mode); HiDream's unpatchify
    # and MoE gate, for one, branch on `self.training`
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def masked_text_inputs(seed: int, batch: int, cfg: bool, tokens: int, guidance: float,
                       mask_dtype: torch.dtype = torch.long, **call: Any) -> dict:
    """Prompt embeddings (width 16) with an all-ones attention mask, and the same for the negative prompt when
    ``cfg`` (drawn after the positive ones from one generator), plus the pipeline call's other ``call`` arguments."""
    g = gen(seed)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "prompt_attention_mask": torch.ones(batch, tokens, dtype=mask_dtype),
              "output_type": "pt", "guidance_scale": guidance if cfg else 1.0, **call}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_prompt_attention_mask"] = torch.ones(batch, tokens, dtype=mask_dtype)
    return kwargs


def glyph_prompt(g: torch.Generator, batch: int, tokens: int, glyph_tokens: int, glyphs: bool, cfg: bool) -> dict:
    """The prompt of HunyuanImage 2.1 and HunyuanVideo 1.5: text embeddings (width 16) and ByT5 glyph embeddings
    (width 8), each with its mask, and the same for the negative prompt when ``cfg`` (drawn after the positive ones
    from ``g``); ``glyphs=False``: all-zero glyph embeddings and masks, "no text to render" (nothing drawn)."""
    kwargs = {}
    for prefix in ("", "negative_") if cfg else ("",):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs[f"{prefix}prompt_embeds_mask"] = torch.ones(batch, tokens, dtype=torch.long)
        if glyphs:
            kwargs[f"{prefix}prompt_embeds_2"] = torch.randn(batch, glyph_tokens, 8, generator=g)
            kwargs[f"{prefix}prompt_embeds_mask_2"] = torch.ones(batch, glyph_tokens, dtype=torch.long)
        else:
            kwargs[f"{prefix}prompt_embeds_2"] = torch.zeros(batch, glyph_tokens, 8)
            kwargs[f"{prefix}prompt_embeds_mask_2"] = torch.zeros(batch, glyph_tokens, dtype=torch.long)
    return kwargs


def image(seed: int, size: int = 32) -> torch.Tensor:
    # a [0, 1] image tensor (1, 3, H, W): what pipelines' image processors accept besides PIL
    return torch.rand(1, 3, size, size, generator=gen(seed + 77))


def kl_vae(latent_channels: int = 4, shift_factor: float | None = 0.0609, scaling_factor: float = 1.5035,
           levels: int = 2):
    """The smallest ``AutoencoderKL`` (2 levels: vae_scale_factor 2): FLUX/SD3/Chroma/Z-Image-style image VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                         layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def wan_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                            latents_std=[1.0] * z_dim)


def hunyuan_video_vae():
    """The smallest ``AutoencoderKLHunyuanVideo`` (HunyuanVideo 1.0, Kandinsky 5)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False)


def clip_image_encoder():
    """A tiny CLIP vision encoder and its image processor (Wan 2.1 I2V, ChronoEdit: 'image tokens' in front of the
    text tokens)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as _Proc
    except ImportError:  # transformers without the PIL variant
        from transformers import CLIPImageProcessor as _Proc

    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8,
                                                     projection_dim=16))
    processor = _Proc(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return image_encoder, processor


def flux_like_transformer(cls, **extra):
    """The tiny FLUX-like transformer (2 double + 4 single blocks) of FLUX.1 Kontext, Chroma, Ovis-Image and Bria."""
    return cls(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), **extra)


def text_inputs(seed: int, batch: int, cfg: bool, tokens: int = 8, guidance: float = 4.0, size: int = 32,
                **call: Any) -> dict:
    """Prompt embeddings (width 16) at ``size`` x ``size``, and the negative ones when ``cfg`` (drawn after the
    positive ones from one generator), plus the pipeline call's other ``call`` arguments."""
    g = gen(seed)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g), "height": size, "width": size,
              "output_type": "pt", "guidance_scale": guidance if cfg else 1.0, **call}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
    return kwargs
