"""Ovis-Image: FLUX-like double and single blocks, each list its own chain."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="ovis-image", transformer="OvisImageTransformer2DModel", pipelines=("OvisImagePipeline",),
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)),
                       contracts={"OvisImageTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                 "OvisImageSingleTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states")},
                       tested=True))
