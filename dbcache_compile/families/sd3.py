"""Stable Diffusion 3 / 3.5 (MMDiT, MMDiT-X): one list of joint blocks; batched CFG (one call per step). The
ControlNet pipeline passes ``block_controlnet_hidden_states``, which the forward adds to the hidden stream after every
block but the last (residual ``int(i / (N / len(residuals)))``): an index-added input. IP-Adapter image embeddings
(``joint_attention_kwargs["ip_adapter_image_embeds"]``) are projected by the model's own forward into the block kwargs:
they run unchanged (tests/test_ip_adapter.py)."""

from __future__ import annotations

from . import CONTROL_INPUTS, Family, register_family

register_family(Family(name="sd3", transformer="SD3Transformer2DModel",
                       pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                                  "StableDiffusion3ControlNetPipeline"),
                       chains=(("transformer_blocks",),), cfg="batched",
                       unsupported=tuple(n for n in CONTROL_INPUTS
                                         if n != "block_controlnet_hidden_states"),
                       index_added=("block_controlnet_hidden_states",), tested=True))
