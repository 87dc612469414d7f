"""``eager``: plain PyTorch. Block hooks run the model's blocks one by one (no grouping), the host reads the device
once per step whose gates allow a hit."""

from __future__ import annotations

from . import Lowering, register_lowering


@register_lowering
class Eager(Lowering):
    name = "eager"
    compiled = False
    groups = False
    captures = False
    description = "plain PyTorch; one host read of (predicate, diff) per step whose gates allow a hit"
