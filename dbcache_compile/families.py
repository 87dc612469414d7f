"""Model families the generic adapter (:mod:`dbcache_compile.generic`) serves, declared as data: per transformer class,
which block lists form each cached chain, how each block class takes and returns its streams, how its pipelines run
CFG, and which forward inputs the cache does not implement. (How each family was read from diffusers 0.42.1 and
cache-dit 1.5.3, with sources: ``docs/families.md``.)

* **Chains.** cache-dit keeps one cache context per block list (its own Fn/Bn split, residual, decision and step
  count); FLUX.1 is the exception (one chain of 57 blocks, explicit adapter). So a family lists its chains; each
  chain is a tuple of block-list attribute names (usually one). Lists in no chain (Z-Image's refiners) always run.
* **Block contracts.** Which output of a block is the hidden stream and which the encoder stream, and the names of
  those arguments. diffusers' ``TransformerBlockRegistry`` has most of them, but not all, and two are wrong (Bria
  returns ``(encoder, hidden)``; Z-Image's blocks take ``x``): entries here take precedence.
* **CFG.** Pipelines that call the transformer twice per step mostly say so with ``cache_context("cond" /
  "uncond")``; a family whose pipeline makes both calls without a context (Chroma, Lumina2, Kandinsky 5,
  ChronoEdit) declares ``cfg="separate"``, and its calls then alternate between the two branches whenever the
  pipeline's ``do_classifier_free_guidance`` is on. ``"batched"``: cond and uncond in one call (one decision).
* **Unsupported inputs.** Forward arguments that feed blocks by index from outside the chain (ControlNet residuals,
  skip layers, FLUX.2's KV cache) and IP-Adapter embeddings: a call that passes one is refused with the argument's
  name instead of producing an image the cache silently changed. Models whose forward always does so (Wan VACE's
  hints, Wan Animate's face adapter) are refused at ``optimize`` time (``REFUSED``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["Family", "FAMILIES", "REFUSED", "contract_for", "family_for", "supported_models"]

# what the cache does not implement in any family: inputs added after block i by the model's own loop (diffusers
# 0.42.1 forward arguments: FLUX.1/Chroma/Bria/Sana/Z-Image/Qwen-Image ControlNet residuals, SD3's ControlNet
# residuals and skip-layer guidance), and IP-Adapter image embeddings (they reach the blocks through the attention
# kwargs; no test covers them with the cache). "<argument>.<key>": a key of a dict argument.
_CONTROL = ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states",
            "skip_layers")
_IP_ADAPTER = ("joint_attention_kwargs.ip_adapter_image_embeds", "attention_kwargs.ip_adapter_image_embeds")

#: transformer classes refused at ``optimize`` time (their blocks are in diffusers' registry, so the generic adapter
#: would take them): class name -> why. Their forward adds something to the hidden stream after block i, by index,
#: between the blocks a hit skips, so a hit would add it twice (measured on a tiny Wan VACE transformer called three
#: times on identical inputs: the hit, which must reproduce the uncached output exactly, was 0.55 max abs off).
REFUSED: dict[str, str] = {
    "WanVACETransformer3DModel": (
        "Wan VACE is not supported: its forward adds the VACE hint computed from `control_hidden_states` to the "
        "hidden stream after each block in `vace_layers` (by index, between the blocks a cache hit skips), so the "
        "cache would add those hints twice; cache-dit needs a patch functor for it (WanVACEPatchFunctor)"),
    "WanAnimateTransformer3DModel": (
        "Wan Animate is not supported: its forward adds the face adapter's output (from `face_pixel_values`) to the "
        "hidden stream after every `inject_face_latents_blocks`-th block, by index, between the "
        "blocks a cache hit skips, so the cache would add it twice"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """One transformer class's caching recipe (module doc)."""

    name: str
    transformer: str
    pipelines: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]
    cfg: str = "contexts"  # "contexts" | "separate" | "batched" (see the module doc)
    #: block class name -> (hidden output index, encoder output index or None, hidden argument, encoder argument)
    contracts: dict = dataclasses.field(default_factory=dict)
    unsupported: tuple[str, ...] = _CONTROL + _IP_ADAPTER
    #: the generic lowerings the family supports, and why a compiled one is missing
    lowerings: tuple[str, ...] = ("eager", "regional")
    lowering_note: str = ""
    #: whether tests/test_families.py runs a tiny pipeline of the family: a parity test against cache-dit 1.5.3
    #: (Bria: against its uncached forward, cache-dit 1.5.3 crashes on it)
    tested: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("wan", "WanTransformer3DModel",
           ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"), (("blocks",),), tested=True),
    Family("hunyuan-video", "HunyuanVideoTransformer3DModel",
           ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
           (("transformer_blocks",), ("single_transformer_blocks",)), tested=True),
    Family("hunyuan-video-1.5", "HunyuanVideo15Transformer3DModel",
           ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"), (("transformer_blocks",),),
           contracts={"HunyuanVideo15TransformerBlock": (0, 1, "hidden_states", "encoder_hidden_states")},
           tested=True),
    Family("sd3", "SD3Transformer2DModel", ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
           (("transformer_blocks",),), cfg="batched", tested=True),
    # kv_cache / kv_cache_mode (FLUX.2 [klein] KV): block i reads kv_cache.get_double(i) / get_single(i)
    Family("flux2", "Flux2Transformer2DModel", ("Flux2Pipeline", "Flux2KleinPipeline"),
           (("transformer_blocks",), ("single_transformer_blocks",)),
           unsupported=_CONTROL + _IP_ADAPTER + ("kv_cache", "kv_cache_mode"), tested=True),
    Family("chroma", "ChromaTransformer2DModel", ("ChromaPipeline", "ChromaImg2ImgPipeline"),
           (("transformer_blocks",), ("single_transformer_blocks",)), cfg="separate",
           contracts={"ChromaTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                      "ChromaSingleTransformerBlock": (0, None, "hidden_states", None)}, tested=True),
    Family("z-image", "ZImageTransformer2DModel", ("ZImagePipeline", "ZImageImg2ImgPipeline"), (("layers",),),
           cfg="batched", contracts={"ZImageTransformerBlock": (0, None, "x", None)}, tested=True),
    Family("ltx-video", "LTXVideoTransformer3DModel",
           ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"), (("transformer_blocks",),),
           cfg="batched", tested=True),
    Family("cogvideox", "CogVideoXTransformer3DModel",
           ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
           (("transformer_blocks",),), cfg="batched", tested=True),
    Family("hunyuan-image-2.1", "HunyuanImageTransformer2DModel", ("HunyuanImagePipeline",),
           (("transformer_blocks",), ("single_transformer_blocks",)), tested=True),
    Family("mochi", "MochiTransformer3DModel", ("MochiPipeline",), (("transformer_blocks",),), cfg="batched", tested=True),
    Family("cogview4", "CogView4Transformer2DModel", ("CogView4Pipeline",), (("transformer_blocks",),), tested=True),
    Family("lumina2", "Lumina2Transformer2DModel", ("Lumina2Pipeline",), (("layers",),), cfg="separate",
           contracts={"Lumina2TransformerBlock": (0, None, "hidden_states", None)}, tested=True),
    Family("sana", "SanaTransformer2DModel", ("SanaPipeline",), (("transformer_blocks",),), cfg="batched",
           contracts={"SanaTransformerBlock": (0, None, "hidden_states", None)}, tested=True),
    Family("pixart", "PixArtTransformer2DModel", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
           (("transformer_blocks",),), cfg="batched", tested=True),
    Family("skyreels-v2", "SkyReelsV2Transformer3DModel", ("SkyReelsV2Pipeline",), (("blocks",),),
           contracts={"SkyReelsV2TransformerBlock": (0, None, "hidden_states", None)}, tested=True),
    Family("chronoedit", "ChronoEditTransformer3DModel", ("ChronoEditPipeline",), (("blocks",),), cfg="separate",
           contracts={"WanTransformerBlock": (0, None, "hidden_states", "encoder_hidden_states")}, tested=True),
    Family("kandinsky5", "Kandinsky5Transformer3DModel", ("Kandinsky5T2VPipeline",),
           (("visual_transformer_blocks",),), cfg="separate", tested=True),
    Family("auraflow", "AuraFlowTransformer2DModel", ("AuraFlowPipeline",), (("single_transformer_blocks",),),
           cfg="batched", contracts={"AuraFlowSingleTransformerBlock": (0, None, "hidden_states", None)}, tested=True),
    Family("ovis-image", "OvisImageTransformer2DModel", ("OvisImagePipeline",),
           (("transformer_blocks",), ("single_transformer_blocks",)),
           contracts={"OvisImageTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                      "OvisImageSingleTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states")}, tested=True),
    # both lists hold HiDreamBlock wrappers: double blocks return (hidden, encoder), single blocks hidden only (the
    # one contract serves both: a tensor output has no encoder stream). The forward concatenates the i-th Llama-3
    # layer to block i's text input and slices it off after the block: that glue runs on hits too.
    Family("hidream", "HiDreamImageTransformer2DModel", ("HiDreamImagePipeline",),
           (("double_stream_blocks",), ("single_stream_blocks",)), cfg="batched",
           contracts={"HiDreamBlock": (0, 1, "hidden_states", "encoder_hidden_states")}, lowerings=("eager",),
           lowering_note="its blocks' MoE feed-forward routes tokens with a data-dependent Python loop over experts "
                         "(MOEFeedForwardSwiGLU.moe_infer), which a fullgraph compile cannot trace", tested=True),
    Family("bria", "BriaTransformer2DModel", ("BriaPipeline",),
           (("transformer_blocks",), ("single_transformer_blocks",)), cfg="batched",
           contracts={"BriaTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states"),
                      "BriaSingleTransformerBlock": (1, 0, "hidden_states", "encoder_hidden_states")}, tested=True),
)


def family_for(transformer_cls: type) -> Optional[Family]:
    """The family entry for a transformer class (by class name, so that no family's module is imported)."""
    name = transformer_cls.__name__
    return next((f for f in FAMILIES if f.transformer == name), None)


def contract_for(block_cls: type, family: Optional[Family]) -> Optional[tuple]:
    """``(hidden out, encoder out, hidden arg, encoder arg)`` of a block class: the family's entry, else diffusers'
    ``TransformerBlockRegistry``, else ``None``."""
    if family is not None and block_cls.__name__ in family.contracts:
        return family.contracts[block_cls.__name__]
    from diffusers.hooks._helpers import TransformerBlockRegistry
    try:
        meta = TransformerBlockRegistry.get(block_cls)
    except ValueError:
        return None
    return (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index,
            meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name)


def supported_models() -> list[dict]:
    """One row per supported model family: ``family``, ``transformer`` (class name), ``pipelines``, ``adapter``
    (``"file"``: an explicit adapter with its segment graphs; ``"generic"``), ``chains`` (block lists, each its own
    decision; ``"+"`` joins lists of one chain), ``cfg`` and ``lowerings``, and whether a parity test against
    cache-dit 1.5.3 covers it (``tested``). The README's model table is this list."""
    explicit = [
        {"family": "flux", "transformer": "FluxTransformer2DModel",
         "pipelines": ["FluxPipeline", "FluxImg2ImgPipeline", "FluxKontextPipeline", "FluxFillPipeline"],
         "adapter": "file", "chains": ["transformer_blocks+single_transformer_blocks"], "cfg": "contexts",
         "lowerings": ["eager", "segments", "regional", "cond"], "tested": True},
        {"family": "qwen-image", "transformer": "QwenImageTransformer2DModel",
         "pipelines": ["QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"],
         "adapter": "file", "chains": ["transformer_blocks"], "cfg": "contexts",
         "lowerings": ["eager", "segments", "regional", "cond"], "tested": True},
    ]
    generic = [{"family": f.name, "transformer": f.transformer, "pipelines": list(f.pipelines), "adapter": "generic",
                "chains": ["+".join(chain) for chain in f.chains], "cfg": f.cfg, "lowerings": list(f.lowerings),
                "tested": f.tested} for f in FAMILIES]
    return explicit + generic
