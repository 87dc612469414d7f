"""HunyuanImage 2.1: dual-stream then single-stream blocks, each list its own chain."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="hunyuan-image-2.1", transformer="HunyuanImageTransformer2DModel",
                       pipelines=("HunyuanImagePipeline",),
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)), tested=True))
