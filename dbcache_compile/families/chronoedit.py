"""ChronoEdit: Wan blocks; cond and uncond as two unnamed calls."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="chronoedit", transformer="ChronoEditTransformer3DModel", pipelines=("ChronoEditPipeline",),
                       chains=(("blocks",),), cfg="separate",
                       contracts={"WanTransformerBlock": (0, None, "hidden_states", "encoder_hidden_states")},
                       tested=True))
