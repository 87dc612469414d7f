"""``python -m bench <subcommand> ...``: the one entry point of the benchmarks (``bench/README.md``).

Subcommands (each a module of this package with ``configure(parser)``, an optional ``validate(parser, args)`` and
``execute(args) -> exit status``; only the chosen one is imported):

* ``run``: one model through rows (uncached / ours / cache-dit / diffusers' FBCache × eager / compiled / quantized):
  wall-clock, FLOP ratio, quality (:mod:`bench.run`). ``python -m bench --model ...`` without a subcommand is ``run``.
* ``gpu``: the whole GPU proof in one command of at most 9 minutes; ``--dry-run`` on a CPU (:mod:`bench.gpu`).
* ``steps``: cold compile and hit / miss step times per lowering, each variant in a fresh process
  (:mod:`bench.steps`).
* ``ablation``: the kernel recipe part by part, device ms per full / cached step and VAE decode, roofline %
  (:mod:`bench.ablation`).
* ``cold-start``: time to first image from a fresh process, AOTInductor package vs compiling (:mod:`bench.cold_start`).
* ``lowerings``: the compiled lowerings (cond, segments, regional) on the digits model (:mod:`bench.lowerings`).
* ``threshold-shift``: how quantization moves the residual diffs DBCache thresholds (:mod:`bench.threshold_shift`).
* ``sweep``: a notebook's config sweep (optimize → generate → disable, a new config each cycle): graphs compiled,
  memory and time per cycle (:mod:`bench.sweep`).
* ``soak``: many generations over a shape / config / lowering mix on the tiny models, with interruptions: exceptions,
  recompiles, bit-identity after an interruption, memory growth (:mod:`bench.soak`).
* ``fuzz``: fuzzed cache configs through every lowering on the tiny FLUX; each run ends in success or a clear error
  naming the config field (:mod:`bench.fuzz`).

Every subcommand records the same metadata and writes its results through :func:`bench.report.write_report`.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from types import ModuleType
from typing import Any, Optional

__all__ = ["SUBCOMMANDS", "parse_args", "main", "choices_from"]

#: subcommand -> (module of this package, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "rows of uncached / ours / peers x eager / compiled / quantized: wall-clock, FLOPs, quality"),
    "gpu": ("gpu", "the whole GPU proof in one command of <= 9 minutes (--dry-run: the same on a CPU)"),
    "steps": ("steps", "cold compile and hit / miss step times per lowering, a fresh process per variant"),
    "ablation": ("ablation", "the kernel recipe part by part: GPU ms per full / cached step and VAE decode, roofline"),
    "cold-start": ("cold_start", "time to first image from a fresh process: AOTInductor package vs compiling"),
    "lowerings": ("lowerings", "the compiled lowerings on the digits model: compile and steady time"),
    "threshold-shift": ("threshold_shift", "how quantization moves the residual diffs that DBCache thresholds"),
    "sweep": ("sweep", "optimize -> generate -> disable with a new config per cycle: graphs, memory, time"),
    "soak": ("soak", "N generations over a shape / config / lowering mix: exceptions, recompiles, memory"),
    "fuzz": ("fuzz", "fuzzed cache configs x lowerings on the tiny FLUX: success or a clear error naming the field"),
}


def choices_from(parser: argparse.ArgumentParser, text: str, allowed: Any, flag: str) -> list[str]:
    """A comma-separated flag value as a list, each entry one of ``allowed`` (an argparse error otherwise)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        parser.error(f"{flag}: {', '.join(unknown) or 'none given'}; choose from {', '.join(allowed)}")
    return values


def _overview() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks of dbcache_compile (bench/README.md). `python -m bench SUBCOMMAND --help` lists the "
                    "flags of one subcommand; `python -m bench --model ...` / `--random-weights ...` without a "
                    "subcommand is `run`.",
        epilog="subcommands:\n" + "\n".join(f"  {name:<16} {text}" for name, (_, text) in SUBCOMMANDS.items()))
    parser.add_argument("subcommand", choices=list(SUBCOMMANDS))
    return parser


def module_of(subcommand: str) -> ModuleType:
    """The module implementing ``subcommand``."""
    return importlib.import_module(f"{__package__}.{SUBCOMMANDS[subcommand][0]}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse and validate a command line (errors exit with a message, as argparse does).

    The namespace also holds ``subcommand``, ``argv`` (the command line with the subcommand spelt out) and
    ``command_line`` (``python -m bench run ...``, what the results record)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # the flags of `run` without a subcommand: `python -m bench --model tiny ...`
    if not argv or argv[0] not in SUBCOMMANDS:
        _overview().parse_args(argv[:1])  # prints the overview for -h, an error otherwise; exits either way
    name = argv[0]
    module = module_of(name)
    parser = argparse.ArgumentParser(prog=f"python -m bench {name}", description=SUBCOMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    if hasattr(module, "validate"):
        module.validate(parser, args)
    args.subcommand, args.argv = name, argv
    args.command_line = "python -m bench " + shlex.join(argv)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m bench``: parse, then run the subcommand; returns its exit status."""
    args = parse_args(argv)
    return module_of(args.subcommand).execute(args)
