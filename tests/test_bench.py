"""Tests of the benchmark package (bench/): metrics on known images, FLOP counting against hand counts, peer
attach/detach hygiene, row planning, and one real end-to-end run of ``python -m bench`` on the tiny FLUX (eager only,
no torch.compile)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a top-level package of the repository

from bench.cli import main, parse_args  # noqa: E402
from bench.flops import (ForwardFlops, cached_forward_flops, count_attention, count_forward,  # noqa: E402
                         full_forward_flops, generation_flops)
from bench.methods import CacheDit, FirstBlockCache, peer_unavailable  # noqa: E402
from bench.metrics import Scorers, psnr, ssim  # noqa: E402
from bench.report import COLUMNS, baseline_of, speedups  # noqa: E402
from bench.runner import REFERENCE, RowResult, RowSpec, explicit_rows, plan_rows  # noqa: E402
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline  # noqa: E402

HIDDEN, HEADS, HEAD_DIM = 32, 2, 16


# ------------------------------------------------------------------------------------------------------- metrics
def test_identical_images_psnr_inf_ssim_one():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(images, images)).all()
    torch.testing.assert_close(ssim(images, images), torch.ones(2))


def test_psnr_of_known_noise_level():
    # a +-0.05 checkerboard around 0.5: MSE = 0.0025 exactly, PSNR = 10 log10(1 / 0.0025) = 26.02 dB
    reference = torch.full((1, 3, 16, 16), 0.5)
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1
    noisy = reference + 0.05 * sign
    assert psnr(noisy, reference).item() == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-3)
    assert ssim(noisy, reference).item() < 1.0


def _tiny_local_clip(path: Path) -> None:
    """A random 1-layer CLIP with a 58-token character vocabulary, saved as a transformers directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [".", ","]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    config = CLIPConfig(text_config={"vocab_size": len(tokens), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def test_clip_score_only_from_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIP_MODEL_DIR", raising=False)
    assert "CLIP_MODEL_DIR" in Scorers(torch.device("cpu"), prompt_inputs=True, images=True).unavailable["Clip Score"]
    assert "not this model's input" in Scorers(torch.device("cpu"), False, True).unavailable["Clip Score"]
    _tiny_local_clip(tmp_path / "clip")
    monkeypatch.setenv("CLIP_MODEL_DIR", str(tmp_path / "clip"))
    scorers = Scorers(torch.device("cpu"), prompt_inputs=True, images=True)
    assert "Clip Score" not in scorers.unavailable
    score = scorers.clip_score(torch.rand(2, 3, 40, 40), ["a red car.", "a dog."])
    assert 0.0 <= score <= 100.0


# --------------------------------------------------------------------------------------------------------- FLOPs
@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def test_linear_flops_match_hand_count(transformer):
    x = torch.randn(1, 64, 16)
    assert count_forward(transformer.x_embedder, transformer.x_embedder, {"input": x}) == \
        ForwardFlops(calflops=2 * 64 * 16 * HIDDEN, attention=0)


def test_single_block_flops_match_hand_count(transformer):
    image, text = 64, 8
    tokens = image + text
    block = transformer.single_transformer_blocks[0]
    kwargs = {"hidden_states": torch.randn(1, image, HIDDEN), "encoder_hidden_states": torch.randn(1, text, HIDDEN),
              "temb": torch.randn(1, HIDDEN), "image_rotary_emb": transformer.pos_embed(torch.zeros(tokens, 3))}
    flops = count_forward(block, block, kwargs)
    d = HIDDEN
    # proj_mlp d->4d, to_q/k/v d->d, proj_out 5d->d on every token; the adaLN linear d->3d once per sample
    linears = 2 * tokens * (4 * d * d + 3 * d * d + 5 * d * d) + 2 * d * 3 * d
    assert linears <= flops.calflops <= 1.02 * linears  # calflops adds norms/activations (element-wise)
    assert flops.attention == 2 * HEADS * tokens * tokens * (HEAD_DIM + HEAD_DIM)


def test_attention_counter_restores_sdpa():
    original = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(2, 3, 5, 4)
    with count_attention() as total:
        torch.nn.functional.scaled_dot_product_attention(q, torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6))
    assert total[0] == 2 * 6 * 5 * 7 * (4 + 6)
    assert torch.nn.functional.scaled_dot_product_attention is original


def test_cached_forward_cheaper_than_full():
    pipe = tiny_flux_pipeline()
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("kw", kwargs)

    handle = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    pipe(**flux_inputs(), num_inference_steps=1)
    handle.remove()
    full = full_forward_flops(pipe.transformer, captured["kw"])
    f1 = cached_forward_flops(pipe.transformer, captured["kw"], 1, 0)
    f2b1 = cached_forward_flops(pipe.transformer, captured["kw"], 2, 1)
    assert 0 < f1.total < f2b1.total < full.total
    # 8 identical-attention blocks: a cached F1B0 forward runs exactly 1 of 8 attentions
    assert f1.attention * 8 == full.attention
    assert generation_flops(full, f1, calls=10, cached_calls=4) == 6 * full.total + 4 * f1.total
    with pytest.raises(ValueError):
        cached_forward_flops(pipe.transformer, captured["kw"], 8, 1)


# ------------------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("make", [lambda: CacheDit("F1B0_W2MC2_R0.45", compiled=False, separate_cfg=False),
                                  lambda: FirstBlockCache(0.45, compiled=False)], ids=["cache-dit", "fbcache"])
def test_peer_detach_restores_the_pipeline(make):
    method = make()
    if peer_unavailable(method.name):
        pytest.skip(peer_unavailable(method.name))
    pipe = tiny_flux_pipeline()
    kwargs = dict(flux_inputs(), num_inference_steps=6)
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    method.attach(pipe)
    method.begin_call()
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert 0 < method.cached_calls(pipe) < 6
    method.detach(pipe)
    assert "forward" not in vars(pipe.transformer)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in pipe.transformer.modules())
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_plan_rows_reference_first_quantized_last_fbcache_per_threshold():
    rows = plan_rows(["compile+int8", "compile", "eager"], ["F1B0_W2_R0.2", "F2B0_W2_R0.2", "F1B0_W2_R0.3"],
                     ["cache-dit", "diffusers-fbcache"])
    assert rows[0] == RowSpec("uncached", "eager")
    assert [r.mode for r in rows].index("compile+int8") > max(i for i, r in enumerate(rows) if r.mode == "compile")
    assert sum(r.method == "diffusers-fbcache" and r.mode == "eager" for r in rows) == 2
    assert sum(r.method == "uncached" for r in rows) == 3
    assert sum(r.method == "ours" for r in rows) == 9


def test_explicit_rows_keep_their_order_and_add_the_reference_only_for_images():
    """``--rows``: the comparison that matters can run first (the GPU proof runs ours + fp8 and cache-dit + fp8
    before the slow uncached row); the eager reference row is only needed when there are images to compare."""
    rows = explicit_rows(["ours:compile+fp8", "cache-dit:compile+fp8", "uncached:compile"], ["F1B0_W4MC6_R1.0"],
                         reference=False)
    assert rows == [RowSpec("ours", "compile+fp8", "F1B0_W4MC6_R1.0"),
                    RowSpec("cache-dit", "compile+fp8", "F1B0_W4MC6_R1.0"), RowSpec("uncached", "compile")]
    with_images = explicit_rows(["ours:eager", "uncached:eager"], ["F1B0_W2_R0.2", "F2B0_W2_R0.2"], reference=True)
    assert with_images[0] == REFERENCE and len(with_images) == 3  # the named uncached eager row is the reference
    with pytest.raises(ValueError, match="METHOD:MODE"):
        explicit_rows(["fastest:compile"], ["F1B0_W2_R0.2"], reference=False)
    with pytest.raises(ValueError, match="twice"):
        explicit_rows(["ours:eager", "ours:eager"], ["F1B0_W2_R0.2"], reference=False)


def test_a_quantized_row_without_its_own_baseline_is_compared_with_the_unquantized_one():
    def row(method, mode, wall):
        return RowResult(RowSpec(method, mode, None if method == "uncached" else "F1B0_W2_R0.2"), wall_s=[wall])

    base, fp8, bf16 = row("uncached", "compile", 6.0), row("ours", "compile+fp8", 1.5), row("ours", "compile", 2.0)
    assert baseline_of([fp8, bf16, base], "compile+fp8") is base
    ratios = speedups([fp8, bf16, base])
    assert ratios[fp8.spec][1] == pytest.approx(4.0) and ratios[bf16.spec][1] == pytest.approx(3.0)
    own = row("uncached", "compile+fp8", 3.0)  # a quantized mode's own baseline wins when it ran
    assert speedups([fp8, own, base])[fp8.spec][1] == pytest.approx(2.0)
    assert speedups([fp8])[fp8.spec] == (None, None)


def test_cli_rejects_missing_model_dir_and_bad_modes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path / "nope"), "--device", "cpu"])
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--random-weights", "flux-tiny", "--modes", "compile+fp8", "--device", "cpu"])
    assert "int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--random-weights", "flux-tiny", "--configs", "F1X0"])
    with pytest.raises(SystemExit):
        parse_args(["--random-weights", "flux-tiny", "--rows", "ours:turbo", "--device", "cpu"])
    assert "METHOD:MODE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # fp8 named in --rows is checked like --modes
        parse_args(["--random-weights", "flux-tiny", "--rows", "ours:compile+fp8", "--device", "cpu"])
    assert "int8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- end to end
def test_end_to_end_tiny_flux_eager(tmp_path):
    out = tmp_path / "bench"
    code = main(["--random-weights", "flux-tiny", "--modes", "eager", "--configs", "F1B0_W2MC2_R0.45", "--steps",
                 "6", "--height", "32", "--width", "32", "--num-prompts", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Config"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    assert (out / "speedup_vs_psnr.png").stat().st_size > 0

    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["versions"]["torch"] == torch.__version__
    assert "CPU" in data["meta"]["device"] and data["meta"]["command"].startswith("python -m bench")
    assert data["meta"]["git"] and data["meta"]["date"]
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["uncached"]["speedup_flops"] == 1.0 and rows["uncached"]["speedup_measured"] == 1.0
    ours = rows["F1B0_W2MC2_R0.45"]
    assert ours["status"] == "ok"
    assert ours["speedup_flops"] > 1.0  # some steps were cached: fewer FLOPs
    assert ours["speedup_measured"] > 0 and ours["speedup_measured"] != ours["speedup_flops"]
    assert len(ours["per_prompt"]["wall_s"]) == 2 and all(c == 6 for c in ours["per_prompt"]["calls"])
    assert 0 < sum(ours["per_prompt"]["cached_calls"]) < 12
    line = next(line for line in table.splitlines() if line.startswith("| F1B0_W2MC2_R0.45 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    flop_cell, measured_cell = cells[COLUMNS.index("SpeedUp(FLOPs)")], cells[COLUMNS.index("SpeedUp(measured)")]
    assert flop_cell == f"{ours['speedup_flops']:.2f}x" and measured_cell == f"{ours['speedup_measured']:.2f}x"
    assert "random weights" in table  # the quality columns say why they are n/a
    for peer in ("cache-dit", "diffusers-fbcache"):
        assert any(r["method"] == peer for r in data["rows"])


def test_end_to_end_digits_model_has_quality_columns(tmp_path):
    from dbcache_compile.digits import WEIGHTS_DIR
    if not (WEIGHTS_DIR / "transformer").is_dir():
        pytest.skip("the digits weights are not in this checkout")
    out = tmp_path / "tiny"
    assert main(["--model", "tiny", "--modes", "eager", "--configs", "F1B0_W2MC2_R0.3", "--steps", "8",
                 "--num-prompts", "2", "--peers", "cache-dit", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["uncached"]["psnr_mean"] == "inf" and rows["uncached"]["ssim_mean"] == pytest.approx(1.0)
    ours, peer = rows["F1B0_W2MC2_R0.3"], rows["F1B0_W2MC2_R0.3 [cache-dit]"]
    assert 0 < ours["psnr_mean"] and 0 < ours["ssim_mean"] <= 1 and 0 <= ours["extra_mean"] <= 1
    # cache-dit's DBCache makes the same decisions in eager (bit-exact parity), so the same images
    assert peer["per_prompt"]["cached_calls"] == ours["per_prompt"]["cached_calls"]
    assert peer["psnr_mean"] == ours["psnr_mean"]
    assert "Digit acc" in (out / "results.md").read_text()


def test_bench_steps_runs_a_variant_in_a_fresh_process(tmp_path):
    """``python -m bench.steps`` end to end on the tiny FLUX (regional, Inductor default mode, CPU): a fresh process
    with an empty Inductor cache, hits and misses timed, 0 graph breaks, results written."""
    from bench.steps import main as steps_main

    rc = steps_main(["--random-weights", "flux-tiny", "--height", "32", "--width", "32", "--steps", "8",
                     "--graphs", "regional", "--mode", "default", "--dtype", "fp32", "--threads", "1",
                     "--repeats", "1", "--device", "cpu", "--out", str(tmp_path), "--tag", "t"])
    report = json.loads((tmp_path / "steps_t.json").read_text())
    row = report["rows"][0]
    assert rc == 0, row.get("error")
    assert row["graph"] == "regional" and row["graph_breaks"] == 0 and row["unique_graphs"] == 2
    assert row["cached_calls"] == 4 and row["calls"] == 8  # F1B0_W4MC6_R1.0: warm-up 4, then every step a hit
    assert row["compile_s"] > 0 and row["hit_ms"] < row["miss_ms"]
    assert (tmp_path / "steps_t.md").read_text().count("| regional |") == 1


def test_gpu_proof_dry_run_writes_the_summary_of_every_part(tmp_path):
    """``python -m bench.gpu --dry-run``: the one-call GPU proof on a CPU (tiny FLUX, int8 for fp8, TorchDynamo off
    in the children), the same parts, child processes and files as on the GPU, so the script cannot rot between GPU
    sessions: every required part passes, each e2e table has the four rows in the order that puts ours vs cache-dit
    first, all with the forced schedule, and the ratio of ours vs cache-dit is computed from those rows."""
    from bench.gpu import main as gpu_main

    rc = gpu_main(["--dry-run", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = {p["name"]: p["status"] for p in summary["parts"]}
    assert rc == 0, parts
    assert parts == {"tests": "pass", "e2e-1024": "pass", "e2e-512": "pass", "fp8-shift": "pass"}
    assert "skipped" in (tmp_path / "tests.log").read_text()  # the CUDA tests were collected and skipped here
    for name in ("e2e-1024", "e2e-512"):
        rows = json.loads((tmp_path / name / "results.json").read_text())["rows"]
        assert [(r["method"], r["mode"]) for r in rows] == [
            ("ours", "compile+int8"), ("cache-dit", "compile+int8"), ("ours", "compile"), ("uncached", "compile")]
        assert all(r["status"] == "ok" for r in rows)
        assert [r["per_prompt"]["cached_calls"] for r in rows] == [[4], [4], [4], [0]]  # W4 of 8 steps, then hits
        ratio = summary["ratios"][name]
        assert ratio["ratio"] == pytest.approx(ratio["cache_dit_s"] / ratio["ours_s"])
        assert ratio["met"] is None  # a dry run never claims a target
    assert "| tests | pass |" in (tmp_path / "summary.md").read_text()
