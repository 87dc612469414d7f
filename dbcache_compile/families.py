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
  VACE hints, skip layers): a call that passes one is refused with the argument's name instead of producing an image
  the cache silently changed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["Family", "FAMILIES", "contract_for", "family_for", "supported_models"]

# what the cache does not implement in any family: inputs added after block i by the model's own loop
_CONTROL = ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states",
            "controlnet_states", "controlnet_block_hidden_states", "skip_layers", "vace_hints")


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
    unsupported: tuple[str, ...] = _CONTROL
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
    Family("flux2", "Flux2Transformer2DModel", ("Flux2Pipeline", "Flux2KleinPipeline"),
           (("transformer_blocks",), ("single_transformer_blocks",)), tested=True),
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
                "chains": ["+".join(chain) for chain in f.chains], "cfg": f.cfg, "lowerings": ["eager", "regional"],
                "tested": f.tested} for f in FAMILIES]
    return explicit + generic
