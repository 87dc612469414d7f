"""Chroma: FLUX-like 2 double + 4 single blocks, per-block modulation sliced from one pooled_temb inside the loop."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, flux_like_transformer, gen, kl_vae, masked_text_inputs

FAMILY = "chroma"
CHROMA_BLOCKS = (2, 4)
#: width of the image embeddings the tiny Chroma IP-Adapter projects
CHROMA_IP_EMBED_DIM = 24


def tiny_chroma_pipeline(seed: int = 0):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(seed)
    transformer = flux_like_transformer(ChromaTransformer2DModel, approximator_num_channels=16,
                                        approximator_hidden_dim=32, approximator_layers=1)
    return finish(ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(), text_encoder=None,
                                 tokenizer=None, transformer=transformer))


def tiny_chroma_ip_adapter_pipeline(seed: int = 0):
    """ChromaPipeline around the tiny Chroma with one IP-Adapter loaded through diffusers' own loader (Chroma's
    transformer has FLUX's, ``FluxTransformer2DLoadersMixin``): ``pipe.load_ip_adapter(state_dict,
    image_encoder_folder=None)`` with a state dict drawn here in XLabs' layout (``image_proj`` = an ImageProjection of
    4 tokens, ``ip_adapter`` = to_k_ip / to_v_ip of each double block), as ``tests/families/flux.py`` does for FLUX.1;
    the loader puts FluxIPAdapterAttnProcessor on the double blocks and a MultiIPAdapterImageProjection into
    ``encoder_hid_proj``. No image encoder: calls pass the embeddings (:func:`chroma_ip_adapter_inputs`)."""
    pipe = tiny_chroma_pipeline(seed)
    transformer = pipe.transformer
    g = gen(seed + 600)
    cross, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, CHROMA_IP_EMBED_DIM, generator=g) * 0.2,
                  "proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter = {}
    for k in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{k}.{name}.weight"] = torch.randn(inner, cross, generator=g) * 0.2
            ip_adapter[f"{k}.{name}.bias"] = torch.randn(inner, generator=g) * 0.1
    pipe.load_ip_adapter({"image_proj": image_proj, "ip_adapter": ip_adapter}, weight_name="ip_adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path=None, low_cpu_mem_usage=False)
    return finish(pipe)


def chroma_ip_adapter_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    """:func:`chroma_inputs` plus the IP-Adapter image embeddings (one adapter: a list of one ``[batch, 1, dim]``
    tensor) and, with CFG, the negative ones (the pipeline would otherwise encode a black image)."""
    kwargs = chroma_inputs(batch, seed, cfg, tokens)
    g = gen(seed + 7500)
    kwargs["ip_adapter_image_embeds"] = [torch.randn(batch, 1, CHROMA_IP_EMBED_DIM, generator=g)]
    if cfg:
        kwargs["negative_ip_adapter_image_embeds"] = [torch.randn(batch, 1, CHROMA_IP_EMBED_DIM, generator=g)]
    return kwargs


def chroma_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    # bool mask: the pipeline appends bool ones for the image tokens and SDPA rejects integer masks
    return masked_text_inputs(seed + 7000, batch, cfg, tokens, 4.0, torch.bool, height=32, width=32)


CASES = {"chroma": Case(tiny_chroma_pipeline, chroma_inputs, threshold=0.35, record=0.8)}
