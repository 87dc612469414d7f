"""export → AOTInductor package → load (Python) and the C++ runner (CMakeLists.txt): the same outputs and cached
steps as the live compiled ``cond`` path, from a package that needs no compilation."""

import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dbcache_compile as dbc
from dbcache_compile.export import capture_transformer_inputs, euler_loop, write_runner_inputs
from dbcache_compile.graphs import SCENARIO_CONFIG, SCENARIOS, STEPS, run_scenario
from dbcache_compile.testing import flux_inputs

ROOT = Path(__file__).resolve().parent.parent


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    pipe, inputs = SCENARIOS["flux"]()
    example = capture_transformer_inputs(pipe, **inputs, generator=torch.Generator().manual_seed(0))
    path = dbc.export(pipe, example, tmp_path_factory.mktemp("pkg") / "flux.pt2", cache=SCENARIO_CONFIG)
    return path, example


def test_loaded_package_reproduces_the_live_compiled_path(package, compiled_run):
    """load(path, pipe=...) installs the exported package as the pipeline's transformer and reproduces the live
    cond path's cached steps and images; disable() then asks for the original back."""
    path, _ = package
    live = compiled_run("flux", "cond")
    pipe, inputs = SCENARIOS["flux"]()
    module = dbc.load(path, pipe=pipe)
    assert pipe.transformer is module
    images, summaries = run_scenario(pipe, inputs)
    for img, summary, ref_img, ref in zip(images, summaries, live.images, live.summaries):
        assert summary.lowering == "aoti" and summary.num_steps == STEPS
        assert summary.cached_steps == ref.cached_steps
        assert summary.residual_diffs.keys() == ref.residual_diffs.keys()
        torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    assert summaries[0].cached_steps, "the scenario must hit the cache"
    with pytest.raises(ValueError, match="assign your original transformer back"):
        dbc.disable(pipe)


def test_loaded_package_keeps_one_state_per_cache_context(package):
    """A package in a pipeline that runs true CFG (two transformer calls per step, in the "cond" and "uncond"
    contexts) keeps a state per context: the step count and both branches' decisions equal the live runtime's (it
    used to count 20 steps for 10 and mix the branches)."""
    path, _ = package
    pipe, inputs = SCENARIOS["flux"]()
    negative = flux_inputs(seed=7)
    kwargs = dict(inputs, negative_prompt_embeds=negative["prompt_embeds"],
                  negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=4.0,
                  num_inference_steps=STEPS)
    dbc.optimize(pipe, cache=SCENARIO_CONFIG)
    live, live_summary = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, dbc.summary(pipe)
    dbc.disable(pipe)
    dbc.load(path, pipe=pipe)
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    summary = dbc.summary(pipe)
    assert summary.num_steps == STEPS and summary.separate_cfg and summary.cfg_cached_steps
    assert summary.cached_steps == live_summary.cached_steps
    assert summary.cfg_cached_steps == live_summary.cfg_cached_steps
    torch.testing.assert_close(images, live, rtol=1e-4, atol=1e-4)


class Interrupted(Exception):
    """What a callback raises to stop a generation at step k (as Ctrl-C or a failing callback would)."""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_generation_after_an_interrupted_one_equals_a_fresh_load(package, seed):
    """With load(path, pipe=pipe), a pipeline call that raises at a random step k (a callback raising after step k,
    true CFG: both branches mid-generation) leaves nothing behind: the next call is bit-identical to one on a freshly
    loaded package (it used to continue the interrupted generation's step counts and residuals)."""
    path, _ = package
    negative = flux_inputs(seed=7)

    def call(pipe, **extra):
        kwargs = dict(flux_inputs(), negative_prompt_embeds=negative["prompt_embeds"],
                      negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=4.0)
        return pipe(**kwargs, **extra, num_inference_steps=STEPS, generator=generator()).images

    fresh_pipe, _ = SCENARIOS["flux"]()
    dbc.load(path, pipe=fresh_pipe)
    expected, expected_summary = call(fresh_pipe), dbc.summary(fresh_pipe)
    k = random.Random(seed).randrange(STEPS)

    def stop_at_k(pipe, i, t, callback_kwargs):
        if i == k:
            raise Interrupted(k)
        return callback_kwargs

    pipe, _ = SCENARIOS["flux"]()
    dbc.load(path, pipe=pipe)
    with pytest.raises(Interrupted):
        call(pipe, callback_on_step_end=stop_at_k)
    images = call(pipe)
    assert torch.equal(images, expected)
    assert dbc.summary(pipe) == expected_summary


def test_export_errors(package):
    """export() refuses quantization, missing example tensors and an optimized transformer with clear errors;
    load() of a missing package raises FileNotFoundError."""
    pipe, _ = SCENARIOS["flux"]()
    with pytest.raises(NotImplementedError, match="tensor-subclass"):
        dbc.export(pipe, {}, "x.pt2", quantize="int8")
    with pytest.raises(ValueError, match="needs tensors for"):
        dbc.export(pipe, {"hidden_states": torch.zeros(1)}, "x.pt2")
    dbc.optimize(pipe, cache=SCENARIO_CONFIG)
    with pytest.raises(ValueError, match="un-optimized transformer"):
        dbc.export(pipe, package[1], "x.pt2")
    dbc.disable(pipe)
    with pytest.raises(FileNotFoundError, match="dbcache_compile.export"):
        dbc.load("/nonexistent/model.pt2")


def _missing_build_tools():
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    return f"C++ runner test needs {', '.join(missing)} (not found on PATH)" if missing else None


@pytest.mark.skipif(_missing_build_tools() is not None, reason=str(_missing_build_tools()))
def test_cpp_runner_matches_python(package, tmp_path):
    """The C++ runner built with CMake runs an exported package to the same latents and cache hits as the Python
    Euler loop."""
    path, example = package
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    sigmas = torch.linspace(1.0, 0.0, 11)
    expected, hits = euler_loop(dbc.LoadedCachedTransformer(path), example, sigmas)
    inputs = write_runner_inputs(path, example, sigmas, tmp_path / "inputs.pt")
    result = subprocess.run([str(build / "dbcache_runner"), str(path), str(inputs), str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    latents, cpp_hits = torch.load(tmp_path / "out.pt", weights_only=False)
    assert cpp_hits.tolist() == hits and any(hits) and not all(hits)
    assert f"{sum(hits)} cached" in result.stdout
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
