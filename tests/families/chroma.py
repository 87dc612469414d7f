"""Chroma: FLUX-like 2 double + 4 single blocks, per-block modulation sliced from one pooled_temb inside the loop."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, flux_like_transformer, kl_vae, masked_text_inputs

FAMILY = "chroma"
CHROMA_BLOCKS = (2, 4)


def tiny_chroma_pipeline(seed: int = 0):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(seed)
    transformer = flux_like_transformer(ChromaTransformer2DModel, approximator_num_channels=16,
                                        approximator_hidden_dim=32, approximator_layers=1)
    return finish(ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(), text_encoder=None,
                                 tokenizer=None, transformer=transformer))


def chroma_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    # bool mask: the pipeline appends bool ones for the image tokens and SDPA rejects integer masks
    return masked_text_inputs(seed + 7000, batch, cfg, tokens, 4.0, torch.bool, height=32, width=32)


CASES = {"chroma": Case(tiny_chroma_pipeline, chroma_inputs, threshold=0.35, record=0.8)}
