"""A small scikit-learn digit classifier used to score generated digits.

An RBF ``sklearn.svm.SVC`` (default hyper-parameters) on the same 16x16 bilinear-upscaled digits in [0, 1] as
the generator (:func:`dbcache_compile.digits.model.load_real_digits`), flattened to 256 features. It is fit
deterministically on a stratified 75% split of the 1797 sklearn digits (``random_state=0``) the first time it is
needed (~0.1 s) and cached; on the 450 held-out real digits it scores 98.9% (:func:`held_out_accuracy`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from .model import IMAGE_SIZE, load_real_digits

_CACHE: dict[str, object] = {}


def _fitted() -> tuple[SVC, np.ndarray, np.ndarray]:
    """The fitted classifier and the held-out ``(features (450, 256), labels (450,))``, built once."""
    if "model" not in _CACHE:
        images, labels = load_real_digits()
        features = images.reshape(len(images), -1)
        x_train, x_test, y_train, y_test = train_test_split(
            features, labels, test_size=0.25, stratify=labels, random_state=0
        )
        _CACHE["model"] = SVC().fit(x_train, y_train)
        _CACHE["held_out"] = (x_test, y_test)
    x_test, y_test = _CACHE["held_out"]
    return _CACHE["model"], x_test, y_test


def _features(images: np.ndarray | torch.Tensor | Sequence[PIL.Image.Image]) -> np.ndarray:
    """Flatten images to (N, 256) float features in [0, 1].

    Accepts (N, 16, 16) or (N, 1, 16, 16) arrays/tensors, floats in [0, 1] or uint8 in [0, 255], or a list of
    16x16 grayscale PIL images (the pipeline's ``"np"``, ``"pt"`` and ``"pil"`` outputs).
    """
    if isinstance(images, torch.Tensor):
        array = images.detach().float().cpu().numpy()
    elif isinstance(images, np.ndarray):
        array = images
    else:
        array = np.stack([np.asarray(img) for img in images])
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {array.shape}")
    return array.reshape(len(array), -1).astype(np.float32)


def classify(images: np.ndarray | torch.Tensor | Sequence[PIL.Image.Image]) -> np.ndarray:
    """Predicted digit (int64, shape (N,)) for each 16x16 image in [0, 1] (see :func:`_features` for formats)."""
    model, _, _ = _fitted()
    return model.predict(_features(images)).astype(np.int64)


def accuracy(
    images: np.ndarray | torch.Tensor | Sequence[PIL.Image.Image],
    labels: Sequence[int] | np.ndarray | torch.Tensor,
) -> float:
    """Fraction in [0, 1] of ``images`` classified as the matching entry of ``labels`` (N ints in 0..9)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    expected = np.asarray(labels, dtype=np.int64)
    predicted = classify(images)
    if expected.shape != predicted.shape:
        raise ValueError(f"got {len(predicted)} images but labels of shape {expected.shape}")
    return float((predicted == expected).mean())


def held_out_accuracy() -> float:
    """Accuracy of the classifier on the 450 real digits it was not fit on (0.989)."""
    model, x_test, y_test = _fitted()
    return float(model.score(x_test, y_test))
