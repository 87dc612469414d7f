"""Model definition and data for the tiny class-conditional FLUX digits model.

The model is the real :class:`diffusers.FluxTransformer2DModel` with a small config, run in pixel space
(no VAE) on scikit-learn's ``load_digits`` images:

* Data: the 8x8 digits (integer intensities 0..16) are divided by 16 and upscaled to 16x16 with **bilinear**
  interpolation (``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``), giving values
  in [0, 1]. The model works on ``2 * x - 1`` in [-1, 1].
* Packing: a (B, 1, 16, 16) image is packed into (B, 64, 4) tokens exactly like ``FluxPipeline._pack_latents``
  (2x2 patches, channel-major inside a token), so ``in_channels=4`` and there are 8x8 = 64 image tokens.
* Positions: ``img_ids`` is (64, 3) with the patch row in channel 1 and the patch column in channel 2 (as in
  ``FluxPipeline._prepare_latent_image_ids``); ``txt_ids`` is all zeros, (4, 3).
* Conditioning: :class:`DigitClassConditioner` maps a digit label 0..9 to 4 ``encoder_hidden_states`` tokens of
  ``joint_attention_dim`` and one ``pooled_projections`` vector of ``pooled_projection_dim`` (FLUX's "text" inputs).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from sklearn.datasets import load_digits
from torch import nn

IMAGE_SIZE = 16
"""Side of the generated (and upscaled training) images, in pixels."""
NUM_CLASSES = 10
"""Digits 0..9."""
NUM_TEXT_TOKENS = 4
"""Number of ``encoder_hidden_states`` tokens produced per label."""
PATCH = 2
"""FLUX packs 2x2 pixel patches into one token."""
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 64
TOKEN_CHANNELS = PATCH * PATCH  # 1 image channel x 2 x 2 = 4

TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": TOKEN_CHANNELS,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 6,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}
"""Keyword arguments of :class:`diffusers.FluxTransformer2DModel` for the digits model (2 double + 6 single
blocks, hidden size 64, ~0.71 M parameters)."""


class DigitClassConditioner(ModelMixin, ConfigMixin):
    """Learned class embedding standing in for FLUX's text encoders.

    Maps integer labels to ``encoder_hidden_states`` (B, num_tokens, joint_attention_dim) and
    ``pooled_projections`` (B, pooled_projection_dim), both float tensors in the module's dtype.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        num_tokens: int = NUM_TEXT_TOKENS,
        joint_attention_dim: int = 64,
        pooled_projection_dim: int = 64,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(num_classes, num_tokens * joint_attention_dim)
        self.pooled_embedding = nn.Embedding(num_classes, pooled_projection_dim)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed ``labels`` (B,) int64 in [0, num_classes) into ``(encoder_hidden_states, pooled_projections)``."""
        if labels.dtype != torch.long or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D int64 tensor, got shape {tuple(labels.shape)} {labels.dtype}")
        num_classes = self.config.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}), got {labels.tolist()}")
        tokens = self.token_embedding(labels).view(
            labels.shape[0], self.config.num_tokens, self.config.joint_attention_dim
        )
        return tokens, self.pooled_embedding(labels)


def build_transformer() -> FluxTransformer2DModel:
    """A randomly initialised :class:`diffusers.FluxTransformer2DModel` with :data:`TRANSFORMER_CONFIG`."""
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def build_conditioner() -> DigitClassConditioner:
    """A randomly initialised :class:`DigitClassConditioner` matching :data:`TRANSFORMER_CONFIG`."""
    return DigitClassConditioner(
        num_classes=NUM_CLASSES,
        num_tokens=NUM_TEXT_TOKENS,
        joint_attention_dim=TRANSFORMER_CONFIG["joint_attention_dim"],
        pooled_projection_dim=TRANSFORMER_CONFIG["pooled_projection_dim"],
    )


def pack_images(images: torch.Tensor) -> torch.Tensor:
    """Pack (B, 1, 16, 16) images into (B, 64, 4) FLUX tokens, like ``FluxPipeline._pack_latents``."""
    b, c, h, w = images.shape
    tokens = images.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_images`: (B, 64, 4) tokens -> (B, 1, 16, 16) images."""
    b, n, ch = tokens.shape
    side = IMAGE_SIZE // PATCH
    if n != side * side or ch != TOKEN_CHANNELS:
        raise ValueError(f"expected tokens of shape (B, {side * side}, {TOKEN_CHANNELS}), got {tuple(tokens.shape)}")
    images = tokens.view(b, side, side, ch // (PATCH * PATCH), PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return images.reshape(b, ch // (PATCH * PATCH), IMAGE_SIZE, IMAGE_SIZE)


def image_ids(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX ``img_ids`` (64, 3): zeros in channel 0, patch row in channel 1, patch column in channel 2."""
    side = IMAGE_SIZE // PATCH
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3).to(device=device, dtype=dtype)


def text_ids(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX ``txt_ids`` (4, 3): all zeros."""
    return torch.zeros(NUM_TEXT_TOKENS, 3, device=device, dtype=dtype)


def load_real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits upscaled to 16x16.

    Returns:
        ``(images, labels)``: images float32 (1797, 16, 16) in [0, 1] (8x8 intensities / 16, bilinear upscaling
        with ``align_corners=False``); labels int64 (1797,) in 0..9.
    """
    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return big[:, 0].numpy(), digits.target.astype(np.int64)
