"""torchao quantization of the transformer's block linears: one name → one torchao config (a registry, as torchao).

Defaults keep the embedders, the modulation (adaLN) linears and the output projection in the original dtype, as
peers do for quality: only the attention and MLP linears inside the cached block lists are quantized.

torchao configs adjust global Inductor flags when ``set_inductor_config=True`` (their default). On FLUX-size fp8
those flags made the regional compile take 273 s and run slower than Inductor's defaults (18.4 s; docs/design.md, "Compile time"), and
they would silently change every later ``torch.compile`` in the user's process. The named configs here therefore use
``set_inductor_config=False``; a torchao config object you pass is applied as given (its flag is yours). The flags
torchao recommends can be applied to this library's own compiles only: ``optimize(..., recipe=KernelRecipe(
torchao_flags=True))`` (:mod:`dbcache_compile.recipe`).

fp8 granularity (dynamic activations and weights, ``torch._scaled_mm``): ``"fp8-row"`` (one scale per row of the
activation and per output channel of the weight), ``"fp8-tensor"`` (one scale per tensor: cheaper scaling, coarser
rounding), ``"fp8-mix"`` (a per-layer plan: per-tensor for the attention's Q/K/V projections, whose outputs go
through the model's RMS/LayerNorm of q and k, per-row for everything else). ``"fp8"`` is ``"fp8-row"``, the
granularity measured on the H100 (``bench/results/gpu-h100-2026-11-26/``); the others are there to be measured
(``python -m bench gpu``'s recipe ablation) before any becomes the default.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional

import torch

__all__ = ["QUANTIZE_NAMES", "named_config", "resolve_quantization", "quantize_transformer", "count_selected",
           "default_filter", "QuantizationPlan", "Rule", "plan_layers", "is_qkv_projection"]

QUANTIZE_NAMES = ("fp8", "fp8-row", "fp8-tensor", "fp8-mix", "fp8-wo", "int8", "int8-wo")
_FP8_NAMES = ("fp8", "fp8-row", "fp8-tensor", "fp8-mix", "fp8-wo")
#: the last name component of the attention's query / key / value projections (separate, fused, added stream)
QKV_PROJECTIONS = frozenset({"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_qkv",
                             "to_added_qkv", "qkv", "to_kv"})


def is_qkv_projection(fqn: str) -> bool:
    """Whether the module at ``fqn`` is an attention Q / K / V projection (``...attn.to_q``, ``...attn.to_qkv``)."""
    return fqn.rsplit(".", 1)[-1] in QKV_PROJECTIONS


@dataclasses.dataclass(frozen=True)
class Rule:
    """One part of a :class:`QuantizationPlan`: the linears whose qualified name ``matches`` get ``config``."""

    label: str
    matches: Callable[[str], bool]
    config: Any


@dataclasses.dataclass(frozen=True)
class QuantizationPlan:
    """A per-layer quantization: each selected linear gets the config of the first rule that matches its name."""

    name: str
    rules: tuple[Rule, ...]


def plan_layers(transformer: torch.nn.Module, plan: QuantizationPlan,
                filter_fn: Callable[[torch.nn.Module, str], bool]) -> dict[str, str]:
    """``{fqn: rule label}`` for every linear ``filter_fn`` selects (first matching rule), without quantizing."""
    chosen = {}
    for fqn, module in transformer.named_modules():
        if filter_fn(module, fqn):
            rule = next((r for r in plan.rules if r.matches(fqn)), None)
            if rule is not None:
                chosen[fqn] = rule.label
    return chosen


def named_config(name: str) -> Any:
    """The torchao config of a quantization name (``set_inductor_config=False``), without device checks; for
    ``"fp8-mix"`` a :class:`QuantizationPlan` of two such configs.

    Imports torchao (only here and in :func:`quantize_transformer`: ``import dbcache_compile`` stays silent)."""
    if name not in QUANTIZE_NAMES:
        raise ValueError(f"quantize name must be one of {QUANTIZE_NAMES}, got {name!r}")
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow, PerTensor)
    if name in ("fp8", "fp8-row"):
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if name == "fp8-tensor":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False)
    if name == "fp8-mix":
        return QuantizationPlan(name, (
            Rule("fp8 per-tensor (Q/K/V)", is_qkv_projection, named_config("fp8-tensor")),
            Rule("fp8 per-row", lambda fqn: True, named_config("fp8-row"))))
    if name == "fp8-wo":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    if name == "int8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Int8WeightOnlyConfig(set_inductor_config=False)


#: why each fp8 name needs SM >= 8.9 (the error says what was asked and why)
_FP8_WHY = {
    "fp8": "its fp8 x fp8 matmuls (torch._scaled_mm) exist only there",
    "fp8-wo": "without fp8 matmuls the fp8 weights are upcast again on every forward, which costs time instead of "
              "saving it (measured 2.2x slower than fp32 for 1024x1024 linears on a 2-core CPU) and adds fp8 "
              "rounding",
}
_FP8_INSTEAD = {
    "fp8": "Use quantize='int8' instead",
    "fp8-wo": "Use quantize='int8-wo' instead (or pass torchao's Float8WeightOnlyConfig() object, applied as given, "
              "to measure fp8 weight rounding there)",
}


def check_fp8_supported(device: Any, name: str = "fp8") -> None:
    """fp8 (``name``: one of the ``"fp8*"`` names) needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper,
    Blackwell); a ``ValueError`` naming ``name`` and the reason otherwise. ``device``: a ``torch.device`` or its
    string."""
    device = torch.device(device)
    head = (f"quantize={name!r} needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper/Blackwell): "
            f"{_FP8_WHY.get(name, _FP8_WHY['fp8'])}")
    instead = _FP8_INSTEAD.get(name, _FP8_INSTEAD["fp8"])
    if device.type != "cuda":
        raise ValueError(f"{head}; the transformer is on {device.type}. {instead}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"{head}; this GPU ({torch.cuda.get_device_name(device)}) has compute capability "
                         f"{capability[0]}.{capability[1]}. {instead}")


def _is_torchao_config(value: Any) -> bool:
    """A torchao ``AOBaseConfig``, recognized without importing torchao (whoever built one has imported it)."""
    base = sys.modules.get("torchao.core.config")
    return base is not None and isinstance(value, base.AOBaseConfig)


def resolve_quantization(quantize: Any, device: Any, mode: Optional[str]) -> Any:
    """A torchao config for ``quantize`` (a name or a torchao ``AOBaseConfig``), with clear errors.

    torchao is imported only once the request is valid (its import prints C-extension load failures and
    deprecation warnings on machines without its kernels)."""
    if _is_torchao_config(quantize) or isinstance(quantize, QuantizationPlan):
        return quantize
    if not isinstance(quantize, str) or quantize not in QUANTIZE_NAMES:
        raise ValueError(f"quantize must be None, one of {QUANTIZE_NAMES} or a torchao config object, "
                         f"got {quantize!r}")
    if quantize in _FP8_NAMES:
        check_fp8_supported(device, quantize)
        if mode is None:
            raise ValueError(f"quantize={quantize!r} without torch.compile runs ~5x slower than bf16 (measured "
                             f"298 ms vs 57.8 ms per FLUX forward at 512² on an H100, fp8); pass a compile mode, "
                             f"e.g. mode='max-autotune'")
    return named_config(quantize)


def default_filter(block_list_names: tuple[str, ...]) -> Callable[[torch.nn.Module, str], bool]:
    """Quantize ``nn.Linear`` inside the block lists, except modulation (``norm*`` / ``*_mod``) linears."""
    def keep(module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return False
        parts = name.split(".")
        if parts[0] not in block_list_names:
            return False
        return not any(p.startswith("norm") or p.endswith("_mod") for p in parts)
    return keep


def quantize_transformer(transformer: torch.nn.Module, config: Any,
                         filter_fn: Callable[[torch.nn.Module, str], bool]) -> int:
    """Apply ``torchao.quantization.quantize_`` in place (once per rule of a :class:`QuantizationPlan`); returns the
    number of linears converted."""
    from torchao.quantization import quantize_
    selected = count_selected(transformer, filter_fn)
    if not isinstance(config, QuantizationPlan):
        quantize_(transformer, config, filter_fn=filter_fn)
        return selected
    chosen = plan_layers(transformer, config, filter_fn)
    for rule in config.rules:
        if rule.label in chosen.values():
            quantize_(transformer, rule.config, filter_fn=lambda m, fqn, label=rule.label: chosen.get(fqn) == label)
    return len(chosen)


def count_selected(transformer: torch.nn.Module, filter_fn: Callable[[torch.nn.Module, str], bool]) -> int:
    """How many modules ``filter_fn`` selects; a ``ValueError`` when none."""
    selected = sum(1 for name, m in transformer.named_modules() if filter_fn(m, name))
    if selected == 0:
        raise ValueError("the quantization filter selected no linear layer of the transformer")
    return selected
