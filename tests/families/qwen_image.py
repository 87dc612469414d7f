"""Qwen-Image (the tiny pipeline of :mod:`dbcache_compile.testing`) and Qwen-Image-Edit / Edit-Plus
(QwenImageEditPipeline, QwenImageEditPlusPipeline): QwenImageTransformer2DModel, whose hidden sequence for Edit is
[noisy latents, VAE(input image)] tokens; separate CFG calls (cache_context "cond"/"uncond") with true_cfg_scale."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dbcache_compile.testing import qwen_inputs, tiny_qwen_pipeline

from . import Case
from ._common import finish, gen

FAMILY = "qwen-image"
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
    return finish(cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                      processor=None, transformer=transformer))


def tiny_qwen_image_edit_plus_pipeline(seed: int = 0):
    """Qwen-Image-Edit-2509/2511 (QwenImageEditPlusPipeline): several reference images, same transformer."""
    return tiny_qwen_image_edit_pipeline(seed, plus=True)


def qwen_image_edit_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 7) -> dict:
    from PIL import Image

    g = gen(seed + 9000)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    kwargs = {"image": Image.fromarray(pixels), "prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_mask": torch.ones(batch, tokens, dtype=torch.long),
              "height": 64, "width": 64, "output_type": "pt", "true_cfg_scale": 4.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens - 2, 16, generator=g)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(batch, tokens - 2, dtype=torch.long)
    return kwargs


CASES = {
    # the tiny Qwen-Image of dbcache_compile.testing with true CFG: the graph records' "qwen-image" scenario
    # (graphs/qwen-image-<lowering>.json) and test_parity's model
    "qwen_image": Case(tiny_qwen_pipeline, partial(qwen_inputs, cfg=True), threshold=0.35),
    # segments of the Qwen-Image prologue: graphs/qwen-image-segments.json (Inductor)
    "qwen_image_edit": Case(tiny_qwen_image_edit_pipeline, qwen_image_edit_inputs, threshold=0.35, record=0.35,
                            record_lowerings=("regional",)),
    "qwen_image_edit_plus": Case(tiny_qwen_image_edit_plus_pipeline, qwen_image_edit_inputs, threshold=0.35),
    # true_cfg_scale 1: 1 call per step, QwenImage adapter says has_separate_cfg=True
    "qwen_image_edit_no_cfg": Case(tiny_qwen_image_edit_pipeline, partial(qwen_image_edit_inputs, cfg=False),
                                   threshold=0.5, separate_cfg=False),
}


def tiny_qwen_image_controlnet_pipeline(seed: int = 0, layers: int = 2):
    """QwenImageControlNetPipeline around the tiny Qwen-Image of :mod:`dbcache_compile.testing` (6 blocks) and a
    tiny QwenImageControlNetModel of ``layers`` blocks: sample k is added after blocks 3k..3k+2 (interval 3)."""
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline

    base = tiny_qwen_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnet = QwenImageControlNetModel.from_transformer(base.transformer, num_layers=layers,
                                                           attention_head_dim=16, num_attention_heads=2)
    g = gen(seed + 400)
    with torch.no_grad():  # a trained ControlNet's projections are not zero (zeros would hide a double count)
        for part in (controlnet.controlnet_blocks, controlnet.controlnet_x_embedder):
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return finish(QwenImageControlNetPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None,
                                              tokenizer=None, transformer=base.transformer, controlnet=controlnet))


def qwen_image_controlnet_inputs(batch: int = 1, seed: int = 0, cfg: bool = False) -> dict:
    from ._common import image
    return dict(qwen_inputs(batch, seed, cfg=cfg), control_image=image(seed, 32), controlnet_conditioning_scale=0.8)
