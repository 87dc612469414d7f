"""DBCache configuration: the dataclass (cache-dit field names) and its compact string form.

The string form is the notation of cache-dit's benchmark tables, e.g. ``F8B0_W8M0MC0_T0O1_R0.08``:

========  ==========================================================================
token     meaning
========  ==========================================================================
``F``     ``Fn_compute_blocks``: first blocks always computed (their residual drives the decision)
``B``     ``Bn_compute_blocks``: last blocks always computed
``W``     ``max_warmup_steps``: steps ``range(0, W, I)`` always compute
``I``     ``warmup_interval`` (optional, default 1)
``M``     ``max_cached_steps`` (``M0`` or absent = unlimited)
``MC``    ``max_continuous_cached_steps`` (``MC0`` or absent = unlimited)
``T``     TaylorSeer on (1) / off (0)
``O``     TaylorSeer order (default 1)
``R``     ``residual_diff_threshold`` (may be negative: ``R-0.5``; ``<= 0`` never caches)
``SCM``   ``steps_computation_mask`` as 0/1 digits, e.g. ``SCM11110101`` (absent = no mask)
``CFG``   ``enable_separate_cfg``: ``CFG1`` / ``CFG0`` (absent = follow the pipeline's cache contexts)
========  ==========================================================================

``SCM`` and ``CFG`` are written as cache-dit's ``strify()`` writes them, so ``str(config)`` describes every field and
``DBCacheConfig.from_string(str(config)) == config`` holds for every config the dataclass accepts.

In the dataclass, "unlimited" is ``-1`` as in cache-dit. ``0`` is rejected for ``max_cached_steps`` and
``max_continuous_cached_steps`` because cache-dit reads it as "never cache" while the string form reads ``M0`` as
"unlimited"; a config that silently means two things is worse than an error.

Every numeric field is bounded when the config is built (string form and keyword construction alike), so a config
that is accepted cannot overflow a device counter, allocate without bound or run for hours:

==================================  ====================================================================
field                               allowed
==================================  ====================================================================
``Fn_compute_blocks``               ``1 .. MAX_BLOCKS`` (10 000; FLUX.1 has 57 blocks, Qwen-Image 60)
``Bn_compute_blocks``               ``0 .. MAX_BLOCKS``
``max_warmup_steps``                ``0 .. MAX_STEPS`` (1 000 000 denoising steps)
``warmup_interval``                 ``1 .. MAX_STEPS``
``max_cached_steps``                ``-1`` (unlimited) or ``1 .. MAX_STEPS``
``max_continuous_cached_steps``     ``-1`` (unlimited) or ``1 .. MAX_STEPS``
``taylorseer_order``                ``1 .. MAX_TAYLORSEER_ORDER`` (4; cache-dit recommends 1 or 2, every order
                                    keeps one more hidden-state-sized buffer per stream and CFG branch)
``residual_diff_threshold``         any finite number; ``<= 0`` never caches, ``>= 1`` caches every step the
                                    other gates allow (cache-dit's reading)
``steps_computation_mask``          ``None`` or ``1 .. MAX_STEPS`` entries, each ``0`` or ``1``
==================================  ====================================================================

Integer fields take Python or NumPy integers (never ``bool``); the threshold takes any real number but ``bool``;
``taylorseer`` and ``enable_separate_cfg`` take only ``True`` / ``False`` (Python or NumPy bools; the latter also
``None``). Values are normalized to plain Python types, so equal configs compare and hash equal.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
from typing import Any, Optional

__all__ = ["DBCacheConfig", "MAX_BLOCKS", "MAX_STEPS", "MAX_TAYLORSEER_ORDER"]

#: upper bound of ``Fn_compute_blocks`` / ``Bn_compute_blocks``
MAX_BLOCKS = 10_000
#: upper bound of every step count (warmup, interval, cached-step limits, mask length)
MAX_STEPS = 1_000_000
#: upper bound of ``taylorseer_order``
MAX_TAYLORSEER_ORDER = 4

_NUMBER = r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?"
_TOKEN = re.compile(r"(MC|CFG|SCM|[FBWIMTOR])(" + _NUMBER + ")")
_TOKEN_FIELD = {"F": "Fn_compute_blocks", "B": "Bn_compute_blocks", "W": "max_warmup_steps", "I": "warmup_interval",
                "M": "max_cached_steps", "MC": "max_continuous_cached_steps", "T": "taylorseer",
                "O": "taylorseer_order", "R": "residual_diff_threshold", "SCM": "steps_computation_mask",
                "CFG": "enable_separate_cfg"}
_GRAMMAR = ("F<int> B<int> W<int> I<int> M<int> MC<int> T<0|1> O<int> R<float> SCM<0/1 digits> CFG<0|1>, "
            "e.g. 'F8B0_W8M0MC0_T0O1_R0.08'")
# (field, lowest, highest, what it means); -1 is also allowed where ``unlimited`` is set
_INT_FIELDS = (
    ("Fn_compute_blocks", 1, MAX_BLOCKS, "the decision needs at least one computed block"),
    ("Bn_compute_blocks", 0, MAX_BLOCKS, "last blocks always computed"),
    ("max_warmup_steps", 0, MAX_STEPS, "steps range(0, W, I) always compute"),
    ("warmup_interval", 1, MAX_STEPS, "stride of the warmup steps"),
    ("max_cached_steps", 1, MAX_STEPS, "or -1 for unlimited; the string form writes unlimited as M0"),
    ("max_continuous_cached_steps", 1, MAX_STEPS, "or -1 for unlimited; the string form writes unlimited as MC0"),
    ("taylorseer_order", 1, MAX_TAYLORSEER_ORDER, "derivatives kept by TaylorSeer"),
)
_INT_RANGE = {name: (lo, hi) for name, lo, hi, _ in _INT_FIELDS}
_UNLIMITED = ("max_cached_steps", "max_continuous_cached_steps")


def _show(value: Any, limit: int = 60) -> str:
    """A short, never-failing description of a value for error messages (huge ints have no ``repr``)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
        if abs(number) >= 10 ** 18:  # str() of an int past 4300 digits raises
            digits = int(number.bit_length() * 0.30103) + 1
            return f"{'minus ' if number < 0 else ''}an integer of about {digits} digits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is described by its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_bool(value: Any) -> bool:
    """Python or NumPy bool (NumPy's ``bool_`` is no ``int`` subclass)."""
    return isinstance(value, bool) or (type(value).__name__ in ("bool_", "bool") and type(value).__module__ == "numpy")


def _as_int(name: str, value: Any, lo: int, hi: int, meaning: str) -> int:
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ValueError(f"DBCacheConfig.{name} must be an int in {lo}..{hi} ({meaning}), got {_show(value)} "
                         f"of type {type(value).__name__}")
    number = operator.index(value)
    if name in _UNLIMITED and number == -1:
        return number
    if not lo <= number <= hi:
        hint = " (cache-dit reads 0 as 'never cache', the string form M0/MC0 as unlimited)" if (
            name in _UNLIMITED and number == 0) else ""
        raise ValueError(f"DBCacheConfig.{name} must be in {lo}..{hi} ({meaning}), got {_show(number)}{hint}")
    return number


def _as_mask(value: Any) -> tuple[int, ...]:
    name = "DBCacheConfig.steps_computation_mask"
    if hasattr(value, "ndim") and hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        if value.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {tuple(getattr(value, 'shape', ()))}")
        value = value.tolist()
    if not isinstance(value, (list, tuple, range)):
        raise ValueError(f"{name} must be None or a list/tuple of 0 and 1 (1 = must compute), got {_show(value)} "
                         f"of type {type(value).__name__}")
    if not 1 <= len(value) <= MAX_STEPS:
        raise ValueError(f"{name} must have 1..{MAX_STEPS} entries, got {len(value)} (an empty mask would only "
                         f"disable warmup: use max_warmup_steps=0 and no mask)")
    mask = []
    for i, m in enumerate(value):
        if _is_bool(m) or not isinstance(m, numbers.Integral) or m not in (0, 1):
            raise ValueError(f"{name} must hold only the ints 0 and 1, got {_show(m)} of type {type(m).__name__} "
                             f"at index {i}")
        mask.append(int(m))
    return tuple(mask)


@dataclasses.dataclass(frozen=True)
class DBCacheConfig:
    """Dual Block Cache settings. Field names follow ``cache_dit.DBCacheConfig`` so a migration is an import swap
    (or pass cache-dit's own config object: :meth:`coerce` / :meth:`from_cache_dit` convert it).

    Every field is checked and bounded here (ranges in the module docstring: blocks ``<= MAX_BLOCKS``, step counts
    ``<= MAX_STEPS``, ``taylorseer_order`` in ``1..MAX_TAYLORSEER_ORDER``); a bad value raises ``ValueError`` naming
    the field and the allowed range.

    Args:
        Fn_compute_blocks: first blocks run on every step; their hidden-stream residual is compared across steps.
        Bn_compute_blocks: last blocks run on every step (they refine the cached approximation).
        residual_diff_threshold: a step is cached when ``mean|r_prev - r| / mean|r_prev| < threshold``.
            ``<= 0`` never caches; ``>= 1`` caches every step the other gates allow, without computing a diff.
        max_warmup_steps: steps ``range(0, max_warmup_steps, warmup_interval)`` always compute.
        warmup_interval: stride of the warmup set (>= 1).
        max_cached_steps: at most this many cached steps per generation and CFG branch; ``-1`` = unlimited.
        max_continuous_cached_steps: at most this many cached steps in a row; ``-1`` = unlimited.
        enable_separate_cfg: ``None``: one cache state per cache context the pipeline enters (``"cond"``,
            ``"uncond"``, ...), so separate CFG is whatever the pipeline does; ``True``: the same, and calls made
            outside any context alternate between ``cond`` and ``uncond`` (cache-dit's even/odd rule); ``False``: one
            state for every call (each call a step, as cache-dit counts without separate CFG).
        taylorseer: forecast the cached middle residual with a Taylor series over compute steps.
        taylorseer_order: number of derivatives kept by TaylorSeer (1 or 2 in practice, at most 4).
        steps_computation_mask: optional per-step list, ``1`` = must compute, ``0`` = may cache (dynamic policy).
    """

    Fn_compute_blocks: int = 8
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    enable_separate_cfg: Optional[bool] = None
    taylorseer: bool = False
    taylorseer_order: int = 1
    steps_computation_mask: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        for name, lo, hi, meaning in _INT_FIELDS:
            object.__setattr__(self, name, _as_int(name, getattr(self, name), lo, hi, meaning))
        threshold = self.residual_diff_threshold
        if _is_bool(threshold) or not isinstance(threshold, numbers.Real):
            raise ValueError(f"DBCacheConfig.residual_diff_threshold must be a finite number, got {_show(threshold)} "
                             f"of type {type(threshold).__name__}")
        try:
            value = float(threshold)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ValueError(f"DBCacheConfig.residual_diff_threshold must be a finite number (<= 0 never caches, "
                             f">= 1 always caches), got {_show(threshold)}")
        object.__setattr__(self, "residual_diff_threshold", value)
        for name, allow_none in (("enable_separate_cfg", True), ("taylorseer", False)):
            flag = getattr(self, name)
            if not (_is_bool(flag) or (allow_none and flag is None)):
                raise ValueError(f"DBCacheConfig.{name} must be {'None, ' if allow_none else ''}True or False, "
                                 f"got {_show(flag)} of type {type(flag).__name__}")
            object.__setattr__(self, name, None if flag is None else bool(flag))
        if self.steps_computation_mask is not None:
            object.__setattr__(self, "steps_computation_mask", _as_mask(self.steps_computation_mask))

    @property
    def taylorseer_terms(self) -> int:
        """Number of Taylor ladder entries kept per stream: 1 (the residual itself) without TaylorSeer."""
        return self.taylorseer_order + 1 if self.taylorseer else 1

    @classmethod
    def from_string(cls, text: str, **overrides) -> "DBCacheConfig":
        """Parse the compact notation, e.g. ``"F8B0_W8M0MC0_T0O1_R0.08"`` or ``"F1B0_W4I2MC2_R0.2"``.

        Tokens may come in any order and grouping; each at most once; at least one token. Missing tokens take the
        dataclass defaults except ``M``/``MC`` (absent = unlimited). ``overrides`` set fields (and win over tokens),
        e.g. ``enable_separate_cfg``. Errors are ``ValueError`` naming the token and its field.
        """
        if not isinstance(text, str):
            raise TypeError(f"cache config must be a string like 'F1B0_W4MC2_R0.2', got {type(text).__name__}")
        shown = _show(text)
        if not text.strip():
            raise ValueError(f"cache config string must be a non-empty string of tokens {_GRAMMAR}, got {shown}")
        values: dict[str, str] = {}
        for group in text.strip().split("_"):
            pos = 0
            while pos < len(group):
                match = _TOKEN.match(group, pos)
                if match is None:
                    raise ValueError(f"unknown token {_show(group[pos:], 30)} in cache config {shown}; expected "
                                     f"tokens {_GRAMMAR}")
                key, number = match.groups()
                if key in values:
                    raise ValueError(f"token {key!r} ({_TOKEN_FIELD[key]}) appears twice in cache config {shown}")
                values[key] = number
                pos = match.end()
        if not values:
            raise ValueError(f"cache config {shown} has no tokens; expected tokens {_GRAMMAR}")

        def as_int(key: str) -> int:
            number = values[key]
            if not number.isdigit():
                raise ValueError(f"token {key} ({_TOKEN_FIELD[key]}) in cache config {shown} needs an integer >= 0, "
                                 f"got {_show(number, 30)}")
            digits = number.lstrip("0")
            if len(digits) > 18:  # int() of a huge digit string is slow (and fails past 4300 digits)
                lo, hi = _INT_RANGE[_TOKEN_FIELD[key]]
                allowed = f"0..{hi} (0 = unlimited)" if key in ("M", "MC") else f"{lo}..{hi}"
                raise ValueError(f"DBCacheConfig.{_TOKEN_FIELD[key]} (token {key}) must be in {allowed}, got an "
                                 f"integer of {len(digits)} digits (cache config {shown})")
            return int(digits or "0")  # without the leading zeros: int() refuses strings past 4300 characters

        def as_flag(key: str) -> bool:
            number = values[key]
            if number not in ("0", "1"):
                raise ValueError(f"token {key} ({_TOKEN_FIELD[key]}) in cache config {shown} must be {key}0 or "
                                 f"{key}1, got {key}{number[:30]}")
            return number == "1"

        fields: dict = {}
        for key in ("F", "B", "W", "I", "O"):
            if key in values:
                fields[_TOKEN_FIELD[key]] = as_int(key)
        for key in ("M", "MC"):
            fields[_TOKEN_FIELD[key]] = (as_int(key) or -1) if key in values else -1
        for key in ("T", "CFG"):
            if key in values:
                fields[_TOKEN_FIELD[key]] = as_flag(key)
        if "R" in values:
            fields["residual_diff_threshold"] = float(values["R"])
        if "SCM" in values:
            bits = values["SCM"]
            if bits.strip("01"):
                raise ValueError(f"token SCM (steps_computation_mask) in cache config {shown} needs 0/1 digits "
                                 f"(1 = must compute), got {_show(bits, 30)}")
            fields["steps_computation_mask"] = tuple(map(int, bits))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown DBCacheConfig fields {sorted(unknown)}")
        fields.update(overrides)
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"{err} (cache config {shown})") from None

    def __str__(self) -> str:
        interval = f"I{self.warmup_interval}" if self.warmup_interval != 1 else ""
        text = (f"F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}_"
                f"W{self.max_warmup_steps}{interval}M{max(0, self.max_cached_steps)}"
                f"MC{max(0, self.max_continuous_cached_steps)}_"
                f"T{int(self.taylorseer)}O{self.taylorseer_order}_R{self.residual_diff_threshold!r}")
        if self.steps_computation_mask is not None:
            text += "_SCM" + "".join(map(str, self.steps_computation_mask))
        if self.enable_separate_cfg is not None:
            text += f"_CFG{int(self.enable_separate_cfg)}"
        return text

    def validate_for(self, num_blocks: int, model: str = "model") -> None:
        """Raise ``ValueError`` unless ``Fn + Bn <= num_blocks`` for the model the cache is applied to."""
        if self.Fn_compute_blocks + self.Bn_compute_blocks > num_blocks:
            raise ValueError(
                f"Fn_compute_blocks + Bn_compute_blocks = {self.Fn_compute_blocks} + {self.Bn_compute_blocks} "
                f"exceeds the {num_blocks} transformer blocks of {model}; lower F or B in the cache config")

    @classmethod
    def from_cache_dit(cls, config: Any, calibrator_config: Any = None) -> "DBCacheConfig":
        """Convert cache-dit's ``cache_dit.DBCacheConfig`` (and optionally its ``TaylorSeerCalibratorConfig``).

        Fields map by name; cache-dit's negative ``max_cached_steps`` / ``max_continuous_cached_steps`` (unlimited)
        become ``-1``. ``num_inference_steps`` is not needed: pipelines start a new generation at every call (call
        :func:`dbcache_compile.reset` between generations when you drive a bare transformer). Settings this library
        does not implement raise ``ValueError`` naming the field: ``cache_type`` other than DBCache,
        ``max_accumulated_residual_diff_threshold``, ``cfg_compute_first=True``, ``cfg_diff_compute_separate=False``,
        ``steps_computation_policy='static'`` with a mask, ``force_refresh_step_hint``, and ``0`` for the cached-step
        limits (cache-dit's "never cache"; use ``residual_diff_threshold=0``).
        """
        if not _is_cache_dit_config(config):
            raise TypeError(f"from_cache_dit needs a cache_dit.DBCacheConfig, got {_qualname(config)}")
        where = "cache_dit.DBCacheConfig"

        def get(name: str, default: Any = None) -> Any:
            return getattr(config, name, default)

        cache_type = get("cache_type")
        if cache_type is not None and str(getattr(cache_type, "value", cache_type)) != "DBCache":
            raise ValueError(f"{where}.cache_type={cache_type!s} is not supported: dbcache_compile implements "
                             f"DBCache only")
        accumulated = get("max_accumulated_residual_diff_threshold")
        unsupported = {
            "max_accumulated_residual_diff_threshold": accumulated is not None and accumulated > 0,
            "cfg_compute_first": bool(get("cfg_compute_first", False)),
            "cfg_diff_compute_separate": not get("cfg_diff_compute_separate", True),
            "steps_computation_policy": (get("steps_computation_mask") is not None
                                         and get("steps_computation_policy", "dynamic") != "dynamic"),
            "force_refresh_step_hint": get("force_refresh_step_hint") is not None,
        }
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(f"{where}.{name}={_show(get(name))} is not supported by dbcache_compile; leave it at "
                                 f"cache-dit's default to convert the config")
        fields: dict[str, Any] = {}
        for name in ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps", "warmup_interval",
                     "enable_separate_cfg", "steps_computation_mask"):
            fields[name] = get(name)
        for name in _UNLIMITED:
            value = get(name)
            if isinstance(value, numbers.Integral) and not _is_bool(value):
                if value == 0:
                    raise ValueError(f"{where}.{name}=0 means 'never cache' in cache-dit; dbcache_compile rejects 0 "
                                     f"(its string form reads M0/MC0 as unlimited): use residual_diff_threshold=0 "
                                     f"to never cache, or -1 for unlimited")
                value = -1 if value < 0 else value
            fields[name] = value
        threshold = get("residual_diff_threshold")
        if hasattr(threshold, "numel") and hasattr(threshold, "item"):  # cache-dit allows a one-element tensor
            if threshold.numel() != 1:
                raise ValueError(f"{where}.residual_diff_threshold must be a number or a one-element tensor, got "
                                 f"shape {tuple(threshold.shape)}")
            threshold = threshold.item()
        fields["residual_diff_threshold"] = threshold
        if calibrator_config is not None:
            fields.update(_taylorseer_fields(calibrator_config))
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"{err} (converting {where})") from None

    @classmethod
    def coerce(cls, cache: Any) -> "DBCacheConfig":
        """Accept a config object, its string form, cache-dit's ``cache_dit.DBCacheConfig`` (converted by
        :meth:`from_cache_dit`; pass TaylorSeer there, or ``taylorseer=True`` here, as cache-dit keeps it in a
        separate calibrator config), or the path of a calibration JSON (a ``str`` ending in ``.json`` or a path
        object: its ``"config"`` entry, as :func:`dbcache_compile.calibrate` and ``python -m dbcache_compile
        calibrate`` write it)."""
        import json
        import os

        if isinstance(cache, cls):
            return cache
        if isinstance(cache, os.PathLike) or (isinstance(cache, str) and cache.strip().lower().endswith(".json")):
            path = os.fspath(cache)
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"cache={path!r}: no such calibration file (python -m dbcache_compile "
                                        f"calibrate or CalibrationResult.save() writes one)") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"cache={path!r} is not a calibration JSON file: {err}") from None
            text = data.get("config") if isinstance(data, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"cache={path!r}: a calibration JSON needs a \"config\" string such as "
                                 f"\"F1B0_W4MC2_R0.2\", got {_show(text)}")
            try:
                return cls.from_string(text)
            except ValueError as err:
                raise ValueError(f"{err} (read from {path!r})") from None
        if isinstance(cache, str):
            return cls.from_string(cache)
        if _is_cache_dit_config(cache):
            return cls.from_cache_dit(cache)
        raise TypeError(f"cache must be a dbcache_compile.DBCacheConfig, cache-dit's cache_dit.DBCacheConfig or a "
                        f"config string like 'F1B0_W4MC2_R0.2' (or the path of a calibration JSON), got "
                        f"{_qualname(cache)}")


def _qualname(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _is_cache_dit_config(value: Any) -> bool:
    """A cache-dit ``BasicCacheConfig`` (its ``DBCacheConfig`` and subclasses), recognized without importing it."""
    return any(k.__name__ == "BasicCacheConfig" and k.__module__.startswith("cache_dit.") for k in type(value).__mro__)


def _taylorseer_fields(calibrator: Any) -> dict[str, Any]:
    """``taylorseer`` / ``taylorseer_order`` from cache-dit's ``TaylorSeerCalibratorConfig``."""
    kinds = [k.__name__ for k in type(calibrator).__mro__ if k.__module__.startswith("cache_dit.")]
    if "TaylorSeerCalibratorConfig" not in kinds:
        raise ValueError(f"calibrator_config must be cache-dit's TaylorSeerCalibratorConfig (the only calibrator "
                         f"dbcache_compile implements), got {_qualname(calibrator)}")
    enabled = bool(getattr(calibrator, "enable_calibrator", True))
    if enabled != bool(getattr(calibrator, "enable_encoder_calibrator", True)):
        raise ValueError("TaylorSeerCalibratorConfig.enable_calibrator and enable_encoder_calibrator must be equal: "
                         "dbcache_compile forecasts both streams or neither")
    return {"taylorseer": enabled, "taylorseer_order": getattr(calibrator, "taylorseer_order", 1)}
