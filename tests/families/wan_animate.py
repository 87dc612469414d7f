"""Wan Animate (WanAnimatePipeline, mode "animate"): WanAnimateTransformer3DModel.blocks (the Wan blocks, hidden
only); after every ``inject_face_latents_blocks``-th block the forward adds the face adapter's output (a
cross-attention of the hidden stream to motion features of ``face_pixel_values``): an index-added input. Separate
cond/uncond calls in cache contexts; the uncond call gets a new blanked face tensor at every step."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import WAN_TEXT_DIM, clip_image_encoder, finish, gen, text_inputs, wan_vae

FAMILY = "wan-animate"
ANIMATE_BLOCKS = 4
FACE_SIZE = 16


def tiny_wan_animate_pipeline(seed: int = 0, inject_every: int = 1):
    """Face adapters after every block (``inject_face_latents_blocks=1``: with F1B1 the adapter of middle block 1 is
    the one a hit must apply once). The face adapters' output projections get larger random weights, so that their
    outputs weigh about as much as a block's own residual."""
    from diffusers import WanAnimatePipeline, WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=ANIMATE_BLOCKS, image_dim=16,
        rope_max_seq_len=32, motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8},
        motion_encoder_size=FACE_SIZE, motion_style_dim=8, motion_dim=4, motion_encoder_dim=8,
        face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=inject_every,
        motion_encoder_batch_size=4)
    for adapter in transformer.face_adapter:
        torch.nn.init.normal_(adapter.to_out.weight, std=0.2)
    image_encoder, processor = clip_image_encoder()
    return finish(WanAnimatePipeline(tokenizer=None, text_encoder=None, vae=wan_vae(),
                                     scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                     image_processor=processor, image_encoder=image_encoder,
                                     transformer=transformer))


def _frames(g: torch.Generator, count: int, size: int) -> list:
    from PIL import Image

    video = (torch.rand(count, size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(frame) for frame in video]


def wan_animate_inputs(batch: int = 1, seed: int = 0, cfg: bool = True, tokens: int = 6, frames: int = 5,
                       size: int = 32) -> dict:
    """One segment of ``frames`` frames: a reference image, a pose video and a face video (random pixels)."""
    g = gen(seed + 3300)
    kwargs = text_inputs(seed + 3000, batch, cfg, tokens, 5.0, size, segment_frame_length=frames)
    kwargs["image"] = _frames(g, 1, size)[0]
    kwargs["pose_video"] = _frames(g, frames, size)
    kwargs["face_video"] = _frames(g, frames, FACE_SIZE)
    return kwargs


CASES = {
    # cache-dit 1.5.3 cannot run it (its Wan adapter asserts WanTransformer3DModel / WanVACETransformer3DModel):
    # tests/test_index_added.py checks it against the uncached pipeline
    "wan_animate": Case(tiny_wan_animate_pipeline, wan_animate_inputs, record=0.1, record_lowerings=("regional",)),
    "wan_animate_no_cfg": Case(tiny_wan_animate_pipeline, partial(wan_animate_inputs, cfg=False)),
}
