"""Sana: one list of blocks returning the hidden stream; batched CFG."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="sana", transformer="SanaTransformer2DModel", pipelines=("SanaPipeline",),
                       chains=(("transformer_blocks",),), cfg="batched",
                       contracts={"SanaTransformerBlock": (0, None, "hidden_states", None)}, tested=True))
