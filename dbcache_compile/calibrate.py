"""Calibrate a DBCache config on your own workload: measured, not guessed.

``calibrate(pipe, calls, min_psnr=35)`` returns the fastest config whose worst-case PSNR over ``calls`` (against
the uncached output of the same seeds) meets 35 dB; ``speedup=2.0`` returns the best-quality config whose measured
wall-clock speedup meets 2x. Both given: a config must meet both, and the fastest of those is returned; when none
does, **min_psnr wins** (quality is the hard floor): the fastest config meeting it is returned and the result says
by how much the speedup target was missed.

How (every number in the result is measured on ``pipe`` with ``calls``):

1. **Reference.** Each call runs uncached, compiled / quantized as asked (``optimize(cache=None, ...)``), twice
   (compiled: three times, the first compiles): the images are the reference, the wall time
   (``time.perf_counter``, minimum of the timed runs) the baseline.
2. **Recording.** Per block split ``Fn``, one run that never caches (``R=1e-9``, no warm-up) records every step's
   relative L1 diff of the Fn residual (:attr:`CacheSummary.residual_diffs`), and one run that caches long
   stretches (``R=0.999``) measures how that diff accumulates over several steps (:func:`gap_ratios`,
   :func:`fit_decay`). In a compiled mode they are also the warm-up that compiles the group's graphs.
3. **Model.** For every warm-up ``W``, ``MC`` and threshold ``R`` (from the quantiles of the recorded diffs), the
   library's own gates (:func:`dbcache_compile.decision.cache_allowed`) are replayed on the recorded diffs
   (:func:`simulate`): each candidate's cached steps per call, without running it. Candidates with the same
   predicted steps are merged, keeping the ``R`` in the middle of its interval (the most robust to new inputs); per
   group ``(Fn, Bn, TaylorSeer order)`` the Pareto front of (cached steps, error proxy) is kept, the error proxy
   being ``sqrt(sum of squared modelled diffs over the cached steps)`` of the worst call, whose rank correlation
   with the measured PSNR is -0.99 on the digits model.
4. **Verification.** Only a few candidates run for real: per group, a search along the front guided by a fitted
   ``PSNR ~ a - b log10(error)`` (``min_psnr``) or by the modelled speed (``speedup``), narrowing until the
   boundary is found; groups that cannot beat the best config found so far are skipped. Candidates of one group
   share its compiled graphs: :meth:`~dbcache_compile.runtime.BranchedRuntime.reconfigure` swaps the thresholds, so
   nothing is recompiled per candidate. The pick and its close rivals are timed again, and (eager) the baseline
   too, interleaved with them; times are the minimum of the runs. For ``min_psnr``, measured speeds within
   ``TIE`` (3 %) of the fastest are a tie, won by the higher PSNR.

The budget (default 10 uncached generations per call) counts the work of each run, modelled from the measured
step costs (a compute step costs an uncached step, a hit its FLOP fraction plus a fitted overhead), so that load
from other processes cannot cut the search short; the wall time, in the same unit, is reported beside it
(``cost["wall_generations"]``), and compile time apart from both.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .config import DBCacheConfig
from .decision import cache_allowed
from .metrics import psnr

__all__ = ["calibrate", "evaluate", "CalibrationResult", "Candidate", "SearchSpace", "simulate", "gap_ratios",
           "fit_decay", "ssim"]

#: a threshold that never caches in practice while every step's gates still allow (and record) a diff
RECORD_THRESHOLD = 1e-9
#: PSNR target range accepted (dB) and speedup range
PSNR_RANGE = (0.0, 150.0)
SPEEDUP_RANGE = (1.0, 100.0)
#: a verified candidate is re-timed when its speed is within this fraction of the decision boundary
RETIME_BAND = 0.10
#: measured speeds this close (relative) are a tie for min_psnr, won by the higher PSNR
TIE = 0.03
_BAR = "{l_bar}{bar}| {n:.1f} gen [{elapsed}] {postfix}"  # n may pass the total (the pick timed again)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What :func:`calibrate` may propose. Groups are ``Fn x Bn x taylorseer_orders`` (order 0 = TaylorSeer off);
    ``warmup`` and ``max_continuous`` are the ``W`` and ``MC`` values tried (``-1`` = unlimited); thresholds come
    from ``thresholds`` quantiles of the recorded diffs. Groups leaving no middle block are skipped."""

    Fn: tuple[int, ...] = (1, 2)
    Bn: tuple[int, ...] = (0,)
    taylorseer_orders: tuple[int, ...] = (0, 1)
    warmup: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    max_continuous: tuple[int, ...] = (1, 2, 3, 4, 6, -1)
    thresholds: int = 48

    def groups(self, num_blocks: int) -> list[tuple[int, int, int]]:
        return [(fn, bn, order) for fn, bn, order in itertools.product(self.Fn, self.Bn, self.taylorseer_orders)
                if fn + bn < num_blocks]


@dataclasses.dataclass
class Candidate:
    """One measured config: a row of the calibration table.

    Attributes:
        config: the cache config.
        source: ``"calibrated"`` (proposed by the model) or a name given to :func:`evaluate`.
        predicted_cached: cached transformer calls the gate model predicted, summed over calls (``None`` when not
            predicted).
        cached: cached transformer calls measured, summed over calls and CFG branches.
        cached_per_call: the same per call.
        cached_steps: per call, the cached step indices of its first branch.
        flop_ratio: uncached FLOPs / executed FLOPs over all calls (calflops, :mod:`dbcache_compile.flops`), or the
            block ratio where the family writes out no prologue (``flops`` says which).
        speedup: uncached wall time / this config's, summed over calls (each the minimum over its runs).
        seconds: per call, wall time (minimum over runs).
        runs: timed runs per call.
        psnr: worst call's PSNR in dB (each call: mean over its images) against the uncached images.
        psnr_calls: every call's PSNR.
        ssim: worst call's SSIM (torchmetrics; ``None`` where torchmetrics is missing or the images are too small).
        pareto: not dominated in (speedup, PSNR) by another measured candidate.
    """

    config: DBCacheConfig
    source: str = "calibrated"
    predicted_cached: Optional[int] = None
    cached: int = 0
    cached_per_call: list[int] = dataclasses.field(default_factory=list)
    cached_steps: list[list[int]] = dataclasses.field(default_factory=list)
    flop_ratio: float = 1.0
    speedup: float = 1.0
    seconds: list[float] = dataclasses.field(default_factory=list)
    runs: int = 0
    psnr: float = math.inf
    psnr_calls: list[float] = dataclasses.field(default_factory=list)
    ssim: Optional[float] = None
    pareto: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["config"] = str(self.config)
        return _jsonable(out)


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate` returns: the recommended config and the measured table. ``print()`` it; ``save()``
    writes JSON that ``optimize(pipe, cache="calibration.json")`` reads.

    Attributes:
        config: the recommended :class:`DBCacheConfig` (its measured wall-clock speedup and FLOP ratio:
            ``chosen.speedup`` / ``chosen.flop_ratio``, also at the top of :meth:`to_dict`).
        target: ``{"min_psnr": ..., "speedup": ...}`` as asked (``None`` where not given).
        met: whether ``config`` meets every target given.
        message: what was chosen and why, and by how much a target is missed when it is.
        candidates: the measured candidates (:class:`Candidate`), fastest first; ``chosen`` is among them.
        chosen: the row of ``config``.
        settings: mode, lowering, quantization, calls, steps.
        baseline_seconds: per call, uncached wall time (minimum over runs).
        noise_floor_psnr: worst PSNR of the never-caching recording runs against the reference: differences below
            it are numerics, not caching (``inf``: bit-identical).
        cost: seconds spent generating, in uncached generations per call (``generations``), compile seconds,
            candidates simulated and verified, ``optimize`` calls.
    """

    config: DBCacheConfig
    target: dict[str, Optional[float]]
    met: bool
    message: str
    candidates: list[Candidate]
    chosen: Candidate
    settings: dict[str, Any]
    baseline_seconds: list[float]
    noise_floor_psnr: float
    cost: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "config": str(self.config), "target": self.target, "met": self.met, "message": self.message,
            "speedup": self.chosen.speedup, "flop_ratio": self.chosen.flop_ratio,
            "settings": self.settings, "baseline_seconds": self.baseline_seconds,
            "noise_floor_psnr": self.noise_floor_psnr, "cost": self.cost,
            "psnr": "dB against the uncached output of the same seeds: mean over a call's images, worst call",
            "table": [dict(c.to_dict(), chosen=c is self.chosen) for c in self.candidates],
        })

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, **kwargs)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write :meth:`to_json` to ``path`` (``optimize(pipe, cache=path)`` then uses the recommended config)."""
        path = Path(path)
        path.write_text(self.to_json())
        return path

    def __str__(self) -> str:
        s = self.settings
        target = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in self.target.items() if v is not None)
        head = (f"DBCache calibration: {s['calls']} calls, {s['lowering']} (mode={s['mode']}"
                f"{', quantized=' + str(s['quantize']) if s['quantize'] else ''}), target {target}")
        return "\n".join([head, format_table(self.candidates, self.chosen), "", self.message,
                          f"cost: {self.cost['generations']:.1f} uncached generations per call "
                          f"({self.cost['seconds']:.1f} s generating, {self.cost['compile_seconds']:.1f} s compiling); "
                          f"{self.cost['verified']} of {self.cost['simulated']} simulated candidates run"])


def format_table(rows: Sequence[Candidate], chosen: Optional[Candidate] = None) -> str:
    """The printed table: one line per candidate (``*`` marks ``chosen``, ``p`` the Pareto front)."""
    table = [("", "config", "source", "cached (pred)", "FLOP ratio", "speedup", "PSNR dB", "SSIM")]
    for c in rows:
        pred = "" if c.predicted_cached is None else f" ({c.predicted_cached})"
        table.append(("*" if c is chosen else ("p" if c.pareto else ""), str(c.config), c.source,
                      f"{c.cached}{pred}", f"{c.flop_ratio:.2f}x", f"{c.speedup:.2f}x", _fmt_db(c.psnr),
                      "n/a" if c.ssim is None else f"{c.ssim:.4f}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, DBCacheConfig):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


# ------------------------------------------------------------------------------------------------- the gate model
def simulate(config: DBCacheConfig, diffs: Mapping[int, float], steps: int,
             decay: float = 0.0) -> tuple[list[int], list[float]]:
    """Replay the cache gates of ``config`` on the per-step diffs of a never-caching run.

    ``diffs[s]`` is the relative L1 change of the Fn residual from step ``s - 1`` to ``s``. The residual is only
    stored on compute steps, so a step ``g`` steps after the last compute is judged by the change accumulated over
    those ``g`` steps, modelled as the sum of the per-step diffs times ``exp(-decay * (g - 1))``: ``decay = 0`` is
    the plain sum (an upper bound: the triangle inequality); :func:`fit_decay` measures it. Returns ``(cached steps,
    the modelled diff each cached step was judged by)``."""
    cached: list[int] = []
    judged: list[float] = []
    consecutive, last = 0, 0
    threshold = config.residual_diff_threshold
    for step in range(steps):
        if step and cache_allowed(config, step, len(cached), consecutive, True):
            diff = sum(diffs.get(k, math.inf) for k in range(last + 1, step + 1)) * math.exp(-decay * (step - last - 1))
            if threshold >= 1.0 or diff < threshold:
                cached.append(step)
                judged.append(diff)
                consecutive += 1
                continue
        consecutive, last = 0, step
    return cached, judged


def gap_ratios(diffs: Mapping[int, float], steps: int, cached: Sequence[int], judged: Mapping[int, float]) -> list:
    """Observations ``(gap, judged diff / sum of per-step diffs)`` from a run that cached long stretches:
    ``cached`` its cached steps and ``judged`` its :attr:`CacheSummary.residual_diffs`, ``diffs`` the per-step diffs
    of the never-caching run of the same call. :func:`fit_decay` turns them into :func:`simulate`'s ``decay``."""
    observations, last, hits = [], 0, set(cached)
    for step in range(1, steps):
        value = judged.get(step)
        total = sum(diffs.get(k, math.nan) for k in range(last + 1, step + 1))
        if value is not None and value > 0 and total > 0 and step - last > 1:
            observations.append((step - last, value / total))
        if step not in hits:
            last = step
    return observations


def fit_decay(observations: Sequence[tuple[int, float]]) -> float:
    """Least-squares ``decay`` of ``ratio = exp(-decay * (gap - 1))`` (0 without observations), clamped to
    ``[-0.5, 1]``."""
    xs = [g - 1 for g, r in observations if r > 0 and math.isfinite(r)]
    ys = [math.log(r) for g, r in observations if r > 0 and math.isfinite(r)]
    if not xs:
        return 0.0
    return float(np.clip(-sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), -0.5, 1.0))


@dataclasses.dataclass
class _Proposal:
    """A simulated candidate: its config, predicted cached calls per call and error proxy (worst call)."""

    config: DBCacheConfig
    hits: list[int]
    error: float
    width: int  # threshold values (of the scanned grid) giving the same outcome: robustness
    measured: Optional[Candidate] = None

    @property
    def total(self) -> int:
        return sum(self.hits)


def _propose(group: tuple[int, int, int], records: list[list[tuple[dict[int, float], int]]], space: SearchSpace,
             decay: float = 0.0) -> tuple[list[_Proposal], int]:
    """Simulate the group's (W, MC, R) grid on the recorded diffs (``records[call] = [(diffs, steps) per branch]``);
    returns the Pareto front (cached calls up, error proxy down), least aggressive first, and how many configs were
    simulated."""
    fn, bn, order = group
    gap = max([m for m in space.max_continuous if m > 0] + [4]) + 1
    sums = []
    for branches in records:
        for diffs, steps in branches:
            values = [diffs.get(s, math.nan) for s in range(steps)]
            for g in range(1, gap + 1):
                sums += [sum(values[s - g + 1:s + 1]) * math.exp(-decay * (g - 1)) for s in range(g, steps)]
    sums = np.array([v for v in sums if math.isfinite(v) and v > 0])
    if not len(sums):
        return [], 0
    levels = np.unique(np.quantile(sums, np.linspace(0.0, 1.0, space.thresholds)))
    grid = [float(x) for x in np.unique(np.concatenate([(levels[:-1] + levels[1:]) / 2, [levels[-1] * 1.05]]))
            if 0 < x < 1]
    max_steps = max(steps for branches in records for _, steps in branches)

    def outcome(config: DBCacheConfig) -> tuple[tuple, list[int], float]:
        key, hits, errors = [], [], []
        for branches in records:
            n, err = 0, 0.0
            for diffs, steps in branches:
                cached, judged = simulate(config, diffs, steps, decay)
                key.append(tuple(cached))
                n += len(cached)
                err += float(np.sum(np.square(judged)))
            hits.append(n)
            errors.append(math.sqrt(err))
        return tuple(key), hits, max(errors)

    best: dict[tuple, _Proposal] = {}
    simulated = 0
    for w, mc in itertools.product(space.warmup, space.max_continuous):
        if w >= max_steps:
            continue
        base = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, max_warmup_steps=w,
                             max_continuous_cached_steps=mc, taylorseer=order > 0, taylorseer_order=max(order, 1))
        found: dict[tuple, list[tuple[float, list[int], float]]] = {}
        for r in grid:
            key, hits, error = outcome(dataclasses.replace(base, residual_diff_threshold=r))
            simulated += 1
            if sum(hits):
                found.setdefault(key, []).append((r, hits, error))
        for key, items in found.items():
            if key in best and len(items) <= best[key].width:
                continue  # another (W, MC) gives this outcome over a wider range of thresholds
            r, hits, error = items[len(items) // 2]  # the middle of the range: the most robust to new inputs
            config = dataclasses.replace(base, residual_diff_threshold=r)
            short = dataclasses.replace(base, residual_diff_threshold=float(f"{r:.4g}"))
            if outcome(short)[0] == key:
                config = short
            best[key] = _Proposal(config, hits, error, len(items))
    proposals = sorted(best.values(), key=lambda p: (-p.total, p.error))
    front: list[_Proposal] = []
    for p in proposals:  # most aggressive first: keep a proposal only if it beats every more aggressive one's error
        if not front or p.error < front[-1].error:
            front.append(p)
    return front[::-1], simulated


# ----------------------------------------------------------------------------------------------- the measurements
def _images(output: Any) -> np.ndarray:
    """A pipeline output's images as float64 ``(N, ...)`` in [0, 1] (uint8 and PIL scaled by 1/255)."""
    images = getattr(output, "images", None)
    if images is None:
        images = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(images, torch.Tensor):
        array = images.detach().to("cpu", torch.float64).numpy() if images.dtype != torch.uint8 else \
            images.cpu().numpy().astype(np.float64) / 255.0
    elif isinstance(images, np.ndarray):
        array = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    elif isinstance(images, (list, tuple)) and images and all(hasattr(i, "size") and hasattr(i, "mode")
                                                                 for i in images):
        array = np.stack([np.asarray(i, dtype=np.float64) / 255.0 for i in images])
    else:
        raise ValueError(f"calibrate needs a pipeline whose output has images (arrays, tensors or PIL images); got "
                         f"{type(images).__name__}")
    if array.ndim < 2:
        raise ValueError(f"calibrate needs a batch of images (N, ...), got shape {array.shape}")
    return array


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, shape ``(N,)``, in [-1, 1] (1 for identical images): torchmetrics'
    ``structural_similarity_index_measure`` (Gaussian window 11, sigma 1.5, ``data_range=1``) on float images
    ``(N, C, H, W)`` in [0, 1]. The one SSIM of the project: the calibration table's and ``bench``'s SSIM column.
    Needs torchmetrics (an ``ImportError`` otherwise)."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    return structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0,
                                               reduction="none")


def _ssim(images: np.ndarray, reference: np.ndarray) -> Optional[float]:
    """Mean :func:`ssim` over a call's images (``(N, H, W)`` or channels first / last), ``None`` where torchmetrics
    is missing or cannot score them (images under 11 pixels)."""
    a, b = torch.from_numpy(images).float(), torch.from_numpy(reference).float()
    if a.ndim == 3:
        a, b = a[:, None], b[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a, b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    if a.ndim != 4 or min(a.shape[-2:]) < 11:
        return None
    try:
        return float(ssim(a, b).mean())
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - a shape torchmetrics refuses is reported as n/a
        return None


def _generators(value: Any) -> list[torch.Generator]:
    if isinstance(value, torch.Generator):
        return [value]
    if isinstance(value, (list, tuple)):
        return [g for v in value for g in _generators(v)]
    return []


class _Workload:
    """The calls, replayable: every generator in a call is restored to its state at calibration start before each
    run, so every run of a call starts from the same noise."""

    def __init__(self, calls: Any) -> None:
        if isinstance(calls, Mapping) or not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
            raise TypeError(f"calls must be a list of pipeline keyword-argument dicts (your workload), got "
                            f"{type(calls).__name__}")
        if not calls:
            raise ValueError("calls is empty: give at least one pipeline call (a dict of keyword arguments, with a "
                             "seeded generator) to calibrate on")
        for i, call in enumerate(calls):
            if not isinstance(call, Mapping):
                raise TypeError(f"calls[{i}] must be a dict of pipeline keyword arguments, got {type(call).__name__}")
            if not _generators(list(call.values())) and call.get("latents") is None:
                raise ValueError(f"calls[{i}] has no torch.Generator and no latents: its output changes from run to "
                                 f"run and cannot be compared with the uncached one; pass "
                                 f"generator=torch.Generator().manual_seed(...)")
        self.calls = [dict(call) for call in calls]
        self.states = [[g.get_state() for g in _generators(list(call.values()))] for call in self.calls]

    def __len__(self) -> int:
        return len(self.calls)

    def run(self, pipe: Any, i: int) -> tuple[np.ndarray, float]:
        call = self.calls[i]
        for g, state in zip(_generators(list(call.values())), self.states[i]):
            g.set_state(state)
        device = getattr(getattr(pipe, "transformer", None), "device", torch.device("cpu"))
        start = time.perf_counter()
        out = pipe(**call)
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return _images(out), seconds

    def restore(self) -> None:
        for call, states in zip(self.calls, self.states):
            for g, state in zip(_generators(list(call.values())), states):
                g.set_state(state)


def _check_number(name: str, value: Any, lo: float, hi: float, meaning: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number ({meaning}), got {value!r}")
    if not lo < float(value) <= hi:
        raise ValueError(f"{name} must be in ({lo:g}, {hi:g}] ({meaning}), got {value!r}")
    return float(value)


def _hits(summary: Any) -> int:
    """Cached transformer calls of a generation, all branches."""
    if summary.branches:
        return sum(len(b["cached_steps"]) for b in summary.branches.values())
    return len(summary.cached_steps) + len(summary.cfg_cached_steps)


def _calls(summary: Any) -> int:
    """Transformer calls of a generation, all branches."""
    if summary.branches:
        return sum(b["calls"] for b in summary.branches.values())
    return summary.num_steps * (2 if summary.separate_cfg else 1)


def _group_of(config: DBCacheConfig) -> tuple[int, int, int]:
    """``(Fn, Bn, TaylorSeer order or 0)``: configs of one group share compiled graphs."""
    return (config.Fn_compute_blocks, config.Bn_compute_blocks, config.taylorseer_order if config.taylorseer else 0)


class _Session:
    """One pipeline being measured: the uncached reference, one optimized group at a time, the runs and what they
    cost. ``close()`` leaves the pipeline un-optimized (quantized weights stay quantized)."""

    def __init__(self, pipe: Any, workload: _Workload, mode: Optional[str], graph: str, quantize: Any,
                 compile_options: Optional[dict], optimize_kwargs: dict) -> None:
        from .families import family_for
        from .lowerings import GRAPHS, lowering_named
        from .optimize import COMPILE_MODES, is_optimized
        if isinstance(pipe, torch.nn.Module) or not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
            raise ValueError(f"calibrate needs a pipeline with a `.transformer` (it replays pipeline calls), got "
                             f"{type(pipe).__name__}")
        if is_optimized(pipe):
            raise ValueError("this pipeline is already optimized: call dbcache_compile.disable(pipe) and pass mode / "
                             "graph / quantize to calibrate, which optimizes it the same way for every candidate")
        if mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
        if graph not in GRAPHS or (mode is None and graph != "auto"):
            raise ValueError(f"graph must be one of {GRAPHS} ('auto' without a mode), got {graph!r} with mode={mode!r}")
        if compile_options is not None and not isinstance(compile_options, dict):
            raise TypeError(f"compile_options must be a dict of torch.compile arguments, got "
                            f"{type(compile_options).__name__}")
        if isinstance(getattr(pipe, "transformer_2", None), torch.nn.Module):
            raise NotImplementedError("calibrate models one denoiser per pipeline; this pipeline also has "
                                      "transformer_2 (Wan 2.2): calibrate each stage's config by hand for now")
        if graph != "auto" and lowering_named(graph).decides_on_device:
            raise ValueError(f"calibrate does not run graph={graph!r}: its wall times are measured on the lowerings "
                             f"that decide on the host, which take the same cache decisions; calibrate with "
                             f"graph='segments' and use the result with graph={graph!r}")
        self.pipe, self.workload, self.bar = pipe, workload, None
        self.mode, self.graph, self.quantize = mode, graph, quantize
        self.compile_options = compile_options
        self.kwargs = {k: v for k, v in optimize_kwargs.items() if k != "quantize_filter"}
        self.quantize_filter = optimize_kwargs.get("quantize_filter")
        self.family = family_for(pipe.transformer, generic=optimize_kwargs.get("prologue") is False)
        self.num_blocks = len(self.family.blocks(pipe.transformer))
        self.group: Optional[tuple[int, int, int]] = None
        self.warm = True
        self._running = 0
        self.reference: list[np.ndarray] = []
        self.baseline: list[float] = []
        self.lowering = "eager"
        self.seconds = 0.0  # generating
        self.units = 0.0  # modelled uncached generations per call (the budget)
        self.overhead: list[float] = []  # per-hit cost beyond the FLOP fraction, in compute steps, per run
        self.calls: list[int] = []  # transformer calls per call (all branches), from the recording
        self.compile_seconds = 0.0
        self.optimize_calls = 0
        self.flops: Optional[list[dict]] = None
        self._progress_config: Any = None

    def start(self, bar: Any) -> None:
        """Silence the pipeline's own progress bar (restored by :meth:`finish`) and report to ``bar``."""
        self.bar = bar
        self._progress_config = getattr(self.pipe, "_progress_bar_config", None)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(**dict(self._progress_config or {}, disable=True))

    # -- bookkeeping and the speed model
    def _spend(self, seconds: float, units: float, compiling: bool = False) -> None:
        """Account a pass over the calls. ``units``: its modelled cost in uncached generations per call, what the
        budget counts (the work, so that load on a shared machine cannot cut the search short; the wall time is
        reported too). Of a compiling pass, the wall time beyond the modelled time is compile time."""
        spent = min(seconds, units * sum(self.baseline)) if compiling else seconds
        self.seconds += spent
        self.compile_seconds += seconds - spent
        self.units += units
        if self.bar.total is not None and self.bar.n + units > self.bar.total:
            self.bar.total = self.bar.n + units  # the pick timed again may pass the budget by a fraction
        self.bar.update(units)

    def fraction(self, split: tuple[int, int]) -> list[float]:
        """Per call, the FLOPs of a cached step over an uncached one (calflops, else the block fraction)."""
        fn, bn = split
        if self.flops is not None:
            return [f[(fn, bn)].total / f["full"].total for f in self.flops]
        return [(fn + bn) / self.num_blocks] * len(self.baseline)

    def model_seconds(self, split: tuple[int, int], hits: Sequence[int]) -> float:
        """Modelled wall time of a pass with ``hits`` cached transformer calls per call: a compute step costs an
        uncached step, a hit its FLOP fraction plus the measured overhead (median over the runs so far)."""
        o = float(np.median(self.overhead)) if self.overhead else 0.1
        return sum(t * ((n - h) + h * (o + (1 - o) * f)) / n
                   for t, n, h, f in zip(self.baseline, self.calls, hits, self.fraction(split)))

    def learn(self, split: tuple[int, int], hits: Sequence[int], seconds: Sequence[float]) -> None:
        """Fit the per-hit overhead (beyond the FLOP fraction, in compute steps) to a measured pass."""
        rows = list(zip(self.baseline, self.calls, hits, self.fraction(split)))
        base = sum(t * ((n - h) + h * f) / n for t, n, h, f in rows)
        per_hit = sum(t * h * (1 - f) / n for t, n, h, f in rows)
        if per_hit > 0:
            self.overhead.append(float(np.clip((sum(seconds) - base) / per_hit, 0.0, 0.5)))

    def _pass(self, label: str) -> tuple[list[np.ndarray], list[float]]:
        self.bar.set_postfix_str(label, refresh=False)
        images, seconds = [], []
        for i in range(len(self.workload)):
            self._running = i
            im, s = self.workload.run(self.pipe, i)
            images.append(im)
            seconds.append(s)
        return images, seconds

    # -- the reference
    def count_flops(self, groups: list[tuple[int, int]]) -> None:
        """calflops counts per call (full forward and each (Fn, Bn) cached forward), before any hook is attached;
        ``None`` (block ratio instead) where the family writes out no prologue or its call cannot be captured."""
        from .export import capture_transformer_inputs
        from .flops import cached_forward_flops, full_forward_flops
        try:
            flops = []
            for call in self.workload.calls:
                example = capture_transformer_inputs(self.pipe, **call)
                full = full_forward_flops(self.pipe.transformer, example)
                flops.append({"full": full, **{split: cached_forward_flops(self.pipe.transformer, example, *split)
                                               for split in groups}})
            self.flops = flops
        except Exception:  # noqa: BLE001 - no prologue / positional transformer calls: block ratio
            self.flops = None
        finally:
            self.workload.restore()

    def run_baseline(self) -> None:
        from .optimize import disable, optimize
        compiled = self.mode is not None
        if compiled or self.quantize is not None:
            options = {} if self.quantize_filter is None else {"quantize_filter": self.quantize_filter}
            optimize(self.pipe, cache=None, mode=self.mode, graph=self.graph, quantize=self.quantize,
                     compile_options=self.compile_options, **self.kwargs, **options)
            self.optimize_calls += 1
        try:
            try:
                self.reference, first = self._pass("uncached reference")
            except Exception as err:
                raise ValueError(f"calls[{self._running}] fails when run uncached ({type(err).__name__}: {err}); "
                                 f"check its keyword arguments (shapes, types)") from err
            _, second = self._pass("uncached timing")
            # the first pass compiled: time once more, so that compiled like eager takes the minimum of two
            third = self._pass("uncached timing")[1] if compiled else first
        finally:
            if compiled or self.quantize is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "stays quantized": intended, the candidates run quantized too
                    disable(self.pipe)
        self.baseline = [min(a, b) for a, b in zip(second, third)]
        self._spend(sum(first), 1.0, compiling=compiled)
        self._spend(sum(second), 1.0)
        if compiled:
            self._spend(sum(third), 1.0)

    def retime_baseline(self) -> None:
        """Eager: time the uncached calls again, interleaved with the candidates' runs (load on a shared machine
        then slows both alike); the baseline is the per-call minimum. Compiled modes keep their first timing (timing
        again would mean compiling the uncached forward again)."""
        if self.mode is not None:
            return
        self.close()
        _, seconds = self._pass("uncached timing")
        self._spend(sum(seconds), 1.0)
        self.baseline[:] = [min(a, b) for a, b in zip(self.baseline, seconds)]

    # -- candidates
    def use(self, config: DBCacheConfig) -> None:
        """Attach ``config``: reconfigure when its group is attached (nothing recompiles), else optimize anew."""
        from .optimize import optimize, runtime_of
        group = _group_of(config)
        if group == self.group:
            runtime_of(self.pipe).reconfigure(config)
            return
        self.close()
        optimize(self.pipe, cache=config, mode=self.mode, graph=self.graph, compile_options=self.compile_options,
                 **self.kwargs)
        self.optimize_calls += 1
        self.group = group
        self.lowering = runtime_of(self.pipe).lowering
        self.warm = self.mode is None  # compiled: graphs compile on the first compute and the first hit steps

    def close(self) -> None:
        from .optimize import disable
        if self.group is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "stays quantized": intended
                disable(self.pipe)
            self.group = None

    def finish(self) -> None:
        """Leave the pipeline un-optimized, with its progress bar and its calls' generators as they came."""
        try:
            self.close()
        finally:
            if self._progress_config is not None:
                self.pipe._progress_bar_config = self._progress_config
            elif hasattr(self.pipe, "_progress_bar_config"):
                del self.pipe._progress_bar_config
            self.workload.restore()
            if self.bar is not None:
                self.bar.close()

    def record(self, group: tuple[int, int, int]) -> tuple[list[list[tuple[dict[int, float], int]]], list[int], float]:
        """The never-caching run of ``group``: per call the per-branch ``(diffs, steps)``, the transformer calls per
        call, and the worst PSNR against the reference (the measurement's noise floor)."""
        from .optimize import summary
        fn, bn, order = group
        config = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=RECORD_THRESHOLD,
                               max_warmup_steps=0, taylorseer=order > 0, taylorseer_order=max(order, 1))
        self.use(config)
        compiles = not self.warm
        self.bar.set_postfix_str(f"recording F{fn}B{bn}", refresh=False)
        records, calls, floor = [], [], math.inf
        start = time.perf_counter()
        for i in range(len(self.workload)):
            images, _ = self.workload.run(self.pipe, i)
            self._check_shape(i, images)
            s = summary(self.pipe)
            if len(s.chains) > 1:
                raise NotImplementedError(f"calibrate models one block chain; {type(self.pipe.transformer).__name__} "
                                          f"has {len(s.chains)} ({', '.join(s.chains)}), each deciding on its own")
            branches = [(dict(s.residual_diffs), s.num_steps)]
            if s.separate_cfg and s.cfg_residual_diffs:
                branches.append((dict(s.cfg_residual_diffs), s.num_steps))
            records.append(branches)
            calls.append(_calls(s))
            floor = min(floor, float(np.mean(psnr(images, self.reference[i]))))
        self.calls = calls
        self._spend(time.perf_counter() - start, 1.0, compiling=compiles)
        # compiled: the compute path is compiled now; a lowering that compiles segments whole compiles its hit graph
        # at the first hit
        from .lowerings import lowering_named
        self.warm = self.warm or not lowering_named(self.lowering).compile_segments
        return records, calls, floor

    def record_gaps(self, group: tuple[int, int, int], records: list) -> float:
        """A run that caches long stretches (``R`` just below 1, no limits) measures how the diff accumulates over
        several steps against the per-step diffs ``records`` of the never-caching run: :func:`simulate`'s ``decay``.
        In a compiled mode it also compiles the hit path."""
        from .optimize import summary
        fn, bn, order = group
        config = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=0.999,
                               max_warmup_steps=1, taylorseer=order > 0, taylorseer_order=max(order, 1))
        self.use(config)
        compiles = not self.warm
        self.bar.set_postfix_str(f"recording gaps F{fn}B{bn}", refresh=False)
        observations, hits = [], []
        start = time.perf_counter()
        for i in range(len(self.workload)):
            self._check_shape(i, self.workload.run(self.pipe, i)[0])
            s = summary(self.pipe)
            hits.append(_hits(s))
            runs = [(s.cached_steps, s.residual_diffs)]
            if s.separate_cfg:
                runs.append((s.cfg_cached_steps, s.cfg_residual_diffs))
            for (diffs, steps), (cached, judged) in zip(records[i], runs):
                observations += gap_ratios(diffs, steps, cached, judged)
        seconds = time.perf_counter() - start
        self._spend(seconds, self.model_seconds((fn, bn), hits) / sum(self.baseline), compiling=compiles)
        self.warm = True
        return fit_decay(observations)

    def _check_shape(self, i: int, images: np.ndarray) -> None:
        if images.shape != self.reference[i].shape:
            raise ValueError(f"calls[{i}] returned images of shape {images.shape} with the cache but "
                             f"{self.reference[i].shape} uncached: the call is not reproducible (output shape must "
                             f"not depend on the run)")

    def measure(self, config: DBCacheConfig, source: str = "calibrated", predicted: Optional[int] = None,
                into: Optional[Candidate] = None) -> Candidate:
        """Run every call with ``config``: quality, cached steps, FLOP ratio, wall time (``into``: time again and
        keep the per-call minimum)."""
        from .optimize import summary
        split = (config.Fn_compute_blocks, config.Bn_compute_blocks)
        self.use(config)
        if not self.warm:  # first cached pass of a freshly compiled group: warm-up (compiles the hit path), untimed
            start = time.perf_counter()
            warm = []
            for i in range(len(self.workload)):
                self.workload.run(self.pipe, i)
                warm.append(_hits(summary(self.pipe)))
            self._spend(time.perf_counter() - start, self.model_seconds(split, warm) / sum(self.baseline),
                        compiling=True)
            self.warm = True
        self.bar.set_postfix_str(str(config), refresh=False)
        images, seconds, hits, steps, calls = [], [], [], [], []
        for i in range(len(self.workload)):
            im, sec = self.workload.run(self.pipe, i)
            self._check_shape(i, im)
            s = summary(self.pipe)
            images.append(im)
            seconds.append(sec)
            hits.append(_hits(s))
            calls.append(_calls(s))
            steps.append(list(s.cached_steps))
        self.calls = self.calls or calls
        self._spend(sum(seconds), self.model_seconds(split, hits) / sum(self.baseline))
        self.learn(split, hits, seconds)
        if into is not None:
            into.seconds = [min(a, b) for a, b in zip(into.seconds, seconds)]
            into.runs += 1
            return into
        quality = [float(np.mean(psnr(im, ref))) for im, ref in zip(images, self.reference)]
        ssims = [_ssim(im, ref) for im, ref in zip(images, self.reference)]
        if self.flops is not None:
            from .flops import generation_flops
            full = sum(generation_flops(f["full"], f[split], n, 0) for n, f in zip(calls, self.flops))
            done = sum(generation_flops(f["full"], f[split], n, h) for n, h, f in zip(calls, hits, self.flops))
        else:
            kept = config.Fn_compute_blocks + config.Bn_compute_blocks
            full = sum(calls) * self.num_blocks
            done = full - sum(hits) * (self.num_blocks - kept)
        return Candidate(config=config, source=source, predicted_cached=predicted, cached=sum(hits),
                         cached_per_call=hits, cached_steps=steps, flop_ratio=full / done,
                         speedup=sum(self.baseline) / sum(seconds), seconds=seconds, runs=1, psnr=min(quality),
                         psnr_calls=quality, ssim=None if any(v is None for v in ssims) else min(ssims))


def _mark_pareto(rows: list[Candidate]) -> None:
    for c in rows:
        c.pareto = not any(o is not c and o.speedup >= c.speedup and o.psnr >= c.psnr and
                           (o.speedup > c.speedup or o.psnr > c.psnr) for o in rows)


class _QualityModel:
    """``PSNR ~ a - b log10(error)`` fitted on a group's verified candidates (slope 24 dB per decade until two
    points with different errors fit it, clamped to 8..40)."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def add(self, error: float, value: float) -> None:
        if math.isfinite(value) and error > 0:
            self.points.append((math.log10(error), value))

    def predict(self, error: float, prior: Optional["_QualityModel"] = None) -> Optional[float]:
        points = self.points or (prior.points if prior is not None else [])
        if not points or error <= 0:
            return None
        x = np.array([p[0] for p in points])
        y = np.array([p[1] for p in points])
        slope = 24.0
        if len(points) >= 2 and np.ptp(x) > 0.05:
            slope = float(np.clip(-np.polyfit(x, y, 1)[0], 8.0, 40.0))
        a = float(np.mean(y + slope * x))
        return a - slope * math.log10(error)


def calibrate(pipe: Any, calls: Sequence[Mapping[str, Any]], *, min_psnr: Optional[float] = None,
              speedup: Optional[float] = None, target: Optional[Mapping[str, float]] = None,
              mode: Optional[str] = None, graph: str = "auto", quantize: Any = None,
              compile_options: Optional[dict[str, Any]] = None, search: Optional[SearchSpace] = None,
              budget: float = 10.0, progress: bool = True, **optimize_kwargs: Any) -> CalibrationResult:
    """Find the DBCache config for your workload by measuring it (module doc: the method).

    Args:
        pipe: a diffusers pipeline (not optimized; ``calibrate`` optimizes it per candidate and leaves it
            un-optimized, with quantized weights when ``quantize`` is given).
        calls: the workload, a few pipeline keyword-argument dicts, each with a seeded ``generator`` (or
            ``latents``): every run of a call replays the same noise.
        min_psnr: the fastest config whose worst-call PSNR (dB, against the uncached images) meets this.
        speedup: the best-quality config whose measured wall-clock speedup over uncached meets this. With both,
            min_psnr wins when they conflict (module doc).
        target: the same as a mapping, ``{"min_psnr": 35}``; giving it together with ``min_psnr`` or ``speedup``
            is an error (no silent precedence between the two spellings).
        mode / graph / quantize / compile_options / optimize_kwargs: how the pipeline runs, as in
            :func:`dbcache_compile.optimize` (``graph='cond'`` is refused: calibrate with ``segments``, which takes
            the same decisions, and run the pick with ``cond``).
        search: the :class:`SearchSpace` (default: Fn 1-2, B0, TaylorSeer off/order 1, W 1-8, MC 1-6/unlimited).
        budget: uncached generations per call that the reference, recordings and verifications may take (>= 4).
        progress: a tqdm bar on stderr.
    """
    from tqdm.auto import tqdm

    if target is not None:
        if min_psnr is not None or speedup is not None:
            raise ValueError(f"give the targets either as target={dict(target)!r} or as min_psnr= / speedup=, not "
                             f"both (got min_psnr={min_psnr!r}, speedup={speedup!r} as well)")
        if not isinstance(target, Mapping):
            raise TypeError(f"target must be a mapping like {{'min_psnr': 35}}, got {type(target).__name__}")
        unknown = set(target) - {"min_psnr", "speedup"}
        if unknown:
            raise ValueError(f"target keys are 'min_psnr' and 'speedup', got {sorted(unknown)}")
        min_psnr, speedup = target.get("min_psnr"), target.get("speedup")
    min_psnr = _check_number("min_psnr", min_psnr, *PSNR_RANGE, "dB against the uncached output")
    speedup = _check_number("speedup", speedup, *SPEEDUP_RANGE, "wall-clock speedup over uncached")
    if min_psnr is None and speedup is None:
        raise ValueError("give a target: min_psnr=... (dB) and/or speedup=... (x over uncached)")
    budget = _check_number("budget", budget, 0.0, 1000.0, "uncached generations per call")
    if budget < 4:
        raise ValueError(f"budget must be >= 4 uncached generations per call (the reference takes 2, a recording 1, "
                         f"candidates the rest), got {budget:g}")
    space = search or SearchSpace()
    if not isinstance(space, SearchSpace):
        raise TypeError(f"search must be a dbcache_compile.calibrate.SearchSpace, got {type(space).__name__}")
    session = _Session(pipe, _Workload(calls), mode, graph, quantize, compile_options, optimize_kwargs)
    groups = space.groups(session.num_blocks)
    if not groups:
        raise ValueError(f"the search space leaves no middle block to skip on this {session.num_blocks}-block model "
                         f"(Fn + Bn must be below it): lower SearchSpace.Fn / Bn")
    session.start(tqdm(total=budget, desc="calibrate", unit="gen", disable=not progress, leave=False,
                       bar_format=_BAR))
    try:
        session.count_flops(sorted({(fn, bn) for fn, bn, _ in groups}))
        session.run_baseline()
        search = _Search(session, space, min_psnr, speedup, budget)
        search.run(groups)
        if not search.measured:
            failed = "".join(f"; group {g} failed: {e}" for g, e in search.failed.items())
            raise RuntimeError(f"calibrate measured no candidate within budget={budget:g} uncached generations per "
                               f"call (the reference and recordings took {session.units:.1f}){failed}")
        search.retime()
        return _result(search)
    finally:
        session.finish()


class _Search:
    """The verification search of :func:`calibrate` over the groups' Pareto fronts (module doc, step 4)."""

    def __init__(self, session: _Session, space: SearchSpace, min_psnr: Optional[float], speedup: Optional[float],
                 budget: float) -> None:
        self.session, self.space, self.min_psnr, self.speedup, self.budget = session, space, min_psnr, speedup, budget
        self.baseline = session.baseline
        self.measured: list[Candidate] = []
        self.floor = math.inf
        self.simulated = 0
        self.exhausted = False
        self.fronts: dict[tuple, list[_Proposal]] = {}
        self.decay: dict[str, float] = {}  # per Fn: simulate()'s decay, measured
        self.failed: dict[str, str] = {}  # groups that failed (e.g. to compile): group -> error
        self.models: dict[tuple, _QualityModel] = {}

    # -- the speed model (the session's, fitted to every measured pass)
    def seconds(self, group: tuple, hits: Sequence[int]) -> float:
        return self.session.model_seconds(group[:2], hits)

    def speed(self, group: tuple, hits: Sequence[int]) -> float:
        return sum(self.baseline) / self.seconds(group, hits)

    def model_speed(self, c: Candidate) -> float:
        """A measured candidate's speed by the model, from its measured cached steps (noise-free comparisons)."""
        return self.speed(_group_of(c.config), c.cached_per_call)

    # -- runs
    def verify(self, group: tuple, p: _Proposal) -> Optional[Candidate]:
        cost = self.seconds(group, p.hits) / sum(self.baseline)
        if self.session.units + cost > self.budget - 0.5:  # keep half a generation to time the pick again
            self.exhausted = True
            return None
        c = self.session.measure(p.config, predicted=p.total)
        p.measured = c
        self.measured.append(c)
        self.models.setdefault(group, _QualityModel()).add(p.error, c.psnr)
        return c

    def run(self, groups: list[tuple[int, int, int]]) -> None:
        recorded: dict[int, list] = {}
        simulations: dict[tuple, tuple[list[_Proposal], int]] = {}
        prior: Optional[_QualityModel] = None
        for group in groups:
            fn, split = group[0], group[:2]
            if fn not in recorded and self.session.units + 1.5 > self.budget:
                self.exhausted = True
                break
            try:
                if fn not in recorded:  # the diffs of the Fn residual do not depend on Bn or TaylorSeer
                    records, calls, floor = self.session.record(group)
                    self.floor = min(self.floor, floor)
                    recorded[fn] = (records, self.session.record_gaps(group, records))
                    self.decay[f"F{fn}"] = recorded[fn][1]
                if split not in simulations:  # nor do the gates: one simulation per block split
                    simulations[split] = _propose((*split, 0), recorded[fn][0], self.space, recorded[fn][1])
                    self.simulated += simulations[split][1]
                front = [_Proposal(dataclasses.replace(p.config, taylorseer=group[2] > 0,
                                                       taylorseer_order=max(group[2], 1)), p.hits, p.error, p.width)
                         for p in simulations[split][0]]
                self.fronts[group] = front
                if front:
                    if self.min_psnr is not None:
                        self.quality_search(group, front, prior)
                    else:
                        self.speed_search(group, front)
            except NotImplementedError:
                raise
            except Exception as err:  # noqa: BLE001 - e.g. a compile failure of this group: reported, not hidden
                name = f"F{group[0]}B{group[1]}_T{int(group[2] > 0)}O{max(group[2], 1)}"
                self.failed[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
                try:
                    self.session.close()
                except Exception:  # noqa: BLE001 - a runtime broken mid-call may refuse to detach; start over
                    self.session.group = None
                continue
            if self.models.get(group) and self.models[group].points:
                prior = self.models[group]
            if self.exhausted:
                break
        if self.min_psnr is None and not any(c.speedup >= self.speedup for c in self.measured):
            # nothing reached the speedup: run the fastest proposal of all, to report the closest
            tops = [(self.speed(g, f[-1].hits), g, f[-1]) for g, f in self.fronts.items()
                    if f and f[-1].measured is None]
            if tops:
                _, g, p = max(tops, key=lambda t: t[0])
                self.verify(g, p)

    def quality_search(self, group: tuple, front: list[_Proposal], prior: Optional[_QualityModel]) -> None:
        """Fastest proposal meeting min_psnr: front[lo] is known to meet it, front[hi] to miss it."""
        model = self.models.setdefault(group, _QualityModel())
        lo, hi = -1, len(front)
        while hi - lo > 1:
            inside = list(range(lo + 1, hi))
            ok = [c for c in self.measured if c.psnr >= self.min_psnr]
            if ok:  # only what the speed model says could beat the best so far is worth a run
                bar = max(self.model_speed(c) for c in ok)
                inside = [i for i in inside if self.speed(group, front[i].hits) > bar * 0.99]
                if not inside:
                    return
            preds = [(i, model.predict(front[i].error, prior)) for i in inside]
            if preds[0][1] is None:  # nothing measured yet: bisect
                pick = inside[len(inside) // 2]
            else:  # the most aggressive proposal the fitted model expects to meet the target
                above = [i for i, v in preds if v >= self.min_psnr + 0.5]
                pick = max(above) if above else inside[0]
            c = self.verify(group, front[pick])
            if c is None:
                return
            if c.psnr >= self.min_psnr:
                lo = pick
            else:
                hi = pick

    def speed_search(self, group: tuple, front: list[_Proposal]) -> None:
        """Least aggressive (best-quality) proposal meeting the speedup: front[lo] is too slow, front[hi] fast
        enough."""
        lo, hi = -1, len(front)
        while hi - lo > 1:
            inside = list(range(lo + 1, hi))
            fast = [i for i in inside if self.speed(group, front[i].hits) >= self.speedup * 1.02]
            if fast:
                pick = fast[0]
            elif self.speed(group, front[inside[-1]].hits) >= self.speedup * 0.9:
                pick = inside[-1]
            else:
                return  # this group cannot reach the speedup
            c = self.verify(group, front[pick])
            if c is None:
                return
            if c.speedup >= self.speedup:
                hi = pick
            else:
                lo = pick

    def retime(self) -> None:
        """Time again the candidates a timing glitch could misplace (those meeting min_psnr whose measured or
        modelled speed is within RETIME_BAND of the fastest, or near the speedup target; at most three, the attached
        group first), then the uncached baseline (eager), interleaved with them."""
        rivals: list[Candidate] = []
        if self.min_psnr is not None:
            ok = [c for c in self.measured if c.psnr >= self.min_psnr]
            if ok:
                top = max(c.speedup for c in ok)
                rivals = [c for c in ok if max(c.speedup, self.model_speed(c)) >= top * (1 - RETIME_BAND)]
        if self.speedup is not None:
            rivals += [c for c in self.measured if c not in rivals and (
                abs(c.speedup / self.speedup - 1) <= RETIME_BAND or c.speedup < self.speedup <= self.model_speed(c))]
        rivals.sort(key=lambda c: (_group_of(c.config) != self.session.group, -c.speedup))
        for c in rivals[:3]:
            if self.session.units + sum(c.seconds) / sum(self.baseline) > self.budget:
                break
            self.session.measure(c.config, into=c)
        if self.session.mode is None and self.session.units + 1.0 <= self.budget + 0.5:
            self.session.retime_baseline()


def _result(search: _Search) -> CalibrationResult:
    session, measured = search.session, search.measured
    for c in measured:
        c.speedup = sum(session.baseline) / sum(c.seconds)
    chosen, met, message = _choose(measured, search.min_psnr, search.speedup, search.exhausted)
    for group, error in search.failed.items():
        message += f"\nskipped group {group}: {error}"
    measured.sort(key=lambda c: -c.speedup)
    _mark_pareto(measured)
    quantize = session.quantize
    settings = {"mode": session.mode, "graph": session.graph, "lowering": session.lowering,
                "quantize": quantize if isinstance(quantize, (str, type(None))) else type(quantize).__name__,
                "calls": len(session.baseline), "transformer_calls": session.calls, "num_blocks": session.num_blocks,
                "flops": "calflops" if session.flops is not None else "block ratio", "decay": search.decay,
                "failed_groups": search.failed}
    cost = {"seconds": session.seconds, "generations": session.units,
            "wall_generations": session.seconds / sum(session.baseline), "budget": search.budget,
            "compile_seconds": session.compile_seconds, "simulated": search.simulated, "verified": len(measured),
            "optimize_calls": session.optimize_calls, "budget_exhausted": search.exhausted}
    return CalibrationResult(config=chosen.config, target={"min_psnr": search.min_psnr, "speedup": search.speedup},
                             met=met, message=message, candidates=measured, chosen=chosen, settings=settings,
                             baseline_seconds=list(session.baseline), noise_floor_psnr=search.floor, cost=cost)


def _choose(measured: list[Candidate], min_psnr: Optional[float], speedup: Optional[float],
            exhausted: bool) -> tuple[Candidate, bool, str]:
    note = " (budget exhausted before the search finished)" if exhausted else ""
    if min_psnr is not None:
        ok = [c for c in measured if c.psnr >= min_psnr]
        if not ok:
            best = max(measured, key=lambda c: (c.psnr, c.speedup))
            return best, False, (f"NOT MET: no candidate reached {min_psnr:g} dB; closest is {best.config} at "
                                 f"{_fmt_db(best.psnr)} dB ({min_psnr - best.psnr:.2f} dB short), "
                                 f"{best.speedup:.2f}x{note}")
        both = [c for c in ok if speedup is None or c.speedup >= speedup]
        pool = both or ok
        top = max(c.speedup for c in pool)  # speeds within the timing resolution are a tie, won by quality
        pick = max((c for c in pool if c.speedup >= top * (1 - TIE)), key=lambda c: (c.psnr, c.speedup))
        text = (f"recommended {pick.config}: worst-call PSNR {_fmt_db(pick.psnr)} dB >= {min_psnr:g} dB, "
                f"{pick.speedup:.2f}x measured ({pick.flop_ratio:.2f}x FLOPs), the fastest of {len(ok)} measured "
                f"configs meeting it (speeds within {TIE:.0%} tie, won by PSNR)")
        if speedup is None:
            return pick, True, text + note
        if both:
            return pick, True, text + f"; speedup {speedup:g}x met too" + note
        return pick, False, (text + f"; speedup {speedup:g}x NOT MET ({pick.speedup:.2f}x, "
                                    f"{speedup - pick.speedup:.2f}x short): min_psnr wins when both cannot be met"
                             + note)
    ok = [c for c in measured if c.speedup >= speedup]
    if not ok:
        best = max(measured, key=lambda c: (c.speedup, c.psnr))
        return best, False, (f"NOT MET: no candidate reached {speedup:g}x; closest is {best.config} at "
                             f"{best.speedup:.2f}x ({speedup - best.speedup:.2f}x short), {_fmt_db(best.psnr)} dB"
                             f"{note}")
    pick = max(ok, key=lambda c: (c.psnr, c.speedup))
    return pick, True, (f"recommended {pick.config}: {pick.speedup:.2f}x measured >= {speedup:g}x, worst-call PSNR "
                        f"{_fmt_db(pick.psnr)} dB, the best quality of {len(ok)} measured configs meeting it{note}")


def evaluate(pipe: Any, calls: Sequence[Mapping[str, Any]], configs: Mapping[str, Any], *, mode: Optional[str] = None,
             graph: str = "auto", quantize: Any = None, compile_options: Optional[dict[str, Any]] = None,
             repeats: int = 2, progress: bool = True, **optimize_kwargs: Any) -> list[Candidate]:
    """Measure given configs on ``calls`` the way :func:`calibrate` measures candidates (e.g. a calibrated config
    and hand-picked ones on held-out calls): ``configs`` maps a name (the row's ``source``) to a config or its
    string. Each config runs ``repeats`` times per call (time: the minimum). Returns the rows in ``configs``
    order, Pareto-marked; the pipeline is left un-optimized."""
    from tqdm.auto import tqdm

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    parsed = {name: DBCacheConfig.coerce(cfg) for name, cfg in configs.items()}
    if not parsed:
        raise ValueError("evaluate needs at least one config")
    session = _Session(pipe, _Workload(calls), mode, graph, quantize, compile_options, optimize_kwargs)
    for cfg in parsed.values():
        cfg.validate_for(session.num_blocks, type(pipe.transformer).__name__)
    session.start(tqdm(total=2 + repeats * len(parsed), desc="evaluate", unit="gen", disable=not progress,
                       leave=False, bar_format=_BAR))
    try:
        session.count_flops(sorted({(c.Fn_compute_blocks, c.Bn_compute_blocks) for c in parsed.values()}))
        session.run_baseline()
        if mode is None:  # eager: rounds interleaving the baseline and every config (switching costs nothing)
            rows = [session.measure(cfg, source=name) for name, cfg in parsed.items()]
            for _ in range(repeats - 1):
                session.retime_baseline()
                for row in rows:
                    session.measure(row.config, into=row)
        else:  # compiled: a config's repeats back to back (one compile per group)
            rows = []
            for name, cfg in parsed.items():
                rows.append(session.measure(cfg, source=name))
                for _ in range(repeats - 1):
                    session.measure(cfg, into=rows[-1])
        for row in rows:
            row.speedup = sum(session.baseline) / sum(row.seconds)
        _mark_pareto(rows)
        return rows
    finally:
        session.finish()
