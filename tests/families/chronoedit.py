"""ChronoEdit (Wan 2.1 I2V architecture, image-edit as a 2-frame video): ChronoEditTransformer3DModel.blocks; needs
a CLIP image encoder; the Wan I2V inputs."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from . import Case
from ._common import WAN_TEXT_DIM, clip_image_encoder, finish, wan_vae
from .wan import wan_i2v_inputs

FAMILY = "chronoedit"


def tiny_chronoedit_pipeline(seed: int = 0):
    from diffusers import ChronoEditPipeline, ChronoEditTransformer3DModel

    torch.manual_seed(seed)
    transformer = ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4 + 4 + 4, out_channels=4,
        text_dim=WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=4, image_dim=16, rope_max_seq_len=32)
    image_encoder, processor = clip_image_encoder()
    return finish(ChronoEditPipeline(tokenizer=None, text_encoder=None, image_encoder=image_encoder,
                                     image_processor=processor, transformer=transformer, vae=wan_vae(),
                                     scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0)))


CASES = {"chronoedit": Case(tiny_chronoedit_pipeline, wan_i2v_inputs, threshold=0.05, record=0.05)}
