"""AuraFlow: AuraFlowTransformer2DModel, joint (MMDiT) blocks then single DiT blocks; batched CFG."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, kl_vae
from .sana import sana_inputs

FAMILY = "auraflow"


def tiny_auraflow_pipeline(seed: int = 0):
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=4,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64)
    return finish(AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=kl_vae(shift_factor=None),
                                   transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()))


def auraflow_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    kwargs = sana_inputs(batch, seed + 2000, cfg, tokens)
    kwargs.pop("use_resolution_binning")
    kwargs["guidance_scale"] = 3.5 if cfg else 1.0
    return kwargs


CASES = {"auraflow": Case(tiny_auraflow_pipeline, auraflow_inputs, threshold=0.5, record=0.8)}
