"""FLUX.1 (dev / schnell, and any pipeline around a ``FluxTransformer2DModel``): 19 double + 38 single blocks form one
57-block chain (Fn counts from the first double block, Bn from the last single block)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from . import Adapter, Embedded, register_adapter, reject_unsupported

_SIGNATURE = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
              "guidance", "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples",
              "return_dict", "controlnet_blocks_repeat")


class FluxAdapter(Adapter):
    name = "flux"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    fused_qkv = True  # FluxAttnProcessor reads attn.to_qkv / to_added_qkv when attn.fused_projections
    signature = _SIGNATURE
    embedder = "x_embedder"

    def embed(self, transformer: FluxTransformer2DModel, *args: Any, **kwargs: Any) -> Embedded:
        kwargs.update(zip(_SIGNATURE, args))
        reject_unsupported(kwargs, ("controlnet_block_samples", "controlnet_single_block_samples"), "FLUX")
        attn_kwargs = kwargs.get("joint_attention_kwargs")
        if attn_kwargs and "ip_adapter_image_embeds" in attn_kwargs:
            raise NotImplementedError("FLUX: IP-Adapter inputs are not supported by the cached forward yet")
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
        block_kwargs = {"temb": temb, "image_rotary_emb": rotary, "joint_attention_kwargs": attn_kwargs}
        return Embedded(hidden, encoder, block_kwargs, {"temb": temb})

    def project(self, transformer: FluxTransformer2DModel, hidden: torch.Tensor,
                out_kwargs: dict[str, Any]) -> torch.Tensor:
        return transformer.proj_out(transformer.norm_out(hidden, out_kwargs["temb"]))


register_adapter((FluxTransformer2DModel,), FluxAdapter())
