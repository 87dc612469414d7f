"""SkyReels-V2: Wan-like blocks returning the hidden stream."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="skyreels-v2", transformer="SkyReelsV2Transformer3DModel",
                       pipelines=("SkyReelsV2Pipeline",), chains=(("blocks",),),
                       contracts={"SkyReelsV2TransformerBlock": (0, None, "hidden_states", None)}, tested=True))
