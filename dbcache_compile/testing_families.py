"""Tiny configs of the real diffusers pipelines of the DiT families cache-dit 1.5.3 and diffusers 0.42.1 both support
(random weights, seeded): 30 families in ``FAMILIES``; docs/families.md lists the ones not built and why.

Companion of :mod:`dbcache_compile.testing` (FLUX.1, Qwen-Image) for the families of issue #14. Each family has
``tiny_<family>_pipeline(seed=0)`` (the real diffusers pipeline class around a tiny transformer, a VAE as small as the
pipeline allows, no text encoder wherever the pipeline accepts prompt embeddings) and ``<family>_inputs(...)``
(the call kwargs: prompt embeddings, a small resolution, few frames for video, ``output_type="pt"``), so that
``pipe(**<family>_inputs(), num_inference_steps=8)`` runs on a CPU in a few seconds. Nothing is mocked and nothing
is downloaded: where a pipeline cannot run without a text/image encoder, a tiny one is built from a
``transformers`` config.

``FAMILIES`` maps a family name to ``(builder, inputs)``, ``VARIANTS`` the same pipelines in other CFG modes;
``docs/families.md`` describes every family (block lists, block forward patterns, CFG, cache-dit's adapter) and records
cache-dit's decisions on these pipelines (``tools/families_oracle.py``). Builders call ``.eval()`` on every
module (models built from a config start in training mode) and return float32 pipelines with the progress bar off.
Run them single-threaded (``torch.set_num_threads(1)``, as the test suite does): on a shared 2-core machine two
threads made a tiny forward 40x slower.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

__all__ = ["FAMILIES", "VARIANTS", "THRESHOLDS", "CFG_COUNT_CASES", "RECORD_FAMILIES", "record_threshold"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _masked_text_inputs(seed: int, batch: int, cfg: bool, tokens: int, guidance: float,
                        mask_dtype: torch.dtype = torch.long, **call: Any) -> dict:
    """Prompt embeddings (width 16) with an all-ones attention mask, and the same for the negative prompt when
    ``cfg`` (drawn after the positive ones from one generator), plus the pipeline call's other ``call`` arguments."""
    g = _gen(seed)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "prompt_attention_mask": torch.ones(batch, tokens, dtype=mask_dtype),
              "output_type": "pt", "guidance_scale": guidance if cfg else 1.0, **call}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_prompt_attention_mask"] = torch.ones(batch, tokens, dtype=mask_dtype)
    return kwargs



def _finish(pipe):
    # modules built from a config start in training mode (from_pretrained returns eval mode); HiDream's unpatchify
    # and MoE gate, for one, branch on `self.training`
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2 (WanPipeline, WanImageToVideoPipeline): WanTransformer3DModel.blocks, blocks return hidden only.
# ----------------------------------------------------------------------------------------------------------------
WAN_BLOCKS = 4
_WAN_TEXT_DIM = 16


def _wan_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                            latents_std=[1.0] * z_dim)


def _wan_transformer(in_channels: int = 4, out_channels: int = 4, layers: int = WAN_BLOCKS, image_dim=None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=_WAN_TEXT_DIM,
                                 freq_dim=32, ffn_dim=32, num_layers=layers, image_dim=image_dim,
                                 rope_max_seq_len=32)


def tiny_wan_pipeline(seed: int = 0):
    """Wan 2.1 T2V: one transformer, separate cond/uncond calls when guidance_scale > 1."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    transformer = _wan_transformer()
    vae = _wan_vae()
    return _finish(WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer))


def tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.875):
    """Wan 2.2 A14B T2V: ``transformer`` (high noise, t >= boundary_ratio * 1000) then ``transformer_2``."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    transformer = _wan_transformer()
    transformer_2 = _wan_transformer()
    vae = _wan_vae()
    return _finish(WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                               transformer_2=transformer_2, boundary_ratio=boundary_ratio))


def wan_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 5,
               size: int = 32) -> dict:
    g = _gen(seed + 3000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, _WAN_TEXT_DIM, generator=g),
              "height": size, "width": size, "num_frames": frames, "output_type": "pt",
              "guidance_scale": 5.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, _WAN_TEXT_DIM, generator=g)
    return kwargs


wan22_inputs = wan_inputs


def tiny_wan22_i2v_pipeline(seed: int = 0, boundary_ratio: float = 0.9):
    """Wan 2.2 A14B I2V: no image encoder; the transformer input is [noise latents, mask, VAE(image)] on channels."""
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(seed)
    # in_channels = z_dim (noisy latents) + 4 (temporal mask) + z_dim (encoded first frame)
    transformer = _wan_transformer(in_channels=4 + 4 + 4)
    transformer_2 = _wan_transformer(in_channels=4 + 4 + 4)
    vae = _wan_vae()
    return _finish(WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                           transformer=transformer, transformer_2=transformer_2,
                                           boundary_ratio=boundary_ratio))


def _image(seed: int, size: int = 32) -> torch.Tensor:
    # a [0, 1] image tensor (1, 3, H, W): what pipelines' image processors accept besides PIL
    return torch.rand(1, 3, size, size, generator=_gen(seed + 77))


def wan22_i2v_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, **kw) -> dict:
    kwargs = wan_inputs(batch, seed, cfg, **kw)
    kwargs["image"] = _image(seed, kwargs["height"])
    return kwargs


def tiny_wan_i2v_pipeline(seed: int = 0):
    """Wan 2.1 I2V: a tiny CLIP vision encoder adds 'image tokens' in front of the text tokens (image_dim)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as _Proc
    except ImportError:  # transformers without the PIL variant
        from transformers import CLIPImageProcessor as _Proc

    torch.manual_seed(seed)
    transformer = _wan_transformer(in_channels=4 + 4 + 4, image_dim=16)
    vae = _wan_vae()
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8,
                                                     projection_dim=16))
    processor = _Proc(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _finish(WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                           image_processor=processor, image_encoder=image_encoder,
                                           transformer=transformer))


wan_i2v_inputs = wan22_i2v_inputs



def _kl_vae(latent_channels: int = 4, shift_factor: float | None = 0.0609, scaling_factor: float = 1.5035,
            levels: int = 2):
    """The smallest ``AutoencoderKL`` (2 levels: vae_scale_factor 2): FLUX/SD3/Chroma/Z-Image-style image VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                         layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


# ----------------------------------------------------------------------------------------------------------------
# HunyuanVideo (1.0): 2 double-stream transformer_blocks + 4 single_transformer_blocks, both (hidden, encoder).
# ----------------------------------------------------------------------------------------------------------------
HUNYUAN_VIDEO_BLOCKS = (2, 4)


def tiny_hunyuan_video_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=4, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False)
    return _finish(HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                        tokenizer_2=None))


def hunyuan_video_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 6, frames: int = 5,
                         size: int = 32) -> dict:
    """``guidance_scale`` is the embedded (distilled) guidance; ``cfg=True`` adds true CFG (a second call)."""
    g = _gen(seed + 4000)
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


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5: SD3Transformer2DModel.transformer_blocks (JointTransformerBlock, returns (encoder, hidden);
# the last block is context_pre_only and returns encoder None). Batched CFG (one call on [uncond, cond]).
# ----------------------------------------------------------------------------------------------------------------
SD3_BLOCKS = 4


def tiny_sd3_pipeline(seed: int = 0, sd35: bool = False):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=SD3_BLOCKS, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        out_channels=4, pos_embed_max_size=16, **extra)
    vae = _kl_vae(shift_factor=0.0609, scaling_factor=1.5305)
    return _finish(StableDiffusion3Pipeline(transformer=transformer,
                                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                            text_encoder_3=None, tokenizer_3=None))


def tiny_sd35_pipeline(seed: int = 0):
    """SD3.5 (Medium-style): qk RMSNorm and MMDiT-X dual-attention layers (extra attn2 on the hidden stream)."""
    return tiny_sd3_pipeline(seed, sd35=True)


def sd3_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    g = _gen(seed + 5000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 16, generator=g),
              "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 5.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
    return kwargs


sd35_inputs = sd3_inputs


# ----------------------------------------------------------------------------------------------------------------
# FLUX.2 [dev] / [klein]: Flux2Transformer2DModel, 2 double transformer_blocks ((encoder, hidden)) then 4
# single_transformer_blocks that take the concatenated [text, image] sequence as hidden_states only.
# ----------------------------------------------------------------------------------------------------------------
FLUX2_BLOCKS = (2, 4)


def _flux2_parts(seed: int, guidance_embeds: bool = True):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False)
    return transformer, vae


def tiny_flux2_pipeline(seed: int = 0):
    """FLUX.2 [dev]: guidance-distilled (embedded guidance), one transformer call per step."""
    from diffusers import Flux2Pipeline

    transformer, vae = _flux2_parts(seed)
    return _finish(Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, transformer=transformer))


def flux2_inputs(batch: int = 1, seed: int = 0, tokens: int = 8) -> dict:
    g = _gen(seed + 6000)
    return {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g), "height": 32, "width": 32,
            "output_type": "pt", "guidance_scale": 4.0}


def tiny_flux2_klein_pipeline(seed: int = 0):
    """FLUX.2 [klein] base (not distilled): no guidance embedding, true CFG as a second call per step."""
    from diffusers import Flux2KleinPipeline

    transformer, vae = _flux2_parts(seed, guidance_embeds=False)
    return _finish(Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                      tokenizer=None, transformer=transformer, is_distilled=False))


def flux2_klein_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    g = _gen(seed + 6500)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g), "height": 32, "width": 32,
              "output_type": "pt", "guidance_scale": 4.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# Chroma: FLUX-like 2 double + 4 single blocks, per-block modulation sliced from one pooled_temb inside the loop.
# ----------------------------------------------------------------------------------------------------------------
CHROMA_BLOCKS = (2, 4)


def tiny_chroma_pipeline(seed: int = 0):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1)
    return _finish(ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(), text_encoder=None,
                                  tokenizer=None, transformer=transformer))


def chroma_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    # bool mask: the pipeline appends bool ones for the image tokens and SDPA rejects integer masks
    return _masked_text_inputs(seed + 7000, batch, cfg, tokens, 4.0, torch.bool, height=32, width=32)


# ----------------------------------------------------------------------------------------------------------------
# Z-Image (Turbo / base): ZImageTransformer2DModel.layers over ONE unified [image, caption] sequence (block arg `x`).
# Batched CFG: the pipeline passes lists of per-sample tensors; cond and uncond samples ride in one call.
# ----------------------------------------------------------------------------------------------------------------
ZIMAGE_BLOCKS = 4


def tiny_zimage_pipeline(seed: int = 0):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=ZIMAGE_BLOCKS,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    return _finish(ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_kl_vae(),
                                  text_encoder=None, tokenizer=None, transformer=transformer))


def zimage_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 8) -> dict:
    """Z-Image-Turbo runs without CFG (guidance_scale 0); ``cfg=True`` is the base model's batched CFG."""
    g = _gen(seed + 8000)
    kwargs = {"prompt_embeds": [torch.randn(tokens, 16, generator=g) for _ in range(batch)],
              "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 4.0 if cfg else 0.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = [torch.randn(tokens - 2, 16, generator=g) for _ in range(batch)]
    return kwargs



# ----------------------------------------------------------------------------------------------------------------
# Qwen-Image-Edit (QwenImageEditPipeline): QwenImageTransformer2DModel (as Qwen-Image) whose hidden sequence is
# [noisy latents, VAE(input image)] tokens; separate CFG calls (cache_context "cond"/"uncond") with true_cfg_scale.
# ----------------------------------------------------------------------------------------------------------------
QWEN_EDIT_BLOCKS = 4


def tiny_qwen_image_edit_pipeline(seed: int = 0, plus: bool = False):
    """The pipeline resizes the input image to ~1024x1024 before the VAE whatever ``height``/``width`` say, so the
    tiny VAE downsamples 32x (5 levels, no res blocks) to keep the image tokens at 16x16 = 256 and the encode of
    that 1024x1024 image at ~0.3 s."""
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImageEditPlusPipeline
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=QWEN_EDIT_BLOCKS, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1] * 6, num_res_blocks=0,
                                 temperal_downsample=[False] * 5, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return _finish(cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       processor=None, transformer=transformer))


def qwen_image_edit_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 7) -> dict:
    from PIL import Image

    g = _gen(seed + 9000)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    kwargs = {"image": Image.fromarray(pixels), "prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_mask": torch.ones(batch, tokens, dtype=torch.long),
              "height": 64, "width": 64, "output_type": "pt", "true_cfg_scale": 4.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens - 2, 16, generator=g)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(batch, tokens - 2, dtype=torch.long)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# LTX-Video (0.9.x): LTXVideoTransformer3DModel.transformer_blocks, cross-attention blocks returning hidden only;
# batched CFG (one call on [uncond, cond], cache_context "cond_uncond").
# ----------------------------------------------------------------------------------------------------------------
LTX_BLOCKS = 4


def tiny_ltx_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=LTX_BLOCKS, caption_channels=16)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False), patch_size=1,
                                patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return _finish(LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                               tokenizer=None, transformer=transformer))


def ltx_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 9) -> dict:
    return _masked_text_inputs(seed + 10000, batch, cfg, tokens, 3.0, height=32, width=32, num_frames=frames)


# ----------------------------------------------------------------------------------------------------------------
# CogVideoX: CogVideoXTransformer3DModel.transformer_blocks, blocks return (hidden, encoder); batched CFG.
# ----------------------------------------------------------------------------------------------------------------
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
    return _finish(CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing")))


def cogvideox_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8, frames: int = 9) -> dict:
    """CogVideoX pads the text to ``max_text_seq_length`` tokens (8 here) and needs ``frames - 1`` divisible by 4."""
    g = _gen(seed + 11000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g), "height": 32, "width": 32,
              "num_frames": frames, "output_type": "pt", "guidance_scale": 6.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# HunyuanImage 2.1: HunyuanImageTransformer2DModel, 2 double + 4 single blocks (both (hidden, encoder)); CFG by a
# diffusers guider (AdaptiveProjectedMixGuidance): separate calls in cache_context("pred_cond"/"pred_uncond").
# ----------------------------------------------------------------------------------------------------------------
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
    return _finish(HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), vae=vae,
                                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        transformer=transformer, guider=guider))


def hunyuan_image_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, glyph_tokens: int = 4):
    """``cfg`` must match the pipeline's guider (``tiny_hunyuan_image_pipeline(guided=...)``)."""
    g = _gen(seed + 12000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_mask": torch.ones(batch, tokens, dtype=torch.long),
              # all-zero ByT5 glyph embeddings = "no text to render" (the pipeline then skips the OCR guider)
              "prompt_embeds_2": torch.zeros(batch, glyph_tokens, 8),
              "prompt_embeds_mask_2": torch.zeros(batch, glyph_tokens, dtype=torch.long),
              "height": 32, "width": 32, "output_type": "pt"}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(batch, tokens, dtype=torch.long)
        kwargs["negative_prompt_embeds_2"] = torch.zeros(batch, glyph_tokens, 8)
        kwargs["negative_prompt_embeds_mask_2"] = torch.zeros(batch, glyph_tokens, dtype=torch.long)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5: HunyuanVideo15Transformer3DModel.transformer_blocks (one list, (hidden, encoder)); CFG by a
# ClassifierFreeGuidance guider: separate calls in cache_context("pred_cond"/"pred_uncond").
# ----------------------------------------------------------------------------------------------------------------
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
    return _finish(HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                          scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None,
                                          tokenizer_2=None, guider=guider))


def hunyuan_video15_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, glyph_tokens: int = 4,
                           frames: int = 5) -> dict:
    g = _gen(seed + 13000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_mask": torch.ones(batch, tokens, dtype=torch.long),
              "prompt_embeds_2": torch.randn(batch, glyph_tokens, 8, generator=g),
              "prompt_embeds_mask_2": torch.ones(batch, glyph_tokens, dtype=torch.long),
              "height": 32, "width": 32, "num_frames": frames, "output_type": "pt"}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(batch, tokens, dtype=torch.long)
        kwargs["negative_prompt_embeds_2"] = torch.randn(batch, glyph_tokens, 8, generator=g)
        kwargs["negative_prompt_embeds_mask_2"] = torch.ones(batch, glyph_tokens, dtype=torch.long)
    return kwargs



# ----------------------------------------------------------------------------------------------------------------
# More families cache-dit supports (shorter notes: docs/families.md).
# ----------------------------------------------------------------------------------------------------------------
def tiny_flux_kontext_pipeline(seed: int = 0):
    """FLUX.1 Kontext: the FLUX.1 transformer; the reference image's tokens are appended to the hidden sequence."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        guidance_embeds=True)
    return _finish(FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(), text_encoder=None,
                                       tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                       transformer=transformer))


def flux_kontext_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 8) -> dict:
    """``max_area`` and ``_auto_resize=False`` keep output and reference image at 32x32 (the pipeline would rescale
    both to ~1 MP)."""
    g = _gen(seed + 14000)
    kwargs = {"image": _image(seed, 32), "prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 16, generator=g), "height": 32, "width": 32,
              "output_type": "pt", "guidance_scale": 2.5, "max_area": 32 * 32, "_auto_resize": False}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
        kwargs["true_cfg_scale"] = 2.0
    return kwargs


def tiny_qwen_image_edit_plus_pipeline(seed: int = 0):
    """Qwen-Image-Edit-2509/2511 (QwenImageEditPlusPipeline): several reference images, same transformer."""
    return tiny_qwen_image_edit_pipeline(seed, plus=True)


qwen_image_edit_plus_inputs = qwen_image_edit_inputs


def tiny_mochi_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLMochi, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=4, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=16, time_embed_dim=8, max_sequence_length=8)
    # its GroupNorms have 32 groups: 32 channels is the narrowest VAE possible
    vae = AutoencoderKLMochi(latent_channels=12, encoder_block_out_channels=(32, 32, 32, 32),
                             decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
                             add_attention_block=(False,) * 5)
    return _finish(MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, transformer=transformer))


def mochi_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8, frames: int = 7) -> dict:
    return _masked_text_inputs(seed + 15000, batch, cfg, tokens, 4.5, height=32, width=32, num_frames=frames)


def tiny_cogview4_pipeline(seed: int = 0):
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel

    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, pos_embed_max_size=16, sample_size=16,
        rope_axes_dim=(8, 8))
    return _finish(CogView4Pipeline(tokenizer=None, text_encoder=None, vae=_kl_vae(shift_factor=None),
                                    transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()))


def cogview4_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 16) -> dict:
    g = _gen(seed + 16000)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g), "height": 32, "width": 32,
              "output_type": "pt", "guidance_scale": 5.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
    return kwargs


def tiny_lumina2_pipeline(seed: int = 0):
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=4, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
        cap_feat_dim=16)
    # the pipeline hard-codes vae_scale_factor = 8: a 4-level VAE
    return _finish(Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                   vae=_kl_vae(levels=4), text_encoder=None, tokenizer=None))


def lumina2_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    return _masked_text_inputs(seed + 17000, batch, cfg, tokens, 4.0, height=64, width=64)


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
    return _finish(SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                scheduler=Sched(shift=3.0)))


def sana_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    return _masked_text_inputs(seed + 18000, batch, cfg, tokens, 4.5, height=32, width=32,
                               use_resolution_binning=False,
                               negative_prompt=None)  # defaults to "" (a text to encode) in these pipelines


def tiny_pixart_sigma_pipeline(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=16, norm_num_groups=2)
    return _finish(PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_kl_vae(shift_factor=None),
                                       transformer=transformer, scheduler=DPMSolverMultistepScheduler()))


def pixart_sigma_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    kwargs = sana_inputs(batch, seed + 1000, cfg, tokens)
    kwargs["guidance_scale"] = 4.5 if cfg else 1.0
    return kwargs


def tiny_hidream_pipeline(seed: int = 0):
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
        caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(4, 6, 6), max_resolution=(16, 16), llama_layers=[0, 1, 0, 1, 0, 1])
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_kl_vae(),
                                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                text_encoder_3=None, tokenizer_3=None, text_encoder_4=None, tokenizer_4=None,
                                transformer=transformer)
    # __call__ rescales any height x width to the area (default_sample_size * vae_scale_factor)**2 (128 latents a
    # side): 16 keeps the tiny pipeline at 32x32 pixels
    pipe.default_sample_size = 16
    return _finish(pipe)


def hidream_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    """Llama-3 embeddings are per layer: (num llama layers used, batch, tokens, dim)."""
    g = _gen(seed + 19000)
    kwargs = {"prompt_embeds_t5": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_llama3": torch.randn(2, batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 16, generator=g),
              "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 5.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds_t5"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_prompt_embeds_llama3"] = torch.randn(2, batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
    return kwargs


def tiny_skyreels_v2_pipeline(seed: int = 0):
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=_WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return _finish(SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=_wan_vae(),
                                      scheduler=scheduler))


skyreels_v2_inputs = wan_inputs


def tiny_kandinsky5_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo, Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel

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
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False)
    return _finish(Kandinsky5T2VPipeline(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                                         text_encoder_2=None, tokenizer_2=None,
                                         scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0)))


def kandinsky5_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 5) -> dict:
    g = _gen(seed + 20000)
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


def tiny_auraflow_pipeline(seed: int = 0):
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=4,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64)
    return _finish(AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=_kl_vae(shift_factor=None),
                                    transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()))


def auraflow_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    kwargs = sana_inputs(batch, seed + 2000, cfg, tokens)
    kwargs.pop("use_resolution_binning")
    kwargs["guidance_scale"] = 3.5 if cfg else 1.0
    return kwargs


def _flux_like_transformer(cls, **extra):
    return cls(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), **extra)


def tiny_ovis_image_pipeline(seed: int = 0):
    from diffusers import OvisImagePipeline, OvisImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = _flux_like_transformer(OvisImageTransformer2DModel, out_channels=16)
    return _finish(OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(), text_encoder=None,
                                     tokenizer=None, transformer=transformer))


def _flux_like_inputs(seed: int, batch: int, cfg: bool, tokens: int = 8, guidance: float = 4.0) -> dict:
    g = _gen(seed)
    kwargs = {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g), "height": 32, "width": 32,
              "output_type": "pt", "guidance_scale": guidance if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
    return kwargs


def ovis_image_inputs(batch: int = 1, seed: int = 0, cfg: bool = True) -> dict:
    kwargs = _flux_like_inputs(seed + 21000, batch, cfg)
    kwargs["negative_prompt"] = None  # defaults to "" (a text to encode)
    return kwargs


def tiny_bria_pipeline(seed: int = 0):
    from diffusers import BriaPipeline, BriaTransformer2DModel

    torch.manual_seed(seed)
    transformer = _flux_like_transformer(BriaTransformer2DModel)
    return _finish(BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(),
                                text_encoder=None, tokenizer=None))


def bria_inputs(batch: int = 1, seed: int = 0, cfg: bool = True) -> dict:
    return _flux_like_inputs(seed + 23000, batch, cfg, guidance=5.0)


def tiny_chronoedit_pipeline(seed: int = 0):
    """ChronoEdit (Wan 2.1 I2V architecture, image-edit as a 2-frame video): needs a CLIP image encoder."""
    from diffusers import ChronoEditPipeline, ChronoEditTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as _Proc
    except ImportError:
        from transformers import CLIPImageProcessor as _Proc

    torch.manual_seed(seed)
    transformer = ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4 + 4 + 4, out_channels=4,
        text_dim=_WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=4, image_dim=16, rope_max_seq_len=32)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8,
                                                     projection_dim=16))
    processor = _Proc(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _finish(ChronoEditPipeline(tokenizer=None, text_encoder=None, image_encoder=image_encoder,
                                      image_processor=processor, transformer=transformer, vae=_wan_vae(),
                                      scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0)))


chronoedit_inputs = wan_i2v_inputs


FAMILIES: dict[str, tuple[Callable[..., Any], Callable[..., dict]]] = {
    "wan": (tiny_wan_pipeline, wan_inputs),
    "wan_i2v": (tiny_wan_i2v_pipeline, wan_i2v_inputs),
    "wan22": (tiny_wan22_pipeline, wan22_inputs),
    "wan22_i2v": (tiny_wan22_i2v_pipeline, wan22_i2v_inputs),
    "hunyuan_video": (tiny_hunyuan_video_pipeline, hunyuan_video_inputs),
    "sd3": (tiny_sd3_pipeline, sd3_inputs),
    "sd35": (tiny_sd35_pipeline, sd35_inputs),
    "flux2": (tiny_flux2_pipeline, flux2_inputs),
    "flux2_klein": (tiny_flux2_klein_pipeline, flux2_klein_inputs),
    "chroma": (tiny_chroma_pipeline, chroma_inputs),
    "zimage": (tiny_zimage_pipeline, zimage_inputs),
    "qwen_image_edit": (tiny_qwen_image_edit_pipeline, qwen_image_edit_inputs),
    "ltx": (tiny_ltx_pipeline, ltx_inputs),
    "cogvideox": (tiny_cogvideox_pipeline, cogvideox_inputs),
    "hunyuan_image": (tiny_hunyuan_image_pipeline, hunyuan_image_inputs),
    "hunyuan_video15": (tiny_hunyuan_video15_pipeline, hunyuan_video15_inputs),
    "flux_kontext": (tiny_flux_kontext_pipeline, flux_kontext_inputs),
    "qwen_image_edit_plus": (tiny_qwen_image_edit_plus_pipeline, qwen_image_edit_plus_inputs),
    "mochi": (tiny_mochi_pipeline, mochi_inputs),
    "cogview4": (tiny_cogview4_pipeline, cogview4_inputs),
    "lumina2": (tiny_lumina2_pipeline, lumina2_inputs),
    "sana": (tiny_sana_pipeline, sana_inputs),
    "pixart_sigma": (tiny_pixart_sigma_pipeline, pixart_sigma_inputs),
    "hidream": (tiny_hidream_pipeline, hidream_inputs),
    "skyreels_v2": (tiny_skyreels_v2_pipeline, skyreels_v2_inputs),
    "kandinsky5": (tiny_kandinsky5_pipeline, kandinsky5_inputs),
    "auraflow": (tiny_auraflow_pipeline, auraflow_inputs),
    "ovis_image": (tiny_ovis_image_pipeline, ovis_image_inputs),
    "bria": (tiny_bria_pipeline, bria_inputs),
    "chronoedit": (tiny_chronoedit_pipeline, chronoedit_inputs),
}

#: The same pipelines called so that the number of transformer calls per step differs from what cache-dit 1.5.3
#: assumes for the family (its separate-CFG flag counts calls: odd calls are the CFG branch), plus the CFG modes
#: the defaults above do not exercise. docs/families.md, section 5.2, lists what cache-dit does with each.
VARIANTS: dict[str, tuple[Callable[..., Any], Callable[..., dict]]] = {
    # 1 call per step, cache-dit's Wan adapter says has_separate_cfg=True
    "wan_no_cfg": (tiny_wan_pipeline, partial(wan_inputs, cfg=False)),
    # 2 calls per step (true CFG), cache-dit's HunyuanVideo 1.0 adapter says has_separate_cfg=False
    "hunyuan_video_true_cfg": (tiny_hunyuan_video_pipeline, partial(hunyuan_video_inputs, cfg=True)),
    # distilled HunyuanImage-2.1: no guider, 1 call per step, adapter says has_separate_cfg=True
    "hunyuan_image_distilled": (partial(tiny_hunyuan_image_pipeline, guided=False),
                                partial(hunyuan_image_inputs, cfg=False)),
    # guider disabled: 1 call per step, adapter says has_separate_cfg=True
    "hunyuan_video15_no_cfg": (partial(tiny_hunyuan_video15_pipeline, guided=False),
                               partial(hunyuan_video15_inputs, cfg=False)),
    # true_cfg_scale 1: 1 call per step, QwenImage adapter says has_separate_cfg=True
    "qwen_image_edit_no_cfg": (tiny_qwen_image_edit_pipeline, partial(qwen_image_edit_inputs, cfg=False)),
    # FLUX.1 Kontext with true CFG: 2 calls per step, the Flux adapter says has_separate_cfg=False
    "flux_kontext_true_cfg": (tiny_flux_kontext_pipeline, partial(flux_kontext_inputs, cfg=True)),
    # Z-Image base with CFG: cond + uncond as one batched call (list inputs)
    "zimage_cfg": (tiny_zimage_pipeline, partial(zimage_inputs, cfg=True)),
    # SD3 without CFG (guidance_scale 1): batch 1 instead of 2
    "sd3_no_cfg": (tiny_sd3_pipeline, partial(sd3_inputs, cfg=False)),
}


#: residual-diff thresholds that make cache-dit 1.5.3 cache on each tiny pipeline with ``F1B0_W2M0MC2``
#: (docs/families.md section 5.1): the parity tests and the graph records use them.
THRESHOLDS: dict[str, float] = {
    "wan": 0.1, "wan_i2v": 0.05, "wan22": 0.05, "wan22_i2v": 0.05, "hunyuan_video": 0.2, "hunyuan_video15": 0.35,
    "sd35": 0.2, "flux2": 0.8, "chroma": 0.35, "zimage": 0.8, "qwen_image_edit": 0.35, "ltx": 0.05, "cogvideox": 0.2,
    "hunyuan_image": 0.35, "mochi": 0.05, "cogview4": 0.2, "lumina2": 0.1, "sana": 0.05, "pixart_sigma": 0.1,
    "skyreels_v2": 0.1, "chronoedit": 0.05, "kandinsky5": 0.1, "auraflow": 0.5, "ovis_image": 0.35,
    "hidream": 0.35}

#: Call modes where cache-dit 1.5.3 counts the transformer calls of a step wrongly (its separate-CFG flag comes from
#: the adapter / pipeline name, not from the calls: docs/families.md section 3, 5.2): name -> (threshold, whether the
#: pipeline really makes two calls per step). Told the real call pattern (``enable_separate_cfg``), cache-dit takes
#: our decisions; with its defaults it compares residuals of different steps or branches.
CFG_COUNT_CASES: dict[str, tuple[float, bool]] = {
    "wan_no_cfg": (0.1, False), "qwen_image_edit_no_cfg": (0.5, False), "hunyuan_video15_no_cfg": (0.35, False),
    "hunyuan_image_distilled": (0.35, False), "hunyuan_video_true_cfg": (0.35, True),
    # FLUX.2 [klein] base: true CFG as a second call ("uncond" context), cache-dit's Flux adapter says no separate
    # CFG. Its tiny diffs are ~1 (random weights): 0.99 is the smallest of the thresholds that caches.
    "flux2_klein": (0.99, True),
    # FLUX.1 Kontext with true CFG: cond and uncond as two unnamed calls per step (no cache context); we tell them
    # apart by their conditioning tensors, cache-dit's Flux adapter counts them as two steps
    "flux_kontext_true_cfg": (0.35, True),
}

#: Families with a golden graph record (graphs/family-<name>-regional.json): every tiny family of a supported model
#: family (Bria too: no cache-dit parity, cache-dit crashes on it; not HiDream: eager only). ``record_threshold`` is
#: the threshold the record runs with: the parity threshold, or a higher one where that one caches nothing in the
#: record's 6 steps (the record must run the compiled hit path).
RECORD_FAMILIES: tuple[str, ...] = (*(name for name in THRESHOLDS if name != "hidream"), "bria")
_RECORD_THRESHOLDS: dict[str, float] = {"auraflow": 0.8, "chroma": 0.8, "flux2": 0.99, "kandinsky5": 0.35,
                                         "mochi": 0.35, "sd35": 0.35, "bria": 0.5}


def record_threshold(name: str) -> float:
    return _RECORD_THRESHOLDS.get(name, THRESHOLDS.get(name))


def tiny_wan_vace_transformer(seed: int = 0):
    """A tiny ``WanVACETransformer3DModel`` (VACE hints after blocks 0 and 2) and its forward kwargs: the model
    ``optimize`` refuses (families.REFUSED)."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=_WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=WAN_BLOCKS, rope_max_seq_len=32,
        vace_layers=[0, 2], vace_in_channels=8).eval()
    g = _gen(seed + 3100)
    kwargs = {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 6, _WAN_TEXT_DIM, generator=g),
              "control_hidden_states": torch.randn(1, 8, 2, 8, 8, generator=g), "return_dict": False}
    return transformer, kwargs
