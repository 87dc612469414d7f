import pytest

from dbcache_compile import DBCacheConfig


@pytest.mark.parametrize("text", ["F8B0_W8M0MC0_T0O1_R0.08", "F1B0_W4M0MC2_T0O1_R0.2", "F4B4_W2I2M10MC3_T1O2_R0.12",
                                  "F24B24_W2M0MC1_T0O1_R0.8", "F1B0_W4M0MC6_T0O1_R1.0",
                                  "F1B0_W4M0MC6_T0O1_R-0.5", "F1B0_W4M0MC6_T0O1_R0.2_SCM11110101_CFG1",
                                  "F1B0_W4M0MC6_T1O4_R0.2_CFG0"])
def test_canonical_strings_round_trip(text):
    """A canonical config string prints back unchanged and re-parses to an equal config, so a printed config (or a
    cache-dit table entry) can be pasted back."""
    cfg = DBCacheConfig.from_string(text)
    assert str(cfg) == text
    assert DBCacheConfig.from_string(str(cfg)) == cfg


def test_fields_and_defaults():
    """Config tokens set the cache-dit fields, absent tokens take the defaults, M0/MC0 mean unlimited (-1), T1O2
    keeps three Taylor terms, and from_string overrides set fields."""
    cfg = DBCacheConfig.from_string("F1B0_W4I2MC2_R0.2")
    assert (cfg.Fn_compute_blocks, cfg.Bn_compute_blocks, cfg.max_warmup_steps, cfg.warmup_interval) == (1, 0, 4, 2)
    assert cfg.max_cached_steps == -1 and cfg.max_continuous_cached_steps == 2
    assert cfg.residual_diff_threshold == 0.2 and not cfg.taylorseer and cfg.taylorseer_order == 1
    assert str(cfg) == "F1B0_W4I2M0MC2_T0O1_R0.2"
    # M0 / MC0 mean unlimited (-1 in the dataclass, as cache-dit)
    cfg = DBCacheConfig.from_string("F8B0_W8M0MC0_R0.08")
    assert cfg.max_cached_steps == -1 and cfg.max_continuous_cached_steps == -1
    assert DBCacheConfig.from_string("T1O2_R0.1_F2B1").taylorseer_terms == 3
    assert DBCacheConfig.from_string("F2", enable_separate_cfg=True).enable_separate_cfg is True


@pytest.mark.parametrize("text, needle", [
    ("F8B0_X3", "unknown token 'X3'"),
    ("F8B0_W8Q", "unknown token 'Q'"),
    ("F8F2", "appears twice"),
    ("F0B0_W8", "Fn_compute_blocks must be in 1..10000"),
    ("_", "no tokens"),
    ("T1O5", "taylorseer_order must be in 1..4"),
    ("W9223372036854775808", "max_warmup_steps .*must be in 0..1000000"),
    ("F1B0_CFG1_SCM01_CFG0", "appears twice"),
    ("F1B0_T2", "T0 or T1"),
    ("F1.5B0", "needs an integer"),
    ("F1B0_I0", "warmup_interval"),
    ("", "non-empty"),
])
def test_bad_strings_name_the_problem(text, needle):
    """A malformed config string (unknown/repeated token, out of range, non-integer, empty) raises a ValueError
    naming what is wrong."""
    with pytest.raises(ValueError, match=needle):
        DBCacheConfig.from_string(text)


@pytest.mark.parametrize("kwargs, field", [
    ({"Fn_compute_blocks": 0}, "Fn_compute_blocks"),
    ({"Bn_compute_blocks": -1}, "Bn_compute_blocks"),
    ({"residual_diff_threshold": float("nan")}, "residual_diff_threshold"),
    ({"residual_diff_threshold": float("inf")}, "residual_diff_threshold"),
    ({"residual_diff_threshold": "0.1"}, "residual_diff_threshold"),
    ({"max_cached_steps": 0}, "max_cached_steps"),
    ({"max_continuous_cached_steps": -2}, "max_continuous_cached_steps"),
    ({"max_warmup_steps": -1}, "max_warmup_steps"),
    ({"taylorseer_order": 0}, "taylorseer_order"),
    ({"Fn_compute_blocks": 1.0}, "Fn_compute_blocks"),
    ({"steps_computation_mask": (1, 2)}, "steps_computation_mask"),
    ({"steps_computation_mask": ()}, "steps_computation_mask"),
    ({"enable_separate_cfg": 0.0}, "enable_separate_cfg"),
    ({"taylorseer": 1}, "taylorseer"),
    ({"taylorseer_order": 5}, "taylorseer_order"),
    ({"Bn_compute_blocks": True}, "Bn_compute_blocks"),
])
def test_bad_fields_raise_value_error_naming_the_field(kwargs, field):
    """Building DBCacheConfig with an out-of-range or wrongly typed field raises ValueError naming that field."""
    with pytest.raises(ValueError, match=field):
        DBCacheConfig(**kwargs)


def test_unknown_override_is_rejected():
    """from_string() rejects a keyword override that is not a DBCacheConfig field: a typo is an error."""
    with pytest.raises(ValueError, match="unknown DBCacheConfig fields"):
        DBCacheConfig.from_string("F1B0", Fn_blocks=3)


def test_fn_plus_bn_checked_against_model():
    """validate_for() accepts Fn + Bn up to the model's block count and rejects more, naming the block count."""
    cfg = DBCacheConfig.from_string("F6B3")
    cfg.validate_for(9)
    with pytest.raises(ValueError, match="exceeds the 8 transformer blocks"):
        cfg.validate_for(8)


def test_coerce():
    """coerce() returns a config object as is, parses a config string, and raises TypeError for anything else."""
    cfg = DBCacheConfig()
    assert DBCacheConfig.coerce(cfg) is cfg
    assert DBCacheConfig.coerce("F2B0") == DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=0)
    with pytest.raises(TypeError, match="DBCacheConfig or a config string"):
        DBCacheConfig.coerce(3)
