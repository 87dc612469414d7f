"""HunyuanVideo 1.5: one list of dual-stream blocks (diffusers' registry does not describe them)."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="hunyuan-video-1.5", transformer="HunyuanVideo15Transformer3DModel",
                       pipelines=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
                       chains=(("transformer_blocks",),),
                       contracts={"HunyuanVideo15TransformerBlock": (0, 1, "hidden_states", "encoder_hidden_states")},
                       tested=True))
