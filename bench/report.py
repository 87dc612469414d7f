"""The one writer of the benchmarks' outputs: run metadata, ``<stem>.md`` + ``<stem>.json``, and the run table.

Every subcommand of ``python -m bench`` records the same metadata (:func:`metadata`: date, device or card, the
versions of python / torch / diffusers / torchao / cache-dit / calflops / torchmetrics / dbcache-compile, the git
commit, the exact command) and writes its results with :func:`write_report`: a markdown file (title, the metadata
lines, then the subcommand's tables) and a JSON file ``{"meta": ..., **data}``.

``python -m bench run`` writes ``results.md`` / ``results.json`` / ``speedup_vs_psnr.png``. Speedups are against the
uncached row of the same mode (for a quantized mode without one, e.g. ``--rows`` runs, the uncached row of the
unquantized mode: ``compile+fp8`` against ``compile``): ``SpeedUp(FLOPs)`` = its TFLOPs / the row's TFLOPs,
``SpeedUp(measured)`` = its median wall time / the row's. The two are separate columns on purpose: a cache that skips
FLOPs but not time (launch-bound steps, host syncs) shows up as the gap between them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from .runner import RowResult, RowSpec

__all__ = ["COLUMNS", "baseline_of", "speedups", "metadata", "device_name", "markdown_table", "write_report",
           "write_results", "write_plot"]

ROOT = Path(__file__).resolve().parent.parent
#: The distributions whose versions every result records.
DISTRIBUTIONS = ("torch", "diffusers", "torchao", "cache-dit", "calflops", "torchmetrics", "dbcache-compile")


# ------------------------------------------------------------------------------------------------------- metadata
def versions() -> dict[str, str]:
    """``{distribution: version}`` for python and :data:`DISTRIBUTIONS` (``not installed`` where missing)."""
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def git_revision() -> str:
    """The repository commit the run used (``+dirty`` with uncommitted changes to tracked files), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def device_name(device: Union[torch.device, str]) -> str:
    """``NVIDIA H100 80GB HBM3 (SM 9.0), CUDA 13.0`` or ``CPU, 2 cores (AMD EPYC ...), torch threads 1``."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (SM {major}.{minor}), CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"CPU, {os.cpu_count()} cores ({cpu}), torch threads {torch.get_num_threads()}"


def metadata(command: str, device: Union[torch.device, str],
             started: Optional[datetime.datetime] = None) -> dict[str, Any]:
    """What every result records: ``date`` (ISO, local time zone; ``started`` or now), ``device`` (card or CPU),
    ``versions``, ``git`` (commit) and ``command`` (the exact command line)."""
    started = started or datetime.datetime.now().astimezone()
    return {"date": started.isoformat(timespec="seconds"), "device": device_name(device), "versions": versions(),
            "git": git_revision(), "command": command}


# -------------------------------------------------------------------------------------------------------- writers
def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "INF"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; ``None`` cells are ``n/a``."""
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(stem: Path, title: str, meta: dict[str, Any], body: Sequence[str],
                 data: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (``# title``, the :func:`metadata` lines, then ``body``) and ``<stem>.json``
    (``{"meta": meta, **data}``; infinities as ``"inf"``, NaN as ``null``). Returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    versions_line = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [f"# {title}", "", f"- Date: {meta['date']}", f"- Device: {meta['device']}",
             f"- Versions: {versions_line}", f"- Command: `{meta['command']}` (commit {meta['git']})", ""]
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    md.write_text("\n".join(lines + list(body)).rstrip("\n") + "\n")
    js.write_text(json.dumps(_json_safe({"meta": meta, **data}), indent=1) + "\n")
    return md, js


#: The seed's columns first (Config, Clip Score, ImageReward, PSNR, TFLOPs, SpeedUp(FLOPs)), then ours.
COLUMNS = ("Config", "Clip Score", "ImageReward", "PSNR", "TFLOPs", "SpeedUp(FLOPs)", "Mode", "Wall s/img",
           "SpeedUp(measured)", "Compile s", "Peak mem", "Cached steps", "SSIM", "LPIPS", "Transformer s/img")


def baseline_of(results: list[RowResult], mode: str) -> Optional[RowResult]:
    """The uncached row a row of ``mode`` is compared with: the same mode's, else (quantized modes) the unquantized
    mode's; ``None`` when neither ran."""
    base = {r.spec.mode: r for r in results if r.spec.method == "uncached" and r.ok}
    return base.get(mode) or base.get(mode.split("+", 1)[0])


def speedups(results: list[RowResult]) -> dict[RowSpec, tuple[Optional[float], Optional[float]]]:
    """``spec -> (FLOP ratio, measured wall-clock speedup)`` against :func:`baseline_of` the row's mode."""
    out: dict[RowSpec, tuple[Optional[float], Optional[float]]] = {}
    for r in results:
        b = baseline_of(results, r.spec.mode)
        if not r.ok or b is None:
            out[r.spec] = (None, None)
            continue
        flop = b.tflops / r.tflops if b.tflops and r.tflops else None
        out[r.spec] = (flop, b.wall_median / r.wall_median)
    return out


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def _num(value: Optional[float], digits: int = 4, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "INF"
    return f"{value:.{digits}f}{suffix}"


def _bytes(value: Optional[int]) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _cached(r: RowResult) -> str:
    """``cached/total`` transformer calls per image; a mean and range when the schedule varied over prompts."""
    if not r.calls:
        return "n/a"
    total = max(r.calls)
    if min(r.cached_calls) == max(r.cached_calls):
        return f"{r.cached_calls[0]}/{total}"
    return f"{statistics.fmean(r.cached_calls):.1f}/{total} ({min(r.cached_calls)}-{max(r.cached_calls)})"


def _cells(r: RowResult, ratio: tuple[Optional[float], Optional[float]], extra: bool) -> list[str]:
    if not r.ok:
        return ([r.spec.label] + [r.status] + [""] * 4 + [r.spec.mode] + [""] * (len(COLUMNS) - 7)
                + ([""] if extra else []))
    flop, measured = ratio
    cells = [r.spec.label, _num(_mean(r.clip_score)), _num(_mean(r.image_reward)), _num(_mean(r.psnr)),
             _num(r.tflops, 2 if (r.tflops or 0) >= 1 else 6), _num(flop, 2, "x"), r.spec.mode,
             _num(r.wall_median, 3), _num(measured, 2, "x"), _num(r.compile_s, 1), _bytes(r.peak_mem_bytes),
             _cached(r), _num(_mean(r.ssim)), _num(_mean(r.lpips)), _num(r.transformer_median, 3)]
    if extra:
        cells.append(_num(_mean(r.extra), 3))
    return cells


def _row_json(r: RowResult, ratio: tuple[Optional[float], Optional[float]]) -> dict[str, Any]:
    def finite(values: list[float]) -> list[Optional[float]]:
        return [v if math.isfinite(v) else None for v in values]  # JSON has no inf: null = identical images

    mean_psnr = _mean(r.psnr)
    return {"config": r.spec.config, "label": r.spec.label, "method": r.spec.method, "mode": r.spec.mode,
            "status": r.status, "reason": r.reason, "details": r.details,
            "wall_s_median": r.wall_median, "speedup_measured": ratio[1], "speedup_flops": ratio[0],
            "tflops_per_image": r.tflops, "compile_s": r.compile_s, "warmup_s": r.warmup_s,
            "transformer_s_median": r.transformer_median, "peak_mem_bytes": r.peak_mem_bytes,
            "psnr_mean": mean_psnr if mean_psnr is None or math.isfinite(mean_psnr) else "inf",
            "ssim_mean": _mean(r.ssim), "lpips_mean": _mean(r.lpips), "clip_score_mean": _mean(r.clip_score),
            "image_reward_mean": _mean(r.image_reward), "extra_mean": _mean(r.extra),
            "per_prompt": {"wall_s": r.wall_s, "transformer_s": r.transformer_s, "calls": r.calls,
                           "cached_calls": r.cached_calls, "flops": r.flops, "psnr": finite(r.psnr), "ssim": r.ssim,
                           "lpips": r.lpips, "clip_score": r.clip_score, "image_reward": r.image_reward,
                           "extra": r.extra}}


def write_results(out: Path, results: list[RowResult], meta: dict[str, Any], unavailable: dict[str, str],
                  extra_name: Optional[str] = None) -> None:
    """``results.md`` (the metadata, one table, then why any column is n/a or a row did not run) and
    ``results.json`` (the metadata and every row with its per-prompt numbers) in ``out``."""
    ratios = speedups(results)
    header = list(COLUMNS) + ([extra_name] if extra_name else [])
    body = [f"{meta['prompts']} prompts, {meta['steps']} steps, {meta['resolution']}, seed {meta['seed']} "
            f"(prompt i uses seed + i); compile mode `{meta['compile_mode']}`, graph `{meta['graph']}`.", "",
            "Wall s/img and Transformer s/img are medians over the prompts after one warm-up call; Compile s is the "
            "warm-up call minus that median. SpeedUp(FLOPs) and SpeedUp(measured) are both against the `uncached` "
            "row of the same mode (a quantized mode without one: the unquantized mode's). TFLOPs: transformer "
            "forwards per image (calflops + attention matmuls by hand). "
            "PSNR/SSIM/LPIPS are against the uncached eager images. Cached steps: cached / total transformer calls "
            "per image.", ""]
    body += markdown_table(header, [_cells(r, ratios[r.spec], extra_name is not None) for r in results])
    notes = [f"- {name}: n/a, {reason}" for name, reason in unavailable.items()]
    notes += [f"- {r.spec.label} ({r.spec.mode}): {r.status}, {r.reason[:200]}" for r in results if not r.ok]
    if notes:
        body += ["", "Notes:", ""] + notes
    write_report(out / "results", f"dbcache_compile benchmark: {meta['model']}", meta, body,
                 {"rows": [_row_json(r, ratios[r.spec]) for r in results]})


def write_plot(path: Path, results: list[RowResult], title: str) -> None:
    """``speedup_vs_psnr.png``: left, PSNR vs measured speedup (one point per config and mode; identical images
    are drawn at the top edge); right, measured speedup vs FLOP ratio with the y = x line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = speedups(results)
    modes = sorted({r.spec.mode for r in results}, key=[r.spec.mode for r in results].index)
    markers = {"uncached": "s", "ours": "o", "cache-dit": "^", "diffusers-fbcache": "v"}
    colors = {mode: f"C{i}" for i, mode in enumerate(modes)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    points = [(r, *ratios[r.spec]) for r in results if r.ok and ratios[r.spec][1] is not None]
    finite = [p for r, _, _ in points for p in [_mean(r.psnr)] if p is not None and math.isfinite(p)]
    top = (max(finite) + 3) if finite else 60.0
    drawn: set[tuple[str, str]] = set()
    for r, flop, measured in points:
        key = (r.spec.method, r.spec.mode)
        label = f"{r.spec.method}, {r.spec.mode}" if key not in drawn else None
        drawn.add(key)
        style = {"marker": markers[r.spec.method], "color": colors[r.spec.mode], "label": label}
        value = _mean(r.psnr)
        if value is not None:
            left.scatter(measured, min(value, top), **style)
            left.annotate(r.spec.label, (measured, min(value, top)), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
        if flop is not None:
            right.scatter(flop, measured, **style)
    if not any(_mean(r.psnr) is not None for r, _, _ in points):
        left.text(0.5, 0.5, "PSNR n/a (no images: random weights)", ha="center", va="center",
                  transform=left.transAxes)
    left.set(xlabel="measured wall-clock speedup (x, vs uncached of the same mode)",
             ylabel="PSNR vs uncached eager (dB)", title="quality vs speed")
    lim = max([1.0] + [max(f, m) for _, f, m in points if f is not None]) * 1.05
    right.plot([0, lim], [0, lim], color="grey", linewidth=0.8, linestyle="--", label="measured = FLOP ratio")
    right.set(xlabel="FLOP ratio (x)", ylabel="measured speedup (x)", title="measured vs FLOP speedup",
              xlim=(0, lim), ylim=(0, lim))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
