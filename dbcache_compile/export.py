"""Cold start without compiling: export the cached transformer step (``cond`` lowering) with ``torch.export`` and
package it with AOTInductor; load the package in a fresh process (Python: :func:`load`; C++: ``dbcache_runner``).

**What a package holds.** One ``.pt2`` archive with one AOTInductor model per *shape set*: the distinct call
signatures among the example inputs given to :func:`export` (:func:`capture_transformer_calls` records every distinct
transformer call of a pipeline's first step, e.g. the cond and the uncond call of true CFG whose negative prompt has
another length). Shape set ``i`` is the archive's model ``"model"`` (``i = 0``) or ``"model_<i>"``; ``<path>.json``
(``format`` 3) lists the shape sets in ``shape_sets``, each with the exact inputs it was exported for.

**Input contract (Python).** A call of the loaded module is accepted only when its inputs equal one shape set's:

* every tensor input: shape, dtype and device (the shapes fix the resolution, batch size and prompt length);
* every non-tensor input, baked into the graph: ``img_shapes`` of Qwen-Image, ``None`` where a tensor may go
  (``guidance``, ``encoder_hidden_states_mask``, ...), the attention kwargs (``None`` and ``{}`` are the same); an
  absent argument counts as ``None``; ``return_dict`` is free;
* the LoRA scale (``<attention kwargs>["scale"]``, 1.0 when absent), when the transformer had PEFT LoRA layers: it is
  baked into the graph (PEFT scales its layers by a Python float). A transformer without LoRA layers ignores it.

Anything else raises ``ValueError`` naming the input, the value it got and the exported values, before anything
runs (a refused call changes no state). Tensors are passed to the package with standard (row-major) strides: one
copy where a caller's tensor has other strides (a pipeline's ``timestep`` is an ``expand`` view).

**Flat order (what the C++ runner relies on).** Each AOTInductor model takes::

    hidden_states, timestep, step, counters, fn_residual, ladder_h[0..T-1], ladder_e[0..T-1], <other tensor inputs>

(``T`` = the config's TaylorSeer terms, ``<other tensor inputs>`` in the shape set's ``other_inputs`` order; its
``input_order`` spells the whole list) and returns ``output, hit predicate, diff, counters', fn_residual',
ladder_h'..., ladder_e'...`` (state outputs in the same order as the state inputs). ``step`` is an int64 scalar (the
branch's step index), ``counters`` int64 ``(6,)`` (:func:`~dbcache_compile.step.initial_counters` at a generation's
start), the state tensors start as zeros of the shape set's ``state_shapes`` / ``state_dtypes``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .config import DBCacheConfig
from .families import family_for, family_named
from .runtime import (Applied, BranchedRuntime, Branches, GenerationWatch, InputWatch,
                      refuse_while_compiling)
from .state import BranchState
from .step import CacheStep, fold_records, initial_counters, transformer_output

# euler_loop is the C++ runner's reference loop (tests/test_export.py), not public API
__all__ = ["export", "load", "LoadedCachedTransformer", "capture_transformer_calls", "capture_transformer_inputs",
           "write_runner_inputs", "FORMAT"]

#: version of the package metadata (``<path>.json``); a package of another format is refused at load
FORMAT = 3
_LEADING = ("hidden_states", "timestep")
#: how an absent argument is described (the transformers' forwards default their optional inputs to None)
_NONE = {"value": None}


def model_name(index: int) -> str:
    """The AOTInductor model name of shape set ``index`` inside the archive (``dbcache_runner`` uses the same rule)."""
    return "model" if index == 0 else f"model_{index}"


def _standard_strides(t: Any) -> Any:
    """``t`` with standard (row-major) strides, as the package's kernels index their inputs: ``t`` itself when it has
    them, else a copy (a pipeline's ``timestep`` is an ``expand`` view with stride 0)."""
    if not isinstance(t, torch.Tensor):
        return t
    expected, acc = [], 1
    for size in reversed(t.shape):
        expected.append(acc)
        acc *= max(size, 1)
    return t if tuple(reversed(expected)) == t.stride() else t.clone(memory_format=torch.contiguous_format)


def _plain(value: Any, name: str) -> Any:
    """A non-tensor input as JSON data (tuples become lists), or a ``ValueError`` naming the input."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, name) for k, v in value.items()}
    raise ValueError(f"input {name!r} holds a {type(value).__name__}: a package's inputs are tensors and plain values "
                     f"(None, numbers, strings, lists and dicts of them), which it bakes into its graph")


def _lora_scale_name(attention_kwargs: str) -> str:
    return f"{attention_kwargs}['scale']"


def _describe(kwargs: dict[str, Any], attention_kwargs: str, lora: bool) -> dict[str, dict]:
    """The signature of one transformer call, what a shape set is matched on: ``{name: {"tensor": {"shape", "dtype",
    "device"}}}`` for tensor inputs and ``{name: {"value": plain value}}`` for the others (``return_dict`` left out;
    the attention kwargs without their LoRA scale, which is its own entry when ``lora``, else ignored)."""
    described: dict[str, dict] = {}
    for name in (*_LEADING, *kwargs):
        if name in described or name == "return_dict":
            continue
        value = kwargs.get(name)
        if name == attention_kwargs:
            value = dict(value or {})
            scale = value.pop("scale", 1.0)
            if lora:
                described[_lora_scale_name(attention_kwargs)] = {"value": _plain(scale, name)}
        if isinstance(value, torch.Tensor):
            described[name] = {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                                          "device": str(value.device)}}
        else:
            described[name] = {"value": _plain(value, name)}
    return described


def _show(spec: dict) -> str:
    if "tensor" in spec:
        t = spec["tensor"]
        return f"a {t['dtype']} tensor of shape {tuple(t['shape'])} on {t['device']}"
    return repr(spec["value"])


def _has_lora_layers(transformer: torch.nn.Module) -> bool:
    """Whether the transformer has PEFT LoRA layers, whose scale (``<attention kwargs>["scale"]``) is then baked in."""
    from diffusers.utils import USE_PEFT_BACKEND
    if not USE_PEFT_BACKEND:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer
    return any(isinstance(m, BaseTunerLayer) for m in transformer.modules())


@contextlib.contextmanager
def _lora_scaled(transformer: torch.nn.Module, scale: Optional[float]):
    """The transformer's PEFT LoRA layers scaled by ``scale`` while tracing (what the model's forward does around its
    blocks with diffusers' ``apply_lora_scale``); ``None``: no LoRA layers, nothing to scale."""
    if scale is None:
        yield
        return
    from diffusers.utils import scale_lora_layers, unscale_lora_layers
    scale_lora_layers(transformer, scale)
    try:
        yield
    finally:
        unscale_lora_layers(transformer, scale)


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


def export(pipe_or_transformer: Any, example_inputs: Union[dict[str, Any], Sequence[dict[str, Any]]],
           path: Union[str, Path], cache: Union[DBCacheConfig, str] = "F1B0_W4MC2_R0.2", quantize: Any = None) -> Path:
    """Export the cached transformer step and package it with AOTInductor at ``path`` (a ``.pt2`` file; metadata goes
    to ``<path>.json``).

    ``example_inputs``: the keyword arguments of one transformer call, or a list of them (e.g. the cond and uncond
    calls from :func:`capture_transformer_calls`). Each distinct call signature (module doc) becomes one shape set of
    the package; the loaded package runs exactly those. Each shape set is compiled separately and holds its own copy
    of the weights (disk and memory grow with the number of shape sets). The LoRA scale of an example
    (``joint_attention_kwargs={"scale": s}``, Qwen-Image: ``attention_kwargs``) is applied to the transformer's PEFT
    LoRA layers while tracing and baked in.

    Returns the package path. Takes a while (compiles with Inductor: ~20-90 s per shape set for the tiny models on a
    CPU).
    """
    if quantize is not None:
        raise NotImplementedError("export(quantize=...) is not supported: torch.cond has no rule for torchao "
                                  "tensor-subclass weights in torch 2.11-2.14; export unquantized")
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    from .optimize import is_optimized
    if is_optimized(transformer):
        raise ValueError("export() takes an un-optimized transformer; call dbcache_compile.disable() first")
    examples = [example_inputs] if isinstance(example_inputs, dict) else list(example_inputs)
    if not examples:
        raise ValueError("export() needs at least one example call (example_inputs is empty)")
    for i, example in enumerate(examples):
        missing = [k for k in _LEADING if not isinstance(example.get(k), torch.Tensor)]
        if missing:
            where = "" if isinstance(example_inputs, dict) else f"[{i}]"
            raise ValueError(f"example_inputs{where} needs tensors for {missing}")
    config = DBCacheConfig.coerce(cache)
    family = family_for(transformer)
    if not family.has_prologue:
        raise ValueError(f"export() packages the whole cached step, which needs a family that writes out the forward "
                         f"around its blocks (FLUX.1, Qwen-Image); {type(transformer).__name__} ({family.name}) runs "
                         f"its own forward")
    config.validate_for(len(family.blocks(transformer)), type(transformer).__name__)
    attention_kwargs, lora = family.attention_kwargs, _has_lora_layers(transformer)
    signatures = []
    for example in examples:  # every example validated before anything is compiled
        kwargs = {k: _standard_strides(v) for k, v in example.items() if k != "return_dict"}
        signature = _describe(kwargs, attention_kwargs, lora)
        if all(signature != seen for _, seen in signatures):
            signatures.append((kwargs, signature))
    step_fns = CacheStep(transformer, family, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shape_sets, files = [], {}
    for index, (kwargs, signature) in enumerate(signatures):
        name = model_name(index)
        entry, files[name] = _export_shape_set(step_fns, kwargs, signature, attention_kwargs, lora)
        shape_sets.append(dict(entry, model=name))
    from torch._inductor.package import package_aoti
    package_aoti(str(path), files)
    first = signatures[0][0]
    meta = {
        "format": FORMAT, "cache": str(config), "family": family.name, "terms": config.taylorseer_terms,
        "num_blocks": step_fns.num_blocks, "enable_separate_cfg": config.enable_separate_cfg,
        "device": first["hidden_states"].device.type, "dtype": shape_sets[0]["state_dtypes"][1],
        "attention_kwargs": attention_kwargs, "lora": lora, "shape_sets": shape_sets,
        "transformer_config": dict(transformer.config),
        "export_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
    }
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def _export_shape_set(step_fns: CacheStep, kwargs: dict[str, Any], signature: dict[str, dict],
                      attention_kwargs: str, lora: bool) -> tuple[dict, list]:
    """torch.export + AOTInductor compile of one shape set: ``(its metadata entry, its AOTInductor files)``."""
    config = step_fns.config
    other_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _LEADING]
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    scale = 1.0
    if attention_kwargs in constants:  # as diffusers' apply_lora_scale: the blocks get the kwargs without the scale
        rest = dict(constants[attention_kwargs] or {})
        scale = rest.pop("scale", 1.0)
        constants[attention_kwargs] = rest
    state = BranchState(config.taylorseer_terms)
    with torch.no_grad(), _lora_scaled(step_fns.transformer, scale if lora else None):
        hidden, encoder, _, _ = step_fns.head(**kwargs)  # the state's shapes: one run of the head on the example
        state.allocate(hidden, encoder)
        device = hidden.device
        args = (kwargs["hidden_states"], kwargs["timestep"], torch.tensor(0, device=device),
                initial_counters(device), state.fn_residual, *state.ladder_h, *state.ladder_e,
                *(kwargs[k] for k in other_names))
        module = _ExportedStep(step_fns, other_names, constants).eval()
        program = torch.export.export(module, args, strict=False)
        files = torch._inductor.aot_compile(program.module(check_guards=False), *program.example_inputs,
                                            options={"aot_inductor.package": True})
    state_tensors = args[3:3 + 2 + 2 * state.terms]
    entry = {
        "inputs": signature, "other_inputs": other_names,
        "input_order": [*_LEADING, "step", "counters", "fn_residual",
                        *[f"ladder_h.{i}" for i in range(config.taylorseer_terms)],
                        *[f"ladder_e.{i}" for i in range(config.taylorseer_terms)], *other_names],
        "state_shapes": [list(t.shape) for t in state_tensors],
        "state_dtypes": [str(t.dtype).removeprefix("torch.") for t in state_tensors],
    }
    return entry, files


class LoadedCachedTransformer(torch.nn.Module, BranchedRuntime):
    """An AOTInductor package in place of the transformer: same call signature (keyword arguments), same cached-step
    decisions as the live ``cond`` lowering, no compilation. Each call is checked against the exported shape sets
    (module doc) and runs the one it matches. Like an optimized transformer it keeps one state per cache context the
    pipeline enters (``cache_context``) and ends a generation at the pipeline's end-of-call reset
    (``_reset_stateful_cache``); with ``watch`` (:func:`load` with ``pipe=``) a pipeline call that follows one that
    raised (a failing callback, Ctrl-C) also starts a new generation. A bare caller calls :meth:`reset` between
    generations. It is its own runtime (:func:`dbcache_compile.runtime_of`).

    Args:
        path: the ``.pt2`` package written by :func:`export` (``<path>.json`` next to it).
        watch: the :class:`~dbcache_compile.runtime.GenerationWatch` of the pipeline the package runs in, or ``None``.
    """

    lowering = "aoti"
    family = ""

    supported_lowerings = ("aoti",)

    def _check_generation_start(self) -> None:
        """The package replaced the transformer: no diffusers hooks, offload or compiled blocks to check."""

    def __init__(self, path: Union[str, Path], watch: Optional[GenerationWatch] = None) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict
        from torch._inductor.package import load_package
        path = Path(path)
        meta_path = Path(str(path) + ".json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"no dbcache_compile package at {path} (expected {path} and {meta_path}; "
                                    f"create them with dbcache_compile.export)")
        self.path = path
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}: package format {self.meta.get('format')} is not this version's ({FORMAT}); "
                             f"export it again with this dbcache_compile")
        self.shape_sets: list[dict] = self.meta["shape_sets"]
        self.runners = [load_package(str(path), entry["model"]) for entry in self.shape_sets]
        self.config = FrozenDict(self.meta["transformer_config"])
        self.cache_config = DBCacheConfig.from_string(self.meta["cache"])
        self.num_blocks = self.meta["num_blocks"]
        self.applied = Applied()
        self.family = family_named(self.meta["family"]).name
        self.branches = Branches(self.meta["terms"], self.meta["enable_separate_cfg"])
        self.watch = watch
        self.inputs = InputWatch(self)
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

    def shape_set_for(self, kwargs: dict[str, Any]) -> int:
        """The index of the shape set that a call with these keyword arguments runs; ``ValueError`` naming the first
        input whose value no shape set was exported for (module doc: what is checked)."""
        got = _describe(kwargs, self.meta["attention_kwargs"], self.meta["lora"])
        sets = [entry["inputs"] for entry in self.shape_sets]
        for index, exported in enumerate(sets):
            if all(exported.get(name, _NONE) == got.get(name, _NONE) for name in exported.keys() | got.keys()):
                return index
        names = list(dict.fromkeys([*sets[0], *(n for s in sets for n in s), *got]))
        for name in names:
            values = list(dict.fromkeys(json.dumps(s.get(name, _NONE), sort_keys=True) for s in sets))
            if json.dumps(got.get(name, _NONE), sort_keys=True) not in values:
                exported_as = " or ".join(_show(json.loads(v)) for v in values)
                raise ValueError(f"{self.path}: input {name!r} is {_show(got.get(name, _NONE))}, but the package was "
                                 f"exported for {exported_as}. {self._remedy(name)}")
        listing = "; ".join(", ".join(f"{n}: {_show(s[n])}" for n in s if "tensor" in s[n]) for s in sets)
        raise ValueError(f"{self.path}: every input was exported, but not in this combination (shape sets: {listing}). "
                         f"{self._remedy('')}")

    def _remedy(self, name: str) -> str:
        attention_kwargs = self.meta["attention_kwargs"]
        if name == _lora_scale_name(attention_kwargs):
            return (f"The LoRA scale is baked into the package (PEFT scales its layers by a Python float): export "
                    f"with example inputs that carry {attention_kwargs}={{'scale': <your scale>}} (e.g. "
                    f"capture_transformer_calls(pipe, ..., {attention_kwargs}={{'scale': s}})), or call with the "
                    f"exported scale")
        return ("A package runs only the calls it was exported for (tensor shapes fix the resolution, batch size and "
                "prompt length; non-tensor inputs are baked in): export with example inputs of this call, e.g. "
                "dbc.export(pipe, capture_transformer_calls(pipe, **your_call_kwargs), path)")

    def _initial_state(self, index: int) -> list[torch.Tensor]:
        entry = self.shape_sets[index]
        shapes, dtypes = entry["state_shapes"], entry["state_dtypes"]
        state = [torch.zeros(s, dtype=getattr(torch, d), device=self.device) for s, d in zip(shapes[1:], dtypes[1:])]
        return [initial_counters(self.device), *state]

    def _on_new_generation(self, state: BranchState) -> None:
        self._flat.pop(id(state), None)

    def _cp_group(self) -> Any:
        return None  # a package runs in one process

    def forward(self, return_dict: bool = True, **kwargs: Any) -> Any:
        """One step: ``kwargs`` are the transformer's keyword arguments (checked first: ``ValueError`` before
        anything runs when no shape set matches). The branch's step count and state tensors are updated only after
        the package ran; a call that raises ends the generation all the same (README "When a generation starts")."""
        try:
            return self._forward(return_dict, kwargs)
        except BaseException:
            self.reset()
            raise

    def _forward(self, return_dict: bool, kwargs: dict[str, Any]) -> Any:
        refuse_while_compiling("package")
        index = self.shape_set_for(kwargs)
        state, step, key = self._begin((), kwargs)  # the caller's tensors: the generation rule compares identities
        kwargs = {k: _standard_strides(v) for k, v in kwargs.items()}
        flat = self._flat.get(id(state))
        if flat is None:
            flat = self._initial_state(index)
        inputs = _flat_inputs(self.shape_sets[index], kwargs, flat)
        inputs[2] = torch.tensor(step, device=self.device)
        out, pred, diff, *new_state = self.runners[index](*inputs)
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


def _flat_inputs(entry: dict, kwargs: dict[str, Any], state: list[torch.Tensor]) -> list[torch.Tensor]:
    """The flat input list of shape set ``entry`` (module doc), ``step`` set to 0."""
    device = kwargs["hidden_states"].device
    return [kwargs["hidden_states"], kwargs["timestep"], torch.tensor(0, device=device), *state,
            *(kwargs[k] for k in entry["other_inputs"])]


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
    """Write the ``INPUTS.pt`` that ``dbcache_runner`` reads: ``[sigmas (N+1,) float32, num_state (int64 scalar),
    shape set index (int64 scalar), *flat package inputs of that shape set]`` for one transformer call's ``kwargs``
    (checked against the package like a Python call: ``ValueError`` when no shape set matches)."""
    module = LoadedCachedTransformer(package)
    index = module.shape_set_for(kwargs)
    state = module._initial_state(index)
    flat = _flat_inputs(module.shape_sets[index], {k: _standard_strides(v) for k, v in kwargs.items()}, state)
    torch.save([sigmas.to(torch.float32), torch.tensor(len(state)), torch.tensor(index), *flat], str(path))
    return Path(path)


def _call_signature(kwargs: dict[str, Any]) -> tuple:
    """Tensor shapes, dtypes and devices and the other values of one call (what makes two calls one shape set)."""
    return tuple((k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v))
                 for k, v in sorted(kwargs.items()) if k != "return_dict")


def capture_transformer_calls(pipe: Any, **call_kwargs: Any) -> list[dict[str, Any]]:
    """Run ``pipe(**call_kwargs)`` for one step and return the keyword arguments of every transformer call of that
    step with a distinct signature, in call order (cloned): with true CFG whose negative prompt has another length,
    the cond and the uncond call. The ``example_inputs`` that :func:`export` needs to run this resolution, batch,
    prompt lengths and CFG setting."""
    transformer = pipe.transformer
    captured: list[dict[str, Any]] = []
    seen: set = set()

    def spy(*args: Any, **kwargs: Any) -> Any:
        if args:
            raise ValueError("export needs a pipeline that calls its transformer with keyword arguments")
        signature = _call_signature(kwargs)
        if signature not in seen:
            seen.add(signature)
            captured.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return type(transformer).forward(transformer, **kwargs)

    transformer.forward = spy
    try:
        pipe(**dict(call_kwargs, num_inference_steps=1))
    finally:
        del transformer.forward
    return captured


def capture_transformer_inputs(pipe: Any, **call_kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of the first transformer call of ``pipe(**call_kwargs)`` (one step is run): one call
    signature, the cond call of a CFG pipeline. To export a pipeline call with true CFG use
    :func:`capture_transformer_calls`, which records the uncond call too."""
    return capture_transformer_calls(pipe, **call_kwargs)[0]
