"""PixArt-alpha / Sigma: one list of blocks; batched CFG."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="pixart", transformer="PixArtTransformer2DModel",
                       pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"), chains=(("transformer_blocks",),),
                       cfg="batched", tested=True))
