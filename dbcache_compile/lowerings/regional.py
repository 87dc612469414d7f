"""``regional`` (``auto`` on CUDA): each block class compiled once as a ``fullgraph=True`` region, reused by every
block of the class, the glue plain PyTorch; on CUDA with ``reduce-overhead`` / ``max-autotune`` each segment is
captured by hand as one CUDA graph per input shape, so a step is a few graph replays and at most one host read.
Compiles in seconds where whole-segment graphs of a FLUX-size model take minutes."""

from __future__ import annotations

from . import Lowering, register_lowering


@register_lowering
class Regional(Lowering):
    name = "regional"
    region_blocks = True
    description = ("one compiled region per block class; segments captured by hand as CUDA graphs on CUDA with a "
                   "CUDA-graph mode")
