"""The kernel recipe: what ``optimize(..., mode=..., quantize=...)`` asks of Inductor besides the compile mode, each
part switchable so that it can be measured on and off (``python -m bench gpu``, part ``recipe``).

* ``torchao_flags``: the Inductor flags torchao recommends for its quantized configs
  (``torchao.quantization.utils.recommended_inductor_config_setter``: coordinate-descent tuning in all directions,
  ``force_fuse_int_mm_with_mul``, unique kernel names, the FX graph cache). torchao sets them globally when a config
  has ``set_inductor_config=True``; here they reach **only this library's compiles**, as ``torch.compile(...,
  options=...)`` (Inductor reads them inside ``compile_fx`` of each of our graphs, which runs at the graph's first
  call: the lazy compile is covered, the user's other ``torch.compile`` calls are not). Off by default: on FLUX
  size they once made the compile take 273 s and the forward slower (docs/design.md, "Compile time"), a probe of
  torchao's global setter that this switch lets the bench measure again.
* ``gemm_autotune``: under ``mode="max-autotune"`` the block regions compile with ``max-autotune-no-cudagraphs``
  (the segments are captured by hand), whose ``max_autotune`` benchmarks Triton GEMM templates against ATen for
  every matmul, ``aten._scaled_mm`` (fp8) included (``tuned_scaled_mm`` adds the Triton scaled-mm templates, with
  TMA on Hopper). ``False`` keeps max-autotune's pointwise tuning and coordinate descent but takes the GEMMs off
  the search (ATen / cuBLAS only): the switch that isolates what GEMM autotuning buys. Without a max-autotune mode
  it changes nothing.
* ``inductor``: further Inductor options for this library's compiles only (a dict, ``torch._inductor.config``
  names).

fp8 granularity (``quantize="fp8-row" | "fp8-tensor" | "fp8-mix"``), fused QKV (``fuse_qkv=True``), the attention
backend (``attention="auto"``, :mod:`dbcache_compile.attention`) and the VAE decode (``compile_vae``,
:mod:`dbcache_compile.vae`) are ``optimize`` arguments of their own; :data:`FULL` plus those is the full recipe the
bench measures.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

__all__ = ["KernelRecipe", "DEFAULT", "FULL", "TORCHAO_FLAGS", "OPTIONS_KEY", "compile_options", "torch_compile_args"]

#: torchao 0.18's ``recommended_inductor_config_setter`` (``torchao/quantization/utils.py``), as Inductor options
TORCHAO_FLAGS: dict[str, Any] = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "force_fuse_int_mm_with_mul": True,
    "fx_graph_cache": True,
    "triton.unique_kernel_names": True,
}
#: the key under which the recipe's Inductor options travel in a compile-options dict to each ``torch.compile``
OPTIONS_KEY = "_dbcache_inductor_options"
_AUTOTUNE_MODES = ("max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class KernelRecipe:
    """What this library asks of Inductor for its own graphs (module doc). ``optimize(recipe=...)`` takes one of
    these, a dict of its fields, ``"default"`` / ``None`` (:data:`DEFAULT`) or ``"full"`` (:data:`FULL`)."""

    torchao_flags: bool = False
    gemm_autotune: bool = True
    inductor: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def coerce(cls, value: Union["KernelRecipe", Mapping[str, Any], str, None]) -> "KernelRecipe":
        """A recipe from what ``optimize(recipe=...)`` accepts; a clear error otherwise."""
        if value is None or value == "default":
            return DEFAULT
        if value == "full":
            return FULL
        if isinstance(value, KernelRecipe):
            recipe = value
        elif isinstance(value, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - fields)
            if unknown:
                raise ValueError(f"recipe: unknown part(s) {unknown}; the parts are {sorted(fields)}")
            recipe = cls(**value)
        else:
            raise ValueError(f"recipe must be None, 'default', 'full', a KernelRecipe or a dict of its fields "
                             f"{[f.name for f in dataclasses.fields(cls)]}, got {value!r}")
        for name in ("torchao_flags", "gemm_autotune"):
            if not isinstance(getattr(recipe, name), bool):
                raise ValueError(f"recipe.{name} must be True or False, got {getattr(recipe, name)!r}")
        if not isinstance(recipe.inductor, Mapping):
            raise ValueError(f"recipe.inductor must be a dict of Inductor options, got {recipe.inductor!r}")
        from torch._inductor import config
        known = config.get_config_copy()
        unknown = sorted(k for k in recipe.inductor if k.replace("-", "_") not in known)
        if unknown:
            raise ValueError(f"recipe.inductor: {unknown} are not torch._inductor.config options")
        return recipe

    def inductor_options(self, mode: Optional[str]) -> dict[str, Any]:
        """The Inductor options this recipe adds to a compile under ``mode`` (empty: the mode alone)."""
        options: dict[str, Any] = {}
        if self.torchao_flags:
            options.update(TORCHAO_FLAGS)
        if not self.gemm_autotune and mode in _AUTOTUNE_MODES:
            options.update({"max_autotune": False, "max_autotune_gemm": False, "max_autotune_pointwise": True})
        options.update(self.inductor)
        return options

    def describe(self, mode: Optional[str] = None) -> str:
        """One line for ``summary()`` (GEMM autotuning only exists under a max-autotune ``mode``)."""
        autotune = ("on" if self.gemm_autotune else "off") if mode in _AUTOTUNE_MODES else f"n/a (mode={mode})"
        parts = [f"torchao_flags={'on' if self.torchao_flags else 'off'}", f"gemm_autotune={autotune}"]
        if self.inductor:
            parts.append(f"inductor={dict(self.inductor)}")
        return ", ".join(parts)


DEFAULT = KernelRecipe()
FULL = KernelRecipe(torchao_flags=True, gemm_autotune=True)


def compile_options(recipe: KernelRecipe, mode: Optional[str], options: Optional[dict[str, Any]]
                    ) -> Optional[dict[str, Any]]:
    """``optimize``'s ``compile_options`` with the recipe's Inductor options for ``mode`` attached under
    :data:`OPTIONS_KEY` (unchanged when the recipe adds none, or when a ``backend`` other than Inductor is given)."""
    extra = recipe.inductor_options(mode)
    if mode is None or not extra or (options and options.get("backend") not in (None, "inductor")):
        return options
    return {**(options or {}), OPTIONS_KEY: extra}


def torch_compile_args(options: dict[str, Any]) -> dict[str, Any]:
    """The ``torch.compile`` keyword arguments for a compile-options dict that may carry :data:`OPTIONS_KEY`: the
    mode becomes its Inductor options (``torch._inductor.list_mode_options``, e.g. cudagraph trees for
    ``reduce-overhead``), merged with the user's ``options`` and the recipe's (``torch.compile`` takes a mode or
    options, not both); without the key the dict is returned as it is."""
    if OPTIONS_KEY not in options:
        return options
    args = dict(options)
    extra = args.pop(OPTIONS_KEY)
    mode = args.pop("mode", None)
    from torch._inductor import list_mode_options
    merged = dict(list_mode_options(mode, args.get("dynamic")) if mode not in (None, "default") else {})
    merged.update(args.pop("options", None) or {})
    merged.update(extra)
    args["options"] = merged
    return args


def attach(applied: Any, recipe: KernelRecipe, mode: Optional[str], vae: Any = None) -> None:
    """Record the recipe in ``applied`` (``summary()``) and compile the VAE decode (a
    :class:`~dbcache_compile.vae.VaePlan`, or ``None``), its undo chained onto ``applied.undo`` (``disable()``)."""
    applied.recipe = recipe.describe(mode) if mode is not None else None
    if vae is None:
        return
    applied.vae, undo_vae = vae.apply()
    undo = applied.undo

    def undo_all() -> None:
        undo_vae()
        undo()

    applied.undo = undo_all
