"""FLUX.1 (dev / schnell / Kontext / Fill, and any pipeline around a ``FluxTransformer2DModel``): 19 double + 38
single blocks form one 57-block chain (Fn counts from the first double block, Bn from the last single block), and
the forward around them is written out (prologue / epilogue), so whole steps compile and CUDA-graph as one segment.
ControlNet residuals (``FluxControlNetPipeline``: ``controlnet_block_samples`` / ``controlnet_single_block_samples``,
by interval or ``controlnet_blocks_repeat``) are added after their blocks in our loop (:meth:`Flux.block_residuals`)
and IP-Adapter image embeddings are projected in :meth:`Flux.embed`, as the model's forward does.
"""

from __future__ import annotations

from math import ceil
from typing import Any, Optional

import torch

from . import CONTROL_INPUTS, IP_ADAPTER_INPUTS, Embedded, Family, register_family

_CONTROLNET = ("controlnet_block_samples", "controlnet_single_block_samples")
_IP_ADAPTER = "joint_attention_kwargs.ip_adapter_image_embeds"


@register_family
class Flux(Family):
    name = "flux"
    transformer = "FluxTransformer2DModel"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxKontextPipeline", "FluxFillPipeline",
                 "FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline")
    chains = (("transformer_blocks", "single_transformer_blocks"),)
    fused_qkv = True  # FluxAttnProcessor reads attn.to_qkv / to_added_qkv when attn.fused_projections
    signature = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance", "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples",
                 "return_dict", "controlnet_blocks_repeat")
    embedder = "x_embedder"
    tested = True
    #: ControlNet residuals (InstantX: by interval; XLabs: ``controlnet_blocks_repeat``) are added in our block loop
    #: as the model's forward adds them; IP-Adapter image embeddings are projected in :meth:`embed` as it does
    block_residual_inputs = (*_CONTROLNET, "controlnet_blocks_repeat")
    prologue_inputs = (*_CONTROLNET, _IP_ADAPTER)
    unsupported = tuple(sorted(set(CONTROL_INPUTS + IP_ADAPTER_INPUTS) - set(prologue_inputs)))

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
        if attention_kwargs is not None and "ip_adapter_image_embeds" in attention_kwargs:
            # as the model's forward: the IP-Adapter image embeddings projected once per call, into every block's
            # attention kwargs (a new dict: the caller's stays as it passed it)
            attention_kwargs = dict(attention_kwargs)
            embeds = attention_kwargs.pop("ip_adapter_image_embeds")
            attention_kwargs["ip_hidden_states"] = transformer.encoder_hid_proj(embeds)
        block_kwargs = {"temb": temb, "image_rotary_emb": rotary, "joint_attention_kwargs": attention_kwargs}
        return Embedded(hidden, encoder, block_kwargs, {"temb": temb})

    def project(self, transformer: torch.nn.Module, hidden: torch.Tensor, out_kwargs: dict[str, Any]) -> torch.Tensor:
        return transformer.proj_out(transformer.norm_out(hidden, out_kwargs["temb"]))

    def block_residuals(self, transformer: torch.nn.Module,
                        controls: dict[str, Any]) -> Optional[list[Optional[torch.Tensor]]]:
        """FluxTransformer2DModel.forward's ControlNet glue, per block of the 19 + 38 chain: double block ``i`` gets
        ``controlnet_block_samples[i // ceil(19 / n)]`` (``[i % n]`` with ``controlnet_blocks_repeat``), single
        block ``i`` gets ``controlnet_single_block_samples[i // ceil(38 / n)]``."""
        double, single = controls.get(_CONTROLNET[0]), controls.get(_CONTROLNET[1])
        n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
        out: list[Optional[torch.Tensor]] = [None] * (n_double + n_single)
        if double is not None:
            interval = int(ceil(n_double / len(double)))
            repeat = bool(controls.get("controlnet_blocks_repeat", False))
            for i in range(n_double):
                out[i] = double[i % len(double)] if repeat else double[i // interval]
        if single is not None:
            interval = int(ceil(n_single / len(single)))
            for i in range(n_single):
                out[n_double + i] = single[i // interval]
        return out
