"""``optimize(..., compile_cache=DIR)``: a second process loads what the first compiled (real Inductor, fresh
processes, each with its own empty default Inductor cache), the directory scoping, the validation, and the
``warmup`` command."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import dbcache_compile as dbc
from dbcache_compile.compile_cache import MANIFEST, open_compile_cache
from dbcache_compile.testing import tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "F1B0_W1MC2_R0.45"

#: one compiled generation of the tiny FLUX with a compile cache; prints torch's cache lookups inside our forwards
#: and where the process's own Inductor cache directory points afterwards, saves the images
_CHILD = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    import dbcache_compile as dbc
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline
    cache_dir, out = sys.argv[1], sys.argv[2]
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache={config!r}, mode="default", graph="regional", compile_cache=cache_dir)
    images = pipe(**flux_inputs(), num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    torch.save(images, out)
    store = dbc.compile_cache_of(pipe)
    print("RESULT", json.dumps({{"counts": store.counts, "cached_steps": dbc.summary(pipe).cached_steps,
                                "env": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "entries": store.entries()}}))
""").format(config=CONFIG)


def _env(default: Path) -> dict:
    """A fresh process's environment: its own (new, empty) default Inductor cache, one thread, this checkout."""
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(default), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_second_process_loads_what_the_first_compiled(tmp_path):
    """``python -m dbcache_compile warmup`` fills DIR in a fresh process; a second process, with a fresh default
    Inductor cache and the same DIR, hits torch's FX graph and AOTAutograd caches for every graph (no miss: nothing
    compiled again) and makes bit-identical images with the same cached steps. Neither process's own Inductor cache
    directory receives a graph (the compiles went to DIR only), and the environment variable is back to the process's
    own value after the forward."""
    cache_dir = tmp_path / "compile-cache"
    fill_default, load_default = tmp_path / "default-fill", tmp_path / "default-load"
    proc = subprocess.run([sys.executable, "-m", "dbcache_compile", "warmup", "--model", "flux-tiny", "--config",
                           CONFIG, "--mode", "default", "--graph", "regional", "--height", "32", "--width", "32",
                           "--steps", "3", "--threads", "1", "--compile-cache", str(cache_dir),
                           "--json", str(tmp_path / "fill.json"), "--save-images", str(tmp_path / "fill.pt")],
                          env=_env(fill_default), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "FX graph cache: 0 hits, 2 misses" in proc.stdout  # the two block classes
    fill = json.loads((tmp_path / "fill.json").read_text())
    (run,) = fill["runs"]
    assert fill["entries"]["fxgraph"] >= 2 and fill["entries"]["aotautograd"] >= 2
    assert fill["entries"]["kernel_libraries"] >= 1
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(cache_dir), str(tmp_path / "load.pt")],
                          env=_env(load_default), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    load = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert load["counts"]["fxgraph_miss"] == 0 and load["counts"]["autograd_miss"] == 0
    assert load["counts"]["fxgraph_hit"] == run["fxgraph_miss"] and load["counts"]["autograd_hit"] >= 2
    assert load["cached_steps"] == run["cached_steps"]
    assert torch.equal(torch.load(tmp_path / "load.pt"), torch.load(tmp_path / "fill.pt"))
    assert load["env"] == str(load_default)
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["torch"] == torch.__version__
    for default in (fill_default, load_default):
        assert not (default / "fxgraph").exists() and not (default / "aotautograd").exists()


def test_forward_runs_inside_the_directory_and_restores_the_environment(tmp_path, monkeypatch):
    """The wrapped forward sees Inductor's cache directory in DIR and the caller's value comes back afterwards, also
    when the forward raises, and when the variable was unset."""
    store = open_compile_cache(tmp_path / "cc", "default", torch.device("cpu"))
    seen = []

    def forward(fail=False):
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        if fail:
            raise RuntimeError("boom")
        return 1

    wrapped = store.wrap(forward)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert wrapped() == 1
    with pytest.raises(RuntimeError, match="boom"):
        wrapped(fail=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    wrapped()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert seen == [str(tmp_path / "cc" / "inductor")] * 3


def test_overlapping_forwards_in_two_threads_restore_the_callers_value(tmp_path, monkeypatch):
    """Two optimized pipelines served from two threads: forwards that overlap (one enters, the other enters, the
    first returns, then the second) leave the caller's value behind, not DIR."""
    import threading

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/callers/own")
    first = open_compile_cache(tmp_path / "a", "default", torch.device("cpu")).wrap
    second = open_compile_cache(tmp_path / "b", "default", torch.device("cpu")).wrap
    inside, leave = threading.Event(), threading.Event()

    def held():
        inside.set()
        leave.wait(10)

    thread = threading.Thread(target=second(held))
    thread.start()
    inside.wait(10)
    first(lambda: None)()  # enters and returns while the other thread's forward is inside
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] != "/callers/own"  # the other forward still runs in a DIR
    leave.set()
    thread.join(10)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/callers/own"


def test_refused_arguments_leave_the_model_untouched(tmp_path):
    pipe = tiny_flux_pipeline()
    before = dict(vars(pipe.transformer))
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cases = [
        (dict(mode=None, compile_cache=tmp_path / "a"), ValueError, "needs a compile mode"),
        (dict(mode="default", compile_cache=3), TypeError, "directory path"),
        (dict(mode="default", compile_cache=""), ValueError, "empty"),
        (dict(mode="default", compile_cache=tmp_path / "file"), ValueError, "is a file"),
        (dict(mode="default", compile_cache=tmp_path / "other"), ValueError, "not a compile cache"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            dbc.optimize(pipe, cache=CONFIG, graph="regional", **kwargs)
        assert dict(vars(pipe.transformer)) == before
    assert not (tmp_path / "a").exists()
    with torch._inductor.config.patch(fx_graph_cache=False):
        with pytest.raises(ValueError, match="fx_graph_cache"):
            dbc.optimize(pipe, cache=CONFIG, mode="default", compile_cache=tmp_path / "b")
    assert dict(vars(pipe.transformer)) == before


def test_manifest_of_another_torch_version_or_damaged_warns(tmp_path):
    """A directory filled by another torch version is used (its entries simply miss) with a warning naming both
    versions; an unreadable manifest is rewritten with a warning. Neither is an error."""
    pipe = tiny_flux_pipeline()
    cache_dir = tmp_path / "cc"
    cache_dir.mkdir()
    (cache_dir / MANIFEST).write_text(json.dumps({"format": 1, "torch": "2.11.0+cu128", "cuda": "12.8",
                                                  "hip": None, "python": "3.11.7"}))
    with pytest.warns(UserWarning, match=r"torch 2\.11\.0\+cu128 \(now " + torch.__version__.replace("+", r"\+")):
        dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional", compile_cache=cache_dir)
    assert dbc.compile_cache_of(pipe).directory == cache_dir
    assert json.loads((cache_dir / MANIFEST).read_text())["torch"] == torch.__version__
    dbc.disable(pipe)
    (cache_dir / MANIFEST).write_text("{not json")
    with pytest.warns(UserWarning, match="cannot read"):
        dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional", compile_cache=str(cache_dir))
    dbc.disable(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional", compile_cache=cache_dir)
    assert dbc.compile_cache_of(pipe) is not None
    dbc.disable(pipe)
    dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional")
    assert dbc.compile_cache_of(pipe) is None
    dbc.disable(pipe)


def test_warmup_forces_a_hit_when_the_config_cached_nothing():
    """A config whose thresholds cache nothing in the warm-up generation would leave the hit graph uncompiled: the
    warm-up runs one more generation with every step after the first cached (same block split, so the same graphs),
    then puts the user's config back."""
    from dbcache_compile.testing import flux_inputs
    from dbcache_compile.warmup import _every_branch_hit, _forced_hits_generation

    pipe = tiny_flux_pipeline()
    config = dbc.DBCacheConfig.from_string("F1B0_W2MC2_R0.0001")
    dbc.optimize(pipe, cache=config)
    make = lambda: dict(flux_inputs(), num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    pipe(**make())
    assert not _every_branch_hit(pipe)
    assert _forced_hits_generation(pipe, make, log=lambda msg: None)
    assert dbc.summary(pipe).cached_steps == [1, 2, 3]
    assert dbc.runtime_of(pipe).cache_config == config
    dbc.disable(pipe)


def test_warmup_command_refuses_bad_arguments(tmp_path, capsys):
    """Argument errors exit with status 2 and a message, before any model is built or directory created."""
    from dbcache_compile.cli import main

    cases = [(["--mode", "fast"], "--mode must be one of"), (["--graph", "whole"], "--graph must be one of"),
             (["--height", "32"], "same number of values"), (["--steps", "0"], ">= 1"),
             (["--height", "32", "--width", "32"], "16x16 images only")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["warmup", "--model", "tiny", "--compile-cache", str(tmp_path / "cc"), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cc").exists()
