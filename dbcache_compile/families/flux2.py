"""FLUX.2 [dev] / [klein]: dual-stream then single-stream blocks, each list its own chain. Block i of the
[klein] KV cache reads ``kv_cache.get_double(i)`` / ``get_single(i)``: refused."""

from __future__ import annotations

from . import CONTROL_INPUTS, Family, IP_ADAPTER_INPUTS, register_family

register_family(Family(name="flux2", transformer="Flux2Transformer2DModel",
                       pipelines=("Flux2Pipeline", "Flux2KleinPipeline"),
                       chains=(("transformer_blocks",), ("single_transformer_blocks",)),
                       unsupported=CONTROL_INPUTS + IP_ADAPTER_INPUTS + ("kv_cache", "kv_cache_mode"), tested=True))
