"""``segments`` (``auto`` off CUDA): every segment — the head, each middle group, the hit, the tail; for a family
with a prologue the whole ``head`` / ``miss`` / ``hit`` steps — is one ``torch.compile(fullgraph=True)`` graph, and on
CUDA with a CUDA-graph mode each is captured by hand as a CUDA graph per input shape; one host read per step whose
gates allow a hit, none otherwise. The fastest step on a CPU; on a FLUX-size model the whole-segment graphs take
minutes to compile."""

from __future__ import annotations

from . import Lowering, register_lowering


@register_lowering
class Segments(Lowering):
    name = "segments"
    compile_segments = True
    needs_groups = True
    description = "each segment one fullgraph graph; captured by hand as CUDA graphs on CUDA with a CUDA-graph mode"
