"""The main job (`python -m dbcache_compile demo`) on the embedded trained digits model, on a small batch."""

import json

import numpy as np
import pytest

from dbcache_compile.cli import DEFAULT_CONFIG, format_table, main, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, per_class=3, steps=20, mode="default", progress=False)


def test_demo_quality_uncached_recognised_and_cached_within_five_points(demo):
    _, (uncached, cached_eager, cached_compiled) = demo
    assert uncached.accuracy >= 0.8
    for variant in (cached_eager, cached_compiled):
        assert variant.cached_steps, "the default config must cache steps on the demo"
        assert variant.accuracy >= uncached.accuracy - 0.05
        assert variant.flop_ratio > 1.2
        assert variant.psnr > 25
    assert cached_compiled.cached_steps == cached_eager.cached_steps
    assert cached_compiled.compile_seconds is not None and cached_eager.compile_seconds is None


def test_demo_writes_grid_report_and_samples(demo):
    out, variants = demo
    with np.load(out / "samples.npz") as samples:
        assert samples["labels"].dtype.kind == "i" and samples["labels"].shape == (30,)
        assert samples["uncached"].dtype == np.uint8 and samples["uncached"].shape == (30, 16, 16)
        assert samples["cached"].shape == (30, 16, 16)
        assert np.array_equal(samples["cached"], (np.clip(variants[-1].images, 0, 1) * 255).round())
    report = json.loads((out / "report.json").read_text())
    assert report["config"] == DEFAULT_CONFIG and len(report["variants"]) == 3
    from PIL import Image
    width, height = Image.open(out / "grid.png").size
    assert height < width and height > 3 * 16 * 3  # three rows of 3x-upscaled 16px digits
    table = format_table(variants, DEFAULT_CONFIG)
    for column in ("wall s", "compile s", "cached steps", "FLOP ratio", "PSNR dB", "accuracy"):
        assert column in table


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--out", "x", "--config", "F1B0_Q3"])
    assert "unknown token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", "x", "--mode", "turbo"])
