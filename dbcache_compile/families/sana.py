"""Sana: one list of blocks returning the hidden stream; batched CFG. ``SanaControlNetPipeline`` passes
``controlnet_block_samples``, which the forward adds to the hidden stream after blocks 1 .. len(samples) (sample
``i - 1`` after block ``i``): an index-added input."""

from __future__ import annotations

from . import CONTROL_INPUTS, IP_ADAPTER_INPUTS, Family, register_family

register_family(Family(name="sana", transformer="SanaTransformer2DModel",
                       pipelines=("SanaPipeline", "SanaControlNetPipeline"),
                       chains=(("transformer_blocks",),), cfg="batched",
                       contracts={"SanaTransformerBlock": (0, None, "hidden_states", None)},
                       unsupported=tuple(n for n in CONTROL_INPUTS + IP_ADAPTER_INPUTS
                                         if n != "controlnet_block_samples"),
                       index_added=("controlnet_block_samples",), tested=True))
