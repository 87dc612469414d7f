"""Mochi: one list of blocks; batched CFG."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="mochi", transformer="MochiTransformer3DModel", pipelines=("MochiPipeline",),
                       chains=(("transformer_blocks",),), cfg="batched", tested=True))
