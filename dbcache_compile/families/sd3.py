"""Stable Diffusion 3 / 3.5 (MMDiT, MMDiT-X): one list of joint blocks; batched CFG (one call per step)."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="sd3", transformer="SD3Transformer2DModel",
                       pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
                       chains=(("transformer_blocks",),), cfg="batched", tested=True))
