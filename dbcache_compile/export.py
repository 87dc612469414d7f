"""Cold start without compiling: export the cached transformer step (``cond`` lowering) with ``torch.export`` and
package it with AOTInductor; load the package in a fresh process (Python: :func:`load`; C++: ``dbcache_runner``).

The exported program is a pure function with the cache state as explicit inputs and outputs. Its flat input order
(what the C++ runner relies on) is::

    hidden_states, timestep, step, counters, fn_residual, ladder_h[0..T-1], ladder_e[0..T-1], <other tensor inputs>

and its outputs are ``output, hit predicate, diff, counters', fn_residual', ladder_h'..., ladder_e'...`` (state
outputs in the same order as the state inputs). Shapes are those of the example inputs (static): export once per
resolution and batch size. Non-tensor transformer arguments (``img_shapes`` of Qwen-Image, ``None``s) are baked in.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .adapters import adapter_for, adapter_named
from .config import DBCacheConfig
from .runtime import Applied, BranchedRuntime, Branches, GenerationWatch, refuse_while_compiling
from .state import BranchState
from .step import CacheStep, fold_records, initial_counters, transformer_output

# euler_loop is the C++ runner's reference loop (tests/test_export.py), not public API
__all__ = ["export", "load", "LoadedCachedTransformer", "capture_transformer_inputs", "write_runner_inputs"]

_LEADING = ("hidden_states", "timestep")


class _ExportedStep(torch.nn.Module):
    """``CacheStep.cond_step_functional`` as a module with a flat tensor signature."""

    def __init__(self, step: CacheStep, other_names: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.transformer = step.transformer
        self._step = [step]  # not a submodule: the transformer is registered once, above
        self.other_names = other_names
        self.constants = constants

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, step: torch.Tensor,
                counters: torch.Tensor, fn_residual: torch.Tensor, *rest: torch.Tensor):
        step_fns = self._step[0]
        terms = step_fns.config.taylorseer_terms
        ladder_h, ladder_e, others = list(rest[:terms]), list(rest[terms:2 * terms]), rest[2 * terms:]
        kwargs = dict(self.constants, **dict(zip(self.other_names, others)))
        out, pred, diff, counters, fn_residual, ladder_h, ladder_e = step_fns.cond_step_functional(
            step, counters, fn_residual, ladder_h, ladder_e, hidden_states=hidden_states, timestep=timestep, **kwargs)
        return (out, pred, diff, counters, fn_residual, *ladder_h, *ladder_e)


def export(pipe_or_transformer: Any, example_inputs: dict[str, Any], path: Union[str, Path],
           cache: Union[DBCacheConfig, str] = "F1B0_W4MC2_R0.2", quantize: Any = None) -> Path:
    """Export the cached transformer step for ``example_inputs`` (the keyword arguments of one transformer call)
    and package it with AOTInductor at ``path`` (a ``.pt2`` file; metadata goes to ``<path>.json``).

    Returns the package path. Takes a while (compiles with Inductor, ~20 s for the tiny models on CPU).
    """
    if quantize is not None:
        raise NotImplementedError("export(quantize=...) is not supported: torch.cond has no rule for torchao "
                                  "tensor-subclass weights in torch 2.11-2.14; export unquantized")
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    from .optimize import is_optimized
    if is_optimized(transformer):
        raise ValueError("export() takes an un-optimized transformer; call dbcache_compile.disable() first")
    missing = [k for k in _LEADING if not isinstance(example_inputs.get(k), torch.Tensor)]
    if missing:
        raise ValueError(f"example_inputs needs tensors for {missing}")
    config = DBCacheConfig.coerce(cache)
    adapter = adapter_for(transformer)
    config.validate_for(len(adapter.blocks(transformer)), type(transformer).__name__)
    step_fns = CacheStep(transformer, adapter, config)
    kwargs = {k: v for k, v in example_inputs.items() if k != "return_dict"}
    other_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _LEADING]
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    state = BranchState(config.taylorseer_terms)
    with torch.no_grad():  # the state's shapes: one run of the head on the example inputs
        hidden, encoder, _, _ = step_fns.head(**kwargs)
    state.allocate(hidden, encoder)
    device = hidden.device
    args = (kwargs["hidden_states"], kwargs["timestep"], torch.tensor(0, device=device),
            initial_counters(device), state.fn_residual, *state.ladder_h, *state.ladder_e,
            *(kwargs[k] for k in other_names))
    module = _ExportedStep(step_fns, other_names, constants).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(module, args, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    meta = {
        "format": 2, "cache": str(config), "adapter": adapter.name, "terms": config.taylorseer_terms,
        "num_blocks": step_fns.num_blocks, "input_order": [*_LEADING, "step", "counters", "fn_residual",
                                                          *[f"ladder_h.{i}" for i in range(config.taylorseer_terms)],
                                                          *[f"ladder_e.{i}" for i in range(config.taylorseer_terms)],
                                                          *other_names],
        "other_inputs": other_names, "state_shapes": [list(t.shape) for t in args[3:3 + 2 + 2 * state.terms]],
        "state_dtypes": [str(t.dtype).removeprefix("torch.") for t in args[3:3 + 2 + 2 * state.terms]],
        "enable_separate_cfg": config.enable_separate_cfg, "device": device.type,
        "transformer_config": dict(transformer.config), "dtype": str(hidden.dtype).removeprefix("torch."),
        "export_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
    }
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2, default=str))
    return path


class LoadedCachedTransformer(torch.nn.Module, BranchedRuntime):
    """An AOTInductor package in place of the transformer: same call signature (keyword arguments), same cached-step
    decisions as the live ``cond`` lowering, no compilation. Like an optimized transformer it keeps one state per
    cache context the pipeline enters (``cache_context``) and ends a generation at the pipeline's end-of-call reset
    (``_reset_stateful_cache``); with ``watch`` (:func:`load` with ``pipe=``) a pipeline call that follows one that
    raised (a failing callback, Ctrl-C) also starts a new generation. A bare caller calls :meth:`reset` between
    generations. It is its own runtime (:func:`dbcache_compile.runtime_of`).

    Args:
        path: the ``.pt2`` package written by :func:`export` (``<path>.json`` next to it).
        watch: the :class:`~dbcache_compile.runtime.GenerationWatch` of the pipeline the package runs in, or ``None``.
    """

    lowering = "aoti"
    adapter = ""

    supported_lowerings = ("aoti",)

    def _check_generation_start(self) -> None:
        """The package replaced the transformer: no diffusers hooks, offload or compiled blocks to check."""

    def __init__(self, path: Union[str, Path], watch: Optional[GenerationWatch] = None) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict
        path = Path(path)
        meta_path = Path(str(path) + ".json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"no dbcache_compile package at {path} (expected {path} and {meta_path}; "
                                    f"create them with dbcache_compile.export)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != 2:
            raise ValueError(f"{path}: package format {self.meta.get('format')} is not this version's (2); export it "
                             f"again with this dbcache_compile")
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.config = FrozenDict(self.meta["transformer_config"])
        self.cache_config = DBCacheConfig.from_string(self.meta["cache"])
        self.num_blocks = self.meta["num_blocks"]
        self.applied = Applied()
        self.adapter = adapter_named(self.meta["adapter"]).name
        self.branches = Branches(self.meta["terms"], self.meta["enable_separate_cfg"])
        self.watch = watch
        self._generation = 0
        self._flat: dict[int, list[torch.Tensor]] = {}  # per branch state (id): the package's state tensors

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    @property
    def device(self) -> torch.device:
        return torch.device(self.meta["device"])

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any):
        """diffusers pipelines wrap each transformer call in ``transformer.cache_context("cond" / "uncond")``: the
        context picks the branch state, as for an optimized transformer."""
        from diffusers.hooks.hooks import CacheContext
        self.branches.set_context(CacheContext(name, **kwargs))
        try:
            yield
        finally:
            self.branches.set_context(None)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """diffusers' end-of-call reset (``maybe_free_model_hooks``): the generation is over."""
        self.finish()

    def _initial_state(self) -> list[torch.Tensor]:
        shapes, dtypes = self.meta["state_shapes"], self.meta["state_dtypes"]
        state = [torch.zeros(s, dtype=getattr(torch, d), device=self.device) for s, d in zip(shapes[1:], dtypes[1:])]
        return [initial_counters(self.device), *state]

    def _on_new_generation(self, state: BranchState) -> None:
        self._flat.pop(id(state), None)

    def _cp_group(self) -> Any:
        return None  # a package runs in one process

    def forward(self, return_dict: bool = True, **kwargs: Any) -> Any:
        refuse_while_compiling()
        state, step, key = self._begin((), kwargs)
        flat = self._flat.get(id(state))
        if flat is None:
            flat = self._initial_state()
        inputs = _flat_inputs(self.meta, kwargs, flat)
        inputs[2] = torch.tensor(step, device=self.device)
        out, pred, diff, *new_state = self.runner(*inputs)
        self._flat[id(state)] = new_state
        state.records.append((step, pred, diff))
        self._end(state, key)
        return transformer_output(out, return_dict)

    def _fold(self) -> None:
        fold_records(list(self.branches.states.values()))

    def cudagraph_status(self) -> str:
        return "off (AOTInductor package with torch.cond)"


def load(path: Union[str, Path], pipe: Any = None) -> LoadedCachedTransformer:
    """Load a package made by :func:`export`. With ``pipe``, it replaces ``pipe.transformer`` (the pipeline's class
    is untouched: the package follows the pipeline's cache contexts and end-of-call reset, so
    :func:`dbcache_compile.summary` works on it) and watches the pipeline's scheduler, so that the call after one
    that raised starts a new generation (:class:`~dbcache_compile.runtime.GenerationWatch`)."""
    module = LoadedCachedTransformer(path, watch=GenerationWatch(pipe) if pipe is not None else None)
    if pipe is not None:
        pipe.transformer = module
    return module


def _flat_inputs(meta: dict, kwargs: dict[str, Any], state: list[torch.Tensor]) -> list[torch.Tensor]:
    device = kwargs["hidden_states"].device
    return [kwargs["hidden_states"], kwargs["timestep"], torch.tensor(0, device=device), *state,
            *(kwargs[k] for k in meta["other_inputs"])]


def euler_loop(module: LoadedCachedTransformer, kwargs: dict[str, Any], sigmas: torch.Tensor
               ) -> tuple[torch.Tensor, list[bool]]:
    """The denoising loop of ``dbcache_runner`` in Python (reference for the C++ runner): flow-matching Euler
    steps ``x += (sigma[i+1] - sigma[i]) * v`` in float32, ``timestep = sigma[i]``. Returns latents and hits."""
    module.reset()
    kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    x = kwargs["hidden_states"]
    for i in range(len(sigmas) - 1):
        step_kwargs = dict(kwargs, hidden_states=x, timestep=torch.full_like(kwargs["timestep"], float(sigmas[i])))
        v = module(return_dict=False, **step_kwargs)[0]
        x = (x.to(torch.float32) + float(sigmas[i + 1] - sigmas[i]) * v.to(torch.float32)).to(x.dtype)
    cached = set(module.summary().cached_steps)
    return x, [i in cached for i in range(len(sigmas) - 1)]


def write_runner_inputs(package: Union[str, Path], kwargs: dict[str, Any], sigmas: torch.Tensor,
                        path: Union[str, Path]) -> Path:
    """Write the ``INPUTS.pt`` that ``dbcache_runner`` reads: ``[sigmas, num_state, *flat package inputs]``."""
    module = LoadedCachedTransformer(package)
    state = module._initial_state()
    flat = _flat_inputs(module.meta, kwargs, state)
    torch.save([sigmas.to(torch.float32), torch.tensor(len(state)), *[t.contiguous() for t in flat]], str(path))
    return Path(path)


def capture_transformer_inputs(pipe: Any, **call_kwargs: Any) -> dict[str, Any]:
    """Run ``pipe(**call_kwargs)`` for one step and return the keyword arguments of its first transformer call:
    the ``example_inputs`` that :func:`export` needs for this resolution, batch and prompt length."""
    transformer = pipe.transformer
    captured: dict[str, Any] = {}

    def spy(*args: Any, **kwargs: Any) -> Any:
        if args:
            raise ValueError("export needs a pipeline that calls its transformer with keyword arguments")
        if not captured:
            captured.update(kwargs)
        return type(transformer).forward(transformer, **kwargs)

    transformer.forward = spy
    try:
        pipe(**dict(call_kwargs, num_inference_steps=1))
    finally:
        del transformer.forward
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in captured.items()}
