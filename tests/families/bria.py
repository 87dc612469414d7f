"""Bria 3.x: BriaTransformer2DModel, FLUX-like double and single blocks returning (encoder, hidden). cache-dit 1.5.3
crashes on it (it reads the block outputs hidden-first): no cache-dit parity (tests/test_families.py tests it
against the uncached model), a graph record."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, flux_like_transformer, kl_vae, text_inputs

FAMILY = "bria"


def tiny_bria_pipeline(seed: int = 0):
    from diffusers import BriaPipeline, BriaTransformer2DModel

    torch.manual_seed(seed)
    transformer = flux_like_transformer(BriaTransformer2DModel)
    return finish(BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(),
                               text_encoder=None, tokenizer=None))


def bria_inputs(batch: int = 1, seed: int = 0, cfg: bool = True) -> dict:
    return text_inputs(seed + 23000, batch, cfg, guidance=5.0)


CASES = {"bria": Case(tiny_bria_pipeline, bria_inputs, record=0.5)}
