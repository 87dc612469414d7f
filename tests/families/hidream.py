"""HiDream-I1: HiDreamImageTransformer2DModel, 2 double + 4 single blocks with a routed MoE feed-forward; batched
CFG. Eager only (the MoE routing loop cannot be traced fullgraph): a parity test, no graph record."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import finish, gen, kl_vae

FAMILY = "hidream"


def tiny_hidream_pipeline(seed: int = 0):
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
        caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(4, 6, 6), max_resolution=(16, 16), llama_layers=[0, 1, 0, 1, 0, 1])
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=kl_vae(),
                                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                text_encoder_3=None, tokenizer_3=None, text_encoder_4=None, tokenizer_4=None,
                                transformer=transformer)
    # __call__ rescales any height x width to the area (default_sample_size * vae_scale_factor)**2 (128 latents a
    # side): 16 keeps the tiny pipeline at 32x32 pixels
    pipe.default_sample_size = 16
    return finish(pipe)


def hidream_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 8) -> dict:
    """Llama-3 embeddings are per layer: (num llama layers used, batch, tokens, dim)."""
    g = gen(seed + 19000)
    kwargs = {"prompt_embeds_t5": torch.randn(batch, tokens, 16, generator=g),
              "prompt_embeds_llama3": torch.randn(2, batch, tokens, 16, generator=g),
              "pooled_prompt_embeds": torch.randn(batch, 16, generator=g),
              "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 5.0 if cfg else 1.0}
    if cfg:
        kwargs["negative_prompt_embeds_t5"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs["negative_prompt_embeds_llama3"] = torch.randn(2, batch, tokens, 16, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
    return kwargs


CASES = {"hidream": Case(tiny_hidream_pipeline, hidream_inputs, threshold=0.35)}
