"""Wan 2.1 / 2.2 (T2V, I2V, V2V; Wan 2.2 A14B's ``transformer_2`` gets its own runtime): one list of blocks that
return the hidden stream only."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="wan", transformer="WanTransformer3DModel",
                       pipelines=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
                       chains=(("blocks",),), tested=True))
