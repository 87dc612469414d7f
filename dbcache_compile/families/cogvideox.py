"""CogVideoX: one list of blocks; batched CFG."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="cogvideox", transformer="CogVideoXTransformer3DModel",
                       pipelines=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline",
                                  "CogVideoXVideoToVideoPipeline"),
                       chains=(("transformer_blocks",),), cfg="batched", tested=True))
