"""``python -m bench run``: one model through rows (uncached, ours, cache-dit, diffusers' FBCache × eager /
compiled / quantized), measured wall-clock next to the FLOP ratio; writes ``results.md`` / ``results.json`` /
``speedup_vs_psnr.png``. ``python -m bench --model ...`` (no subcommand) is the same. See ``bench/README.md``."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from dbcache_compile import DBCacheConfig
from dbcache_compile.optimize import COMPILE_MODES, GRAPHS
from dbcache_compile.quantize import QUANTIZE_NAMES, check_fp8_supported

from .methods import PEERS
from .models import RANDOM_WEIGHTS, load_model
from .report import metadata, write_plot, write_results
from .runner import METHODS, RowResult, Runner, explicit_rows, plan_rows, quantization_of, run_rows

__all__ = ["configure", "validate", "execute", "FLUX_CONFIGS", "QWEN_LIGHTNING_CONFIGS", "PROMPTS", "MODES"]

#: The rows of the seed's FLUX.1-dev DrawBench table (cache-dit bench/README.md, NVIDIA L20).
FLUX_CONFIGS = ("F8B0_W4MC0_R0.08", "F8B0_W4MC2_R0.12", "F8B0_W4MC3_R0.12", "F4B0_W4MC3_R0.12", "F4B0_W4MC4_R0.12",
                "F1B0_W4MC6_R0.24")
#: The rows of the seed's Qwen-Image-Lightning (4 steps) DrawBench table.
QWEN_LIGHTNING_CONFIGS = ("F24B24_W2MC1_R0.8", "F16B16_W2MC1_R0.8", "F1B0_W2MC1_R0.8")
#: DrawBench's 200 prompts (Saharia et al., 2022), one per line.
PROMPTS = Path(__file__).resolve().parent / "prompts" / "DrawBench200.txt"
MODES = ("eager", "compile") + tuple(f"compile+{q}" for q in QUANTIZE_NAMES)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def configure(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench run``."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="'tiny' (the embedded digits model) or a local diffusers FLUX.1-dev / "
                                        "Qwen-Image pipeline directory (loaded with local_files_only=True)")
    source.add_argument("--random-weights", choices=RANDOM_WEIGHTS,
                        help="full-size FLUX.1-dev / Qwen-Image architecture with random weights (latency only), "
                             "or the tiny test FLUX for CPU checks")
    p.add_argument("--configs", type=_csv, default=None,
                   help="comma-separated cache configs (default: the seed's table rows for the model family)")
    p.add_argument("--modes", type=_csv, default=None,
                   help=f"comma-separated, from {', '.join(MODES)} "
                        "(default: eager,compile,compile+fp8 on CUDA, eager,compile on CPU)")
    p.add_argument("--rows", type=_csv, default=None,
                   help=f"comma-separated METHOD:MODE rows to run in this order instead of the --modes grid (METHOD "
                        f"from {', '.join(METHODS)}; ours and peers: one row per config), e.g. "
                        "'ours:compile+fp8,cache-dit:compile+fp8,uncached:compile'. The uncached eager reference row "
                        "runs first only when the model returns images to compare")
    p.add_argument("--compile-mode", default=None, choices=[m for m in COMPILE_MODES if m],
                   help="torch.compile mode of the compiled modes (default: max-autotune on CUDA, default on CPU)")
    p.add_argument("--graph", default="auto", choices=GRAPHS, help="our lowering of the cached step when compiled")
    p.add_argument("--peers", type=_csv, default=list(PEERS),
                   help=f"comma-separated peers from {', '.join(PEERS)}, or 'none' (default: both)")
    p.add_argument("--prompts", type=Path, default=PROMPTS, help="prompt file, one per line (default: DrawBench200)")
    p.add_argument("--num-prompts", type=int, default=200, help="first N prompts (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default: 0)")
    p.add_argument("--height", type=int, default=1024, help="pixels (default: 1024; the digits model is 16x16)")
    p.add_argument("--width", type=int, default=1024, help="pixels (default: 1024)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="FLUX guidance (default: 3.5)")
    p.add_argument("--true-cfg-scale", type=float, default=1.0,
                   help="Qwen-Image true CFG; > 1 adds the negative prompt ' ' (default: 1.0, as the seed's "
                        "Lightning table)")
    p.add_argument("--lora", default=None, help="a LoRA .safetensors fused into --model (e.g. Qwen-Image-Lightning)")
    p.add_argument("--scheduler-config", default=None,
                   help="JSON FlowMatchEulerDiscreteScheduler config replacing --model's scheduler "
                        "(bench/configs/qwen-image-lightning-scheduler.json for Lightning)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's); on a shared CPU, 1 avoids OpenMP oversubscription")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output directory (default: out/bench)")


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the flags together and fill in the device-dependent defaults (errors exit through ``p.error``)."""

    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    args.modes = args.modes or (["eager", "compile", "compile+fp8"] if cuda else ["eager", "compile"])
    args.compile_mode = args.compile_mode or ("max-autotune" if cuda else "default")
    args.peers = [] if args.peers == ["none"] else args.peers
    if args.rows is not None:
        for item in args.rows:
            method, _, mode = item.partition(":")
            if method not in METHODS or mode not in MODES:
                p.error(f"--rows: {item!r} is not METHOD:MODE (METHOD from {', '.join(METHODS)}, MODE from "
                        f"{', '.join(MODES)})")
        args.modes = list(dict.fromkeys(item.partition(":")[2] for item in args.rows))
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if quantization_of(mode) in ("fp8", "fp8-wo"):
            try:
                check_fp8_supported(args.device)
            except ValueError as err:
                p.error(f"--modes {mode}: {err}")
    for peer in args.peers:
        if peer not in PEERS:
            p.error(f"--peers: unknown peer {peer!r}; choose from {', '.join(PEERS)} or 'none'")
    for config in args.configs or []:
        try:
            DBCacheConfig.from_string(config)
        except ValueError as err:
            p.error(f"--configs: {err}")
    if args.num_prompts < 1 or args.steps < 1 or (args.threads is not None and args.threads < 1):
        p.error("--num-prompts, --steps and --threads must be >= 1")
    if not args.prompts.is_file():
        p.error(f"--prompts {args.prompts}: no such file")
    if args.model not in (None, "tiny") and not Path(args.model).is_dir():
        p.error(f"--model {args.model}: no such directory (pass 'tiny' or a local diffusers FLUX.1-dev / "
                f"Qwen-Image pipeline directory; weights are never downloaded)")
    if (args.lora or args.scheduler_config) and (args.model is None or args.model == "tiny"):
        p.error("--lora and --scheduler-config apply to --model PATH only")
    if args.lora and importlib.util.find_spec("peft") is None:
        p.error("--lora needs the peft package (pip install peft)")
    if args.scheduler_config and not Path(args.scheduler_config).is_file():
        p.error(f"--scheduler-config {args.scheduler_config}: no such file")


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark; returns 0, 1 when one of our rows or a baseline failed (peers may fail or skip), 2 when the
    model cannot be loaded."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("cache_dit").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()

    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()][:args.num_prompts]
    try:
        model = load_model(args.model, args.random_weights, args.device, args.dtype, args.steps, args.height,
                           args.width, args.seed, args.true_cfg_scale, args.guidance_scale, args.lora,
                           args.scheduler_config)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m bench run: error: {err}", file=sys.stderr)
        return 2
    configs = args.configs or list(QWEN_LIGHTNING_CONFIGS if model.family == "qwen-image" else FLUX_CONFIGS)
    if args.rows is not None:
        rows = explicit_rows(args.rows, configs, reference=model.images)
    else:
        rows = plan_rows(args.modes, configs, args.peers)
    runner = Runner(model, prompts, args.compile_mode, args.graph)
    started = datetime.datetime.now().astimezone()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[RowResult] = run_rows(
        runner, rows, after_row=lambda done: _write(args, model, runner, configs, started, done, plot=False))
    _write(args, model, runner, configs, started, results, plot=True)
    print(f"wrote {args.out / 'results.md'}, results.json, speedup_vs_psnr.png")
    ours_failed = [r for r in results if r.spec.method in ("uncached", "ours") and not r.ok]
    return 1 if ours_failed else 0


def _write(args: argparse.Namespace, model: Any, runner: Runner, configs: list[str], started: datetime.datetime,
           results: list[RowResult], plot: bool) -> None:
    """Write results.md / results.json for the rows so far (and the plot at the end)."""
    unavailable = dict(runner.scorers.unavailable)
    if runner.flops.error:
        unavailable["TFLOPs"] = f"FLOP counting failed ({runner.flops.error})"
    resolution = "16x16" if args.model == "tiny" else f"{args.width}x{args.height}"
    meta: dict[str, Any] = {
        **metadata(args.command_line, args.device, started), "model": model.name,
        "dtype": str(args.dtype).removeprefix("torch."),
        "prompts": len(runner.prompts), "steps": args.steps, "resolution": resolution, "seed": args.seed,
        "compile_mode": args.compile_mode, "graph": args.graph, "modes": args.modes, "configs": configs,
        "peers": args.peers, "rows": args.rows, "unavailable": unavailable,
        "flops_per_forward": {
            "note": "calflops 0.3.2 (linears, matmuls, norms, activations) + scaled_dot_product_attention "
                    "2*B*H*Lq*Lk*(D+Dv) counted by hand (dbcache_compile.flops); cached forward = embeddings + "
                    "Fn + Bn blocks + output",
            "full": runner.flops.full and vars(runner.flops.full),
            "cached": {f"F{fn}B{bn}": vars(f) for (fn, bn), f in runner.flops.cached.items()}},
    }
    extra = model.extra_metric[0] if model.extra_metric else None
    write_results(args.out, results, meta, unavailable, extra)
    if plot:
        write_plot(args.out / "speedup_vs_psnr.png", results, f"{model.name}, {resolution}, {args.steps} steps")
