"""Generation core of the digits demo (``python -m dbcache_compile demo``): balanced sampling, scoring, timing and
the labelled image grid.

The CLI (:mod:`dbcache_compile.cli`) drives it; this module only needs a (possibly accelerated)
:class:`DigitsPipeline`::

    pipe = load_digits_pipeline()
    ref = generate_digits(pipe, per_class=4, num_inference_steps=20, seed=0)
    ref.accuracy, ref.seconds            # classifier accuracy in [0, 1], wall time of the pipeline call in s
    image_grid([("uncached", ref)]).save("digits.png")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
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


def image_grid(rows: Sequence[tuple[str, DigitSamples]], scale: int = 3) -> PIL.Image.Image:
    """The demo's ``grid.png``: one row per ``(name, samples)``, labelled with ``name`` on the left, the same digits
    in the same columns (all ``samples`` must come from the same labels); digits the classifier does not recognise
    as the requested one are tinted red. Tiles are upscaled ``scale``x (nearest)."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    labels = rows[0][1].labels
    for name, samples in rows:
        if not np.array_equal(samples.labels, labels):
            raise ValueError(f"row {name!r} was generated for other labels than row {rows[0][0]!r}")
    font = _font(4 * scale)
    side, pad = rows[0][1].images.shape[-1] * scale, scale
    text_width = max(int(np.ceil(font.getlength(name))) for name, _ in rows)
    left0 = pad + text_width + 3 * pad
    grid = np.full((len(rows) * (side + pad) + pad, left0 + len(labels) * (side + pad), 3), 40, dtype=np.uint8)
    for row, (_, samples) in enumerate(rows):
        for col, (image, label, pred) in enumerate(zip(samples.images, samples.labels, samples.predicted)):
            tile = np.kron((image * 255).round().astype(np.uint8), np.ones((scale, scale), dtype=np.uint8))
            rgb = np.stack([tile, tile, tile] if label == pred else [tile, tile // 4, tile // 4], axis=-1)
            top, left = pad + row * (side + pad), left0 + col * (side + pad)
            grid[top:top + side, left:left + side] = rgb
    image = PIL.Image.fromarray(grid)
    draw = PIL.ImageDraw.Draw(image)
    for row, (name, _) in enumerate(rows):
        middle = pad + row * (side + pad) + side // 2
        draw.text((pad, middle), name, fill=(235, 235, 235), font=font, anchor="lm")
    return image


def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (its bitmap font where Pillow has no FreeType)."""
    try:
        return PIL.ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return PIL.ImageFont.load_default()
