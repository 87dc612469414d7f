"""``python -m bench run``: one model through rows (uncached, ours, cache-dit, diffusers' FBCache × eager /
compiled / quantized), measured wall-clock next to the FLOP ratio; writes ``results.md`` / ``results.json`` /
``speedup_vs_psnr.png``. ``python -m bench --model ...`` (no subcommand) is the same. ``--cp N`` runs the rows on N
ranks under diffusers' context parallelism (:mod:`bench.cp`, started by :mod:`bench.ranks`). See ``bench/README.md``."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from dbcache_compile import DBCacheConfig
from dbcache_compile.families import family_for
from dbcache_compile.lowerings import GRAPHS
from dbcache_compile.optimize import COMPILE_MODES
from dbcache_compile.quantize import QUANTIZE_NAMES, check_fp8_supported

from . import cp, ranks
from .methods import PEERS
from .models import RANDOM_WEIGHTS, load_model
from .report import metadata, write_plot, write_results
from .runner import METHODS, Recipe, RowResult, Runner, explicit_rows, plan_rows, quantization_of, run_rows

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
#: the --random-weights models that generate video (--num-frames)
VIDEO = ("wan", "hunyuanvideo-1.5", "wan-tiny", "hunyuanvideo-1.5-tiny")


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def configure(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench run``."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="'tiny' (the embedded digits model) or a local diffusers FLUX.1-dev / "
                                        "Qwen-Image pipeline directory (loaded with local_files_only=True)")
    source.add_argument("--random-weights", choices=RANDOM_WEIGHTS,
                        help="a full-size architecture with random weights, latency only (flux: FLUX.1-dev, "
                             "qwen-image, wan: Wan 2.1 T2V 14B, sd3.5: SD3.5 Large, hunyuanvideo-1.5: HunyuanVideo "
                             "1.5 480p T2V; GPU), or a tiny pipeline for CPU checks (flux-tiny, flux-narrow, "
                             "wan-tiny, sd3.5-tiny, hunyuanvideo-1.5-tiny)")
    p.add_argument("--configs", type=_csv, default=None,
                   help="comma-separated cache configs (default: the seed's table rows for FLUX / Qwen-Image; "
                        "F1B0_W4MC6_R1.0,F4B0_W4MC3_R1.0,F8B0_W4MC2_R1.0 for wan / sd3.5 / hunyuanvideo-1.5; "
                        "F1B0_W2MC2_R<t> for the *-tiny families, t the parity threshold of their case in "
                        "tests/families/)")
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
    p.add_argument("--recipe", default=None,
                   help="ours' kernel recipe in compiled modes: default | full | a JSON dict of "
                        "dbcache_compile.recipe.KernelRecipe fields (default: the library's default)")
    p.add_argument("--attention", default=None,
                   help="ours' attention backend in compiled modes: auto (measured) or a diffusers backend name; "
                        "cache-dit's best stack uses the same (default: the model's)")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="fused QKV projections: ours via optimize(fuse_qkv=True); quantized modes fuse before "
                        "quantizing, for every row of the mode")
    p.add_argument("--compile-vae", choices=("auto", "on", "off"), default="auto",
                   help="ours: optimize(compile_vae=None|True|False) (default auto: the library's default)")
    p.add_argument("--cache-dit-stack", choices=("regional", "best"), default="regional",
                   help="cache-dit's compiled rows: regional (compile_repeated_blocks, Inductor defaults) or best "
                        "(its set_compile_configs() + regional compile + our attention backend; bench/methods.py)")
    p.add_argument("--peers", type=_csv, default=list(PEERS),
                   help=f"comma-separated peers from {', '.join(PEERS)}, or 'none' (default: both)")
    p.add_argument("--prompts", type=Path, default=PROMPTS, help="prompt file, one per line (default: DrawBench200)")
    p.add_argument("--num-prompts", type=int, default=200, help="first N prompts (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default: 0)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels (default: the model's: 1024 for FLUX / Qwen-Image / SD3.5, 480 for Wan and "
                        "HunyuanVideo 1.5, 32 for the *-tiny families; the digits model is 16x16)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels (default: the model's: 1024, Wan 832, HunyuanVideo 1.5 848, *-tiny 32)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="video length of the video families (default: the pipeline's: Wan 81, HunyuanVideo 1.5 "
                        "121, *-tiny 5)")
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
    p.add_argument("--cp", type=int, default=None, metavar="N",
                   help="context parallelism: run the rows on N ranks (diffusers' enable_parallelism, Ulysses degree "
                        "N; gloo on CPU, NCCL on CUDA with one GPU per rank), started here, or by `torchrun "
                        "--nproc-per-node N -m bench run ... --cp N`. Wall times are the max over ranks per call; "
                        "results.md adds per-rank walls (bench/cp.py). Default: 1, or WORLD_SIZE under torchrun")
    p.add_argument("--cp-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others in one collective (rendezvous included) before the "
                        "run fails (default: 600)")


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
        if (quantization_of(mode) or "").startswith("fp8"):
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
    if any(v is not None and v < 1 for v in (args.height, args.width, args.num_frames)):
        p.error("--height, --width and --num-frames must be >= 1")
    if args.random_weights in ("wan", "sd3.5", "hunyuanvideo-1.5") and args.device.type != "cuda":
        p.error(f"--random-weights {args.random_weights} builds the full-size model (8-14 B parameters): run it on a "
                f"GPU (--device cuda); on a CPU use --random-weights {args.random_weights}-tiny")
    if args.num_frames is not None and args.random_weights not in VIDEO:
        p.error(f"--num-frames applies to the video families only ({', '.join(VIDEO)})")
    env = ranks.rank_env()
    if args.cp is None:
        args.cp = env[1] if env is not None else 1
    if args.cp < 1:
        p.error("--cp must be >= 1")
    if env is not None and env[1] != args.cp:
        p.error(f"--cp {args.cp} but WORLD_SIZE is {env[1]} (torchrun --nproc-per-node must equal --cp)")
    if args.cp > 1 and env is None and cuda and torch.cuda.device_count() < args.cp:
        p.error(f"--cp {args.cp} needs one GPU per rank; this machine has {torch.cuda.device_count()}")
    if args.cp_timeout <= 0:
        p.error("--cp-timeout must be > 0")
    if args.cp > 1:
        if any(item.startswith("diffusers-fbcache:") for item in args.rows or []):
            p.error(f"--rows: diffusers-fbcache cannot run under --cp ({cp.FBCACHE_UNDER_CP})")
        args.peers = [peer for peer in args.peers if peer != "diffusers-fbcache"]
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
    if args.recipe is not None:
        from dbcache_compile.recipe import KernelRecipe
        try:
            args.recipe = json.loads(args.recipe) if args.recipe.lstrip().startswith("{") else args.recipe
            KernelRecipe.coerce(args.recipe)
        except ValueError as err:
            p.error(f"--recipe: {err}")
    if args.attention is not None and args.attention != "auto":
        from dbcache_compile.attention import check
        try:
            check(args.attention, args.device)
        except ValueError as err:
            p.error(f"--attention: {err}")


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark; returns 0, 1 when one of our rows or a baseline failed (peers may fail or skip), 2 when the
    model cannot be loaded. With ``--cp N`` outside ``torchrun``: start the N ranks (:func:`bench.cp.launch`) and
    return rank 0's status (1 when a rank failed)."""
    rank: Optional[cp.RankContext] = None
    if args.cp > 1:
        if ranks.rank_env() is None:
            return cp.launch(args, _rank_main)
        rank = cp.setup(args)
        if args.threads is None and args.device.type == "cpu":
            args.threads = max(1, (os.cpu_count() or 1) // args.cp)  # the ranks share the machine's cores
    ok = False
    try:
        status = _execute(args, rank)
        ok = True
        return status
    finally:
        if rank is not None:
            rank.close(ok)


def _rank_main(rank: int, world_size: int, args: argparse.Namespace) -> int:
    """One rank started by :func:`bench.cp.launch` (its environment says which): the run on this rank."""
    return execute(args)


def _execute(args: argparse.Namespace, rank: Optional[cp.RankContext]) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("cache_dit").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    main = rank is None or rank.main

    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()][:args.num_prompts]
    try:
        model = load_model(args.model, args.random_weights, args.device, args.dtype, args.steps, args.height,
                           args.width, args.seed, args.true_cfg_scale, args.guidance_scale, args.lora,
                           args.scheduler_config, num_frames=args.num_frames)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m bench run: error: {err}", file=sys.stderr)
        if rank is not None:
            raise  # a rank that cannot build the model ends the whole run
        return 2
    if rank is not None:
        rank.attach(model)
    configs = args.configs or list(model.default_configs or (
        QWEN_LIGHTNING_CONFIGS if model.family == "qwen-image" else FLUX_CONFIGS))
    if args.rows is not None:
        rows = explicit_rows(args.rows, configs, reference=model.images)
    else:
        rows = plan_rows(args.modes, configs, args.peers)
    runner = Runner(model, prompts, args.compile_mode, args.graph, Recipe(
        kernels=args.recipe, attention=args.attention, fuse_qkv=args.fuse_qkv,
        compile_vae={"auto": None, "on": True, "off": False}[args.compile_vae], cache_dit_stack=args.cache_dit_stack))
    flops_note = None
    if rank is not None:
        flops_note = (f"not counted under --cp {rank.world_size} (each rank runs a shard of the sequence; run without "
                      f"--cp for the TFLOPs columns)")
    elif not _has_prologue(model.pipe.transformer):
        flops_note = (f"not counted for {type(model.pipe.transformer).__name__}: the cached forward's FLOPs are "
                      f"counted from a family's prologue embed / blocks / project (FLUX, Qwen-Image); this family runs "
                      f"its own forward (no prologue)")
    if flops_note is not None:
        runner.flops.error = flops_note  # the runner skips counting
    started = datetime.datetime.now().astimezone()
    args.out.mkdir(parents=True, exist_ok=True)
    gathered: list[RowResult] = []

    def after_row(done: list[RowResult]) -> None:
        if rank is not None:
            gathered.append(rank.gather(done[-1]))  # every rank, whatever the row's status
        else:
            gathered.append(done[-1])
        if main:
            _write(args, model, runner, configs, started, gathered, rank, flops_note, plot=False)

    run_rows(runner, rows, after_row=after_row)
    if main:
        _write(args, model, runner, configs, started, gathered, rank, flops_note, plot=True)
        print(f"wrote {args.out / 'results.md'}, results.json, speedup_vs_psnr.png")
    ours_failed = [r for r in gathered if r.spec.method in ("uncached", "ours") and not r.ok]
    return 1 if ours_failed else 0


def _has_prologue(transformer: torch.nn.Module) -> bool:
    """Whether the transformer's family writes out its prologue (FLUX, Qwen-Image), which FLOP counting needs."""
    try:
        return family_for(transformer).has_prologue
    except ValueError:
        return False


def _write(args: argparse.Namespace, model: Any, runner: Runner, configs: list[str], started: datetime.datetime,
           results: list[RowResult], rank: Optional[cp.RankContext], flops_note: Optional[str],
           plot: bool) -> None:
    """Write results.md / results.json for the rows so far (and the plot at the end)."""
    unavailable = dict(runner.scorers.unavailable)
    if rank is not None:
        unavailable["diffusers-fbcache"] = f"not run under --cp: {cp.FBCACHE_UNDER_CP}"
    if flops_note is not None:
        unavailable["TFLOPs"] = flops_note
    elif runner.flops.error:
        unavailable["TFLOPs"] = f"FLOP counting failed ({runner.flops.error})"
    resolution = model.resolution or f"{args.width}x{args.height}"
    meta: dict[str, Any] = {
        **metadata(args.command_line, args.device, started), "model": model.name,
        "dtype": str(args.dtype).removeprefix("torch."),
        "prompts": len(runner.prompts), "steps": args.steps, "resolution": resolution, "seed": args.seed,
        "compile_mode": args.compile_mode, "graph": args.graph, "recipe": args.recipe, "attention": args.attention,
        "fuse_qkv": args.fuse_qkv, "compile_vae": args.compile_vae, "cache_dit_stack": args.cache_dit_stack, "modes": args.modes, "configs": configs,
        "peers": args.peers, "rows": args.rows, "unavailable": unavailable,
        "flops_per_forward": {
            "note": "calflops 0.3.2 (linears, matmuls, norms, activations) + scaled_dot_product_attention "
                    "2*B*H*Lq*Lk*(D+Dv) counted by hand (dbcache_compile.flops); cached forward = embeddings + "
                    "Fn + Bn blocks + output",
            "full": runner.flops.full and vars(runner.flops.full),
            "cached": {f"F{fn}B{bn}": vars(f) for (fn, bn), f in runner.flops.cached.items()}},
    }
    if rank is not None:
        meta["cp"] = {"ranks": rank.world_size, "ulysses_degree": rank.world_size, "backend": rank.backend,
                      "launcher": rank.launcher, "wall_time": "per call, the max over ranks"}
    extra = model.extra_metric[0] if model.extra_metric else None
    write_results(args.out, results, meta, unavailable, extra)
    if rank is not None:
        cp.append_rank_table(args.out / "results.md", results, rank.world_size)
    if plot:
        write_plot(args.out / "speedup_vs_psnr.png", results, f"{model.name}, {resolution}, {args.steps} steps")
