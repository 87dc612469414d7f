"""HunyuanVideo 1.0: dual-stream then single-stream blocks, each list its own chain (cache-dit's two
contexts)."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="hunyuan-video", transformer="HunyuanVideoTransformer3DModel",
                       pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)), tested=True))
