"""DBCache configuration: the dataclass (cache-dit field names) and its compact string form.

The string form is the notation of cache-dit's benchmark tables, e.g. ``F8B0_W8M0MC0_T0O1_R0.08``:

======  ==========================================================================
token   meaning
======  ==========================================================================
``F``   ``Fn_compute_blocks``: first blocks always computed (their residual drives the decision)
``B``   ``Bn_compute_blocks``: last blocks always computed
``W``   ``max_warmup_steps``: steps ``range(0, W, I)`` always compute
``I``   ``warmup_interval`` (optional, default 1)
``M``   ``max_cached_steps`` (``M0`` or absent = unlimited)
``MC``  ``max_continuous_cached_steps`` (``MC0`` or absent = unlimited)
``T``   TaylorSeer on (1) / off (0)
``O``   TaylorSeer order (default 1)
``R``   ``residual_diff_threshold``
======  ==========================================================================

In the dataclass, "unlimited" is ``-1`` as in cache-dit. ``0`` is rejected for ``max_cached_steps`` and
``max_continuous_cached_steps`` because cache-dit reads it as "never cache" while the string form reads ``M0`` as
"unlimited"; a config that silently means two things is worse than an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

__all__ = ["DBCacheConfig"]

_TOKEN = re.compile(r"(MC|[FBWIMTOR])([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)")


@dataclasses.dataclass(frozen=True)
class DBCacheConfig:
    """Dual Block Cache settings. Field names follow ``cache_dit.DBCacheConfig`` so a migration is an import swap.

    Args:
        Fn_compute_blocks: first blocks run on every step; their hidden-stream residual is compared across steps.
        Bn_compute_blocks: last blocks run on every step (they refine the cached approximation).
        residual_diff_threshold: a step is cached when ``mean|r_prev - r| / mean|r_prev| < threshold``.
            ``<= 0`` never caches; ``>= 1`` caches every step the other gates allow, without computing a diff.
        max_warmup_steps: steps ``range(0, max_warmup_steps, warmup_interval)`` always compute.
        warmup_interval: stride of the warmup set (>= 1).
        max_cached_steps: at most this many cached steps per generation and CFG branch; ``-1`` = unlimited.
        max_continuous_cached_steps: at most this many cached steps in a row; ``-1`` = unlimited.
        enable_separate_cfg: ``None`` lets the model adapter decide per call (Qwen-Image with true CFG: yes);
            ``True``/``False`` force it. With separate CFG, even transformer calls are the conditional branch and odd
            calls the unconditional one, each with its own cache state.
        taylorseer: forecast the cached middle residual with a Taylor series over compute steps.
        taylorseer_order: number of derivatives kept by TaylorSeer (1 or 2 in practice).
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
        ints = ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps", "warmup_interval",
                "max_cached_steps", "max_continuous_cached_steps", "taylorseer_order")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"DBCacheConfig.{name} must be an int, got {value!r}")
        if self.Fn_compute_blocks < 1:
            raise ValueError(f"DBCacheConfig.Fn_compute_blocks must be >= 1 (the decision needs at least one "
                             f"computed block), got {self.Fn_compute_blocks}")
        if self.Bn_compute_blocks < 0:
            raise ValueError(f"DBCacheConfig.Bn_compute_blocks must be >= 0, got {self.Bn_compute_blocks}")
        if self.max_warmup_steps < 0:
            raise ValueError(f"DBCacheConfig.max_warmup_steps must be >= 0, got {self.max_warmup_steps}")
        if self.warmup_interval < 1:
            raise ValueError(f"DBCacheConfig.warmup_interval must be >= 1, got {self.warmup_interval}")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise ValueError(f"DBCacheConfig.{name} must be -1 (unlimited) or >= 1, got {value} "
                                 f"(the string form writes unlimited as 0, the dataclass as -1)")
        threshold = self.residual_diff_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"DBCacheConfig.residual_diff_threshold must be a finite number, got {threshold!r}")
        object.__setattr__(self, "residual_diff_threshold", float(threshold))
        if self.enable_separate_cfg not in (None, True, False):
            raise ValueError(f"DBCacheConfig.enable_separate_cfg must be None, True or False, "
                             f"got {self.enable_separate_cfg!r}")
        if not isinstance(self.taylorseer, bool):
            raise ValueError(f"DBCacheConfig.taylorseer must be a bool, got {self.taylorseer!r}")
        if self.taylorseer_order < 1:
            raise ValueError(f"DBCacheConfig.taylorseer_order must be >= 1, got {self.taylorseer_order}")
        if self.steps_computation_mask is not None:
            mask = tuple(self.steps_computation_mask)
            if any(m not in (0, 1) for m in mask):
                raise ValueError(f"DBCacheConfig.steps_computation_mask must hold only 0 and 1, got {mask}")
            object.__setattr__(self, "steps_computation_mask", mask)

    @property
    def taylorseer_terms(self) -> int:
        """Number of Taylor ladder entries kept per stream: 1 (the residual itself) without TaylorSeer."""
        return self.taylorseer_order + 1 if self.taylorseer else 1

    @classmethod
    def from_string(cls, text: str, **overrides) -> "DBCacheConfig":
        """Parse the compact notation, e.g. ``"F8B0_W8M0MC0_T0O1_R0.08"`` or ``"F1B0_W4I2MC2_R0.2"``.

        Tokens may come in any order and grouping; each at most once. Missing tokens take the dataclass defaults
        except ``M``/``MC`` (absent = unlimited). ``overrides`` set other fields (e.g. ``enable_separate_cfg``).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"cache config string must be a non-empty string, got {text!r}")
        values: dict[str, str] = {}
        for group in text.strip().split("_"):
            pos = 0
            while pos < len(group):
                match = _TOKEN.match(group, pos)
                if match is None:
                    raise ValueError(
                        f"unknown token {group[pos:]!r} in cache config {text!r}; expected tokens "
                        f"F<int> B<int> W<int> I<int> M<int> MC<int> T<0|1> O<int> R<float>, "
                        f"e.g. 'F8B0_W8M0MC0_T0O1_R0.08'")
                key, number = match.groups()
                if key in values:
                    raise ValueError(f"token {key!r} appears twice in cache config {text!r}")
                values[key] = number
                pos = match.end()

        def as_int(key: str) -> int:
            number = values[key]
            if not number.isdigit():
                raise ValueError(f"token {key} in cache config {text!r} needs an integer, got {number!r}")
            return int(number)

        fields: dict = {}
        if "F" in values:
            fields["Fn_compute_blocks"] = as_int("F")
        if "B" in values:
            fields["Bn_compute_blocks"] = as_int("B")
        if "W" in values:
            fields["max_warmup_steps"] = as_int("W")
        if "I" in values:
            fields["warmup_interval"] = as_int("I")
        fields["max_cached_steps"] = as_int("M") or -1 if "M" in values else -1
        fields["max_continuous_cached_steps"] = as_int("MC") or -1 if "MC" in values else -1
        if "T" in values:
            t = as_int("T")
            if t not in (0, 1):
                raise ValueError(f"token T in cache config {text!r} must be T0 or T1, got T{t}")
            fields["taylorseer"] = bool(t)
        if "O" in values:
            fields["taylorseer_order"] = as_int("O")
        if "R" in values:
            fields["residual_diff_threshold"] = float(values["R"])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown DBCacheConfig fields {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    def __str__(self) -> str:
        interval = f"I{self.warmup_interval}" if self.warmup_interval != 1 else ""
        return (f"F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}_"
                f"W{self.max_warmup_steps}{interval}M{max(0, self.max_cached_steps)}"
                f"MC{max(0, self.max_continuous_cached_steps)}_"
                f"T{int(self.taylorseer)}O{self.taylorseer_order}_R{self.residual_diff_threshold!r}")

    def validate_for(self, num_blocks: int, model: str = "model") -> None:
        """Raise ``ValueError`` unless ``Fn + Bn <= num_blocks`` for the model the cache is applied to."""
        if self.Fn_compute_blocks + self.Bn_compute_blocks > num_blocks:
            raise ValueError(
                f"Fn_compute_blocks + Bn_compute_blocks = {self.Fn_compute_blocks} + {self.Bn_compute_blocks} "
                f"exceeds the {num_blocks} transformer blocks of {model}; lower F or B in the cache config")

    @classmethod
    def coerce(cls, cache: "DBCacheConfig | str") -> "DBCacheConfig":
        """Accept a config object or its string form."""
        if isinstance(cache, cls):
            return cache
        if isinstance(cache, str):
            return cls.from_string(cache)
        raise TypeError(f"cache must be a DBCacheConfig or a config string like 'F1B0_W4MC2_R0.2', "
                        f"got {type(cache).__name__}")
