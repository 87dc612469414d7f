"""HiDream-I1: double and single blocks, each list its own chain. Both lists hold ``HiDreamBlock`` wrappers:
double blocks return (hidden, encoder), single blocks hidden only (one contract serves both: a tensor output has
no encoder stream). The forward concatenates the i-th Llama-3 layer to block i's text input and slices it off after
the block: that glue runs on hits too."""

from __future__ import annotations

from . import Family, register_family

_NO_COMPILE = ("its blocks' MoE feed-forward routes tokens with a data-dependent Python loop over experts "
               "(MOEFeedForwardSwiGLU.moe_infer), which a fullgraph compile cannot trace")

register_family(Family(name="hidream", transformer="HiDreamImageTransformer2DModel",
                       pipelines=("HiDreamImagePipeline",),
                       chains=(("double_stream_blocks",), ("single_stream_blocks",)), cfg="batched",
                       contracts={"HiDreamBlock": (0, 1, "hidden_states", "encoder_hidden_states")},
                       refused_lowerings=dict.fromkeys(("segments", "regional", "cond"), _NO_COMPILE), tested=True))
