"""CogView4: one list of blocks."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="cogview4", transformer="CogView4Transformer2DModel", pipelines=("CogView4Pipeline",),
                       chains=(("transformer_blocks",),), tested=True))
