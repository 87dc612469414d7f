"""Bria 3.x: FLUX-like double and single blocks (returning (encoder, hidden)), each list its own chain. cache-dit
1.5.3 crashes on it: tested against the uncached model."""

from __future__ import annotations

from . import Family, register_family

#: ControlNet residuals: the transformer takes them, but nothing in diffusers 0.42.1 produces them
_CONTROLNET = ("its transformer takes ControlNet residuals, but no ControlNet model or pipeline of diffusers 0.42.1 "
               "produces them for it, so they are untested with the cache (the index-added mechanism would apply)")

register_family(Family(name="bria", transformer="BriaTransformer2DModel", pipelines=("BriaPipeline",),
                       refusal_reasons={name: _CONTROLNET for name in ("controlnet_block_samples",
                                                                       "controlnet_single_block_samples")},
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)), cfg="batched",
                       contracts={"BriaTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                 "BriaSingleTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states")},
                       tested=True))
