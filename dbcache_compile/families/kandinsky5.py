"""Kandinsky 5 (T2V): the visual blocks are the chain; cond and uncond as two unnamed calls."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="kandinsky5", transformer="Kandinsky5Transformer3DModel",
                       pipelines=("Kandinsky5T2VPipeline",), chains=(("visual_transformer_blocks",),), cfg="separate",
                       tested=True))
