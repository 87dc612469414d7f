"""Z-Image (Turbo / base): one list of joint layers taking ``x``; the refiners always run; batched CFG."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="z-image", transformer="ZImageTransformer2DModel",
                       pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline"), chains=(("layers",),), cfg="batched",
                       contracts={"ZImageTransformerBlock": (0, None, "x", None)}, tested=True))
