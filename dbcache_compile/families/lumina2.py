"""Lumina-Image 2.0: the refiners always run, ``layers`` is the chain; cond and uncond as two unnamed calls."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="lumina2", transformer="Lumina2Transformer2DModel", pipelines=("Lumina2Pipeline",),
                       chains=(("layers",),), cfg="separate",
                       contracts={"Lumina2TransformerBlock": (0, None, "hidden_states", None)}, tested=True))
