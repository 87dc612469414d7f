"""Generation core of the digits demo: balanced sampling, scoring, timing and an image grid.

The CLI lives elsewhere; this module only needs a (possibly accelerated) :class:`DigitsPipeline`::

    pipe = load_digits_pipeline()
    ref = generate_digits(pipe, per_class=4, num_inference_steps=20, seed=0)
    ref.accuracy, ref.seconds            # classifier accuracy in [0, 1], wall time of the pipeline call in s
    save_grid(ref, "digits.png")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .classifier import classify
from .model import NUM_CLASSES
from .pipeline import DigitsPipeline


@dataclass
class DigitSamples:
    """Result of :func:`generate_digits`.

    Attributes:
        images: float32 (N, 16, 16) in [0, 1], N = per_class * 10, ordered class by class (0,0,..,1,1,..).
        labels: int64 (N,) requested digits.
        predicted: int64 (N,) digits recognised by :func:`dbcache_compile.digits.classifier.classify`.
        seconds: wall time of the pipeline call, in seconds.
    """

    images: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    seconds: float

    @property
    def accuracy(self) -> float:
        """Fraction in [0, 1] of images recognised as the requested digit."""
        return float((self.predicted == self.labels).mean())


def balanced_labels(per_class: int) -> list[int]:
    """``per_class`` copies of each digit, class by class: ``[0]*per_class + [1]*per_class + ...`` (10*per_class)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    return [digit for digit in range(NUM_CLASSES) for _ in range(per_class)]


def generate_digits(
    pipe: DigitsPipeline,
    per_class: int = 4,
    num_inference_steps: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> DigitSamples:
    """Generate ``per_class`` digits of each class in one batched pipeline call, timed and classified.

    The initial noise depends only on ``seed`` and ``per_class``, so calls with the same arguments on differently
    accelerated pipelines start from identical noise and can be compared image by image.
    """
    labels = balanced_labels(per_class)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    images = pipe(labels, num_inference_steps=num_inference_steps, generator=generator, progress=progress).images
    seconds = time.perf_counter() - start
    return DigitSamples(
        images=images, labels=np.asarray(labels, dtype=np.int64), predicted=classify(images), seconds=seconds
    )


def mean_abs_diff(samples: DigitSamples, reference: DigitSamples) -> float:
    """Mean absolute pixel difference in [0, 1] between two runs with the same labels (e.g. cached vs uncached)."""
    if samples.images.shape != reference.images.shape or not np.array_equal(samples.labels, reference.labels):
        raise ValueError("samples and reference must come from the same labels (same per_class)")
    return float(np.abs(samples.images - reference.images).mean())


def save_grid(samples: DigitSamples, path: str | Path, scale: int = 4) -> Path:
    """Save the images as a PNG grid, one row per requested digit, upscaled ``scale``x (nearest).

    Correctly recognised digits are drawn white on black; misrecognised ones in red. Returns the path.
    """
    per_class = len(samples.labels) // NUM_CLASSES
    side, pad = samples.images.shape[-1] * scale, scale
    grid = np.zeros((NUM_CLASSES * (side + pad) + pad, per_class * (side + pad) + pad, 3), dtype=np.uint8)
    for i, (image, label, pred) in enumerate(zip(samples.images, samples.labels, samples.predicted)):
        tile = np.kron((image * 255).round().astype(np.uint8), np.ones((scale, scale), dtype=np.uint8))
        rgb = np.stack([tile, tile, tile], axis=-1) if label == pred else np.stack([tile, tile // 4, tile // 4], -1)
        row, col = divmod(i, per_class)
        top, left = pad + row * (side + pad), pad + col * (side + pad)
        grid[top : top + side, left : left + side] = rgb
    path = Path(path)
    PIL.Image.fromarray(grid).save(path)
    return path
