"""Run the benchmark rows and collect per-prompt measurements.

Order (``plan_rows``): the uncached eager row first (its images are the PSNR/SSIM/LPIPS reference), then per mode
the uncached row of that mode, our configs, and the peers. Quantized modes run last. ``explicit_rows`` runs the rows
``--rows`` names in the order given instead (the eager reference first only when the model returns images to
compare). A quantized mode runs on a freshly built transformer quantized in place before its first row; an
unquantized row after a quantized one gets a fresh unquantized transformer. The first transformer call of the first
row is captured for the FLOP count, which runs after the first row that succeeds.

Per row: ``torch._dynamo.reset()`` (every row compiles from scratch; Inductor's on-disk caches stay on, as a user's
would be), attach, one warm-up call (prompt 0, excluded from the medians; compile time = warm-up wall minus the
steady median), then one call per prompt, then detach. A row that raises is recorded as failed with the reason and
the run continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import sys
import traceback
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from dbcache_compile import DBCacheConfig
from dbcache_compile.flops import ForwardFlops, cached_forward_flops, full_forward_flops, generation_flops
from dbcache_compile.families import family_for
from dbcache_compile.quantize import default_filter, quantize_transformer, resolve_quantization

from .measure import PeakMemory, TransformerTimer, timed_call
from .methods import CacheDit, FirstBlockCache, Method, Ours, Uncached, peer_unavailable
from .metrics import Scorers, psnr, ssim
from .models import BenchModel

__all__ = ["REFERENCE", "RowSpec", "RowResult", "Runner", "Recipe", "plan_rows", "explicit_rows", "run_rows",
           "quantization_of", "METHODS"]

#: Row methods: the baseline, ours, and the peers (bench.methods.PEERS).
METHODS = ("uncached", "ours", "cache-dit", "diffusers-fbcache")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row: ``method`` (``uncached`` | ``ours`` | a peer) in ``mode`` with cache ``config`` (``None`` for
    ``uncached``; FBCache rows carry the config whose threshold they use)."""

    method: str
    mode: str
    config: Optional[str] = None

    @property
    def label(self) -> str:
        """The Config column."""
        if self.method == "uncached":
            return "uncached"
        if self.method == "ours":
            return self.config
        if self.method == "diffusers-fbcache":
            return f"FBCache_R{_threshold(self.config)} [diffusers]"
        return f"{self.config} [{self.method}]"


@dataclasses.dataclass
class RowResult:
    """Measurements of one row; per-prompt lists are in prompt order, times in seconds, FLOPs per image.

    ``status`` is ``"ok"``, ``"skipped"`` or ``"failed"`` (then ``reason`` says why, on one line; the markdown shows
    its first 200 characters, the JSON all of it).
    """

    spec: RowSpec
    status: str = "ok"
    reason: str = ""
    warmup_s: Optional[float] = None
    wall_s: list[float] = dataclasses.field(default_factory=list)
    transformer_s: list[float] = dataclasses.field(default_factory=list)
    calls: list[int] = dataclasses.field(default_factory=list)
    cached_calls: list[int] = dataclasses.field(default_factory=list)
    flops: list[float] = dataclasses.field(default_factory=list)
    psnr: list[float] = dataclasses.field(default_factory=list)
    ssim: list[float] = dataclasses.field(default_factory=list)
    lpips: list[float] = dataclasses.field(default_factory=list)
    clip_score: list[float] = dataclasses.field(default_factory=list)
    image_reward: list[float] = dataclasses.field(default_factory=list)
    extra: list[float] = dataclasses.field(default_factory=list)
    peak_mem_bytes: Optional[int] = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def wall_median(self) -> Optional[float]:
        """Median pipeline wall time per image over the prompts (s)."""
        return statistics.median(self.wall_s) if self.wall_s else None

    @property
    def transformer_median(self) -> Optional[float]:
        """Median transformer time per image (s)."""
        return statistics.median(self.transformer_s) if self.transformer_s else None

    @property
    def compile_s(self) -> Optional[float]:
        """Warm-up wall minus the steady median (s); only for compiled modes."""
        if self.spec.mode == "eager" or self.warmup_s is None or not self.wall_s:
            return None
        return self.warmup_s - self.wall_median

    @property
    def tflops(self) -> Optional[float]:
        """Mean transformer TFLOPs per image."""
        return statistics.fmean(self.flops) / 1e12 if self.flops else None


REFERENCE = RowSpec("uncached", "eager")
"""The uncached eager row: quality reference and FLOP-count source."""


def _threshold(config: str) -> float:
    return DBCacheConfig.from_string(config).residual_diff_threshold


def _split(config: str) -> tuple[int, int]:
    cfg = DBCacheConfig.from_string(config)
    return cfg.Fn_compute_blocks, cfg.Bn_compute_blocks


def _block_lists(transformer: torch.nn.Module) -> tuple[str, ...]:
    """The block lists of the transformer's family (those optimize() caches)."""
    return family_for(transformer).block_lists


def quantization_of(mode: str) -> Optional[str]:
    """``"compile+fp8"`` → ``"fp8"``; ``None`` for unquantized modes."""
    return mode.split("+", 1)[1] if "+" in mode else None


def plan_rows(modes: list[str], configs: list[str], peers: list[str]) -> list[RowSpec]:
    """All rows in run order: the eager uncached reference, then per mode (quantized last) uncached, ours, peers.
    FBCache gets one row per distinct threshold among ``configs``."""
    rows = [REFERENCE]
    ordered = sorted(modes, key=lambda m: (m != "eager", quantization_of(m) is not None))
    for mode in ordered:
        if mode != "eager":
            rows.append(RowSpec("uncached", mode))
        rows.extend(RowSpec("ours", mode, c) for c in configs)
        if "cache-dit" in peers:
            rows.extend(RowSpec("cache-dit", mode, c) for c in configs)
        if "diffusers-fbcache" in peers:
            seen: set[float] = set()
            for c in configs:
                if _threshold(c) not in seen:
                    seen.add(_threshold(c))
                    rows.append(RowSpec("diffusers-fbcache", mode, c))
    return rows


def explicit_rows(rows: list[str], configs: list[str], reference: bool) -> list[RowSpec]:
    """``--rows``: ``method:mode`` items in the order given; ``ours`` and ``cache-dit`` get one row per config,
    ``diffusers-fbcache`` one per distinct threshold. ``reference``: put the uncached eager row first (the PSNR
    reference) unless it is already named first."""
    specs: list[RowSpec] = []
    for item in rows:
        method, _, mode = item.partition(":")
        if method not in METHODS or not mode:
            raise ValueError(f"--rows: {item!r} is not METHOD:MODE with METHOD one of {', '.join(METHODS)}")
        if method == "uncached":
            specs.append(RowSpec("uncached", mode))
        elif method == "diffusers-fbcache":
            seen: set[float] = set()
            for c in configs:
                if _threshold(c) not in seen:
                    seen.add(_threshold(c))
                    specs.append(RowSpec(method, mode, c))
        else:
            specs.extend(RowSpec(method, mode, c) for c in configs)
    if len(set(specs)) != len(specs):
        raise ValueError(f"--rows: a row is named twice ({', '.join(rows)})")
    if reference and (not specs or specs[0] != REFERENCE):
        specs = [REFERENCE] + [s for s in specs if s != REFERENCE]
    return specs


class _Counter:
    """FLOPs of the forwards a generation runs: one full forward and one cached forward per ``(Fn, Bn)``,
    counted on the transformer inputs captured from the reference row."""

    def __init__(self) -> None:
        self.kwargs: Optional[dict[str, Any]] = None
        self.full: Optional[ForwardFlops] = None
        self.cached: dict[tuple[int, int], ForwardFlops] = {}
        self.error: Optional[str] = None

    def capture(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.kwargs is None:
            if args:
                raise ValueError("the pipeline passed positional arguments to its transformer; expected keywords")
            self.kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    def count(self, transformer: torch.nn.Module, splits: set[tuple[int, int]]) -> None:
        """Count once; a failure leaves the TFLOPs columns n/a (``error`` says why) instead of ending the run."""
        try:
            full = full_forward_flops(transformer, self.kwargs)
            self.cached = {split: cached_forward_flops(transformer, self.kwargs, *split) for split in sorted(splits)}
            self.full = full
        except Exception as err:  # noqa: BLE001 - FLOPs are one column; the timings are the point
            traceback.print_exc(file=sys.stderr)
            self.error = f"{type(err).__name__}: {err}".splitlines()[0]

    def per_generation(self, method: Method, calls: int, cached_calls: int) -> float:
        cached = self.cached[method.split] if method.split is not None else self.full
        return generation_flops(self.full, cached, calls, cached_calls)


@dataclasses.dataclass
class Recipe:
    """What ``run``'s recipe flags ask (``--recipe``, ``--attention``, ``--fuse-qkv``, ``--compile-vae``,
    ``--cache-dit-stack``): ours' extra ``optimize`` arguments, QKV fusion before quantizing (every row of a quantized
    mode then runs the same fused weights), and how cache-dit's rows are built."""

    kernels: Optional[str] = None
    attention: Optional[str] = None
    fuse_qkv: bool = False
    compile_vae: Optional[bool] = None
    cache_dit_stack: str = "regional"

    def ours_options(self, quantized: bool) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.kernels is not None:
            options["recipe"] = self.kernels
        if self.attention is not None:
            options["attention"] = self.attention
        if self.compile_vae is not None:
            options["compile_vae"] = self.compile_vae
        if self.fuse_qkv and not quantized:  # quantized modes fused the weights before quantizing them
            options["fuse_qkv"] = True
        return options


class Runner:
    """Runs :class:`RowSpec` rows on one :class:`BenchModel`."""

    def __init__(self, model: BenchModel, prompts: list[str], compile_mode: str, graph: str,
                 recipe: Optional[Recipe] = None) -> None:
        self.model = model
        self.prompts = prompts
        self.compile_mode = compile_mode
        self.graph = graph
        self.recipe = recipe or Recipe()
        #: the attention backend ours' ``attention="auto"`` chose (cache-dit's best stack then uses the same)
        self.chosen_attention: Optional[str] = None
        self.scorers = Scorers(model.device, model.prompt_inputs, model.images)
        self.reference: list[torch.Tensor] = []
        self.flops = _Counter()
        self.quantized_mode: Optional[str] = None
        first = model.make_inputs(0, prompts[0])
        self.separate_cfg = (model.separate_cfg if model.separate_cfg is not None
                             else family_for(model.pipe.transformer).separate_cfg(first))

    def method(self, spec: RowSpec) -> Method:
        mode = None if spec.mode == "eager" else self.compile_mode
        if spec.method == "uncached":
            return Uncached(mode, self.graph)
        if spec.method == "ours":
            options = self.recipe.ours_options(quantization_of(spec.mode) is not None) if mode is not None else {}
            return Ours(spec.config, mode, self.graph, options)
        if spec.method == "cache-dit":
            if self.recipe.cache_dit_stack == "best" and mode is not None:
                attention = self.recipe.attention if self.recipe.attention != "auto" else self.chosen_attention
                block_mode = ("max-autotune-no-cudagraphs" if self.compile_mode in ("max-autotune",
                                                                                     "max-autotune-no-cudagraphs")
                              else None)
                return CacheDit(spec.config, True, self.separate_cfg, "best", block_mode, attention)
            return CacheDit(spec.config, mode is not None, self.separate_cfg)
        return FirstBlockCache(_threshold(spec.config), mode is not None)

    def _prepare_mode(self, mode: str) -> None:
        """Quantized modes: a fresh transformer, quantized in place (once per mode); an unquantized mode after a
        quantized one: a fresh unquantized transformer."""
        quantize = quantization_of(mode)
        if quantize is None:
            if self.quantized_mode is not None:
                self.model.replace_transformer()
                self.quantized_mode = None
            return
        if self.quantized_mode == mode:
            return
        self.model.replace_transformer()
        transformer = self.model.pipe.transformer
        if self.recipe.fuse_qkv:
            transformer.fuse_qkv_projections()  # before quantizing: the fused linear is what gets quantized
        config = resolve_quantization(quantize, self.model.device, self.compile_mode)
        quantize_transformer(transformer, config, default_filter(_block_lists(transformer)))
        self.quantized_mode = mode

    def run(self, spec: RowSpec, splits: set[tuple[int, int]]) -> RowResult:
        """Run one row; exceptions become a failed row (traceback on stderr)."""
        if spec.method != "uncached" and spec.method != "ours":
            reason = peer_unavailable(spec.method)
            if reason is not None:
                return RowResult(spec, status="skipped", reason=reason)
        try:
            result = self._run(spec)
        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc(file=sys.stderr)
            return RowResult(spec, status="failed", reason=" ".join(f"{type(err).__name__}: {err}".split())[:2000])
        if self.flops.kwargs is not None and self.flops.full is None and self.flops.error is None:
            self.flops.count(self.model.pipe.transformer, splits)  # once, after the first row that ran
        return result

    def _run(self, spec: RowSpec) -> RowResult:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        self._prepare_mode(spec.mode)
        pipe, device = self.model.pipe, self.model.device
        method = self.method(spec)
        result = RowResult(spec)
        memory = PeakMemory(device)
        try:
            method.attach(pipe)
        except Exception:
            with contextlib.suppress(Exception):  # undo a partial attach so later rows start clean
                method.detach(pipe)
            raise
        timer = TransformerTimer(pipe.transformer, device)
        capture = None
        if self.flops.kwargs is None:
            capture = pipe.transformer.register_forward_pre_hook(self.flops.capture, with_kwargs=True)
        try:
            memory.reset()
            method.begin_call()
            result.warmup_s, _ = timed_call(pipe, self.model.make_inputs(0, self.prompts[0]), device)
            if capture is not None:
                capture.remove()
                capture = None
            for i, prompt in enumerate(tqdm(self.prompts, desc=spec.label, leave=False, unit="img")):
                method.begin_call()
                timer.start()
                seconds, output = timed_call(pipe, self.model.make_inputs(i, prompt), device)
                result.wall_s.append(seconds)
                result.transformer_s.append(timer.seconds())
                result.calls.append(timer.calls)
                result.cached_calls.append(method.cached_calls(pipe))
                self._score(result, i, prompt, self.model.output_images(output))
            result.peak_mem_bytes = memory.read()
            result.details = {**method.details(pipe), "peak_mem_kind": memory.kind}
            if spec.method == "ours" and self.recipe.attention == "auto" and self.chosen_attention is None:
                self.chosen_attention = (result.details.get("attention") or "").split(" ")[0] or None
            if quantization_of(spec.mode):
                result.details["quantized"] = quantization_of(spec.mode)
                if self.recipe.fuse_qkv:
                    result.details["fused_qkv"] = "fused before quantization (every row of the mode)"
        finally:
            if capture is not None:
                capture.remove()
            timer.remove()
            method.detach(pipe)
        return result

    def _score(self, result: RowResult, i: int, prompt: str, images: Optional[torch.Tensor]) -> None:
        if images is None:
            return
        if result.spec == REFERENCE:
            self.reference.append(images)
        reference = self.reference[i]
        result.psnr.append(float(psnr(images, reference).mean()))
        result.ssim.append(float(ssim(images, reference).mean()))
        for values, score in ((result.lpips, self.scorers.lpips(images, reference)),
                              (result.clip_score, self.scorers.clip_score(images, [prompt] * len(images))),
                              (result.image_reward, self.scorers.image_reward(images, [prompt] * len(images)))):
            if score is not None:
                values.append(score)
        if self.model.extra_metric is not None:
            result.extra.append(self.model.extra_metric[1](i, images))


def run_rows(runner: Runner, rows: list[RowSpec],
             after_row: Optional[Callable[[list[RowResult]], None]] = None) -> list[RowResult]:
    """Run ``rows`` in order with a progress bar; fill in the FLOPs once they are counted. ``after_row(results so
    far)`` runs after each row (the CLI writes the results files there, so a run killed at a time limit keeps the
    rows it finished)."""
    splits = {_split(r.config) for r in rows if r.method in ("ours", "cache-dit")} | {FirstBlockCache.split}
    results: list[RowResult] = []
    with tqdm(total=len(rows), desc="rows", unit="row") as bar:
        for spec in rows:
            bar.set_postfix_str(f"{spec.mode}: {spec.label}")
            result = runner.run(spec, splits)
            if spec == REFERENCE and not result.ok:
                raise RuntimeError(f"the uncached eager reference row failed ({result.reason}); nothing to compare "
                                   f"against")
            if result.ok and runner.flops.full is not None:
                method = runner.method(spec)
                result.flops = [runner.flops.per_generation(method, n, c)
                                for n, c in zip(result.calls, result.cached_calls)]
            results.append(result)
            bar.update()
            if after_row is not None:
                after_row(results)
    return results
