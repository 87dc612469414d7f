"""FLUX.1 (the tiny pipeline of :mod:`dbcache_compile.testing`) and FLUX.1 Kontext: the FLUX.1 transformer; Kontext
appends the reference image's tokens to the hidden sequence."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

from . import Case
from ._common import finish, flux_like_transformer, gen, image, kl_vae

FAMILY = "flux"


def tiny_flux_kontext_pipeline(seed: int = 0):
    """FLUX.1 Kontext: the FLUX.1 transformer; the reference image's tokens are appended to the hidden sequence."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = flux_like_transformer(FluxTransformer2DModel, pooled_projection_dim=16, guidance_embeds=True)
    return finish(FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(), text_encoder=None,
                                      tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer))


def flux_kontext_inputs(batch: int = 1, seed: int = 0, cfg: bool = False, tokens: int = 8) -> dict:
    """``max_area`` and ``_auto_resize=False`` keep output and reference image at 32x32 (the pipeline would rescale
    both to ~1 MP)."""
    g = gen(seed + 14000)
    kwargs = {"image": image(seed, 32), "prompt_embeds": torch.randn(batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 16, generator=g), "height": 32, "width": 32,
              "output_type": "pt", "guidance_scale": 2.5, "max_area": 32 * 32, "_auto_resize": False}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
        kwargs["true_cfg_scale"] = 2.0
    return kwargs


CASES = {
    # the tiny FLUX.1 of dbcache_compile.testing: the graph records' "flux" scenario (graphs/flux-<lowering>.json)
    # and test_parity's model
    "flux": Case(tiny_flux_pipeline, flux_inputs, threshold=0.35),
    "flux_kontext": Case(tiny_flux_kontext_pipeline, flux_kontext_inputs, threshold=0.35),
    # FLUX.1 Kontext with true CFG: 2 calls per step without a cache context (told apart by their conditioning
    # tensors), the Flux adapter says has_separate_cfg=False
    "flux_kontext_true_cfg": Case(tiny_flux_kontext_pipeline, partial(flux_kontext_inputs, cfg=True), threshold=0.35,
                                  separate_cfg=True),
}


def _unzero(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Seeded random weights for a ControlNet's zero-initialised projections (a trained ControlNet's are not zero;
    with zeros every residual would be 0 and a double-counted one would go unnoticed)."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_flux_controlnet_pipeline(seed: int = 0, double: int = 1, single: int = 2):
    """FluxControlNetPipeline (InstantX-style: the control image is VAE-encoded, `controlnet_blocks_repeat=False`)
    around the tiny FLUX.1 of :mod:`dbcache_compile.testing` (2 double + 6 single blocks) and a tiny
    FluxControlNetModel with ``double`` / ``single`` blocks: its samples are added by interval (double sample 0
    after both double blocks; single sample k after single blocks 3k..3k+2), so the middle span of F1B0 holds
    every kind of index."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = tiny_flux_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnet = FluxControlNetModel.from_transformer(base.transformer, num_layers=double,
                                                      num_single_layers=single, attention_head_dim=16,
                                                      num_attention_heads=2)
    for k, part in enumerate((controlnet.controlnet_blocks, controlnet.controlnet_single_blocks,
                              controlnet.controlnet_x_embedder)):
        _unzero(part, seed + 300 + k)
    return finish(FluxControlNetPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                                         text_encoder_2=None, tokenizer_2=None, transformer=base.transformer,
                                         controlnet=controlnet))


def flux_controlnet_inputs(batch: int = 1, seed: int = 0, cfg: bool = False) -> dict:
    kwargs = dict(flux_inputs(batch, seed), control_image=image(seed, 32), controlnet_conditioning_scale=0.8)
    if cfg:
        g = gen(seed + 15000)
        kwargs["negative_prompt_embeds"] = torch.randn(batch, 8, 32, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 32, generator=g)
        kwargs["true_cfg_scale"] = 2.0
    return kwargs


def tiny_flux_ip_adapter_pipeline(seed: int = 0):
    """FluxPipeline around the tiny FLUX.1 with a tiny CLIP image encoder (built locally, random weights) and one
    IP-Adapter loaded through diffusers' own loader, ``pipe.load_ip_adapter(state_dict, ...)``: the state dict (in
    the layout of XLabs' checkpoints after diffusers' key conversion: ``image_proj`` = an ImageProjection of 4 tokens,
    ``ip_adapter`` = to_k_ip / to_v_ip of each double block) is drawn here instead of downloaded; the loader puts
    FluxIPAdapterAttnProcessor on the double blocks and the MultiIPAdapterImageProjection into ``encoder_hid_proj``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    base = tiny_flux_pipeline(seed)
    transformer = base.transformer
    torch.manual_seed(seed + 2)
    clip_dim = 16
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=clip_dim)).eval()
    pipe = type(base)(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                      text_encoder_2=None, tokenizer_2=None, transformer=transformer, image_encoder=encoder,
                      feature_extractor=None)
    g = gen(seed + 500)
    cross, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, clip_dim, generator=g) * 0.2,
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


def flux_ip_adapter_inputs(batch: int = 1, seed: int = 0) -> dict:
    import numpy as np
    from PIL import Image

    pixels = (image(seed + 9, 32)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return dict(flux_inputs(batch, seed), ip_adapter_image=Image.fromarray(pixels))
