"""Chroma: FLUX-like double and single blocks, each list its own chain; cond and uncond as two unnamed calls."""

from __future__ import annotations

from . import CONTROL_INPUTS, Family, register_family

register_family(Family(name="chroma", transformer="ChromaTransformer2DModel",
                       pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline"),
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)), cfg="separate",
                       # IP-Adapter image embeddings: projected by the model's own forward into the block kwargs
                       unsupported=CONTROL_INPUTS,
                       contracts={"ChromaTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                                  "ChromaSingleTransformerBlock": (0, None, "hidden_states", None)},
                       ungroupable="its forward slices a modulation of its own for each block "
                                   "(pooled_temb[:, 3 * i: 3 * i + 3])", tested=True))
