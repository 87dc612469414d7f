"""Image quality against a reference: the one PSNR of the project (the demo's PSNR column and ``bench``'s)."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

__all__ = ["psnr"]

Images = Union[np.ndarray, torch.Tensor]


def _float64(images: Images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().to("cpu", torch.float64).numpy()
    return np.asarray(images, dtype=np.float64)


def psnr(images: Images, reference: Images, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB, shape ``(N,)`` (scikit-image's ``peak_signal_noise_ratio`` on each image:
    ``10·log10(data_range² / MSE)`` over every non-batch element); ``inf`` where the image equals its reference.

    ``images`` and ``reference`` are arrays or tensors of the same shape ``(N, ...)``, e.g. ``(N, H, W)`` or
    ``(N, C, H, W)`` floats in ``[0, data_range]``.
    """
    from skimage.metrics import peak_signal_noise_ratio
    a, b = _float64(images), _float64(reference)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"psnr needs two batches of the same shape (N, ...), got {a.shape} and {b.shape}")
    with np.errstate(divide="ignore"):
        return np.array([np.inf if np.array_equal(x, y) else peak_signal_noise_ratio(y, x, data_range=data_range)
                         for x, y in zip(a, b)])
