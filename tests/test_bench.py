"""Tests of the benchmark package (bench/): the one entry point ``python -m bench <subcommand>``, metrics on known
images, peer attach/detach hygiene, row planning, and real end-to-end runs of ``run``, ``steps`` and ``gpu --dry-run``
on tiny models (CPU). The FLOP count the bench reports is tested in tests/test_flops.py."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import cp, soak
from bench.cli import SUBCOMMANDS, main, parse_args
from bench.measure import run_child
from bench.methods import PEERS, CacheDit, FirstBlockCache, peer_unavailable, uncached_graph
from bench.ranks import RankError, RankTimeout, launch
from bench.metrics import Scorers, psnr, ssim
from bench.report import COLUMNS, baseline_of, speedups
from bench.runner import REFERENCE, RowResult, RowSpec, explicit_rows, plan_rows
from dbcache_compile.lowerings import GRAPHS, lowering_named, registered
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- entry point
def test_every_subcommand_has_help_and_the_flags_of_run_alone_mean_run(capsys):
    """``python -m bench SUBCOMMAND --help`` works for every subcommand the README lists, and the documented short
    form ``python -m bench --random-weights ...`` (used by docs and older recipes) still means ``run``."""
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert f"python -m bench {name}" in capsys.readouterr().out
    args = parse_args(["--random-weights", "flux-tiny", "--modes", "eager", "--device", "cpu"])
    assert args.subcommand == "run" and args.command_line.startswith("python -m bench run --random-weights")
    with pytest.raises(SystemExit):
        parse_args(["bench-everything"])
    assert "invalid choice" in capsys.readouterr().err


def test_readme_layout_lists_every_module_and_no_old_entry_point():
    """bench/README.md's layout names every module of bench/, no Python script hides under bench/results/ (a
    measurement is a subcommand of ``python -m bench``; recorded runs are data), and no script, doc or module of
    bench/ still tells users to run the retired entry points ``python -m bench.steps`` / ``bench.gpu`` / ...."""
    scripts = [str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "results").rglob("*.py")]
    assert not scripts, f"stand-alone scripts under bench/results/ (fold them into a subcommand): {scripts}"
    readme = (ROOT / "bench" / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    for module in sorted((ROOT / "bench").glob("*.py")):
        assert f"`{module.name}`" in layout, f"bench/README.md's layout does not list {module.name}"
    old = re.compile(r"python3? -m bench\.(gpu|steps|cold_start|lowerings|threshold_shift)\b")
    for path in [*sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "bench").glob("*.sh")),
                 ROOT / "bench" / "README.md", ROOT / "bench" / "results" / "README.md"]:
        assert not old.search(path.read_text()), f"{path.relative_to(ROOT)} still cites an old entry point"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_child_at_its_cap_dies_with_its_whole_process_group(tmp_path):
    """A part of ``bench gpu`` (or a ``steps`` / ``cold-start`` variant) that hangs is killed at its cap together
    with the processes it started (compile workers), so it cannot eat the time of the parts after it; its output so
    far stays in the log."""
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    child = run_child([sys.executable, "-c", code], cap=3.0, log=tmp_path / "part.log")
    assert child.timed_out and child.returncode is None and child.seconds < 30
    assert "started" in (tmp_path / "part.log").read_text()
    grandchild = Path(f"/proc/{int(pid_file.read_text())}/stat")
    for _ in range(50):  # killed: gone, or a zombie waiting for a parent that reaps it
        if not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild survived its group's kill")
    done = run_child([sys.executable, "-c", "print('ok')"], cap=30.0)
    assert done.returncode == 0 and not done.timed_out and done.output.strip() == "ok"


def _bench_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of bench/ that ``path`` imports anywhere (inside functions too; not under ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and (node.module or "").split(".")[0] == "bench":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
    return found & modules


def test_no_import_cycle_among_bench_modules():
    """No module of bench/ imports, directly or through others, a module that imports it back (imports inside
    functions count: they are where cycles hide). ``cli`` picks its subcommand's module by name at run time."""
    modules = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"__init__", "__main__"}
    graph = {m: _bench_imports(ROOT / "bench" / f"{m}.py", modules) for m in modules}
    assert "cp" in graph["run"] and "ranks" in graph["cp"]  # the walk sees the imports it must
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", f"import cycle in bench/: {' -> '.join(path + [module, dep])}"
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [])


def test_bench_lists_of_lowerings_come_from_the_registry():
    """bench/ iterates over lowerings named by the registry of dbcache_compile.lowerings, not by literals: the soak's
    mix is every registered lowering plus a ``-graphs`` variant of each that captures segments by hand, and the
    uncached only where it runs without a cache; the uncached baseline of a lowering that decides on the device
    compiles whole segments; the library CLI's ``--graph`` choices are ``GRAPHS`` (calibrate: those whose lowering
    does not decide on the device)."""
    names = [c.name for c in registered()]
    assert soak.LOWERINGS[:len(names)] == tuple(names)
    assert {soak.lowering_of(name)[0].name for name in soak.LOWERINGS} == set(names)
    for name in soak.LOWERINGS[len(names):]:
        lowering, graphs = soak.lowering_of(name)
        assert graphs and lowering.captures and name == lowering.name + soak.GRAPHS_SUFFIX
        assert soak.runs_uncached(name) == lowering.region_blocks  # uncached, only block regions are captured
    assert [soak.runs_uncached(n) for n in names] == [c.compiled and not c.decides_on_device for c in registered()]
    for graph in GRAPHS:
        baseline = uncached_graph(graph)
        assert baseline in GRAPHS and (baseline == "auto" or not lowering_named(baseline).decides_on_device)
        assert (baseline == graph) == (graph == "auto" or not lowering_named(graph).decides_on_device)
    from dbcache_compile.cli import main as library_main
    for command, choices in (("demo", set(GRAPHS)),
                             ("calibrate", {g for g in GRAPHS if g == "auto"
                                            or not lowering_named(g).decides_on_device})):
        with pytest.raises(SystemExit):
            library_main([command, "--graph", "no-such-lowering"])
        for graph in choices:  # every choice parses (the run itself is not started: --help exits first)
            with pytest.raises(SystemExit) as info:
                library_main([command, "--graph", graph, "--help"])
            assert info.value.code == 0
    assert "cond" not in {g for g in GRAPHS if g != "auto" and not lowering_named(g).decides_on_device}


# ------------------------------------------------------------------------------------------------------- ranks
def _reporting_rank(rank: int, world_size: int) -> dict:
    return {"rank": rank, "env": [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "BENCH_TEST_EXTRA")]}


def _failing_rank(rank: int, world_size: int) -> str:
    print(f"rank {rank} started", flush=True)
    if rank == 1:
        raise ValueError("bad input on rank 1")
    time.sleep(120)  # as a rank stuck in a collective with the failed one
    return "finished"


def _sleeping_rank(rank: int, world_size: int) -> None:
    time.sleep(120)


def test_rank_launcher_collects_results_and_stops_every_rank_at_the_first_failure(tmp_path):
    """The one launcher of ranks (``python -m bench run --cp N`` and the context-parallel tests): each rank gets the
    torchrun environment and returns its result; a rank that raises is reported as a RankError naming it, with its
    own exception and traceback (also in its log), while the rank still running is killed after the grace period;
    ``--cp`` prints that error with the failing rank's traceback and log; past the timeout the ranks are killed."""
    results = launch(_reporting_rank, 2, start_method="fork", env={"BENCH_TEST_EXTRA": "x"})
    assert results == [{"rank": 0, "env": ["0", "2", "0", "x"]}, {"rank": 1, "env": ["1", "2", "1", "x"]}]
    logs = [str(tmp_path / "rank0.log"), str(tmp_path / "rank1.log")]
    start = time.monotonic()
    with pytest.raises(RankError, match=r"^rank 1 failed: ValueError: bad input on rank 1\n") as info:
        launch(_failing_rank, 2, start_method="fork", grace=1.0, logs=logs)
    assert time.monotonic() - start < 30  # rank 0 sleeps 120 s: killed after the grace second
    err = info.value
    assert err.rank == 1 and isinstance(err.exception, ValueError) and not err.died
    assert "_failing_rank" in err.tb and err.__cause__.rank == 1 and err.__notes__ == ["(ranks [0] were stopped)"]
    assert "rank 0 started" in Path(logs[0]).read_text()
    assert "ValueError: bad input on rank 1" in Path(logs[1]).read_text()  # the traceback went to the rank's log
    message = cp.failure_message(err, 2, [None, logs[1]])
    assert message.startswith("python -m bench run --cp 2: error: rank 1 failed: ValueError: bad input on rank 1")
    assert f"traceback of rank 1 (its log: {logs[1]}):" in message and message.endswith("(ranks [0] were stopped)")
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"ranks \[0, 1\] of 2 did not finish within 2 s"):
        launch(_sleeping_rank, 2, start_method="fork", timeout=2.0)
    assert time.monotonic() - start < 30


# ------------------------------------------------------------------------------------------------------- metrics
def test_identical_images_psnr_inf_ssim_one():
    """Rows whose images equal the reference show PSNR INF and SSIM 1 (as the seed's baseline row does)."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(torch.as_tensor(psnr(images, images))).all()
    torch.testing.assert_close(ssim(images, images), torch.ones(2))


def test_psnr_of_known_noise_level():
    """The PSNR column is 10·log10(1 / MSE) per image (data range 1), averaged over images."""
    # a +-0.05 checkerboard around 0.5: MSE = 0.0025 exactly, PSNR = 10 log10(1 / 0.0025) = 26.02 dB
    reference = torch.full((2, 3, 16, 16), 0.5)
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1
    noisy = reference + 0.05 * sign
    noisy[1] = reference[1] + 0.1 * sign  # MSE 0.01: 20 dB
    assert psnr(noisy, reference).tolist() == pytest.approx([10 * math.log10(1 / 0.0025), 20.0], abs=1e-3)
    assert (ssim(noisy, reference) < 1.0).all()
    with pytest.raises(ValueError):
        psnr(noisy, reference[:1])


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
    """The Clip Score column is n/a with the reason unless $CLIP_MODEL_DIR points to a local CLIP (nothing is
    downloaded), and then scores in [0, 100]."""
    monkeypatch.delenv("CLIP_MODEL_DIR", raising=False)
    assert "CLIP_MODEL_DIR" in Scorers(torch.device("cpu"), prompt_inputs=True, images=True).unavailable["Clip Score"]
    assert "not this model's input" in Scorers(torch.device("cpu"), False, True).unavailable["Clip Score"]
    _tiny_local_clip(tmp_path / "clip")
    monkeypatch.setenv("CLIP_MODEL_DIR", str(tmp_path / "clip"))
    scorers = Scorers(torch.device("cpu"), prompt_inputs=True, images=True)
    assert "Clip Score" not in scorers.unavailable
    score = scorers.clip_score(torch.rand(2, 3, 40, 40), ["a red car.", "a dog."])
    assert 0.0 <= score <= 100.0


# ------------------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("make", [lambda: CacheDit("F1B0_W2MC2_R0.45", compiled=False, separate_cfg=False),
                                  lambda: FirstBlockCache(0.45, compiled=False)], ids=["cache-dit", "fbcache"])
def test_peer_detach_restores_the_pipeline(make):
    """After a peer's row the pipeline is back to what it was (same images bit for bit), so the rows after it
    measure what they claim; the peer did cache some steps while attached."""
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
    """The default row order: the uncached eager reference first (PSNR reference), quantized modes last (their
    weights cannot be unquantized), one uncached baseline per mode, one FBCache row per distinct threshold."""
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
    """SpeedUp(measured) divides the uncached wall time of the row's mode (or, for a quantized mode without its own
    baseline, the unquantized mode's) by the row's; without any baseline the columns are n/a."""
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
    """Bad flags of ``run`` stop with a message before anything loads: a missing model directory, fp8 on a CPU
    (with the int8 hint), a malformed config, a malformed or fp8 ``--rows`` entry."""
    with pytest.raises(SystemExit):
        parse_args(["run", "--model", str(tmp_path / "nope"), "--device", "cpu"])
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
    """``python -m bench run`` on the tiny FLUX: results.md has the documented columns with the same speedups as
    results.json, the metadata names device, versions, commit, date and command, our row caches steps and needs
    fewer FLOPs, the peers really ran (cache-dit deciding as we do), and the n/a quality columns say why."""
    out = tmp_path / "bench"
    code = main(["run", "--random-weights", "flux-tiny", "--modes", "eager", "--configs", "F1B0_W2MC2_R0.45",
                 "--steps", "6", "--height", "32", "--width", "32", "--num-prompts", "2", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Config"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    assert (out / "speedup_vs_psnr.png").stat().st_size > 0

    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    assert meta["versions"]["torch"] == torch.__version__ and "diffusers" in meta["versions"]
    assert "CPU" in meta["device"] and meta["command"].startswith("python -m bench run --random-weights flux-tiny")
    assert meta["git"] and meta["date"]
    assert f"(commit {meta['git']})" in table
    rows = {r["label"]: r for r in data["rows"]}
    ours = rows["F1B0_W2MC2_R0.45"]
    assert ours["status"] == "ok"
    assert ours["speedup_flops"] > 1.0  # some steps were cached: fewer FLOPs
    assert ours["speedup_measured"] > 0 and math.isfinite(ours["speedup_measured"])
    assert len(ours["per_prompt"]["wall_s"]) == 2 and all(c == 6 for c in ours["per_prompt"]["calls"])
    assert 0 < sum(ours["per_prompt"]["cached_calls"]) < 12
    line = next(line for line in table.splitlines() if line.startswith("| F1B0_W2MC2_R0.45 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    flop_cell, measured_cell = cells[COLUMNS.index("SpeedUp(FLOPs)")], cells[COLUMNS.index("SpeedUp(measured)")]
    assert flop_cell == f"{ours['speedup_flops']:.2f}x" and measured_cell == f"{ours['speedup_measured']:.2f}x"
    assert "random weights" in table  # the quality columns say why they are n/a
    for peer in PEERS:
        peer_rows = [r for r in data["rows"] if r["method"] == peer]
        assert len(peer_rows) == 1
        if peer_unavailable(peer) is None:  # installed (the test extras install cache-dit): it must have run
            assert peer_rows[0]["status"] == "ok", peer_rows[0]["reason"]
            assert sum(peer_rows[0]["per_prompt"]["cached_calls"]) > 0
    if peer_unavailable("cache-dit") is None:
        assert rows["F1B0_W2MC2_R0.45 [cache-dit]"]["per_prompt"]["cached_calls"] == ours["per_prompt"]["cached_calls"]


def test_end_to_end_digits_model_has_quality_columns(tmp_path):
    """The short form ``python -m bench --model tiny ...`` runs ``run`` on the trained digits model: PSNR / SSIM /
    digit accuracy columns are filled, the reference row is INF / 1, and cache-dit's images equal ours."""
    from dbcache_compile.digits import WEIGHTS_DIR
    if not (WEIGHTS_DIR / "transformer").is_dir():
        pytest.skip("the digits weights are not in this checkout")
    out = tmp_path / "tiny"
    assert main(["--model", "tiny", "--modes", "eager", "--configs", "F1B0_W2MC2_R0.3", "--steps", "8",
                 "--num-prompts", "2", "--peers", "cache-dit", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["uncached"]["psnr_mean"] == "inf" and rows["uncached"]["ssim_mean"] == pytest.approx(1.0)
    ours, peer = rows["F1B0_W2MC2_R0.3"], rows["F1B0_W2MC2_R0.3 [cache-dit]"]
    assert 0 < ours["psnr_mean"] < math.inf and 0 < ours["ssim_mean"] <= 1 and 0 <= ours["extra_mean"] <= 1
    # cache-dit's DBCache makes the same decisions in eager (bit-exact parity), so the same images
    assert peer["per_prompt"]["cached_calls"] == ours["per_prompt"]["cached_calls"]
    assert peer["psnr_mean"] == ours["psnr_mean"]
    assert "Digit acc" in (out / "results.md").read_text()


def test_bench_steps_runs_a_variant_in_a_fresh_process(tmp_path):
    """``python -m bench steps`` end to end on the tiny FLUX (eager and regional, Inductor default mode, CPU): a
    fresh process per lowering, the compiled one compiles, the forced schedule caches its steps, hit calls (timed by
    the transformer hooks over every timed generation: median and minimum, the host-overhead study) are cheaper than
    miss calls, and the report carries the same metadata as every other subcommand."""
    rc = main(["steps", "--random-weights", "flux-tiny", "--height", "32", "--width", "32", "--steps", "8",
               "--graphs", "eager,regional", "--mode", "default", "--dtype", "fp32", "--threads", "1",
               "--repeats", "1", "--timed-generations", "2", "--device", "cpu", "--out", str(tmp_path), "--tag", "t"])
    report = json.loads((tmp_path / "steps_t.json").read_text())
    eager, row = report["rows"]
    assert rc == 0, [r.get("error") for r in report["rows"]]
    assert row["graph"] == "regional" and row["graph_breaks"] == 0 and row["unique_graphs"] == 2
    assert eager["graph"] == "eager" and eager["unique_graphs"] == 0  # the host-overhead baseline compiles nothing
    for r in (eager, row):
        assert r["cached_calls"] == 4 and r["calls"] == 8  # F1B0_W4MC6_R1.0: warm-up 4, then every step a hit
        assert r["timed_generations"] == 2 and r["timed_hits"] == r["timed_misses"] == 8  # both generations timed
        assert r["hit_ms_min"] <= r["hit_ms"] < r["miss_ms"] and r["miss_ms_min"] <= r["miss_ms"]
    assert row["compile_s"] > 0
    assert report["meta"]["command"].startswith("python -m bench steps") and report["meta"]["versions"]["torch"]
    md = (tmp_path / "steps_t.md").read_text()
    assert md.count("| regional |") == 1 and md.count("| eager |") == 1 and report["meta"]["device"] in md


def test_gpu_proof_dry_run_writes_the_summary_of_every_part(tmp_path):
    """``python -m bench gpu --dry-run``: the one-call GPU proof on a CPU (tiny FLUX / tiny Qwen-Image, int8 for fp8,
    TorchDynamo off in the children), the same parts, child processes and files as on the GPU, so the script cannot
    rot between GPU sessions: every part passes; each e2e table has the four rows in the order that puts ours vs
    cache-dit first, all with the forced schedule, ours with the recipe (attention measured, recipe recorded, QKV
    fused before quantizing) and cache-dit with its best stack on the same attention backend; the ratio of ours vs
    cache-dit is computed from those rows; the ablation ran every variant; no target is claimed."""
    from bench.ablation import VARIANTS

    rc = main(["gpu", "--dry-run", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = {p["name"]: p["status"] for p in summary["parts"]}
    assert rc == 0, parts
    assert parts == {"tests": "pass", "e2e-1024": "pass", "e2e-512": "pass", "ablation": "pass", "qwen-1328": "pass"}
    assert "skipped" in (tmp_path / "tests.log").read_text()  # the CUDA tests were collected and skipped here
    assert "python -m bench run " in (tmp_path / "e2e-1024" / "results.md").read_text()
    for name in ("e2e-1024", "e2e-512", "qwen-1328"):
        rows = json.loads((tmp_path / name / "results.json").read_text())["rows"]
        assert [(r["method"], r["mode"]) for r in rows] == [
            ("ours", "compile+int8"), ("cache-dit", "compile+int8"), ("ours", "compile"), ("uncached", "compile")]
        assert all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows]
        assert [r["per_prompt"]["cached_calls"] for r in rows] == [[4], [4], [4], [0]]  # W4 of 8 steps, then hits
        ours, peer = rows[0]["details"], rows[1]["details"]
        assert ours["attention"].split()[0] in ("native", "_native_math") and "auto" in ours["attention"]
        assert ours["recipe"].startswith("torchao_flags=off, gemm_autotune=on")
        assert peer["compile"].startswith("set_compile_configs()") and peer["attention"] == ours["attention"].split()[0]
        assert ("fused_qkv" in ours) == name.startswith("e2e-")
        ratio = summary["ratios"][name]
        assert ratio["ratio"] == pytest.approx(ratio["cache_dit_s"] / ratio["ours_s"])
        assert ratio["met"] is None  # a dry run never claims a target
    assert [r["variant"] for r in summary["ablation"]] == list(VARIANTS)
    assert all("error" not in r and r["full_step_ms"] > 0 and r["cached_step_ms"] > 0 for r in summary["ablation"])
    assert all(t["met"] is None for t in summary["targets"]) and len(summary["targets"]) == 3
    assert json.loads((tmp_path / "attention.json").read_text())  # auto's measurements come back with the results
    assert "| tests | pass |" in (tmp_path / "summary.md").read_text()
    assert summary["meta"]["command"].startswith("python -m bench gpu --dry-run")


def test_ablation_variants_change_one_part_each_and_peaks_are_the_datasheets():
    """Each ablation variant changes exactly what its name says relative to ``full``; off a capable GPU the fp8
    granularities become int8 stand-ins; H100 and H200 share NVIDIA's dense peaks, other cards get none."""
    from bench.ablation import peak_tflops, variant_options

    full = variant_options("full", "fp8", "max-autotune", cpu=False)
    assert full == {"mode": "max-autotune", "quantize": "fp8", "recipe": {}, "fuse_qkv": True, "attention": "auto",
                    "compile_vae": True}
    assert variant_options("no-gemm-autotune", "fp8", "max-autotune", False) == {**full,
                                                                                  "recipe": {"gemm_autotune": False}}
    assert variant_options("fp8-mix", "fp8", "max-autotune", False) == {**full, "quantize": "fp8-mix"}
    assert variant_options("fp8-mix", "fp8", "max-autotune", True)["quantize"] == "int8"
    assert variant_options("base", "fp8", "max-autotune", False) == {**full, "mode": "reduce-overhead",
                                                                     "fuse_qkv": False, "attention": None,
                                                                     "compile_vae": False}
    assert peak_tflops("NVIDIA H100 80GB HBM3") == peak_tflops("NVIDIA H200") == {"bf16": 989.0, "fp8": 1979.0}
    assert peak_tflops("NVIDIA A100-SXM4-80GB") is None


def test_soak_runs_a_clean_mix_and_writes_its_report(tmp_path):
    """``python -m bench soak`` (issue #12): a user who optimizes, generates over changing shapes / CFG, interrupts a
    generation from ``callback_on_step_end`` and re-optimizes, as in a notebook sweep, gets no exception, no graph
    break or uncompiled fallback, and after the interruption the next generation is bit-identical to a clean one;
    the soak reports that (with RSS per generation and the standard metadata) and exits 0. Seed 1's first 12
    generations of the mix eager / segments / regional / regional-graphs (the default mix is every registered
    lowering, which draws other sessions) cover both tiny models, eager and compiled (regional) lowerings, true CFG
    and two interruptions."""
    rc = main(["soak", "--generations", "12", "--seed", "1", "--lowerings", "eager,segments,regional,regional-graphs",
               "--no-warmup", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    summary = data["summary"]
    assert rc == 0, data["failures"]
    assert summary["generations"] == len(data["generations"]) == 12 and summary["passed"]
    assert summary["exceptions"] == 0 and summary["graph_breaks"] == 0 and summary["compile_fallbacks"] == 0
    assert summary["interruption_checks"] == summary["interruption_identical"] == 2
    assert summary["planned_interruptions"] == 2 and summary["compiles_on_exact_repeats"] == 0
    assert {(s["model"], s["lowering"]) for s in data["sessions"]} == {("flux", "regional"), ("qwen-image", "eager")}
    assert summary["graphs"] > 0 and all(r["rss_mib"] > 0 for r in data["generations"])
    assert any(r["cfg"] for r in data["generations"]) and any(r.get("cached_steps") for r in data["generations"])
    assert data["meta"]["command"].startswith("python -m bench soak") and data["meta"]["versions"]["torch"]
    md = (tmp_path / "results.md").read_text()
    assert "Verdict: **PASS**" in md and data["meta"]["device"] in md
    assert summary["warmup"] is None and "No warm-up" in md


def test_soak_warm_up_fills_the_compile_store_before_the_measured_plan(tmp_path):
    """The soak's warm-up (issue #24, on by default) runs every model x lowering x config of the mix over the
    warm-up shapes before the measured plan, as a server warms up; the measured plan then compiles nothing (the
    process-wide store serves every re-optimization at the shapes the warm-up covered), its memory readings start
    after the store's first fill, and the warm-up is reported apart (generations, graphs, RSS before / after)."""
    rc = main(["soak", "--generations", "4", "--seed", "1", "--models", "flux", "--lowerings", "segments",
               "--configs", "F1B0_W2M0MC2_T0O1_R0.4", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    summary, warmup = data["summary"], data["summary"]["warmup"]
    assert rc == 0 and summary["passed"], data["failures"]
    assert warmup["sessions"] == 1
    assert warmup["generations"] == len(soak.WARMUP_SHAPES) == len(data["warmup_generations"])
    assert warmup["graphs"] > 0 and warmup["rss_after_mib"] > warmup["rss_before_mib"] and warmup["exceptions"] == 0
    assert summary["generations"] == len(data["generations"]) == 4 and summary["graphs"] == 0
    assert {r["session"] for r in data["warmup_generations"]} == {-1}
    assert "Warm-up first" in (tmp_path / "results.md").read_text()
