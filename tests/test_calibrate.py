"""``dbcache_compile.calibrate`` on the embedded trained digits model: the command a user runs, the recommendation
checked on held-out digits and seeds, compared with the hand-picked configs, the gate model against the real
decisions, compiled and quantized runs, the target rules, and bad input."""

import contextlib
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dbcache_compile as dbc
import dbcache_compile.digits as digits
from dbcache_compile.calibrate import SearchSpace, fit_decay, gap_ratios, simulate
from dbcache_compile.cli import (CALIBRATION_DIGITS, CALIBRATION_SEEDS, HAND_PICKED, HELD_OUT_DIGITS, HELD_OUT_SEEDS,
                                 WALL_TOLERANCE, digit_calls, main)
from dbcache_compile.config import DBCacheConfig
from dbcache_compile.digits import load_digits_pipeline
from dbcache_compile.metrics import psnr

calibrate_module = sys.modules["dbcache_compile.calibrate"]  # the package's `calibrate` attribute is the function
ROOT = Path(__file__).resolve().parents[1]
TARGET = 35.0  # dB
PER_CLASS = 2
STEPS = 20
T0_ONLY = SearchSpace(Fn=(1,), taylorseer_orders=(0,))


@pytest.fixture(scope="module")
def pipe():
    return load_digits_pipeline()


@pytest.fixture(scope="module")
def small_calls():
    """One short call: what the rule and input tests calibrate on (fast, and enough cached steps to choose from)."""
    return [dict(labels=[0, 3, 5, 7, 9], num_inference_steps=12, generator=torch.Generator().manual_seed(7),
                 progress=False)]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """``python -m dbcache_compile calibrate --model tiny --min-psnr 35`` once: (json path, printed, report, exit
    status, work). ``work`` is what calibrate made the model do, counted by forward hooks on the real transformer and
    its blocks up to the held-out check: ``{"transformer": forward calls, "blocks": block forwards}``."""
    out = tmp_path_factory.mktemp("calibrate") / "calibration.json"
    threads = torch.get_num_threads()
    printed = io.StringIO()
    counts = {"transformer": 0, "blocks": 0}
    work: dict[str, int] = {}
    load, evaluate = digits.load_digits_pipeline, calibrate_module.evaluate

    def counting_pipeline(*args, **kwargs):
        pipe = load(*args, **kwargs)

        def count(key):
            return lambda *_: counts.__setitem__(key, counts[key] + 1)

        pipe.transformer.register_forward_hook(count("transformer"))
        for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
            block.register_forward_hook(count("blocks"))
        return pipe

    def held_out_check(*args, **kwargs):
        work.update(counts)  # calibrate() is done: what follows is the validation
        return evaluate(*args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(digits, "load_digits_pipeline", counting_pipeline)
            patch.setattr(calibrate_module, "evaluate", held_out_check)
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
                status = main(["calibrate", "--model", "tiny", "--min-psnr", str(TARGET), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, printed.getvalue(), json.loads(out.read_text()), status, work


def test_cli_prints_the_table_and_writes_calibration_json(cli):
    """The calibrate command prints the measured table (one chosen row, predicted vs measured cached steps, wall
    speedup and FLOP ratio), the held-out check, and writes calibration.json with the recommended config."""
    out, printed, report, status, _ = cli
    assert status == 0, printed  # 1: a target missed (on the calibration or the held-out calls)
    config = DBCacheConfig.from_string(report["config"])
    assert report["met"] and report["target"] == {"min_psnr": TARGET, "speedup": None}
    chosen = [row for row in report["table"] if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["config"] == str(config) and chosen[0]["psnr"] >= TARGET
    assert chosen[0]["predicted_cached"] == chosen[0]["cached"]  # the gate model predicted the real decisions
    assert report["speedup"] == chosen[0]["speedup"] and report["flop_ratio"] == chosen[0]["flop_ratio"] > 1
    assert report["cost"]["verified"] >= 3 and report["cost"]["simulated"] > 100 * report["cost"]["verified"]
    for header in ("config", "cached (pred)", "FLOP ratio", "speedup", "PSNR dB", "SSIM"):
        assert header in printed
    assert f"* | {config}" in printed and "held-out check" in printed and str(out) in printed
    assert all(row["ssim"] is not None and 0 < row["ssim"] <= 1 for row in report["table"])  # torchmetrics installed


def test_cli_speedup_target_out_of_reach_says_so_and_claims_no_win(tmp_path):
    """``calibrate --speedup`` through the command line (a short run: 1 digit per class, 8 steps): an unreachable
    50x exits with status 1, names the closest config and by how much it misses (on the calibration and the held-out
    calls), and, since no hand-picked config meets 50x either, says there is nothing to compare with instead of
    claiming to beat them."""
    out = tmp_path / "speedup.json"
    printed = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            status = main(["calibrate", "--speedup", "50", "--steps", "8", "--per-class", "1",
                           "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed, report = printed.getvalue(), json.loads(out.read_text())
    assert status == 1 and report["target"] == {"min_psnr": None, "speedup": 50.0} and not report["met"]
    assert "NOT MET" in report["message"] and "closest" in report["message"]
    assert report["speedup"] == max(row["speedup"] for row in report["table"])  # the closest: the fastest measured
    validation = report["validation"]
    check = validation["checks"]["speedup"]
    assert not check["met"] and check["miss_x"] == pytest.approx(50 - check["measured"])
    assert f"MISSES it by {check['miss_x']:.2f}x" in printed
    assert validation["hand_picked_meeting_target"] == [] and validation["beats_hand_picked"] is None
    assert "no hand-picked config meets the target: nothing to compare with" in printed
    assert "than every hand-picked config" not in printed


def test_calibration_costs_at_most_ten_uncached_generations_per_call_measured_on_the_model(cli):
    """The budget a user is promised (~10 uncached generations' worth of work per call on the digits model), measured
    rather than taken from calibrate's own accounting: forward hooks on the real transformer's blocks count every
    block forward calibrate caused (reference, recordings, candidates, re-timing, FLOP counting), in units of one
    uncached generation of the calls (8 blocks x 20 steps x 2 calls). A hit runs only Fn + Bn blocks, so the
    transformer's forward calls outnumber that work: they are counted too and must cover what the report says ran."""
    _, _, report, _, work = cli
    blocks, steps, calls = report["settings"]["num_blocks"], STEPS, len(CALIBRATION_SEEDS)
    uncached_generation = blocks * steps * calls
    spent = work["blocks"] / uncached_generation
    assert spent <= report["cost"]["budget"], f"calibrate ran {spent:.2f} uncached generations' worth of blocks"
    assert spent >= 3  # the count saw calibrate's runs: the reference alone is two generations
    assert spent <= report["cost"]["generations"] + 0.5  # its own accounting does not understate the work
    runs = work["transformer"] / (steps * calls)  # passes over the calls, cached or not
    assert runs >= spent and runs >= 2 + report["cost"]["verified"]


def test_recommended_config_meets_the_target_on_held_out_digits_and_seeds(cli, pipe):
    """Honest validation, independent of calibrate's own measuring code: calibrated on even digits (seeds 0, 1), the
    config read back from calibration.json by optimize() keeps the worst-call PSNR >= 35 dB against the uncached
    images on odd digits with other seeds. A miss fails with the number of dB missed."""
    out, _, report, _, _ = cli
    assert not set(CALIBRATION_DIGITS) & set(HELD_OUT_DIGITS)
    calls = digit_calls(HELD_OUT_DIGITS, HELD_OUT_SEEDS, PER_CLASS, STEPS)
    reference = [pipe(**call).images for call in digit_calls(HELD_OUT_DIGITS, HELD_OUT_SEEDS, PER_CLASS, STEPS)]
    dbc.optimize(pipe, cache=str(out))
    try:
        assert dbc.runtime_of(pipe).cache_config == DBCacheConfig.from_string(report["config"])
        worst, cached = math.inf, 0
        for call, ref in zip(calls, reference):
            worst = min(worst, float(np.mean(psnr(pipe(**call).images, ref))))
            cached += len(dbc.summary(pipe).cached_steps)
    finally:
        dbc.disable(pipe)
    assert worst >= TARGET, f"held-out PSNR {worst:.2f} dB misses {TARGET} dB by {TARGET - worst:.2f} dB"
    validation = report["validation"]
    ours = validation["table"][0]
    assert ours["source"] == "calibrated" and ours["cached"] == cached  # the CLI measured the same decisions
    assert ours["psnr"] == pytest.approx(worst, abs=1e-6) and validation["met"]


def test_recommended_config_is_faster_than_every_hand_picked_config_meeting_the_target(cli):
    """Measured in the same run on the held-out calls: the calibrated config beats the demo default, the README's
    and cache-dit's FLUX configs that also meet 35 dB: more cached steps and a higher FLOP ratio than each
    (deterministic), and a wall-clock speedup no more than WALL_TOLERANCE below any of them (wall times of a few
    seconds on a shared CPU are noisy: two configs caching the same steps measured 1.92x and 1.53x in one run). The
    configs that leave no middle block of the 8-block model are reported as not compared."""
    _, printed, report, _, _ = cli
    rows = report["validation"]["table"]
    ours, hand = rows[0], rows[1:]
    compared = {row["config"] for row in hand}
    assert str(DBCacheConfig.from_string("F1B0_W4M0MC2_T0O1_R0.2")) in compared  # the demo default
    assert {str(DBCacheConfig.from_string(c)) for c in ("F1B0_W4MC6_R0.24", "F4B0_W4MC3_R0.12",
                                                       "F4B0_W4MC4_R0.12")} <= compared
    rivals = [row for row in hand if row["psnr"] >= TARGET]
    assert rivals, "no hand-picked config meets the target: the comparison would say nothing"
    for row in rivals:
        assert ours["cached"] > row["cached"] and ours["flop_ratio"] > row["flop_ratio"]
        assert ours["speedup"] >= row["speedup"] * (1 - WALL_TOLERANCE), (
            f"calibrated {ours['config']} {ours['speedup']:.2f}x is slower than {row['config']} "
            f"{row['speedup']:.2f}x by more than {WALL_TOLERANCE:.0%}")
    validation = report["validation"]
    assert validation["comparison"] == "faster" and validation["beats_hand_picked"] is True
    assert validation["faster_wall"] == all(ours["speedup"] > row["speedup"] for row in rivals)
    assert set(validation["skipped"]) == {c for c in HAND_PICKED if c.startswith("F8B0")}
    assert "faster than every hand-picked config meeting the target" in printed and "not compared: F8B0" in printed


def test_readme_shows_the_hand_picked_configs_compared():
    """README "Calibration" lists exactly the hand-picked configs the calibrate command compares with (cli.HAND_PICKED,
    with their sources), so the table a reader sees is the one the check used."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Calibration"):]
    section = section[:section.index("\n## ", 3)]
    rows = dict(re.findall(r"^ *\| `(F\d+B\d+_[^`]+)` \| ([^|]+?) \|$", section, flags=re.M))
    assert rows == HAND_PICKED


def test_gate_model_replays_the_real_decisions(pipe):
    """simulate() on the per-step diffs of a never-caching run, with the accumulation measured by one run that
    caches long stretches (fit_decay), predicts the steps the cache really caches, for hand-picked configs with
    warm-up, continuous-step limits and TaylorSeer; without the measured decay (the plain sum, an upper bound) it
    predicts fewer."""
    def run(config):
        dbc.optimize(pipe, cache=config)
        try:
            pipe(**digit_calls((2, 7), (5,), 2, STEPS)[0])
            return dbc.summary(pipe)
        finally:
            dbc.disable(pipe)

    never = run(DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=1e-9,
                              max_warmup_steps=0))
    diffs = dict(never.residual_diffs)
    assert sorted(diffs) == list(range(1, STEPS)) and not never.cached_steps
    long = run(DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.999,
                             max_warmup_steps=1))
    ratios = gap_ratios(diffs, STEPS, long.cached_steps, long.residual_diffs)
    assert len(ratios) >= 10 and all(0 < r < 1 for _, r in ratios)  # accumulated change < sum of the steps'
    decay = fit_decay(ratios)
    assert 0 < decay < 0.5
    exact, plain = 0, []
    for text in ("F1B0_W4MC6_R0.24", "F1B0_W4M0MC2_T0O1_R0.2", "F1B0_W2MC3_T1O1_R0.3", "F1B0_W1M0MC0_R0.5",
                 "F1B0_W3MC1_R0.09"):
        config = DBCacheConfig.from_string(text)
        real = run(config).cached_steps
        predicted = simulate(config, diffs, STEPS, decay)[0]
        assert real and abs(len(predicted) - len(real)) <= 1, (text, predicted, real)
        exact += predicted == real
        plain.append(len(simulate(config, diffs, STEPS)[0]) - len(real))
    assert exact >= 4
    assert all(d <= 0 for d in plain) and min(plain) < 0


def test_compiled_candidates_share_one_compile_per_group(pipe, small_calls):
    """With a compile mode every candidate of a group runs through the group's compiled graphs (reconfigure):
    the graphs compiled are one region per block class, shared by the uncached baseline and the cached runtime
    (the compile store), however many candidates run; the pick is verified like in eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    dbc.clear_compiled()
    counters.clear()
    result = dbc.calibrate(pipe, small_calls, min_psnr=30, mode="default", graph="regional",
                           compile_options={"backend": "eager"}, search=T0_ONLY, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    assert result.settings["lowering"] == "regional" and result.cost["compile_seconds"] > 0
    assert result.cost["verified"] >= 3 and result.cost["optimize_calls"] == 2
    assert graphs == 2  # one region per block class (double, single), the baseline's and the cached runtime's
    assert result.met and result.chosen.psnr >= 30
    with pytest.raises(ValueError):
        dbc.runtime_of(pipe)  # left un-optimized


def test_quantized_calibration_keeps_the_weights_quantized(small_calls):
    """quantize= is applied once (the reference is the uncached quantized output); the candidates run on the same
    quantized weights, which stay quantized afterwards with no hook left."""
    pipe = load_digits_pipeline()
    result = dbc.calibrate(pipe, small_calls, min_psnr=30, quantize="int8-wo", search=T0_ONLY, progress=False)
    assert result.settings["quantize"] == "int8-wo" and result.met and result.chosen.psnr >= 30
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight) is not torch.nn.Parameter and type(weight.data) is not torch.Tensor
    with pytest.raises(ValueError):
        dbc.runtime_of(pipe)


def test_target_rules_speedup_both_and_unreachable(pipe, small_calls):
    """speedup=: the best quality among the measured configs meeting it; both targets: min_psnr wins and the result
    says by how much the speedup is missed; unreachable targets return the closest candidate and say so."""
    fast = dbc.calibrate(pipe, small_calls, speedup=1.3, search=T0_ONLY, progress=False)
    meeting = [c for c in fast.candidates if c.speedup >= 1.3]
    # The search verifies the least aggressive proposal its model expects to reach 1.3x: a config whose measured wall
    # speedup on this tiny CPU workload lands at 1.29-1.33x between runs (a clean-clone CI run measured 1.29x). Met
    # or not is therefore a timing outcome (the project keeps timed targets in bench/); what must hold either way:
    # the verified front reaches 1.3x in FLOPs, and the result follows the rule on its own measurements.
    assert max(c.flop_ratio for c in fast.candidates) >= 1.3
    assert fast.met == bool(meeting), fast.message
    if fast.met:
        assert fast.chosen.psnr == max(c.psnr for c in meeting) and "1.3x" in fast.message
    else:
        assert fast.chosen.speedup == max(c.speedup for c in fast.candidates) and "closest" in fast.message

    both = dbc.calibrate(pipe, small_calls, min_psnr=30, speedup=50, search=T0_ONLY, progress=False)
    assert not both.met and both.chosen.psnr >= 30
    assert "min_psnr wins" in both.message and "speedup 50x NOT MET" in both.message

    strict = dbc.calibrate(pipe, small_calls, min_psnr=140, search=T0_ONLY, progress=False, budget=6)
    assert not strict.met and strict.chosen.psnr == max(c.psnr for c in strict.candidates)
    assert "NOT MET" in strict.message and "dB short" in strict.message

    far = dbc.calibrate(pipe, small_calls, speedup=50, search=T0_ONLY, progress=False)
    assert not far.met and far.chosen.speedup == max(c.speedup for c in far.candidates)
    assert "closest" in far.message and json.loads(far.to_json())["met"] is False


def test_calibration_json_is_a_cache_argument(tmp_path, pipe):
    """optimize(cache="calibration.json") / a Path / result.config; unreadable files fail clearly."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"config": "F1B0_W2M0MC3_T1O1_R0.31", "table": []}))
    expected = DBCacheConfig.from_string("F1B0_W2M0MC3_T1O1_R0.31")
    assert DBCacheConfig.coerce(str(path)) == DBCacheConfig.coerce(path) == expected
    dbc.optimize(pipe, cache=path)
    assert dbc.runtime_of(pipe).cache_config == expected
    dbc.disable(pipe)
    with pytest.raises(FileNotFoundError, match="no such calibration file"):
        DBCacheConfig.coerce(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a calibration JSON"):
        DBCacheConfig.coerce(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match='"config" string'):
        dbc.optimize(pipe, cache=str(tmp_path / "empty.json"))
    (tmp_path / "wrong.json").write_text(json.dumps({"config": "F1B0_X9"}))
    with pytest.raises(ValueError, match="wrong.json"):
        DBCacheConfig.coerce(tmp_path / "wrong.json")
    with pytest.raises(ValueError):
        dbc.runtime_of(pipe)  # refused calls attached nothing


def test_bad_input_is_a_clear_error_and_leaves_the_pipeline_alone(pipe, small_calls):
    """No calls, calls that are not dicts or have no seeded generator, no target, targets out of range, a target
    given both as target= and as min_psnr= / speedup=, a too small budget, graph='cond', an optimized pipeline,
    mismatched shapes: each a clear error naming the problem, before any candidate runs; the command line refuses
    bad flags; the pipeline, the caller's generator and its progress bar are left as they came."""
    call = small_calls[0]
    cases = [
        (dict(calls=[], min_psnr=30), ValueError, "calls is empty"),
        (dict(calls=call, min_psnr=30), TypeError, "list of pipeline keyword-argument dicts"),
        (dict(calls=[[1]], min_psnr=30), TypeError, r"calls\[0\] must be a dict"),
        (dict(calls=[dict(call, generator=None)], min_psnr=30), ValueError, "no torch.Generator"),
        (dict(calls=small_calls), ValueError, "give a target"),
        (dict(calls=small_calls, min_psnr=-3), ValueError, r"min_psnr must be in \(0, 150\]"),
        (dict(calls=small_calls, min_psnr=float("nan")), ValueError, "min_psnr must be a finite number"),
        (dict(calls=small_calls, min_psnr=True), ValueError, "min_psnr must be a finite number"),
        (dict(calls=small_calls, speedup=0.5), ValueError, r"speedup must be in \(1, 100\]"),
        (dict(calls=small_calls, target={"psnr": 30}), ValueError, "target keys"),
        (dict(calls=small_calls, target={"min_psnr": 30}, min_psnr=40), ValueError, "not both"),
        (dict(calls=small_calls, target={"speedup": 2}, min_psnr=30), ValueError, "not both"),
        (dict(calls=small_calls, min_psnr=30, budget=2), ValueError, "budget must be >= 4"),
        (dict(calls=small_calls, min_psnr=30, mode="default", graph="cond"), ValueError, "graph='segments'"),
        (dict(calls=small_calls, min_psnr=30, graph="segments"), ValueError, "'auto' without a mode"),
        (dict(calls=small_calls, min_psnr=30, search=SearchSpace(Fn=(8,))), ValueError, "no middle block"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            dbc.calibrate(pipe, progress=False, **kwargs)
    for argv in (["calibrate"], ["calibrate", "--min-psnr", "-1"], ["calibrate", "--model", "flux"]):
        with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
            main(argv)
        assert "error:" in err.getvalue()
    with pytest.raises(ValueError, match="needs a pipeline"):
        dbc.calibrate(pipe.transformer, small_calls, min_psnr=30)
    dbc.optimize(pipe, cache="F1B0_W4MC2_R0.2")
    try:
        with pytest.raises(ValueError, match="already optimized"):
            dbc.calibrate(pipe, small_calls, min_psnr=30)
    finally:
        dbc.disable(pipe)
    # a call whose shapes do not fit (latents for 5 images, labels for 2) fails by name, before any candidate runs
    bad = dict(labels=[1, 2], latents=torch.zeros(5, 64, 4), num_inference_steps=4, progress=False)
    with pytest.raises(ValueError, match=r"calls\[1\] fails when run uncached.*latents must have shape"):
        dbc.calibrate(pipe, [call, bad], min_psnr=30, progress=False)
    with pytest.raises(ValueError):
        dbc.runtime_of(pipe)
    generator = call["generator"]
    state = generator.get_state()
    dbc.calibrate(pipe, small_calls, min_psnr=30, search=T0_ONLY, budget=5, progress=False)
    assert torch.equal(generator.get_state(), state)  # the caller's generator is left as it came
    assert not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
