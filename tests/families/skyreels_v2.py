"""SkyReels-V2: SkyReelsV2Transformer3DModel.blocks (Wan-like, returning the hidden stream); the Wan inputs."""

from __future__ import annotations

import torch

from . import Case
from ._common import WAN_TEXT_DIM, finish, wan_vae
from .wan import wan_inputs

FAMILY = "skyreels-v2"


def tiny_skyreels_v2_pipeline(seed: int = 0):
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return finish(SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=wan_vae(),
                                     scheduler=scheduler))


CASES = {"skyreels_v2": Case(tiny_skyreels_v2_pipeline, wan_inputs, threshold=0.1, record=0.1)}
