"""The attention backend, chosen by measurement: ``optimize(..., attention="auto")``.

``"auto"`` times every diffusers attention backend (``diffusers.models.attention_dispatch``, the real dispatch the
model's processors call) that can run on the device, on random query / key / value of the model's attention shape
and dtype, and sets the fastest with ``transformer.set_attention_backend`` before anything compiles. The shape is
the first call's (a forward pre-hook measures there, once; the first call's wall time includes the measurement) or
a shape given (``Auto(shape=(batch, heads, tokens, head_dim))``: measured inside ``optimize``). The result is cached
on disk per (device, dtype, shape, torch / diffusers versions), in ``~/.cache/dbcache_compile/attention.json`` or
the file ``$DBCACHE_COMPILE_ATTENTION_CACHE`` names, so later processes only read it.

Exact backends only, unless asked: a backend whose numerics differ from scaled-dot-product attention
(SageAttention's int8 Q·K and fp8 P·V kernels, :data:`APPROXIMATE`) is never chosen silently; name it, or opt in with
``Auto(approximate=True)``. Every measurement records each backend's error beside its time: against a float32
reference (relative L2, PSNR) and against SDPA in the model's dtype (PSNR vs the ``native`` backend, e.g. bf16), so
the bench reports what an approximate backend costs in quality.

Candidates on CUDA: torch SDPA through diffusers (``native``: SDPA's own dispatch; ``_native_cudnn``,
``_native_flash``, ``_native_efficient``: one SDPA kernel each), and the packages diffusers 0.42.1 dispatches to when
installed (``flash`` = flash-attn 2, ``_flash_3`` = FlashAttention-3 built from source, ``xformers``; SageAttention
>= 2.1.1 with ``APPROXIMATE``). The ``*_hub`` backends (FlashAttention-3/4, Sage via the ``kernels`` package) download
their kernel from the Hugging Face Hub at first use and are left out (no download at run time). On a CPU:
``native`` and ``_native_math`` (``flex`` without ``torch.compile`` runs an unfused reference, not a candidate).
The eager timings rank the backends; inside the compiled block regions the same kernel is called.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["Auto", "APPROXIMATE", "CUDA_EXACT", "CPU_CANDIDATES", "CPU_BACKENDS", "cache_path", "check",
           "measure", "choose", "pick", "attention_shape", "attach",
           "Measurement"]

#: exact backends on CUDA, in the order of preference when two measure the same
CUDA_EXACT = ("_native_cudnn", "_native_flash", "_native_efficient", "native", "flash", "_flash_3", "xformers")
#: backends whose numerics differ from SDPA (int8 / fp8 inside the attention): only by name or with approximate=True
APPROXIMATE = ("sage", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp16_cuda",
               "_sage_qk_int8_pv_fp16_triton")
CPU_CANDIDATES = ("native", "_native_math")
#: backends that run without CUDA (an explicit name is checked against the device)
CPU_BACKENDS = ("native", "_native_math", "flex")
ENV_CACHE = "DBCACHE_COMPILE_ATTENTION_CACHE"


@dataclasses.dataclass(frozen=True)
class Auto:
    """``attention=Auto(...)``: choose by measurement (module doc).

    Attributes:
        shape: ``(batch, heads, tokens, head_dim)`` to measure at ``optimize``; ``None``: the first call's.
        approximate: also consider backends that change the numerics (:data:`APPROXIMATE`).
        cache: the JSON file of measurements; ``None``: ``$DBCACHE_COMPILE_ATTENTION_CACHE`` or
            ``~/.cache/dbcache_compile/attention.json``.
        repeats: timed calls per backend (after two warm-up calls).
    """

    shape: Optional[tuple[int, int, int, int]] = None
    approximate: bool = False
    cache: Optional[Union[str, Path]] = None
    repeats: int = 10


@dataclasses.dataclass
class Measurement:
    """One ``auto`` decision: the chosen backend, each candidate's median ms, its error against a float32 reference
    (``rel_l2``, ``psnr_db``) and its PSNR against SDPA in the same dtype (``psnr_vs_sdpa_db``: the ``native``
    backend's output; ``None`` = identical), the candidates that could not run and why, and whether it came from the
    cache."""

    choice: str
    ms: dict[str, float]
    rel_l2: dict[str, float]
    psnr_db: dict[str, Optional[float]]
    skipped: dict[str, str]
    key: str
    cached: bool = False
    psnr_vs_sdpa_db: dict[str, Optional[float]] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        timed = ", ".join(f"{name} {ms:.3f} ms" for name, ms in sorted(self.ms.items(), key=lambda kv: kv[1]))
        return f"{self.choice} (auto{', cached' if self.cached else ''}: {timed})"


def cache_path(auto: Optional[Auto] = None) -> Path:
    """Where measurements are cached (module doc)."""
    if auto is not None and auto.cache is not None:
        return Path(auto.cache)
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    return Path.home() / ".cache" / "dbcache_compile" / "attention.json"


def check(attention: Any, device: torch.device) -> Union[str, Auto, None]:
    """What ``optimize(attention=...)`` means on ``device``: ``None`` (leave the model's), a backend name, or an
    :class:`Auto` to resolve at the first call; a clear ``ValueError`` for what cannot run. An ``Auto`` with a
    shape is measured here and returns the chosen name."""
    if attention is None:
        return None
    if attention == "auto":
        attention = Auto()
    if isinstance(attention, Auto):
        if attention.shape is not None:
            if len(attention.shape) != 4 or not all(isinstance(n, int) and n > 0 for n in attention.shape):
                raise ValueError(f"Auto(shape=...) must be (batch, heads, tokens, head_dim) of positive ints, got "
                                 f"{attention.shape!r}")
        if attention.repeats < 1:
            raise ValueError(f"Auto(repeats=...) must be >= 1, got {attention.repeats}")
        return attention
    from diffusers.models.attention_dispatch import AttentionBackendName
    valid = [b.value for b in AttentionBackendName]
    if attention not in valid:
        raise ValueError(f"attention must be None, 'auto', an Auto(...) or a diffusers attention backend "
                         f"({', '.join(valid)}), got {attention!r}")
    if device.type != "cuda" and attention not in CPU_BACKENDS:
        raise ValueError(f"attention={attention!r} needs a CUDA GPU; the transformer is on {device.type} (use "
                         f"'auto', or one of {', '.join(CPU_BACKENDS)})")
    return attention


def candidates(device: torch.device, approximate: bool) -> tuple[str, ...]:
    """The backends ``auto`` times on ``device``."""
    if device.type != "cuda":
        return CPU_CANDIDATES
    return CUDA_EXACT + (APPROXIMATE if approximate else ())


def _key(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, approximate: bool) -> str:
    import diffusers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    return (f"{name}|{str(dtype).removeprefix('torch.')}|{'x'.join(map(str, shape))}|torch {torch.__version__}|"
            f"diffusers {diffusers.__version__}|{'approximate' if approximate else 'exact'}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, approximate: bool = False,
            repeats: int = 10, names: Optional[tuple[str, ...]] = None) -> Measurement:
    """Time each candidate backend through diffusers' ``dispatch_attention_fn`` on random inputs of
    ``shape = (batch, heads, tokens, head_dim)`` (median of ``repeats`` calls after two warm-ups; CUDA events on
    CUDA), with its error against SDPA in float32; the fastest exact one (or any, with ``approximate``) is chosen."""
    from diffusers.models.attention_dispatch import (AttentionBackendName, _AttentionBackendRegistry,
                                                     _check_attention_backend_requirements, dispatch_attention_fn)
    batch, heads, tokens, head_dim = shape
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=generator, device=device, dtype=dtype)
               for _ in range(3))  # diffusers' layout: (batch, tokens, heads, head_dim)
    with torch.no_grad():
        reference = torch.nn.functional.scaled_dot_product_attention(
            *(x.float().permute(0, 2, 1, 3) for x in (q, k, v))).permute(0, 2, 1, 3)
    ms: dict[str, float] = {}
    rel: dict[str, float] = {}
    psnr: dict[str, Optional[float]] = {}
    skipped: dict[str, str] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name in names or candidates(device, approximate):
        backend = AttentionBackendName(name)
        try:
            if backend not in _AttentionBackendRegistry._backends:
                raise RuntimeError("not registered in this diffusers")
            _check_attention_backend_requirements(backend)
            for constraint in _AttentionBackendRegistry._constraints.get(backend, []):
                constraint(query=q, key=k, value=v, attn_mask=None, is_causal=False)
            with torch.no_grad():
                for _ in range(2):
                    out = dispatch_attention_fn(q, k, v, backend=backend)
                _sync(device)
                times = []
                for _ in range(repeats):
                    if device.type == "cuda":
                        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        begin.record()
                        dispatch_attention_fn(q, k, v, backend=backend)
                        end.record()
                        end.synchronize()
                        times.append(begin.elapsed_time(end))
                    else:
                        start = time.perf_counter()
                        dispatch_attention_fn(q, k, v, backend=backend)
                        times.append(1e3 * (time.perf_counter() - start))
        except Exception as err:  # noqa: BLE001 - a backend that cannot run is reported, not fatal
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            continue
        ms[name] = round(statistics.median(times), 4)
        outputs[name] = out
        rel[name] = float(((out.float() - reference).pow(2).mean() / reference.pow(2).mean()).sqrt())
        psnr[name] = _psnr(out, reference)
    if not ms:
        raise RuntimeError(f"attention='auto': no attention backend ran on {device} ({skipped})")
    sdpa = outputs.get("native")
    vs_sdpa = {} if sdpa is None else {name: _psnr(out, sdpa.float()) for name, out in outputs.items()}
    choice = pick(ms, approximate, names or candidates(device, approximate))
    return Measurement(choice, ms, rel, psnr, skipped, _key(shape, dtype, device, approximate),
                       psnr_vs_sdpa_db=vs_sdpa)


def _psnr(out: torch.Tensor, reference: torch.Tensor) -> Optional[float]:
    """PSNR in dB of ``out`` against ``reference`` (peak: the reference's largest magnitude); ``None``: identical."""
    error = (out.float() - reference).pow(2).mean()
    return round(float(10 * torch.log10(reference.abs().max().pow(2) / error)), 2) if error > 0 else None


def pick(ms: dict[str, float], approximate: bool, order: tuple[str, ...]) -> str:
    """The fastest backend of ``ms`` (name -> median ms), ties broken by ``order``; one of :data:`APPROXIMATE` only
    when ``approximate``. A ``ValueError`` when nothing is left to pick."""
    allowed = [name for name in ms if approximate or name not in APPROXIMATE]
    if not allowed:
        raise ValueError(f"attention='auto': only numerics-changing backends ran ({sorted(ms)}); name one, or pass "
                         f"attention=Auto(approximate=True)")
    rank = {name: i for i, name in enumerate(order)}
    return min(allowed, key=lambda name: (ms[name], rank.get(name, len(rank))))


def choose(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, auto: Auto) -> Measurement:
    """The cached decision for (shape, dtype, device), else a fresh :func:`measure` written to the cache."""
    path = cache_path(auto)
    key = _key(shape, dtype, device, auto.approximate)
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if entry is not None:
        return Measurement(entry["choice"], entry["ms"], entry["rel_l2"], entry["psnr_db"], entry["skipped"], key,
                           cached=True, psnr_vs_sdpa_db=entry.get("psnr_vs_sdpa_db", {}))
    result = measure(shape, dtype, device, auto.approximate, auto.repeats)
    table[key] = {"choice": result.choice, "ms": result.ms, "rel_l2": result.rel_l2, "psnr_db": result.psnr_db,
                  "psnr_vs_sdpa_db": result.psnr_vs_sdpa_db, "skipped": result.skipped,
                  "measured_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError:
        pass  # a read-only home: the decision holds for this process
    return result


def attention_shape(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple[int, int, int, int],
                                                                                      torch.dtype]:
    """``((batch, heads, tokens, head_dim), dtype)`` of the model's self-attention at this call: heads and head dim
    from its config, tokens from ``hidden_states`` (packed ``(batch, tokens, channels)``, or latents divided by the
    patch size), plus the text tokens when the model attends jointly (its attention has ``add_q_proj``)."""
    config = transformer.config
    heads = config.get("num_attention_heads")
    head_dim = config.get("attention_head_dim")
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not (isinstance(heads, int) and isinstance(head_dim, int) and isinstance(hidden, torch.Tensor)):
        raise ValueError(f"attention='auto' cannot read the attention shape of {type(transformer).__name__} (no "
                         f"num_attention_heads / attention_head_dim in its config, or no hidden_states); pass "
                         f"attention=Auto(shape=(batch, heads, tokens, head_dim)) or a backend name")
    if hidden.ndim == 3:
        tokens = hidden.shape[1]
    else:
        patch = config.get("patch_size", 1) or 1
        patch = patch if isinstance(patch, (tuple, list)) else (patch,) * 2
        spatial = hidden.shape[2:]
        tokens = math.prod(spatial) // math.prod(patch[-len(spatial):]) if len(patch) >= 1 else math.prod(spatial)
    encoder = kwargs.get("encoder_hidden_states")
    joint = any(getattr(m, "add_q_proj", None) is not None for m in transformer.modules())
    if joint and isinstance(encoder, torch.Tensor) and encoder.ndim == 3:
        tokens += encoder.shape[1]
    dtype = hidden.dtype if hidden.is_floating_point() else next(transformer.parameters()).dtype
    return (hidden.shape[0], heads, tokens, head_dim), dtype


def attach(transformer: torch.nn.Module, auto: Auto, applied: Any) -> None:
    """Resolve ``auto`` now (a shape given) or at the transformer's first call (a forward pre-hook, removed after it
    ran), set the chosen backend, and record it in ``applied.attention``; ``applied.undo`` learns to remove the hook
    and reset the backend."""
    state: dict[str, Any] = {"set": False}

    def resolve(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
        result = choose(shape, dtype, next(transformer.parameters()).device, auto)
        transformer.set_attention_backend(result.choice)
        state["set"] = True
        applied.attention = result.describe()

    def first_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        handle.remove()
        resolve(*attention_shape(module, args, kwargs))

    undo = applied.undo

    def undo_auto() -> None:
        if handle is not None:
            handle.remove()
        if state["set"]:
            transformer.reset_attention_backend()
        undo()

    applied.undo = undo_auto
    if auto.shape is not None:
        handle = None
        dtype = next(p.dtype for p in transformer.parameters() if p.is_floating_point())
        resolve(tuple(auto.shape), dtype)
        return
    handle = transformer.register_forward_pre_hook(first_call, with_kwargs=True, prepend=True)
    applied.attention = "auto (chosen at the first call)"
