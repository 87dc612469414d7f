"""``python -m dbcache_compile warmup``: fill a compile cache directory ahead of serving.

    python -m dbcache_compile warmup --model tiny|flux-tiny|<local diffusers dir> --config F1B0_W4MC2_R0.2 \\
        --mode default --graph segments --height 1024 --width 1024 --steps 4 --compile-cache DIR

Optimizes the pipeline with ``compile_cache=DIR`` (:mod:`dbcache_compile.compile_cache`) and runs one generation per
shape (pairs of ``--height`` / ``--width`` values), which compiles every graph a serving process of the same model,
config, mode, lowering, quantization, dtype, batch and shapes will need. A serving process then calls
``optimize(pipe, ..., compile_cache=DIR)`` with the same arguments. Prints, per generation, the seconds and torch's
cache hits / misses; ``--json FILE`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

if TYPE_CHECKING:
    import os

    import torch

__all__ = ["warmup", "add_warmup_parser", "run_warmup"]

DEFAULT_CONFIG = "F1B0_W4MC2_R0.2"


def _load_pipeline(model: str, device: "torch.device", dtype: "torch.dtype") -> Any:
    """``tiny`` (the embedded digits model), ``flux-tiny`` (:mod:`dbcache_compile.testing`) or a local diffusers
    directory (``from_pretrained(path, local_files_only=True)``: nothing is downloaded)."""
    if model == "tiny":
        from .digits import load_digits_pipeline
        return load_digits_pipeline(device=device, torch_dtype=dtype)
    if model == "flux-tiny":
        from .testing import tiny_flux_pipeline
        return tiny_flux_pipeline().to(device=device, dtype=dtype)
    root = Path(model)
    if not (root / "model_index.json").is_file():
        raise ValueError(f"--model {model}: expected 'tiny', 'flux-tiny' or a local diffusers pipeline directory "
                         f"(with model_index.json); weights are never downloaded")
    from diffusers import DiffusionPipeline
    return DiffusionPipeline.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype).to(device)


def _call_kwargs(model: str, pipe: Any, height: Optional[int], width: Optional[int], steps: int, batch: int,
                 prompt: str, device: "torch.device", dtype: "torch.dtype") -> dict[str, Any]:
    """One generation's arguments: seeded, with the pipeline's progress bar on."""
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    if model == "tiny":
        return {"labels": [i % 10 for i in range(batch)], "num_inference_steps": steps, "generator": generator,
                "progress": True, "output_type": "pt"}
    pipe.set_progress_bar_config(disable=False)
    if model == "flux-tiny":
        from .testing import flux_inputs
        kwargs = flux_inputs(batch=batch)
        kwargs.update(prompt_embeds=kwargs["prompt_embeds"].to(device, dtype),
                      pooled_prompt_embeds=kwargs["pooled_prompt_embeds"].to(device, dtype))
    else:
        kwargs = {"prompt": prompt, "num_images_per_prompt": batch, "output_type": "pt"}
    kwargs.update(num_inference_steps=steps, generator=generator)
    if height is not None:
        kwargs.update(height=height, width=width)
    return kwargs


def warmup(model: str, compile_cache: Union[str, "os.PathLike[str]"], config: str = DEFAULT_CONFIG,
           mode: str = "default", graph: str = "auto",
           shapes: tuple[tuple[Optional[int], Optional[int]], ...] = ((None, None),), steps: int = 4, batch: int = 1,
           quantize: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
           prompt: str = "warmup", save_images: Optional[Union[str, "os.PathLike[str]"]] = None,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill ``compile_cache``: optimize ``model`` with it and run one generation per shape.

    ``shapes``: ``(height, width)`` in pixels per generation (``(None, None)``: the pipeline's default; the digits
    model makes 16x16 images only). ``dtype``: a torch dtype name (default bfloat16 on CUDA, float32 elsewhere).
    ``save_images``: ``torch.save`` the images of the last shape's generation there (a tensor), e.g. to check a
    serving process's output against the warm-up's.
    Returns what was done: seconds per generation, torch's cache lookups in it, what the directory holds."""
    import torch

    import dbcache_compile as dbc

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if model == "tiny" and any(shape != (None, None) for shape in shapes):
        raise ValueError("--model tiny (the embedded digits model) makes 16x16 images only: leave out --height / "
                         "--width")
    log(f"loading {model} on {dev} ({str(torch_dtype).replace('torch.', '')}) ...")
    pipe = _load_pipeline(model, dev, torch_dtype)
    dbc.optimize(pipe, cache=config, mode=mode, graph=graph, quantize=quantize, compile_cache=compile_cache)
    store = dbc.compile_cache_of(pipe)
    lowering = dbc.runtime_of(pipe).lowering
    log(f"compile cache {store.directory} ({store.entries()['fxgraph']} FX graph entries before); {lowering}, "
        f"mode {mode}, config {config}, {steps} steps, batch {batch}")
    runs = []
    for height, width in shapes:
        before = dict(store.counts)
        kwargs = _call_kwargs(model, pipe, height, width, steps, batch, prompt, dev, torch_dtype)
        start = time.perf_counter()
        images = pipe(**kwargs).images
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        summary = dbc.summary(pipe) if config is not None else None
        cached = None if summary is None else {"cached_steps": summary.cached_steps,
                                               "cfg_cached_steps": summary.cfg_cached_steps}
        forced = False
        if config is not None and steps >= 2 and not _every_branch_hit(pipe):
            again = functools.partial(_call_kwargs, model, pipe, height, width, steps, batch, prompt, dev, torch_dtype)
            forced = _forced_hits_generation(pipe, again, log)
        counts = {k: store.counts[k] - before[k] for k in store.counts}
        shape = "default" if height is None else f"{height}x{width}"
        runs.append({"shape": shape, "seconds": round(seconds, 2), **(cached or {}), "forced_hits_generation": forced,
                     **counts})
        log(f"  {shape}: {seconds:.1f} s (FX graph cache: {counts['fxgraph_hit']} hits, {counts['fxgraph_miss']} "
            f"misses; AOTAutograd cache: {counts['autograd_hit']} hits, {counts['autograd_miss']} misses)")
    if save_images is not None:
        torch.save(torch.as_tensor(images).cpu(), save_images)
    entries = store.entries()
    log(f"compile cache {store.directory}: {entries['fxgraph']} FX graph entries, {entries['aotautograd']} "
        f"AOTAutograd entries, {entries['kernel_libraries']} kernel libraries, {entries['bytes'] / 2**20:.1f} MiB")
    return {"directory": str(store.directory), "model": model, "lowering": lowering, "mode": mode, "config": config,
            "quantize": quantize, "device": str(dev), "dtype": str(torch_dtype), "steps": steps, "batch": batch,
            "runs": runs, "entries": entries, "torch": torch.__version__, "python": sys.version.split()[0]}


def _every_branch_hit(pipe: Any) -> bool:
    """Whether the last generation served a step from the cache in each CFG branch (so the hit graph compiled)."""
    import dbcache_compile as dbc

    summary = dbc.summary(pipe)
    return bool(summary.cached_steps) and (not summary.separate_cfg or bool(summary.cfg_cached_steps))


def _forced_hits_generation(pipe: Any, make_kwargs: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> bool:
    """One more generation that caches every step after the first (``R >= 1``, no warm-up or limits), then the
    user's config back: the hit graph is compiled even when the config's thresholds cached nothing at warm-up.
    The graphs are the config's own: thresholds, warm-up and limits are host data (``runtime.reconfigure``).
    Returns whether it ran (not with ``cond``, whose one graph holds both branches)."""
    import dataclasses

    import dbcache_compile as dbc

    runtime = dbc.runtime_of(pipe)
    config = runtime.cache_config
    if runtime.lowering == "cond" or not hasattr(runtime, "reconfigure"):
        return False
    log("  no step was served from the cache in every branch, so the hit graph is not compiled yet: one more "
        "generation with every step after the first cached (same graphs, host-side thresholds only)")
    runtime.reconfigure(dataclasses.replace(config, max_warmup_steps=1, warmup_interval=1, max_cached_steps=-1,
                                            max_continuous_cached_steps=-1, residual_diff_threshold=1.0,
                                            steps_computation_mask=None))
    try:
        pipe(**make_kwargs())
    finally:
        runtime.reconfigure(config)
    return True


def add_warmup_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``warmup`` on the subparsers of ``python -m dbcache_compile`` (without importing torch: the other
    commands' ``--help`` stays fast; :func:`run_warmup` checks ``--mode`` / ``--graph``)."""
    p = sub.add_parser("warmup", help="fill a compile cache directory ahead of serving: optimize with "
                                      "compile_cache=DIR and run one generation per shape")
    p.add_argument("--model", required=True, help="tiny (the embedded digits model), flux-tiny (random weights, "
                                                  "dbcache_compile.testing) or a local diffusers pipeline directory")
    p.add_argument("--compile-cache", required=True, type=Path, help="the directory to fill (created if missing)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"cache config (default {DEFAULT_CONFIG}); 'none' for "
                                                            f"the uncached compiled baseline")
    p.add_argument("--mode", default="default", help="torch.compile mode: default, reduce-overhead, max-autotune, "
                                                     "max-autotune-no-cudagraphs")
    p.add_argument("--graph", default="auto", help="lowering: auto, segments, regional, cond (default auto)")
    p.add_argument("--height", type=int, nargs="+", help="pixels, one value per generation (pairs with --width)")
    p.add_argument("--width", type=int, nargs="+", help="pixels, one value per generation (pairs with --height)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per generation (default 4: enough for the "
                                                        "hit and miss graphs of W<=2 configs; use more for larger W)")
    p.add_argument("--batch", type=int, default=1, help="images per generation (default 1)")
    p.add_argument("--quantize", default=None, help="torchao quantization (fp8, int8, ...), as in optimize()")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before compiling (CPU: the thread "
                                                             "count is part of the compiled code, use the serving "
                                                             "process's)")
    p.add_argument("--prompt", default="warmup", help="prompt of local text-to-image pipelines")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p.add_argument("--save-images", type=Path, default=None, help="torch.save the last shape's images (a tensor) "
                                                                  "to this file, to compare a server's output with")
    return p


def run_warmup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m dbcache_compile warmup``: 0 when every generation ran."""
    from .optimize import COMPILE_MODES, GRAPHS

    if args.mode not in COMPILE_MODES[1:]:
        parser.error(f"--mode must be one of {', '.join(COMPILE_MODES[1:])}")
    if args.graph not in GRAPHS:
        parser.error(f"--graph must be one of {', '.join(GRAPHS)}")
    heights, widths = args.height or [None], args.width or [None]
    if len(heights) != len(widths) or (args.height is None) != (args.width is None):
        parser.error("--height and --width take the same number of values (one pair per generation)")
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    config = None if args.config.lower() == "none" else args.config
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    try:
        report = warmup(args.model, args.compile_cache, config, args.mode, args.graph, tuple(zip(heights, widths)),
                        args.steps, args.batch, args.quantize, args.device, args.dtype, args.prompt,
                        args.save_images)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
