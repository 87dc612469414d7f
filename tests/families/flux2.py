"""FLUX.2 [dev] / [klein]: Flux2Transformer2DModel, 2 double transformer_blocks ((encoder, hidden)) then 4
single_transformer_blocks that take the concatenated [text, image] sequence as hidden_states only."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, text_inputs

FAMILY = "flux2"
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
    return finish(Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                tokenizer=None, transformer=transformer))


def flux2_inputs(batch: int = 1, seed: int = 0, tokens: int = 8) -> dict:
    g = gen(seed + 6000)
    return {"prompt_embeds": torch.randn(batch, tokens, 16, generator=g), "height": 32, "width": 32,
            "output_type": "pt", "guidance_scale": 4.0}


def tiny_flux2_klein_pipeline(seed: int = 0):
    """FLUX.2 [klein] base (not distilled): no guidance embedding, true CFG as a second call per step."""
    from diffusers import Flux2KleinPipeline

    transformer, vae = _flux2_parts(seed, guidance_embeds=False)
    return finish(Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                     tokenizer=None, transformer=transformer, is_distilled=False))


def flux2_klein_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    return text_inputs(seed + 6500, batch, cfg, tokens)


CASES = {
    "flux2": Case(tiny_flux2_pipeline, flux2_inputs, threshold=0.8, record=0.99),
    # FLUX.2 [klein] base: true CFG as a second call ("uncond" context), cache-dit's Flux adapter says no separate
    # CFG. Its tiny diffs are ~1 (random weights): 0.99 is the smallest of the thresholds that caches.
    "flux2_klein": Case(tiny_flux2_klein_pipeline, flux2_klein_inputs, threshold=0.99, separate_cfg=True),
}
