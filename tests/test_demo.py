"""The main job, ``python -m dbcache_compile demo``, run as a user runs it (the README quick start) on a small batch
of the embedded trained digits model: what it prints (on stdout and stderr), what it writes, and the quality it
reports."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbcache_compile.cli import DEFAULT_CONFIG, main

PER_CLASS = 3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run ``python -m dbcache_compile demo`` once in its own process, as a user does (a fresh interpreter: the
    import-time messages of its dependencies show up); returns (output folder, stdout, report.json, stderr)."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "dbcache_compile", "demo", "--out", str(out), "--per-class",
                           str(PER_CLASS)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "report.json").read_text()), proc.stderr


def _table(printed: str) -> dict[str, dict[str, str]]:
    lines = [line for line in printed.splitlines() if " | " in line]
    header = [c.strip() for c in lines[0].split(" | ")]
    return {cells[0]: dict(zip(header, cells)) for cells in ([c.strip() for c in line.split(" | ")]
                                                              for line in lines[1:])}


def test_demo_prints_cached_steps_flop_ratio_psnr_and_accuracy(demo):
    """The printed table has the three variants with the columns a user reads: the cached variants name the steps
    they cached (the same in eager and compiled), a FLOP ratio above 1, a PSNR against the uncached images, an
    accuracy; the compiled row reports its compile time."""
    _, printed, report, _ = demo
    rows = _table(printed)
    names = [v["name"] for v in report["variants"]]
    assert list(rows) == names and names[:2] == ["uncached eager", "cached eager"]
    assert names[2].startswith("cached compiled (")
    uncached, eager, compiled = (rows[n] for n in names)
    assert uncached["cached steps"] == "0" and uncached["PSNR dB"] == "-" and uncached["FLOP ratio"] == "1.00x"
    for row, variant in zip((eager, compiled), report["variants"][1:]):
        steps = variant["cached_steps"]
        assert steps and row["cached steps"] == f"{len(steps)} {steps}"
        assert row["config"] == DEFAULT_CONFIG
        assert float(row["FLOP ratio"].rstrip("x")) == pytest.approx(variant["flop_ratio"], abs=0.005) and \
            variant["flop_ratio"] > 1.2
        assert float(row["PSNR dB"]) == pytest.approx(variant["psnr"], abs=0.05)
        assert re.fullmatch(r"\d+%", row["accuracy"])
    assert report["variants"][1]["cached_steps"] == report["variants"][2]["cached_steps"]
    assert compiled["compile s"] != "-" and eager["compile s"] == "-"
    assert "grid.png" in printed and "report.json" in printed and "samples.npz" in printed


def test_demo_quality_uncached_recognised_and_cached_within_five_points(demo):
    """Caching costs at most 5 points of digit accuracy and keeps the images close (PSNR > 25 dB) on the trained
    model; the uncached digits are recognised (>= 80 %)."""
    _, _, report, _ = demo
    uncached, *cached = report["variants"]
    assert uncached["accuracy"] >= 0.8
    for variant in cached:
        assert variant["accuracy"] >= uncached["accuracy"] - 0.05
        assert variant["psnr"] > 25


def test_demo_writes_grid_report_and_samples(demo):
    """The files the README promises: samples.npz (labels, uncached, cached as uint8 N×16×16), report.json (config,
    image count, variants) and grid.png with one labelled row per variant."""
    out, _, report, _ = demo
    n = 10 * PER_CLASS
    with np.load(out / "samples.npz") as samples:
        assert samples["labels"].tolist() == [d for d in range(10) for _ in range(PER_CLASS)]
        assert samples["uncached"].dtype == np.uint8 and samples["uncached"].shape == (n, 16, 16)
        assert samples["cached"].dtype == np.uint8 and samples["cached"].shape == (n, 16, 16)
        assert not np.array_equal(samples["cached"], samples["uncached"])  # cached steps change pixels a little
    assert report["config"] == DEFAULT_CONFIG and report["images"] == n and len(report["variants"]) == 3
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    tile = 16 * 3 + 3  # 3x-upscaled digits with a 3 px gap
    assert grid.shape[0] == 3 * tile + 3
    label = grid.shape[1] - n * tile
    assert label > 40  # a column for the row names
    for row in range(3):
        assert (grid[3 + row * tile: 3 + (row + 1) * tile - 3, :label] > 150).any(), f"row {row} is not labelled"


def test_demo_stderr_is_its_own_progress_only(demo):
    """A first run on a CPU machine prints nothing on stderr but the demo's own progress lines: in particular not
    diffusers' torchao quantizer warning "Unable to import `torchao` Tensor objects ..." (diffusers 0.42.1 with
    torchao 0.18, at the import of diffusers' models), which reads like a broken install."""
    stderr = demo[3]
    assert "Unable to import `torchao`" not in stderr
    lines = stderr.splitlines()
    assert lines and lines[0].startswith("dbcache_compile demo:")
    others = [line for line in lines[1:] if not re.match(r"  (uncached|cached) [a-z (),-]+: ", line)]
    assert not others, f"unexpected stderr lines: {others}"


def test_cli_rejects_bad_arguments(capsys):
    """A malformed cache config or an unknown compile mode stops with a message before any work."""
    with pytest.raises(SystemExit):
        main(["demo", "--out", "x", "--config", "F1B0_Q3"])
    assert "unknown token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", "x", "--mode", "turbo"])
    assert "--mode" in capsys.readouterr().err
