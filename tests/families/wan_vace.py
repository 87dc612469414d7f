"""Wan VACE (WanVACEPipeline): WanVACETransformer3DModel.blocks (the Wan blocks, hidden only) after its vace_blocks,
which turn the control video into one hint per block of ``vace_layers``; the forward adds hint k after that block
(an index-added input). Separate cond/uncond calls, each in its cache context."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import WAN_TEXT_DIM, finish, gen, text_inputs, wan_vae

FAMILY = "wan-vace"
VACE_BLOCKS = 4
#: hints after blocks 0, 1 and 2 of the 4: with F1B1 the hint of block 1 (a middle block) is the one a hit must add
#: once, the one of block 0 is in the Fn residual
VACE_LAYERS = (0, 1, 2)


def _vace_transformer(vace_in_channels: int):
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=VACE_BLOCKS, rope_max_seq_len=32,
        vace_layers=list(VACE_LAYERS), vace_in_channels=vace_in_channels)


def tiny_wan_vace_pipeline(seed: int = 0):
    """The real WanVACEPipeline: control latents = VAE(inactive video), VAE(reactive video) and the 8x8-folded mask
    on channels (4 + 4 + 64). The VACE blocks' output projections get larger random weights, so that the hints
    weigh about as much as a block's own residual."""
    from diffusers import WanVACEPipeline

    torch.manual_seed(seed)
    transformer = _vace_transformer(4 + 4 + 64)
    for block in transformer.vace_blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.2)
    return finish(WanVACEPipeline(tokenizer=None, text_encoder=None, vae=wan_vae(),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer))


def wan_vace_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 5,
                    size: int = 32) -> dict:
    """A control video (random frames) and its mask (all ones: generate everywhere)."""
    from PIL import Image

    g = gen(seed + 3200)
    kwargs = text_inputs(seed + 3000, batch, cfg, tokens, 5.0, size, num_frames=frames)
    video = (torch.rand(frames, size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    kwargs["video"] = [Image.fromarray(frame) for frame in video]
    kwargs["mask"] = [Image.new("L", (size, size), 255)] * frames
    return kwargs


CASES = {
    # cache-dit runs Wan VACE through its WanVACEPatchFunctor (the hint added inside the block): same cached steps
    "wan_vace": Case(tiny_wan_vace_pipeline, wan_vace_inputs, threshold=0.1, record=0.1,
                     record_lowerings=("regional",)),
    # 1 call per step, cache-dit's Wan adapter says has_separate_cfg=True
    "wan_vace_no_cfg": Case(tiny_wan_vace_pipeline, partial(wan_vace_inputs, cfg=False), threshold=0.1,
                            separate_cfg=False),
}
