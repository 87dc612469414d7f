"""FLUX.1 (dev / schnell / Kontext / Fill, and any pipeline around a ``FluxTransformer2DModel``): 19 double + 38
single blocks form one 57-block chain (Fn counts from the first double block, Bn from the last single block), and
the forward around them is written out (prologue / epilogue), so whole steps compile and CUDA-graph as one segment.
"""

from __future__ import annotations

from typing import Any

import torch

from . import Embedded, Family, register_family


@register_family
class Flux(Family):
    name = "flux"
    transformer = "FluxTransformer2DModel"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxKontextPipeline", "FluxFillPipeline")
    chains = (("transformer_blocks", "single_transformer_blocks"),)
    fused_qkv = True  # FluxAttnProcessor reads attn.to_qkv / to_added_qkv when attn.fused_projections
    signature = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance", "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples",
                 "return_dict", "controlnet_blocks_repeat")
    embedder = "x_embedder"
    tested = True

    def embed(self, transformer: torch.nn.Module, **kwargs: Any) -> Embedded:
        hidden = transformer.x_embedder(kwargs["hidden_states"])
        timestep = kwargs["timestep"].to(hidden.dtype) * 1000
        guidance = kwargs.get("guidance")
        pooled = kwargs.get("pooled_projections")
        if guidance is not None:
            temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
        else:
            temb = transformer.time_text_embed(timestep, pooled)
        encoder = transformer.context_embedder(kwargs["encoder_hidden_states"])
        txt_ids, img_ids = kwargs["txt_ids"], kwargs["img_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        attention_kwargs = kwargs.get("joint_attention_kwargs")
        block_kwargs = {"temb": temb, "image_rotary_emb": rotary, "joint_attention_kwargs": attention_kwargs}
        return Embedded(hidden, encoder, block_kwargs, {"temb": temb})

    def project(self, transformer: torch.nn.Module, hidden: torch.Tensor, out_kwargs: dict[str, Any]) -> torch.Tensor:
        return transformer.proj_out(transformer.norm_out(hidden, out_kwargs["temb"]))
