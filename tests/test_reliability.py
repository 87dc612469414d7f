"""Reliability of config parsing and quantization requests (issue #12 items 6-8, issue #16 item 6).

A seeded fuzzer builds cache config strings from the token grammar plus garbage, and keyword sets with huge,
negative, non-finite, NumPy and bool values. Every outcome must be a config whose fields are in their documented
bounds and that survives ``from_string(str(c)) == c``, or a ``ValueError`` / ``TypeError`` that names the problem.
Keyword outcomes are also checked against an independent statement of what each field accepts.
"""

import dataclasses
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dbcache_compile.config import MAX_BLOCKS, MAX_STEPS, MAX_TAYLORSEER_ORDER, DBCacheConfig
from dbcache_compile.quantize import resolve_quantization

FIELDS = [f.name for f in dataclasses.fields(DBCacheConfig)]
TOKENS = ["F", "B", "W", "I", "M", "MC", "T", "O", "R", "SCM", "CFG"]
INT_RANGES = {"Fn_compute_blocks": (1, MAX_BLOCKS), "Bn_compute_blocks": (0, MAX_BLOCKS),
              "max_warmup_steps": (0, MAX_STEPS), "warmup_interval": (1, MAX_STEPS),
              "max_cached_steps": (1, MAX_STEPS), "max_continuous_cached_steps": (1, MAX_STEPS),
              "taylorseer_order": (1, MAX_TAYLORSEER_ORDER)}
STRING_PROBLEMS = ("unknown token", "has no tokens", "non-empty")


# ------------------------------------------------------------------------------------------------ invariants
def assert_well_formed(cfg: DBCacheConfig) -> None:
    """Every field in its documented bounds and of a plain Python type (so equal configs hash equal)."""
    for name, (lo, hi) in INT_RANGES.items():
        value = getattr(cfg, name)
        assert type(value) is int, (name, value)
        assert lo <= value <= hi or (value == -1 and name in ("max_cached_steps", "max_continuous_cached_steps")), \
            (name, value)
    assert type(cfg.residual_diff_threshold) is float and math.isfinite(cfg.residual_diff_threshold)
    assert type(cfg.taylorseer) is bool
    assert cfg.enable_separate_cfg is None or type(cfg.enable_separate_cfg) is bool
    mask = cfg.steps_computation_mask
    assert mask is None or (type(mask) is tuple and 1 <= len(mask) <= MAX_STEPS
                            and all(type(m) is int and m in (0, 1) for m in mask))


def assert_round_trip(cfg: DBCacheConfig) -> None:
    text = str(cfg)
    again = DBCacheConfig.from_string(text)
    assert again == cfg, (text, again, cfg)
    assert hash(again) == hash(cfg) and str(again) == text


# ---------------------------------------------------------------------------------------------- string fuzzer
def random_number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return str(rng.choice([0, 1, 2, 3, 4, 5, 8, 10, 57, 60]))
    if kind < 0.55:
        return str(rng.choice([MAX_BLOCKS, MAX_BLOCKS + 1, MAX_STEPS, MAX_STEPS + 1, MAX_TAYLORSEER_ORDER + 1]))
    if kind < 0.65:
        return str(rng.choice([2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 99999999999, 100000, 10 ** 30]))
    if kind < 0.68:
        return "9" * rng.choice([19, 400, 5000])  # past int()'s 4300-digit limit too
    if kind < 0.72:
        return "0" * rng.randint(1, 30) + str(rng.randint(0, 9))
    if kind < 0.90:
        sign = rng.choice(["", "", "-"])
        return sign + rng.choice([f"{rng.uniform(0, 2):.{rng.randint(0, 6)}f}", repr(rng.uniform(-1, 2)),
                                  f"{rng.uniform(0, 9):.2f}e{rng.choice(['', '-', '+'])}{rng.randint(0, 400)}",
                                  "1.", "0.0", "1e999"])
    return "".join(rng.choice("01") for _ in range(rng.randint(1, 40)))  # mask-like digits


def plausible_number(rng: random.Random, token: str) -> str:
    """Mostly in range, so that a good share of the fuzzed strings parse."""
    if rng.random() < 0.2:
        return random_number(rng)
    if token == "R":
        return repr(rng.choice([rng.uniform(-1, 2), rng.choice([0.0, -0.0, 1.0, 1e-5, 5e-324, 1e300])]))
    if token == "SCM":
        return "".join(rng.choice("01") for _ in range(rng.randint(1, 60)))
    if token in ("T", "CFG"):
        return rng.choice("01")
    if token == "O":
        return str(rng.randint(1, MAX_TAYLORSEER_ORDER))
    return str(rng.choice([rng.randint(0, 10), rng.randint(1, MAX_STEPS // 10 ** rng.randint(0, 6))]))


def random_config_string(rng: random.Random) -> str:
    if rng.random() < 0.5:  # distinct tokens, plausible values, random grouping
        tokens = rng.sample(TOKENS, rng.randint(1, len(TOKENS)))
        return "".join(t + plausible_number(rng, t) + rng.choice(["", "_"]) for t in tokens)
    parts = []
    for _ in range(rng.randint(0, 8)):
        roll = rng.random()
        if roll < 0.8:
            parts.append(rng.choice(TOKENS) + random_number(rng))
        elif roll < 0.9:
            parts.append(rng.choice(TOKENS))  # token without a number
        else:
            parts.append("".join(rng.choice("xQ _-+.eE C9\t\n") for _ in range(rng.randint(1, 4))))
        parts.append(rng.choice(["", "_", "_", "__"]))
    text = "".join(parts)
    if rng.random() < 0.05:
        text = rng.choice([" ", "  _ ", "_", "___", "\t"]) + text
    return text


def test_string_fuzzer_accepts_only_bounded_configs_and_names_every_problem():
    """Fuzzed config strings either parse into bounded configs that round-trip through str(), or raise an error
    naming the token or field, and parsing stays fast."""
    rng = random.Random(1212)
    accepted, started = 0, time.perf_counter()
    for _ in range(5000):
        text = random_config_string(rng)
        try:
            cfg = DBCacheConfig.from_string(text)
        except (ValueError, TypeError) as err:
            message = str(err)
            assert any(p in message for p in STRING_PROBLEMS) or any(f in message for f in FIELDS), \
                (text[:80], message)
            continue
        accepted += 1
        assert_well_formed(cfg)
        assert_round_trip(cfg)
    assert accepted > 1000  # the grammar side of the fuzzer really builds configs
    assert time.perf_counter() - started < 20  # generous: ~1 s on a 2-core CPU


# ---------------------------------------------------------------------------------------------- keyword fuzzer
def value_pool(rng: random.Random) -> list:
    mask = [rng.randint(0, 1) for _ in range(rng.randint(1, 12))]
    return [0, 1, 2, 4, 5, 8, -1, -2, MAX_BLOCKS, MAX_BLOCKS + 1, MAX_STEPS, MAX_STEPS + 1, 2 ** 63, 10 ** 400,
            -(10 ** 30), 0.0, 0.1, -0.5, 1.0, 1.5, 1e-5, 1e300, -0.0, float("nan"), float("inf"), float("-inf"),
            True, False, None, "1", "0.1", b"1", np.int64(3), np.int32(-1), np.uint8(1), np.int64(2 ** 62),
            np.float32(0.2), np.float64(0.3), np.float64("nan"), np.bool_(True), np.bool_(False), mask,
            tuple(mask), np.array(mask), np.array(mask, dtype=bool), np.array([mask]), [], [1, 2], [True, False],
            [1.0, 0.0], "1010", {1: 0}, range(3), object()]


def expected_valid(name: str, value) -> bool:
    """What each field accepts, stated independently of the implementation (README / config docstring)."""
    is_bool = isinstance(value, (bool, np.bool_))
    is_int = isinstance(value, (int, np.integer)) and not is_bool
    if name in INT_RANGES:
        lo, hi = INT_RANGES[name]
        unlimited = name in ("max_cached_steps", "max_continuous_cached_steps") and is_int and value == -1
        return is_int and (lo <= int(value) <= hi or unlimited)
    if name == "residual_diff_threshold":
        if is_bool or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False
    if name == "enable_separate_cfg":
        return value is None or is_bool
    if name == "taylorseer":
        return is_bool
    assert name == "steps_computation_mask"
    if value is None:
        return True
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            return False
        value = value.tolist()
    if not isinstance(value, (list, tuple, range)) or not 1 <= len(value) <= MAX_STEPS:
        return False
    return all(isinstance(m, (int, np.integer)) and not isinstance(m, (bool, np.bool_)) and m in (0, 1)
               for m in value)


def test_keyword_fuzzer_matches_the_field_rules_and_round_trips():
    """Fuzzed keyword configs are accepted exactly when every value meets its field's rule, errors name a bad
    field, and accepted configs are bounded and round-trip."""
    rng = random.Random(812)
    accepted, started = 0, time.perf_counter()
    for _ in range(3000):
        pool = value_pool(rng)
        names = rng.sample(FIELDS, rng.randint(1, 3))
        kwargs = {name: rng.choice(pool) for name in names}
        valid = all(expected_valid(n, v) for n, v in kwargs.items())
        try:
            cfg = DBCacheConfig(**kwargs)
        except (ValueError, TypeError) as err:
            assert not valid, (kwargs, str(err))
            bad = [n for n, v in kwargs.items() if not expected_valid(n, v)]
            assert any(n in str(err) for n in bad), (kwargs, str(err))
            continue
        assert valid, f"accepted invalid {kwargs!r} as {cfg}"
        accepted += 1
        assert_well_formed(cfg)
        assert_round_trip(cfg)
        assert dataclasses.replace(cfg) == cfg
    assert accepted > 200
    assert time.perf_counter() - started < 20


# ---------------------------------------------------------------- issue #12 item 6: bounds at parse time
@pytest.mark.parametrize("text, field, allowed", [
    ("W9223372036854775808", "max_warmup_steps", f"0..{MAX_STEPS}"),  # was: OverflowError at the first step
    ("T1O99999999999", "taylorseer_order", f"1..{MAX_TAYLORSEER_ORDER}"),  # was: allocation until out of memory
    ("T1O100000", "taylorseer_order", f"1..{MAX_TAYLORSEER_ORDER}"),  # was: 70x slower steps
    (f"T1O{MAX_TAYLORSEER_ORDER + 1}", "taylorseer_order", f"1..{MAX_TAYLORSEER_ORDER}"),
    ("F" + "9" * 5000, "Fn_compute_blocks", f"1..{MAX_BLOCKS}"),  # int() would fail past 4300 digits
    (f"B{MAX_BLOCKS + 1}", "Bn_compute_blocks", f"0..{MAX_BLOCKS}"),
    (f"I{MAX_STEPS + 1}", "warmup_interval", f"1..{MAX_STEPS}"),
    (f"M{MAX_STEPS + 1}", "max_cached_steps", f"1..{MAX_STEPS}"),
    (f"MC{2 ** 64}", "max_continuous_cached_steps", f"0..{MAX_STEPS} (0 = unlimited)"),
    ("R1e999", "residual_diff_threshold", "finite"),
])
def test_numeric_tokens_are_bounded_with_the_field_and_range_named(text, field, allowed):
    """A huge, overflowing or non-finite numeric token raises ValueError naming the field and its allowed range,
    instead of overflowing or allocating later."""
    with pytest.raises(ValueError) as info:
        DBCacheConfig.from_string(text)
    assert field in str(info.value) and allowed in str(info.value)


@pytest.mark.parametrize("key, field", [("F", "Fn_compute_blocks"), ("B", "Bn_compute_blocks"),
                                        ("W", "max_warmup_steps"), ("I", "warmup_interval"), ("M", "max_cached_steps"),
                                        ("MC", "max_continuous_cached_steps"), ("O", "taylorseer_order")])
def test_leading_zeros_past_pythons_int_digit_limit(key, field):
    """An integer token written with more than 4,300 leading zeros is its value (it used to escape as Python's
    int-digit-limit ValueError naming neither the token nor the field); out of range, the error names the field."""
    cfg = DBCacheConfig.from_string(f"{key}{'0' * 5000}1_F2" if key != "F" else f"F{'0' * 5000}1B0_R0.2")
    assert getattr(cfg, field) == 1
    with pytest.raises(ValueError) as info:
        DBCacheConfig.from_string(f"{key}{'0' * 5000}{MAX_STEPS + 1}")
    assert field in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("max_warmup_steps", 2 ** 63), ("taylorseer_order", 99999999999), ("taylorseer_order", 100000),
    ("Fn_compute_blocks", 10 ** 5000), ("max_cached_steps", MAX_STEPS + 1), ("warmup_interval", 2 ** 64),
    ("steps_computation_mask", (1, 0) * MAX_STEPS),
], ids=lambda v: v if isinstance(v, str) else "value")
def test_keyword_fields_are_bounded_too(field, value):
    """Huge keyword values (step counts, Taylor order, blocks, a long mask) raise ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        DBCacheConfig(**{field: value})


def test_largest_accepted_values():
    """The largest accepted value of every field round-trips through the string form, and step bounds fit a 32-bit
    device counter."""
    cfg = DBCacheConfig(Fn_compute_blocks=MAX_BLOCKS, Bn_compute_blocks=MAX_BLOCKS, max_warmup_steps=MAX_STEPS,
                        warmup_interval=MAX_STEPS, max_cached_steps=MAX_STEPS, max_continuous_cached_steps=MAX_STEPS,
                        taylorseer=True, taylorseer_order=MAX_TAYLORSEER_ORDER, residual_diff_threshold=1e300)
    assert_round_trip(cfg)
    assert MAX_STEPS < 2 ** 31  # device step counters never overflow, whatever their integer type


# ------------------------------------------------------------------ issue #12 item 7: str() round trip
@pytest.mark.parametrize("kwargs, text", [
    ({"enable_separate_cfg": True}, "F8B0_W8M0MC0_T0O1_R0.08_CFG1"),
    ({"enable_separate_cfg": False}, "F8B0_W8M0MC0_T0O1_R0.08_CFG0"),
    ({"steps_computation_mask": (1, 1, 0, 1, 0)}, "F8B0_W8M0MC0_T0O1_R0.08_SCM11010"),
    ({"steps_computation_mask": [0], "enable_separate_cfg": True}, "F8B0_W8M0MC0_T0O1_R0.08_SCM0_CFG1"),
    ({"residual_diff_threshold": -0.5}, "F8B0_W8M0MC0_T0O1_R-0.5"),  # R <= 0: never cache, as cache-dit
    ({"residual_diff_threshold": 0}, "F8B0_W8M0MC0_T0O1_R0.0"),
    ({"residual_diff_threshold": -0.0}, "F8B0_W8M0MC0_T0O1_R-0.0"),
    ({"residual_diff_threshold": 1e-05}, "F8B0_W8M0MC0_T0O1_R1e-05"),
    ({"residual_diff_threshold": 2e+20}, "F8B0_W8M0MC0_T0O1_R2e+20"),
])
def test_every_field_survives_the_string_form(kwargs, text):
    """enable_separate_cfg (CFG), steps_computation_mask (SCM) and any finite threshold are written in the string
    form and parse back to the same config."""
    cfg = DBCacheConfig(**kwargs)
    assert str(cfg) == text
    assert_round_trip(cfg)


def test_string_form_is_backward_compatible_and_order_free():
    """Configs without SCM/CFG print as before, tokens parse in any order, an override equals its token."""
    assert str(DBCacheConfig()) == "F8B0_W8M0MC0_T0O1_R0.08"  # configs without the new fields print as before
    cfg = DBCacheConfig.from_string("CFG0_SCM1100_F2B1_R-1")
    assert (cfg.enable_separate_cfg, cfg.steps_computation_mask, cfg.residual_diff_threshold) == (False, (1, 1, 0, 0),
                                                                                                 -1.0)
    assert DBCacheConfig.from_string("F2", enable_separate_cfg=True) == DBCacheConfig.from_string("CFG1F2")


@pytest.mark.parametrize("text, needle", [
    ("CFG2", "enable_separate_cfg"), ("SCM0120", "steps_computation_mask"), ("SCM1.0", "steps_computation_mask"),
    ("F-1", "Fn_compute_blocks"), ("M-1", "max_cached_steps"), ("T-1", "taylorseer"),
    ("SCM", "unknown token 'SCM'"), ("CFG1_CFG0", "appears twice"),
])
def test_new_tokens_reject_bad_values(text, needle):
    """Bad CFG/SCM values, negative integers, a bare SCM token and repeated tokens raise ValueError naming the
    field or problem."""
    with pytest.raises(ValueError, match=needle):
        DBCacheConfig.from_string(text)


# -------------------------------------------------------------- issue #12 item 8: inputs accepted by mistake
@pytest.mark.parametrize("text", ["_", "__", " _ ", "_\t_", "   "])
def test_config_of_only_separators_or_whitespace_is_rejected(text):
    """A config string of only separators or whitespace raises ValueError instead of meaning the default config."""
    with pytest.raises(ValueError, match="no tokens|non-empty|unknown token"):
        DBCacheConfig.from_string(text)


@pytest.mark.parametrize("value", [0.0, 1.0, 0, 1, "True", np.float64(1.0), np.int64(1)])
def test_enable_separate_cfg_takes_only_none_and_bools(value):
    """enable_separate_cfg takes only None, True or False: ints, floats, strings and NumPy numbers are refused."""
    with pytest.raises(ValueError, match="enable_separate_cfg must be None, True or False"):
        DBCacheConfig(enable_separate_cfg=value)


def test_numpy_values_are_accepted_and_normalized():
    """NumPy ints, bools, floats and arrays are accepted and normalized to plain Python values, so the config
    equals, hashes and prints like the plain one."""
    cfg = DBCacheConfig(Fn_compute_blocks=np.int64(2), Bn_compute_blocks=np.int32(1), max_warmup_steps=np.uint16(4),
                        max_cached_steps=np.int8(-1), max_continuous_cached_steps=np.int64(3),
                        taylorseer=np.bool_(True), taylorseer_order=np.int64(2), enable_separate_cfg=np.bool_(False),
                        residual_diff_threshold=np.float32(0.25), steps_computation_mask=np.array([1, 1, 0]))
    plain = DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=4, max_continuous_cached_steps=3,
                          taylorseer=True, taylorseer_order=2, enable_separate_cfg=False, residual_diff_threshold=0.25,
                          steps_computation_mask=(1, 1, 0))
    assert cfg == plain and hash(cfg) == hash(plain) and str(cfg) == str(plain)
    assert_well_formed(cfg)


@pytest.mark.parametrize("field", list(INT_RANGES))
def test_bools_are_not_ints(field):
    """A Python or NumPy bool for an integer field raises ValueError naming the field (True is not read as 1)."""
    with pytest.raises(ValueError, match=field):
        DBCacheConfig(**{field: True})
    with pytest.raises(ValueError, match=field):
        DBCacheConfig(**{field: np.bool_(True)})


def test_coerce_names_the_foreign_type_fully():
    """coerce() of a foreign look-alike class raises TypeError naming its full module path, so it never reads like
    our own DBCacheConfig."""
    @dataclasses.dataclass
    class DBCacheConfig_:  # a look-alike of another library: the message must not read like our own class
        Fn_compute_blocks: int = 1
    DBCacheConfig_.__name__ = DBCacheConfig_.__qualname__ = "DBCacheConfig"
    with pytest.raises(TypeError) as info:
        DBCacheConfig.coerce(DBCacheConfig_())
    assert f"got {__name__}.DBCacheConfig" in str(info.value)


def test_cache_dit_config_is_converted():
    """cache-dit's own ``DBCacheConfig`` (was: a TypeError naming the same class name)."""
    cache_dit = pytest.importorskip("cache_dit")
    theirs = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4,
                                     max_cached_steps=-1, max_continuous_cached_steps=6,
                                     residual_diff_threshold=0.24, enable_separate_cfg=True,
                                     steps_computation_mask=[1, 1, 0, 1], num_inference_steps=28)
    ours = DBCacheConfig.coerce(theirs)
    assert ours == DBCacheConfig.from_string("F1B0_W4MC6_R0.24_SCM1101_CFG1")
    assert DBCacheConfig.coerce(cache_dit.DBCacheConfig()) == DBCacheConfig(max_cached_steps=-1)  # same defaults
    assert DBCacheConfig.coerce(cache_dit.DBCacheConfig(max_cached_steps=-5)).max_cached_steps == -1
    assert DBCacheConfig.coerce(cache_dit.DBCacheConfig(residual_diff_threshold=torch.tensor(0.5))) \
        .residual_diff_threshold == 0.5
    taylor = DBCacheConfig.from_cache_dit(theirs, cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=2))
    assert taylor.taylorseer and taylor.taylorseer_order == 2
    for kwargs, needle in [({"max_cached_steps": 0}, "max_cached_steps=0 means 'never cache'"),
                           ({"cfg_compute_first": True}, "cfg_compute_first"),
                           ({"force_refresh_step_hint": 10}, "force_refresh_step_hint"),
                           ({"max_accumulated_residual_diff_threshold": 0.5}, "max_accumulated_residual_diff"),
                           ({"max_warmup_steps": 2 ** 63}, "max_warmup_steps.*converting cache_dit.DBCacheConfig")]:
        with pytest.raises(ValueError, match=needle):
            DBCacheConfig.coerce(cache_dit.DBCacheConfig(**kwargs))
    with pytest.raises(ValueError, match="DBPrune"):
        DBCacheConfig.coerce(cache_dit.DBPruneConfig())
    with pytest.raises(ValueError, match="TaylorSeerCalibratorConfig"):
        DBCacheConfig.from_cache_dit(theirs, cache_dit.FoCaCalibratorConfig())


# ---------------------------------------------------------------------- quantization requests (item 8, #16)
def test_fp8_wo_on_cpu_names_what_was_asked_and_why():
    """fp8 / fp8-wo on CPU raise ValueError saying what was asked, why it needs compute capability >= 8.9 and which
    int8 name to use instead; bad names are refused."""
    cpu = torch.device("cpu")
    with pytest.raises(ValueError) as info:
        resolve_quantization("fp8-wo", cpu, "default")
    message = str(info.value)
    assert message.startswith("quantize='fp8-wo'") and "upcast" in message and "'int8-wo'" in message
    with pytest.raises(ValueError, match=r"quantize='fp8' needs .*compute capability >= 8.9.*Use quantize='int8'"):
        resolve_quantization("fp8", cpu, "default")
    for bad in ("int4", 8, None, ["int8"]):
        with pytest.raises(ValueError, match="quantize must be None, one of"):
            resolve_quantization(bad, cpu, None)


def test_import_is_silent_and_torchao_loads_only_to_quantize():
    """``import dbcache_compile`` and refused quantization requests print nothing (torchao's import prints
    C-extension load failures and pytree deprecation warnings on a CPU machine), and we never import torchao to
    refuse a request. (diffusers' hook package imports peft when it is installed, and peft imports torchao: then
    torchao is loaded, silently; without peft it stays unimported.)"""
    script = ("import importlib.util, sys, torch, dbcache_compile\n"
              "from dbcache_compile.quantize import resolve_quantization\n"
              "for name in ('fp8-wo', 'fp8', 'int4'):\n"
              "    try:\n"
              "        resolve_quantization(name, torch.device('cpu'), 'default')\n"
              "    except ValueError:\n"
              "        pass\n"
              "    else:\n"
              "        raise SystemExit('accepted ' + name)\n"
              "peft = importlib.util.find_spec('peft') is not None\n"
              "raise SystemExit(3 if 'torchao' in sys.modules and not peft else 0)\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", (
        f"exit {done.returncode} (3: torchao was imported without peft installed), "
        f"stdout {done.stdout[-1000:]!r}, stderr {done.stderr[-2000:]!r}")


def test_a_shape_sweep_never_raises_and_keeps_the_graph_count_bounded():
    """One compiled pipeline (segments; Dynamo's graph structure only, backend eager) through new resolutions,
    batch sizes, prompt lengths and true CFG on and off: no error, no uncompiled fallback, and a bounded number of
    graphs (automatic dynamic shapes cover sizes after the second)."""
    from torch._dynamo.utils import counters

    import dbcache_compile as dbc
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache="F1B0_W2M0MC2_T0O1_R0.4", mode="default", graph="segments",
                 compile_options={"backend": "eager"})
    calls = [dict(), dict(height=48, width=48), dict(batch=2), dict(tokens=12), dict(cfg=True),
             dict(cfg=True, tokens=16, height=64, width=64), dict()]
    try:
        for call in calls:
            call = dict(call)
            cfg = call.pop("cfg", False)
            size = {k: call.pop(k) for k in ("height", "width") if k in call}
            inputs = dict(flux_inputs(**call), **size)
            if cfg:
                negative = flux_inputs(**dict(call, seed=5))
                inputs.update(negative_prompt_embeds=negative["prompt_embeds"], true_cfg_scale=3.0,
                              negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"])
            pipe(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
            summary = dbc.summary(pipe)
            assert summary.num_steps == 3 and summary.separate_cfg == cfg and not summary.compile_fallbacks
    finally:
        dbc.disable(pipe)
    graphs = counters["stats"]["unique_graphs"]
    print(f"shape sweep: {len(calls)} calls, {graphs} graphs")
    assert graphs <= 3 * 5, f"{graphs} graphs for {len(calls)} input variants"


def test_fuzzed_configs_through_eager_and_cond_end_in_success_or_a_named_error():
    """`python -m bench fuzz` in small (issue #26): 40 fuzzed configs (valid ones in the F3 group, whose Fn ends in
    a FLUX single block, with masks, limits and thresholds of every kind; out-of-range tokens; garbage) on the tiny
    FLUX, eager and graph='cond' (aot_eager checks cond's aliasing as Inductor does; one compile, reconfigure() per
    config). Each run succeeds or raises a ValueError / NotImplementedError naming the config field or token, no
    recompile after the first generation, and cond caches the steps eager caches."""
    from bench.fuzz import run_fuzz

    result = run_fuzz(40, seed=26, lowerings=("eager", "cond"), backend="aot_eager", groups=((3, 0, 0),),
                      log=lambda _: None)
    assert not result["failures"], [(r["config"], r["lowering"], r["error"]) for r in result["failures"][:3]]
    for lowering in ("eager", "cond"):
        counts = result["counts"][lowering]
        assert counts["ok"] >= 20 and counts["clear_error"] >= 5 and sum(counts.values()) == 40, counts
    assert not result["disagreements"], result["disagreements"][:3]
    masked = [r for r in result["records"] if r["lowering"] == "cond" and r["outcome"] == "ok" and "SCM" in r["config"]]
    assert masked and any(r["cached_steps"]["cond"] for r in masked)  # the masks really reach the cond graph
