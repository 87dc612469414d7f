"""Tiny class-conditional FLUX transformer on sklearn's 8x8 digits (upscaled to 16x16), for CPU demos and tests.

Usage::

    from dbcache_compile.digits import load_digits_pipeline
    from dbcache_compile.digits.classifier import accuracy

    pipe = load_digits_pipeline()                       # shipped weights, offline
    out = pipe([0, 1, 2], num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    out.images                                          # float32 (3, 16, 16) in [0, 1]
    accuracy(out.images, [0, 1, 2])

See :mod:`.model` for the data/packing conventions, :mod:`.train` to reproduce the weights and
:mod:`.classifier` for the scoring classifier.
"""

from .model import TRANSFORMER_CONFIG, DigitClassConditioner
from .pipeline import WEIGHTS_DIR, DigitsPipeline, DigitsPipelineOutput, load_digits_pipeline

__all__ = [
    "TRANSFORMER_CONFIG",
    "WEIGHTS_DIR",
    "DigitClassConditioner",
    "DigitsPipeline",
    "DigitsPipelineOutput",
    "load_digits_pipeline",
]
