"""AuraFlow: the single-stream blocks are the chain (the joint blocks before them always run); batched CFG."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="auraflow", transformer="AuraFlowTransformer2DModel", pipelines=("AuraFlowPipeline",),
                       chains=(("single_transformer_blocks",),), cfg="batched",
                       contracts={"AuraFlowSingleTransformerBlock": (0, None, "hidden_states", None)}, tested=True))
