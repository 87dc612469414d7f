"""Qwen-Image / Qwen-Image-Edit / Edit-Plus (and Qwen-Image-Lightning LoRAs): one list of 60 dual-stream blocks, and
the forward around them written out (prologue / epilogue). The pipeline runs true CFG as a second transformer call
per step ("uncond" cache context) when ``true_cfg_scale > 1`` and a negative prompt is given. ControlNet residuals
(``QwenImageControlNetPipeline``) are added after their blocks in our loop (:meth:`QwenImage.block_residuals`)."""

from __future__ import annotations

from math import prod
from math import ceil
from typing import Any, Optional

import torch

from . import CONTROL_INPUTS, IP_ADAPTER_INPUTS, Embedded, Family, register_family

#: the keyword under which :meth:`QwenImage.eager_inputs` passes the rotary embedding to :meth:`QwenImage.embed`
_ROTARY = "_dbcache_image_rotary_emb"


@register_family
class QwenImage(Family):
    name = "qwen-image"
    transformer = "QwenImageTransformer2DModel"
    pipelines = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline",
                 "QwenImageControlNetPipeline")
    chains = (("transformer_blocks",),)
    fused_qkv = False  # QwenDoubleStreamAttnProcessor2_0 (diffusers 0.42) always calls to_q/to_k/to_v
    signature = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes",
                 "guidance", "attention_kwargs", "controlnet_block_samples", "additional_t_cond", "return_dict")
    embedder = "img_in"
    default_true_cfg_scale = 4.0  # QwenImagePipeline's default
    attention_kwargs = "attention_kwargs"
    tested = True
    #: ControlNet residuals are added in our block loop as the model's forward adds them
    block_residual_inputs = prologue_inputs = ("controlnet_block_samples",)
    unsupported = tuple(sorted(set(CONTROL_INPUTS + IP_ADAPTER_INPUTS) - set(prologue_inputs)))

    def embed(self, transformer: torch.nn.Module, **kwargs: Any) -> Embedded:
        from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
        hidden = transformer.img_in(kwargs["hidden_states"])
        timestep = kwargs["timestep"].to(hidden.dtype)
        img_shapes = kwargs.get("img_shapes")
        modulate_index = None
        if transformer.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            modulate_index = torch.tensor(
                [[0] * prod(s[0]) + [1] * sum(prod(x) for x in s[1:]) for s in img_shapes],
                device=timestep.device, dtype=torch.int)
        encoder = transformer.txt_in(transformer.txt_norm(kwargs["encoder_hidden_states"]))
        text_seq_len, _, mask = compute_text_seq_len_from_mask(encoder, kwargs.get("encoder_hidden_states_mask"))
        guidance = kwargs.get("guidance")
        t_cond = kwargs.get("additional_t_cond")
        if guidance is not None:
            temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, hidden, t_cond)
        else:
            temb = transformer.time_text_embed(timestep, hidden, t_cond)
        rotary = kwargs.get(_ROTARY)
        if rotary is None:
            rotary = transformer.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden.device)
        block_kwargs = {"encoder_hidden_states_mask": mask, "temb": temb, "image_rotary_emb": rotary,
                        "joint_attention_kwargs": kwargs.get("attention_kwargs"), "modulate_index": modulate_index}
        out_temb = temb.chunk(2, dim=0)[0] if transformer.zero_cond_t else temb
        return Embedded(hidden, encoder, block_kwargs, {"temb": out_temb})

    def eager_inputs(self, transformer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The rotary embedding, computed before the compiled head instead of inside it. Its ``pos_embed`` slices
        the module's ``pos_freqs`` / ``neg_freqs`` tensors; traced, those slices are fake views of a fake base, which
        torch 2.13 keeps alive from C++ after the compile is released (with its whole fake-tensor world, ~5 MiB per
        compile of the tiny model). Computed here, the head receives plain input tensors; the values are the same
        (``pos_embed`` is cached by shape in diffusers, so this costs a lookup and a small copy per step)."""
        named = self.named_inputs(args, kwargs)
        hidden, encoder, img_shapes = (named.get(k) for k in ("hidden_states", "encoder_hidden_states", "img_shapes"))
        if not isinstance(hidden, torch.Tensor) or not isinstance(encoder, torch.Tensor) or img_shapes is None:
            return kwargs
        rotary = transformer.pos_embed(img_shapes, max_txt_seq_len=encoder.shape[1], device=hidden.device)
        return dict(kwargs, **{_ROTARY: tuple(r.clone() for r in rotary)})

    def project(self, transformer: torch.nn.Module, hidden: torch.Tensor, out_kwargs: dict[str, Any]) -> torch.Tensor:
        return transformer.proj_out(transformer.norm_out(hidden, out_kwargs["temb"]))

    def block_residuals(self, transformer: torch.nn.Module,
                        controls: dict[str, Any]) -> Optional[list[Optional[torch.Tensor]]]:
        """QwenImageTransformer2DModel.forward's ControlNet glue: block ``i`` gets
        ``controlnet_block_samples[i // ceil(60 / n)]``."""
        samples = controls["controlnet_block_samples"]
        count = len(transformer.transformer_blocks)
        interval = int(ceil(count / len(samples)))
        return [samples[i // interval] for i in range(count)]
