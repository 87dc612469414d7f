"""The benchmark's model zoo (``bench/models.py``) and its context-parallel mode (``bench/cp.py``).

* ``--random-weights wan | sd3.5 | hunyuanvideo-1.5`` are the full-size published architectures (built here on the
  ``meta`` device only: they are for GPUs), and their pipeline wiring runs on a CPU at a tiny width;
* ``--random-weights wan-tiny | sd3.5-tiny | hunyuanvideo-1.5-tiny`` run end to end on a CPU, ours and cache-dit
  taking the same cached steps;
* ``--cp 2`` runs the rows on two gloo ranks under diffusers' context parallelism, with the single-process cached
  steps and a per-rank wall column.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dbcache_compile as dbc
from bench import models as bm
from bench.cli import main
from bench.measure import timed_call
from bench.methods import CacheDit, Ours, peer_unavailable

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
needs_cache_dit = pytest.mark.skipif(peer_unavailable("cache-dit") is not None, reason="cache-dit is not installed")


def _quiet(argv: list[str]) -> list[str]:
    return argv + ["--threads", "1"]


# ------------------------------------------------------------------------------------------------ full-size models
@pytest.mark.parametrize("kind, params, vae, text_shapes, resolution, separate_cfg", [
    ("wan", (14.2e9, 14.4e9), "AutoencoderKLWan", {"prompt_embeds": (1, 512, 4096)}, "832x480, 81 frames", True),
    ("sd3.5", (8.0e9, 8.1e9), "AutoencoderKL",
     {"prompt_embeds": (1, 333, 4096), "pooled_prompt_embeds": (1, 2048)}, "1024x1024", False),
    ("hunyuanvideo-1.5", (8.3e9, 8.35e9), "AutoencoderKLHunyuanVideo15",
     {"prompt_embeds": (1, 1000, 3584), "prompt_embeds_2": (1, 256, 1472)}, "848x480, 121 frames", True),
])
def test_full_size_random_weights_are_the_published_architectures(kind, params, vae, text_shapes, resolution,
                                                                   separate_cfg):
    """``--random-weights wan|sd3.5|hunyuanvideo-1.5`` builds Wan 2.1 T2V 14B (14.29 B parameters), SD3.5 Large
    (8.06 B) and HunyuanVideo 1.5 480p T2V (8.33 B) in bf16 with their own VAE, prompt embeddings of the real text
    encoders' shapes and the pipelines' default sizes (checked on the meta device: nothing is allocated)."""
    model = bm.load_model(None, kind, torch.device("meta"), torch.bfloat16, 50, None, None, seed=0)
    transformer = model.pipe.transformer
    count = sum(p.numel() for p in transformer.parameters())
    assert params[0] < count < params[1], count
    assert transformer.device.type == "meta" and transformer.dtype == torch.bfloat16
    assert type(model.pipe.vae).__name__ == vae and model.pipe.vae.device.type == "meta"
    assert model.resolution == resolution and model.separate_cfg is separate_cfg and not model.images
    inputs = model.make_inputs(0, "a prompt")
    assert {k: tuple(inputs[k].shape) for k in text_shapes} == text_shapes
    assert inputs["num_inference_steps"] == 50 and inputs["output_type"] == "pt"  # the VAE decode is timed
    if kind == "wan":  # from_pretrained keeps these modules in float32: so does the random-weights build
        assert transformer.scale_shift_table.dtype == torch.float32 and model.pipe.vae.dtype == torch.float32


def test_full_size_pipeline_wiring_runs_at_a_tiny_width():
    """The full-size builders' pipelines (scheduler, CFG inputs, VAE decode of every call, frames out) run end to end
    in bf16 on a CPU when only the widths are shrunk, so a GPU run of the published sizes does not fail on wiring."""
    wan = dict(bm.WAN_T2V_14B_CONFIG, num_attention_heads=2, attention_head_dim=8, text_dim=16, freq_dim=32,
               ffn_dim=32, num_layers=3, rope_max_seq_len=32)
    sd = dict(bm.SD35_LARGE_CONFIG, num_layers=3, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, sample_size=16,
              pos_embed_max_size=16)
    hy = dict(bm.HUNYUAN_VIDEO15_T2V_CONFIG, num_attention_heads=2, attention_head_dim=16, num_layers=3,
              num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6))
    builds = {
        "wan": lambda: bm._wan(CPU, torch.bfloat16, 2, 32, 32, 5, 0, config=wan,
                               vae_config=dict(base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)),
        "sd3.5": lambda: bm._sd35(CPU, torch.bfloat16, 2, 32, 32, 0, config=sd,
                                  vae_config=dict(bm.SD3_VAE_CONFIG, block_out_channels=(8,) * 4, layers_per_block=1,
                                                  norm_num_groups=4)),
        "hunyuanvideo-1.5": lambda: bm._hunyuan_video15(CPU, torch.bfloat16, 2, 32, 32, 5, 0, config=hy,
                                                        vae_config=dict(block_out_channels=(32,) * 5,
                                                                        layers_per_block=1)),
    }
    for kind, build in builds.items():
        model = build()
        _, output = timed_call(model.pipe, model.make_inputs(0, ""), CPU)
        frames = bm.output_frames(output)
        assert frames.shape == ((5 if kind != "sd3.5" else 1), 3, 32, 32), (kind, frames.shape)
        assert torch.isfinite(frames.float()).all(), kind


# ---------------------------------------------------------------------------------------------------- tiny models
@needs_cache_dit
@pytest.mark.parametrize("kind", list(bm.TINY_FAMILIES))
def test_tiny_families_cache_the_same_steps_as_cache_dit(kind):
    """On ``--random-weights <family>-tiny`` the bench's ``ours`` and ``cache-dit`` rows (the same method objects the
    runner uses, cache-dit told the model's CFG mode) cache exactly the same steps and CFG steps, and some; video
    output is handled as frames."""
    model = bm.load_model(None, kind, CPU, torch.float32, 8, None, None, seed=0)
    config = model.default_configs[0]
    steps = {}
    for method in (Ours(config, None, "auto"), CacheDit(config, False, model.separate_cfg)):
        method.attach(model.pipe)
        try:
            output = model.pipe(**model.make_inputs(0, ""))
            if isinstance(method, Ours):
                summary = dbc.summary(model.pipe)
                steps[method.name] = (list(summary.cached_steps), list(summary.cfg_cached_steps))
            else:
                import cache_dit
                stats = cache_dit.summary(method._target, logging=False)
                stats = stats[0] if isinstance(stats, list) else stats
                steps[method.name] = (list(stats.cached_steps), list(stats.cfg_cached_steps or []))
        finally:
            method.detach(model.pipe)
    assert steps["ours"] == steps["cache-dit"] and steps["ours"][0], steps
    frames = bm.output_frames(output)
    assert frames.ndim == 4 and frames.shape[0] == (5 if kind != "sd3.5-tiny" else 1)


@needs_cache_dit
def test_run_wan_tiny_end_to_end(tmp_path):
    """``python -m bench run --random-weights wan-tiny --modes eager --configs F1B0_W2MC2_R0.1 --steps 6
    --num-prompts 1 --device cpu`` writes a table with the uncached, ours and cache-dit rows (same cached calls, some
    cached), the video size in the metadata and why the quality and TFLOPs columns are n/a."""
    out = tmp_path / "wan"
    assert main(_quiet(["run", "--random-weights", "wan-tiny", "--modes", "eager", "--configs", "F1B0_W2MC2_R0.1",
                        "--steps", "6", "--num-prompts", "1", "--device", "cpu", "--out", str(out)])) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    ours, peer = rows["F1B0_W2MC2_R0.1"], rows["F1B0_W2MC2_R0.1 [cache-dit]"]
    assert rows["uncached"]["status"] == ours["status"] == peer["status"] == "ok", peer["reason"]
    assert ours["per_prompt"]["calls"] == [12]  # 6 steps x (cond + uncond)
    assert peer["per_prompt"]["cached_calls"] == ours["per_prompt"]["cached_calls"]
    assert ours["per_prompt"]["cached_calls"][0] > 0
    assert data["meta"]["resolution"] == "32x32, 5 frames"
    table = (out / "results.md").read_text()
    assert "random weights" in table and "its own forward (no prologue)" in table


def test_full_size_models_are_refused_on_a_cpu(capsys):
    """The 8-14 B full-size families are GPU runs: on a CPU the CLI says so and points at the tiny variant."""
    with pytest.raises(SystemExit):
        main(["run", "--random-weights", "wan", "--device", "cpu"])
    assert "wan-tiny" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- context parallelism
def test_cp_two_ranks_match_one_process(tmp_path):
    """``python -m bench run --random-weights flux-tiny ... --cp 2`` starts two gloo ranks under diffusers' Ulysses
    context parallelism: both ran every row, our config caches the same steps as one process does, the table's wall
    time is the per-call maximum over the ranks, and results.md has a per-rank wall column."""
    argv = ["run", "--random-weights", "flux-tiny", "--height", "32", "--width", "32", "--modes", "eager",
            "--configs", "F1B0_W2MC2_R0.3", "--steps", "8", "--num-prompts", "1", "--peers", "none",
            "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "bench", *argv, "--cp", "2", "--cp-timeout", "60",
                             "--out", str(tmp_path / "cp")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # the single-process run meanwhile, in this process (one thread: the ranks share the two cores)
    assert main(_quiet(argv + ["--out", str(tmp_path / "one")])) == 0
    try:
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-3000:]
    one = {r["label"]: r for r in json.loads((tmp_path / "one" / "results.json").read_text())["rows"]}
    data = json.loads((tmp_path / "cp" / "results.json").read_text())
    assert data["meta"]["cp"]["ranks"] == 2 and data["meta"]["cp"]["backend"] == "gloo"
    assert [r["label"] for r in data["rows"]] == list(one)
    for row in data["rows"]:
        assert row["status"] == "ok", row["reason"]
        cp = row["details"]["cp"]
        assert len(cp["wall_s_per_rank"]) == 2 and all(len(w) == 1 and w[0] > 0 for w in cp["wall_s_per_rank"])
        assert row["per_prompt"]["wall_s"] == [max(w[0] for w in cp["wall_s_per_rank"])]
        assert cp["cached_calls_per_rank"] == [one[row["label"]]["per_prompt"]["cached_calls"]] * 2
    assert data["rows"][1]["per_prompt"]["cached_calls"][0] > 0  # our config did cache
    table = (tmp_path / "cp" / "results.md").read_text()
    assert "| Wall s/img rank 0 | Wall s/img rank 1 |" in table
    assert (tmp_path / "cp" / "cp-rank1.log").is_file()
