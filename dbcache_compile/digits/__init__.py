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

import contextlib
import logging
from typing import Iterator

#: diffusers' torchao quantizer module. Imported with diffusers' model classes, it warns "Unable to import `torchao`
#: Tensor objects. This may affect loading checkpoints serialized with `torchao`" when the installed torchao lacks a
#: tensor class it registers for ``torch.load`` (diffusers 0.42.1 with torchao 0.18: ``torchao.dtypes.NF4Tensor`` is
#: gone). The digits weights are plain safetensors, never torchao-serialized, so that warning says nothing here.
TORCHAO_QUANTIZER_LOGGER = "diffusers.quantizers.torchao.torchao_quantizer"
#: What importing diffusers' model classes prints when torchao is installed (diffusers imports torchao there, in
#: ``diffusers.quantizers.torchao``, whatever the caller asked for): torchao's own logger ("Failed to load
#: .../_C_mxfp8...so", "_C_cutlass_90a": its CUDA kernel libraries on a machine without them), torch's pytree
#: deprecation for the enums torchao registers, and the quantizer warning above. Warnings about a quantization the
#: demo never runs.
QUIET_AT_IMPORT = ("torchao", "torch.utils._pytree", TORCHAO_QUANTIZER_LOGGER)


@contextlib.contextmanager
def _quiet_torchao_quantizer() -> Iterator[None]:
    """Drop those loggers' warnings while this package imports diffusers' models (they fire once per process, at
    that import); their errors, every other logger and every exception pass as usual, and their levels are
    restored."""
    loggers = [logging.getLogger(name) for name in QUIET_AT_IMPORT]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


with _quiet_torchao_quantizer():
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
