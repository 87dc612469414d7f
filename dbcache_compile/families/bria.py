"""Bria 3.x: FLUX-like double and single blocks (returning (encoder, hidden)), each list its own chain. cache-dit
1.5.3 crashes on it: tested against the uncached model."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="bria", transformer="BriaTransformer2DModel", pipelines=("BriaPipeline",),
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)), cfg="batched",
                       contracts={"BriaTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                 "BriaSingleTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states")},
                       tested=True))
