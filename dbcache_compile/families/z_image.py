"""Z-Image (Turbo / base): one list of joint layers taking ``x``; the refiners always run; batched CFG.
``ZImageControlNetPipeline`` passes ``controlnet_block_samples`` (a dict: layer index -> hint), which the forward adds
to the unified stream after ``layers[i]`` for each index in it: an index-added input."""

from __future__ import annotations

from . import CONTROL_INPUTS, IP_ADAPTER_INPUTS, Family, register_family

register_family(Family(name="z-image", transformer="ZImageTransformer2DModel",
                       pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageControlNetPipeline"),
                       chains=(("layers",),), cfg="batched",
                       contracts={"ZImageTransformerBlock": (0, None, "x", None)},
                       unsupported=tuple(n for n in CONTROL_INPUTS + IP_ADAPTER_INPUTS
                                         if n != "controlnet_block_samples"),
                       index_added=("controlnet_block_samples",), tested=True))
