"""``python -m bench ablation``: the kernel recipe part by part, in GPU time per step (issue #23, part c).

    python -m bench ablation --random-weights flux --height 1024 --width 1024 --out $OUT/ablation   # a GPU
    python -m bench ablation --random-weights flux-tiny --height 32 --width 32 --quantize int8 \\
        --device cpu --threads 1 --out /tmp/ablation                                            # the CPU dry run

One process; per variant a fresh transformer (random weights, quantization cannot be undone), ``optimize`` with the
variant's recipe, one generation that compiles (its wall time is the variant's compile + first call), then one
timed generation of ``--steps`` steps under the forced schedule ``--config`` (default ``F1B0_W2MC3_R1.0``: with 8
steps, 3 computed and 5 cached). Per variant:

* ``full step ms`` / ``cached step ms``: median device time of the transformer calls that computed / used the cache
  (CUDA events around each call, nothing synchronized inside the pipeline call; wall time off CUDA);
* ``VAE decode ms``: device time of the VAE decoder (events in forward pre / post hooks on ``pipe.vae.decoder``);
* ``first call s``: the compiling generation's wall time (compile, graph captures, attention measurement);
* ``roofline %``: FLOPs of one full forward (``dbcache_compile.flops``: calflops + hand-counted attention, counted
  once on the bf16 transformer) / ``full step ms`` / the card's dense peak (H100 / H200 SXM: 989 TFLOPS bf16, 1979
  TFLOPS fp8); both columns, because the linears run in fp8 and the attention in bf16;
* ``scaled_mm autotune``: how many ``aten._scaled_mm`` GEMMs Inductor's autotuner benchmarked, with how many choices
  and which kinds won (``torch._inductor.select_algorithm.add_feedback_saver``): whether max-autotune really tunes
  the fp8 GEMMs of the block regions.

Variants (``--variants``, in this order by default; each but ``base`` changes one part of ``full``):

* ``full``: ``--quantize`` (fp8 = per-row), ``mode="max-autotune"`` (GEMM autotuning in the block regions),
  ``fuse_qkv=True``, ``attention="auto"``, the VAE decoder compiled, torchao's Inductor flags off;
* ``base``: the configuration of the 2026-11-26 H100 run (``reduce-overhead``: Inductor's default kernels, no
  fusion, the model's attention backend, VAE eager);
* ``no-gemm-autotune``, ``no-vae-compile``, ``native-attention``, ``no-fuse-qkv``: that part off;
* ``fp8-tensor``, ``fp8-mix``: the other granularities (``int8-wo`` / ``int8`` stand in off a capable GPU);
* ``torchao-flags``: torchao's recommended Inductor flags on (applied to our compiles only).

Results are written after every variant (``ablation.md`` / ``.json``), so a run cut at its time cap keeps what it
finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Optional

__all__ = ["VARIANTS", "PEAK_TFLOPS", "variant_options", "configure", "validate", "execute", "peak_tflops"]

#: name -> what it changes in ``full``
#: (in the order they run: under a time cap the first ones matter most; the VAE-only change reuses the transformer
#: graphs of ``full`` from Inductor's caches; torchao's flags, the slowest compile, run last)
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "base": {"mode": "reduce-overhead", "fuse_qkv": False, "attention": None, "compile_vae": False},
    "no-gemm-autotune": {"recipe": {"gemm_autotune": False}},
    "no-vae-compile": {"compile_vae": False},
    "native-attention": {"attention": None},
    "no-fuse-qkv": {"fuse_qkv": False},
    "fp8-tensor": {"quantize": "fp8-tensor"},
    "fp8-mix": {"quantize": "fp8-mix"},
    "torchao-flags": {"recipe": {"torchao_flags": True}},
}
#: dense tensor-core peaks, TFLOPS (NVIDIA's SXM datasheets: H100 and H200 share them)
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp8": 1979.0}, "H200": {"bf16": 989.0, "fp8": 1979.0}}
#: what the fp8 granularities become where fp8 cannot run (the CPU dry run)
_CPU_QUANTIZE = {"fp8": "int8", "fp8-row": "int8", "fp8-tensor": "int8-wo", "fp8-mix": "int8"}


def peak_tflops(device_name: str) -> Optional[dict[str, float]]:
    """The card's dense bf16 / fp8 peaks, or ``None`` for a card not in :data:`PEAK_TFLOPS`."""
    return next((peaks for card, peaks in PEAK_TFLOPS.items() if card in device_name), None)


def variant_options(name: str, quantize: str, mode: str, cpu: bool) -> dict[str, Any]:
    """The ``optimize`` arguments (besides ``cache``) of variant ``name``."""
    options: dict[str, Any] = {"mode": mode, "quantize": quantize, "recipe": {}, "fuse_qkv": True,
                               "attention": "auto", "compile_vae": True}
    for key, value in VARIANTS[name].items():
        options[key] = {**options["recipe"], **value} if key == "recipe" else value
    if cpu:
        options["quantize"] = _CPU_QUANTIZE.get(options["quantize"], options["quantize"])
    return options


class _DecodeTimer:
    """Device time of each VAE decoder call (CUDA events; wall time off CUDA)."""

    def __init__(self, decoder: Any, cuda: bool) -> None:
        import torch
        self.cuda, self.spans, self._open = cuda, [], None
        self._torch = torch
        self._handles = [decoder.register_forward_pre_hook(self._begin), decoder.register_forward_hook(self._end)]

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _begin(self, *args: Any) -> None:
        self._open = self._mark()

    def _end(self, *args: Any) -> None:
        self.spans.append((self._open, self._mark()))

    def ms(self) -> list[float]:
        if self.cuda:
            self._torch.cuda.synchronize()
            return [begin.elapsed_time(end) for begin, end in self.spans]
        return [1e3 * (end - begin) for begin, end in self.spans]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _AutotuneLog:
    """What Inductor's GEMM autotuner benchmarked while the variant compiled (``add_feedback_saver``)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []
        self.available = False
        try:
            from torch._inductor import select_algorithm
            select_algorithm.add_feedback_saver(self._save)
            self.available = True
        except (ImportError, AttributeError):
            pass

    def _save(self, timings: dict, name: str, input_nodes: Any, choices: Any, profiled_time: Any) -> None:
        if timings:
            best = min(timings, key=timings.get)
            self.events.append((name, len(timings), type(best).__name__ + ":" + str(getattr(best, "name", ""))[:60]))

    def summary(self, start: int) -> dict[str, Any]:
        if not self.available:
            return {"error": "torch._inductor.select_algorithm.add_feedback_saver is not in this torch"}
        scaled = [e for e in self.events[start:] if "scaled_mm" in e[0]]
        winners: dict[str, int] = {}
        for _, _, best in scaled:
            kind = "triton" if "Triton" in best else ("aten" if "Extern" in best else best.split(":")[0])
            winners[kind] = winners.get(kind, 0) + 1
        return {"scaled_mm_autotuned": len(scaled), "choices_max": max((e[1] for e in scaled), default=0),
                "winners": winners, "all_autotuned": len(self.events) - start}


def _median(values: list[float]) -> Optional[float]:
    return round(statistics.median(values), 3) if values else None


def _run_variant(name: str, args: argparse.Namespace, model: Any, flops: Any, autotune: _AutotuneLog,
                 peaks: Optional[dict[str, float]]) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    import dbcache_compile as dbc

    from .measure import TransformerTimer, timed_call

    cuda = model.device.type == "cuda"
    options = variant_options(name, args.quantize, args.mode, not cuda)
    torch._dynamo.reset()
    counters.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    model.replace_transformer()
    pipe = model.pipe
    start = len(autotune.events)
    dbc.optimize(pipe, cache=args.config, **options)
    try:
        first, _ = timed_call(pipe, model.make_inputs(0, ""), model.device)
        timer = TransformerTimer(pipe.transformer, model.device)
        decode = _DecodeTimer(pipe.vae.decoder, cuda) if getattr(pipe, "vae", None) is not None else None
        try:
            timer.start()
            wall, _ = timed_call(pipe, model.make_inputs(1, ""), model.device)
            calls = timer.per_call()
            decode_ms = decode.ms() if decode is not None else []
        finally:
            timer.remove()
            if decode is not None:
                decode.remove()
        summary = dbc.summary(pipe)
    finally:
        _disable_quantized(pipe)
    hits = set(summary.cached_steps)
    per = [(1e3 * (device if cuda else host)) for host, device in calls]
    full = [ms for i, ms in enumerate(per) if i not in hits]
    cached = [ms for i, ms in enumerate(per) if i in hits]
    row = {"variant": name, "options": options, "first_call_s": round(first, 2), "timed_call_s": round(wall, 3),
           "full_step_ms": _median(full), "cached_step_ms": _median(cached), "vae_decode_ms": _median(decode_ms),
           "full_steps": len(full), "cached_steps": len(cached), "attention": summary.attention,
           "recipe": summary.recipe, "vae": summary.vae, "quantized": summary.quantized,
           "graph_breaks": sum(counters["graph_break"].values()), "autotune": autotune.summary(start),
           "timing": "CUDA events" if cuda else "wall (no CUDA)"}
    if flops is not None and row["full_step_ms"]:
        achieved = flops / (row["full_step_ms"] / 1e3) / 1e12
        row["achieved_tflops"] = round(achieved, 1)
        if peaks is not None:
            row["roofline_pct_bf16"] = round(100 * achieved / peaks["bf16"], 1)
            row["roofline_pct_fp8"] = round(100 * achieved / peaks["fp8"], 1)
    return row


def _disable_quantized(pipe: Any) -> None:
    """``disable`` without its "stays quantized" warning (the next variant gets a fresh transformer)."""
    import warnings

    import dbcache_compile as dbc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the transformer stays quantized": it is replaced for the next variant
        dbc.disable(pipe)


COLUMNS = ["variant", "first_call_s", "full_step_ms", "cached_step_ms", "vae_decode_ms", "achieved_tflops",
           "roofline_pct_bf16", "roofline_pct_fp8", "attention", "scaled_mm autotune", "status"]


def _write(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    from .report import markdown_table, write_report
    table = []
    for r in rows:
        tune = r.get("autotune") or {}
        tuned = (f"{tune.get('scaled_mm_autotuned')} GEMMs, <= {tune.get('choices_max')} choices, winners "
                 f"{tune.get('winners')}" if "scaled_mm_autotuned" in tune else tune.get("error", ""))
        table.append([r["variant"], r.get("first_call_s"), r.get("full_step_ms"), r.get("cached_step_ms"),
                      r.get("vae_decode_ms"), r.get("achieved_tflops"), r.get("roofline_pct_bf16"),
                      r.get("roofline_pct_fp8"), (r.get("attention") or "")[:40], tuned,
                      r.get("error", "ok")[:200]])
    body = [f"{meta['model']} {meta['resolution']}, config {args.config}, {args.steps} steps, quantize "
            f"{args.quantize}, mode {args.mode}; one process, a fresh transformer per variant. ms: median device "
            f"time per call ({meta['timing']}); roofline: full-forward FLOPs {meta['full_forward_tflops']} TFLOPs "
            f"against the card's dense peak ({meta['peaks']}).", "", *markdown_table(COLUMNS, table)]
    backends = meta.get("attention_backends") or {}
    if "ms" in backends:
        vs_sdpa = backends.get("psnr_vs_sdpa_db") or {}
        body += ["", f"Attention backends at {backends['shape']} (batch, heads, tokens, head dim), every one that ran "
                 f"here, numerics-changing ones included (PSNR against SDPA in the model's dtype, the `native` "
                 f"backend, and PSNR / relative L2 against float32 SDPA; `auto` picks among the exact ones only):",
                 "", *markdown_table(["backend", "ms", "PSNR vs SDPA dB", "PSNR vs fp32 dB", "rel L2 vs fp32"],
                                     [[n, ms, vs_sdpa.get(n) or "identical", backends["psnr_db"].get(n) or "identical",
                                       f"{backends['rel_l2'][n]:.2e}"]
                                      for n, ms in sorted(backends["ms"].items(), key=lambda kv: kv[1])]),
                 "", f"Not run here: {backends['skipped']}"]
    md, _ = write_report(args.out / "ablation", f"Kernel recipe ablation: {meta['model']} {meta['resolution']}",
                         meta, body, {"rows": rows})
    return md


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench ablation``."""
    parser.add_argument("--random-weights", default="flux", help="flux | flux-tiny | qwen-image | qwen-image-tiny")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--config", default="F1B0_W2MC3_R1.0")
    parser.add_argument("--quantize", default="fp8", help="the full recipe's quantization (default fp8 = per-row)")
    parser.add_argument("--mode", default="max-autotune", help="the full recipe's compile mode")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("out/ablation"))


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .cli import choices_from
    args.variants = choices_from(parser, args.variants, VARIANTS, "--variants")
    if args.steps < 2:
        parser.error("--steps must be >= 2")


def execute(args: argparse.Namespace) -> int:
    """Run the variants in order, writing the report after each; 1 when a variant failed."""
    import torch

    from .models import load_model
    from .report import device_name, metadata
    from .runner import _Counter

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(None, args.random_weights, device, dtype, args.steps, args.height, args.width, seed=0)
    counter = _Counter()
    hook = model.pipe.transformer.register_forward_pre_hook(counter.capture, with_kwargs=True)
    probe = dict(model.make_inputs(0, ""), num_inference_steps=1, output_type="latent")
    model.pipe(**probe)
    hook.remove()
    counter.count(model.pipe.transformer, set())
    flops = counter.full.total if counter.full is not None else None
    peaks = peak_tflops(device_name(device)) if device.type == "cuda" else None
    meta = {**metadata(args.command_line, device), "model": model.name, "resolution": model.resolution,
            "full_forward_tflops": None if flops is None else round(flops / 1e12, 2), "peaks": peaks,
            "timing": "CUDA events" if device.type == "cuda" else "wall (no CUDA)", "flops_error": counter.error}
    try:  # every backend that runs here, approximate ones too, with its error against float32 SDPA
        from dbcache_compile.attention import attention_shape, measure
        shape, attn_dtype = attention_shape(model.pipe.transformer, (), counter.kwargs)
        backends = measure(shape, attn_dtype, device, approximate=True, repeats=5)
        meta["attention_backends"] = {"shape": list(shape), "ms": backends.ms, "rel_l2": backends.rel_l2,
                                      "psnr_db": backends.psnr_db, "psnr_vs_sdpa_db": backends.psnr_vs_sdpa_db,
                                      "skipped": backends.skipped, "fastest_any": backends.choice}
    except Exception as err:  # noqa: BLE001 - a report line, not the point of the run
        meta["attention_backends"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    autotune = _AutotuneLog()
    rows: list[dict[str, Any]] = []
    for name in args.variants:
        print(f"[bench ablation] {name}", flush=True)
        try:
            row = _run_variant(name, args, model, flops, autotune, peaks)
        except Exception as err:  # noqa: BLE001 - one variant failing must not lose the others
            traceback.print_exc()
            row = {"variant": name, "error": " ".join(f"{type(err).__name__}: {err}".split())[:1000]}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        _write(args, meta, rows)
    print(_write(args, meta, rows).read_text())
    return 0 if all("error" not in r for r in rows) else 1
