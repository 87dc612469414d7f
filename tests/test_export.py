"""export → AOTInductor package → load (Python) and the C++ runner (CMakeLists.txt): the same outputs and cached
steps as the live compiled ``cond`` path, from a package that needs no compilation; calls the package was not
exported for are refused by name."""

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dbcache_compile as dbc
from dbcache_compile.export import (capture_transformer_calls, capture_transformer_inputs, euler_loop,
                                    write_runner_inputs)
from tools.graph_records import SCENARIO_CONFIG, SCENARIOS, STEPS, run_scenario
from dbcache_compile.testing import flux_inputs

ROOT = Path(__file__).resolve().parent.parent
LORA_SCALE = 0.5


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _export_scenario(tmp_path_factory, scenario: str, capture) -> tuple:
    """A package of a graph-record scenario's tiny pipeline, from the call(s) ``capture`` records: (path, examples)."""
    pipe, inputs = SCENARIOS[scenario]()
    examples = capture(pipe, **inputs, generator=generator())
    return dbc.export(pipe, examples, tmp_path_factory.mktemp(scenario) / "pkg.pt2", cache=SCENARIO_CONFIG), examples


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return _export_scenario(tmp_path_factory, "flux", capture_transformer_inputs)


@pytest.fixture(scope="module")
def qwen_package(tmp_path_factory):
    """Qwen-Image with true CFG whose negative prompt is shorter than the prompt (the README's flow): two shape sets."""
    return _export_scenario(tmp_path_factory, "qwen-image", capture_transformer_calls)


def _lora_flux():
    """The tiny FLUX pipeline with a PEFT LoRA adapter on its attention projections (random, non-zero weights)."""
    from peft import LoraConfig
    pipe, inputs = SCENARIOS["flux"]()
    torch.manual_seed(1)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return pipe, inputs


@pytest.fixture(scope="module")
def lora_package(tmp_path_factory):
    pipe, inputs = _lora_flux()
    example = capture_transformer_inputs(pipe, **inputs, joint_attention_kwargs={"scale": LORA_SCALE},
                                         generator=generator())
    return dbc.export(pipe, example, tmp_path_factory.mktemp("lora") / "lora.pt2", cache=SCENARIO_CONFIG)


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


@pytest.mark.parametrize("change, name, exported", [
    (flux_inputs(batch=2), "hidden_states", "(1, 64, 16)"),  # another batch size
    (flux_inputs(tokens=5), "encoder_hidden_states", "(1, 8, 32)"),  # another prompt length
    (dict(height=48, width=48), "hidden_states", "(1, 64, 16)"),  # another resolution
], ids=["batch", "prompt-length", "resolution"])
def test_calls_with_other_shapes_are_refused_before_anything_runs(package, change, name, exported):
    """A package runs the shapes it was exported for: another batch size, prompt length or resolution is a
    ValueError naming the input, what it got and what was exported, before the package runs (no branch, no step).
    Batch and prompt length used to return a wrong image; the resolution failed deep inside the pipeline."""
    path, _ = package
    pipe, inputs = SCENARIOS["flux"]()
    module = dbc.load(path, pipe=pipe)
    message = rf"input '{name}' is a float32 tensor of shape .*, but the package was exported for a float32 tensor " \
              rf"of shape {re.escape(exported)} on cpu\. .*capture_transformer_calls"
    with pytest.raises(ValueError, match=message):
        pipe(**dict(inputs, **change), num_inference_steps=STEPS, generator=generator())
    assert module.branches.calls == 0 and not module.branches.states


def test_baked_non_tensor_inputs_are_checked(package, qwen_package):
    """Non-tensor inputs are baked into the graph: a tensor where the export had None (FLUX ``guidance``: the
    guidance-embedding mode) and other Qwen-Image ``img_shapes`` are refused by name (both used to run silently);
    ``return_dict`` stays free."""
    flux = dbc.load(package[0])
    example = package[1]
    with pytest.raises(ValueError, match=r"input 'guidance' is a float32 tensor of shape \(1,\) on cpu, but the "
                                         r"package was exported for None"):
        flux(**dict(example, guidance=torch.full((1,), 3.5)))
    assert flux(**dict(example, return_dict=True)).sample.shape == example["hidden_states"].shape
    qwen = dbc.load(qwen_package[0])
    cond = qwen_package[1][0]
    (frames, height, width), = cond["img_shapes"][0]
    other = [[(frames, height * 2, width // 2)]]
    with pytest.raises(ValueError, match=re.escape(f"input 'img_shapes' is {[[list(other[0][0])]]!r}, but the package "
                                                   f"was exported for {[[[frames, height, width]]]!r}")):
        qwen(**dict(cond, img_shapes=other))


def test_a_call_matching_no_shape_set_names_every_exported_value(package, tmp_path):
    """With several shape sets the error lists each exported value of the input, or says that the combination was
    not exported. (The second shape set is written into the metadata by hand: only the lookup reads it.)"""
    path, example = package
    meta = json.loads(Path(str(path) + ".json").read_text())
    batch2 = json.loads(json.dumps(meta["shape_sets"][0]))
    for name in ("hidden_states", "timestep", "pooled_projections", "encoder_hidden_states"):
        batch2["inputs"][name]["tensor"]["shape"][0] = 2
    meta["shape_sets"].append(batch2)
    two = tmp_path / "two.pt2"
    shutil.copy(path, two)
    Path(str(two) + ".json").write_text(json.dumps(meta))
    module = dbc.load(two)
    assert module.shape_set_for(example) == 0
    with pytest.raises(ValueError, match=re.escape(
            "input 'hidden_states' is a float32 tensor of shape (3, 64, 16) on cpu, but the package was exported for "
            "a float32 tensor of shape (1, 64, 16) on cpu or a float32 tensor of shape (2, 64, 16) on cpu.")):
        module(**dict(example, hidden_states=torch.zeros(3, 64, 16)))
    with pytest.raises(ValueError, match="every input was exported, but not in this combination"):
        module(**dict(example, hidden_states=torch.zeros(2, 64, 16)))
    assert not module.branches.states


def test_lora_scale_is_baked_in_and_another_scale_refused(lora_package):
    """export() applies the example's LoRA scale to the PEFT layers (it used to trace them at scale 1.0): the package
    equals the live path at that scale; another scale (or none, i.e. 1.0) is a ValueError that says to export with
    the scale wanted (it used to give the exported scale's image)."""
    pipe, inputs = _lora_flux()
    kwargs = dict(inputs, num_inference_steps=STEPS, joint_attention_kwargs={"scale": LORA_SCALE})
    dbc.optimize(pipe, cache=SCENARIO_CONFIG)
    live = pipe(**kwargs, generator=generator()).images
    live_summary = dbc.summary(pipe)
    unscaled = pipe(**dict(kwargs, joint_attention_kwargs=None), generator=generator()).images
    dbc.disable(pipe)
    assert not torch.allclose(live, unscaled, atol=1e-3), "the LoRA scale must matter for this model"
    dbc.load(lora_package, pipe=pipe)
    images = pipe(**kwargs, generator=generator()).images
    assert dbc.summary(pipe).cached_steps == live_summary.cached_steps and live_summary.cached_steps
    torch.testing.assert_close(images, live, rtol=1e-4, atol=1e-4)
    for other in (None, {"scale": 1.0}, {"scale": 0.25}):
        with pytest.raises(ValueError, match=r"input \"joint_attention_kwargs\['scale'\]\" is .*, but the package was "
                                             r"exported for 0\.5\. The LoRA scale is baked into the package.*export"):
            pipe(**dict(kwargs, joint_attention_kwargs=other), generator=generator())


def test_qwen_true_cfg_with_a_negative_prompt_of_another_length(qwen_package, compiled_run):
    """The README's flow: Qwen-Image with true CFG whose negative prompt has another length than the prompt. The
    uncond calls have other shapes than the cond calls; capture_transformer_calls records both, the package holds a
    shape set for each and reproduces the live cond lowering (both branches' cached steps, images). With only the
    cond call exported, every uncond call used to run on the cond shapes (a wrong image)."""
    path, examples = qwen_package
    assert [e["encoder_hidden_states"].shape[1] for e in examples] == [7, 5]
    meta = json.loads(Path(str(path) + ".json").read_text())
    assert [s["model"] for s in meta["shape_sets"]] == ["model", "model_1"]
    live = compiled_run("qwen-image", "cond")
    pipe, inputs = SCENARIOS["qwen-image"]()
    dbc.load(path, pipe=pipe)
    images, summaries = run_scenario(pipe, inputs)
    for img, summary, ref_img, ref in zip(images, summaries, live.images, live.summaries):
        assert summary.num_steps == STEPS and summary.separate_cfg
        assert summary.cached_steps == ref.cached_steps and summary.cfg_cached_steps == ref.cfg_cached_steps
        torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    assert summaries[0].cached_steps and summaries[0].cfg_cached_steps, "the scenario must hit the cache"


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


def test_a_package_of_another_format_is_refused(package, tmp_path):
    """The metadata format is versioned: a package written by another version is refused with what to do."""
    path, _ = package
    old = tmp_path / "old.pt2"
    shutil.copy(path, old)
    meta = json.loads(Path(str(path) + ".json").read_text())
    Path(str(old) + ".json").write_text(json.dumps(dict(meta, format=2)))
    with pytest.raises(ValueError, match=r"package format 2 is not this version's \(3\); export it again"):
        dbc.load(old)


def test_export_errors(package):
    """export() refuses quantization, missing example tensors, no example, inputs it cannot bake in and an optimized
    transformer with clear errors, before compiling anything; load() of a missing package raises
    FileNotFoundError."""
    pipe, _ = SCENARIOS["flux"]()
    with pytest.raises(NotImplementedError, match="tensor-subclass"):
        dbc.export(pipe, {}, "x.pt2", quantize="int8")
    with pytest.raises(ValueError, match="needs tensors for"):
        dbc.export(pipe, {"hidden_states": torch.zeros(1)}, "x.pt2")
    with pytest.raises(ValueError, match=r"example_inputs\[1\] needs tensors for \['timestep'\]"):
        dbc.export(pipe, [package[1], {"hidden_states": torch.zeros(1)}], "x.pt2")
    with pytest.raises(ValueError, match="at least one example"):
        dbc.export(pipe, [], "x.pt2")
    embeds = {"ip_adapter_image_embeds": [torch.zeros(1)]}
    with pytest.raises(ValueError, match="input 'joint_attention_kwargs' holds a Tensor: a package's inputs are"):
        dbc.export(pipe, dict(package[1], joint_attention_kwargs=embeds), "x.pt2")
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
def test_cpp_runner_matches_python(package, qwen_package, tmp_path):
    """The C++ runner built with CMake runs an exported package to the same latents and cache hits as the Python
    Euler loop, for a package's first shape set (FLUX) and another one (Qwen-Image's uncond call: the archive's
    "model_1"); inputs of another shape are an error there too, not a wrong image."""
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    sigmas = torch.linspace(1.0, 0.0, 11)
    for name, (path, example) in [("flux", package), ("qwen-uncond", (qwen_package[0], qwen_package[1][1]))]:
        expected, hits = euler_loop(dbc.LoadedCachedTransformer(path), example, sigmas)
        inputs = write_runner_inputs(path, example, sigmas, tmp_path / f"{name}.pt")
        out = tmp_path / f"{name}-out.pt"
        result = subprocess.run([str(build / "dbcache_runner"), str(path), str(inputs), str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        latents, cpp_hits = torch.load(out, weights_only=False)
        assert cpp_hits.tolist() == hits and any(hits) and not all(hits), name
        assert f"{sum(hits)} cached" in result.stdout
        torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    wrong = torch.load(tmp_path / "flux.pt", weights_only=False)
    wrong[3] = torch.zeros(1, 36, 16)  # hidden_states of another resolution
    torch.save(wrong, tmp_path / "wrong.pt")
    result = subprocess.run([str(build / "dbcache_runner"), str(package[0]), str(tmp_path / "wrong.pt"),
                             str(tmp_path / "wrong-out.pt")], capture_output=True, text=True)
    assert result.returncode == 1 and "unmatched dim value at 1, expected: 64, but got: 36" in result.stderr
