"""LTX-Video 0.9.x: one list of blocks; batched CFG."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="ltx-video", transformer="LTXVideoTransformer3DModel",
                       pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
                       chains=(("transformer_blocks",),), cfg="batched", tested=True))
