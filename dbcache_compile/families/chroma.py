"""Chroma: FLUX-like double and single blocks, each list its own chain; cond and uncond as two unnamed calls."""

from __future__ import annotations

from . import CONTROL_INPUTS, Family, register_family

#: ControlNet residuals: the transformer takes them, but nothing in diffusers 0.42.1 produces them
_CONTROLNET = ("its transformer takes ControlNet residuals, but no ControlNet model or pipeline of diffusers 0.42.1 "
               "produces them for it, so they are untested with the cache (the index-added mechanism would apply)")

register_family(Family(name="chroma", transformer="ChromaTransformer2DModel",
                       pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline"),
                       refusal_reasons={name: _CONTROLNET for name in ("controlnet_block_samples",
                                                                       "controlnet_single_block_samples")},
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)), cfg="separate",
                       # IP-Adapter image embeddings: projected by the model's own forward into the block kwargs
                       unsupported=CONTROL_INPUTS,
                       contracts={"ChromaTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                                  "ChromaSingleTransformerBlock": (0, None, "hidden_states", None)},
                       ungroupable="its forward slices a modulation of its own for each block "
                                   "(pooled_temb[:, 3 * i: 3 * i + 3])", tested=True))
