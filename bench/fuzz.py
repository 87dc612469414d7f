"""``python -m bench fuzz``: fuzzed cache configs through every lowering on the tiny FLUX pipeline; each run must end
in success or in a clear error naming the config field or token (issue #26).

    python -m bench fuzz --count 1500 --seed 0 --out bench/results/fuzz-cpu-2026-12-06     # Inductor, all lowerings
    python -m bench fuzz --count 40 --lowerings eager,cond --backend aot_eager --out out/fuzz

**Configs** (:func:`draw_cases`, deterministic for a seed): most are valid strings in one of a few block groups
(:data:`GROUPS`: Fn / Bn / TaylorSeer order, e.g. ``F3`` reaching into the tiny FLUX's single blocks), with fuzzed
thresholds (negative, 0, around 1, above 1), warm-up and interval, cached-step limits, steps masks (shorter and
longer than the generation), ``CFG0/1``, tokens in any order and grouping; the rest are out of range (a token
corrupted: ``F0``, ``O5``, ``I0``, ``W-1``, 5,000 leading zeros, ``R1e999``, Fn + Bn beyond the model's 8 blocks, a
token twice, ...) or garbage. Each config is called with its own number of steps (1-12) and, for a quarter of them,
true CFG (two cache contexts per step).

**Runs.** ``eager`` optimizes afresh per config (the reference). A compiled lowering optimizes once per group and
swaps each later config in with ``runtime_of(pipe).reconfigure(config)``: the group's graphs are compiled once and
reused (a recompile after the group's first generation is a failure). Configs that do not parse or do not fit the
model are passed to ``optimize`` on a pipeline never optimized, for every lowering.

**Outcome** of each (config, lowering): ``ok`` (the generation ran, finite images; compiled runs also record whether
their cached steps equal the eager run's), ``clear_error`` (``ValueError`` / ``NotImplementedError`` whose message
names a :class:`~dbcache_compile.DBCacheConfig` field or a config token) or ``failure`` (anything else: an error from
Dynamo / Inductor / a shape, an unnamed error, a recompile, non-finite images). Writes ``results.md`` /
``results.json`` (every run, folded per config: :func:`per_config`) under ``--out``; exit status 1 when anything
failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["GROUPS", "LOWERINGS", "Case", "draw_cases", "classify", "run_fuzz", "per_config", "configure", "validate",
           "execute"]

#: block groups of the valid configs: (Fn, Bn, TaylorSeer order, 0 = off); the tiny FLUX has 2 double + 6 single
#: blocks, so F3 ends in a single block (the cond lowering's aliasing case)
GROUPS: tuple[tuple[int, int, int], ...] = ((1, 0, 0), (3, 0, 0), (2, 1, 1), (1, 2, 2))
LOWERINGS = ("eager", "segments", "regional", "cond")
BACKENDS = ("inductor", "aot_eager", "eager")
TOKENS = ("F", "B", "W", "I", "M", "MC", "T", "O", "R", "SCM", "CFG")
#: share of valid / out-of-range / garbage configs
KINDS = (("valid", 0.72), ("out_of_range", 0.18), ("garbage", 0.10))
CLEAR_ERRORS = (ValueError, NotImplementedError)


@dataclasses.dataclass
class Case:
    """One fuzzed config and the call it is run with."""

    index: int
    text: str
    kind: str  # valid / out_of_range / garbage (how it was drawn; the outcome decides what it is)
    steps: int
    true_cfg: bool
    group: Optional[tuple[int, int, int]] = None  # set when the config parses and fits the model


def _threshold(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(["0", "0.0", "-0.5", "-1", "1", "1.0", "0.999", "1.0001", "2", "5e-1", "1e-3", "0.5"])
    value = rng.uniform(-0.1, 1.3)
    return rng.choice([f"{value:.{rng.randint(1, 5)}f}", repr(value)])


def _valid_tokens(rng: random.Random, group: tuple[int, int, int]) -> dict[str, str]:
    fn, bn, order = group
    tokens = {"F": str(fn), "B": str(bn)}
    if order:
        tokens.update(T="1", O=str(order))
    else:
        if rng.random() < 0.5:
            tokens["T"] = "0"
        if rng.random() < 0.4:
            tokens["O"] = str(rng.randint(1, 4))  # an order without TaylorSeer changes nothing
    if rng.random() < 0.9:
        tokens["W"] = str(rng.choice([0, 0, 1, 2, 2, 3, 4, 6, 10, 1000]))
    if rng.random() < 0.3:
        tokens["I"] = str(rng.choice([1, 2, 3, 5]))
    if rng.random() < 0.5:
        tokens["M"] = str(rng.choice([0, 1, 2, 3, 5, 8]))
    if rng.random() < 0.6:
        tokens["MC"] = str(rng.choice([0, 1, 2, 3, 4]))
    if rng.random() < 0.95:
        tokens["R"] = _threshold(rng)
    if rng.random() < 0.35:
        tokens["SCM"] = "".join(rng.choice("01") for _ in range(rng.randint(1, 14)))
    if rng.random() < 0.25:
        tokens["CFG"] = rng.choice("01")
    return tokens


def _join(rng: random.Random, tokens: dict[str, str]) -> str:
    keys = list(tokens)
    if rng.random() < 0.5:
        rng.shuffle(keys)
    return "".join(k + tokens[k] + rng.choice(["", "_", "_"]) for k in keys).rstrip("_")


def _corrupt(rng: random.Random, tokens: dict[str, str]) -> dict[str, str]:
    """One token out of its range or malformed."""
    tokens = dict(tokens)
    key, value = rng.choice([
        ("F", "0"), ("F", "9"), ("F", "6"), ("B", "8"), ("B", "-1"), ("W", "-1"), ("W", "2.5"), ("I", "0"),
        ("I", "1000001"), ("M", "1000001"), ("MC", "99999999999999999999"), ("T", "2"), ("O", "5"), ("O", "0"),
        ("R", "1e999"), ("R", "-1e999"), ("SCM", "0120"), ("SCM", "1.5"), ("CFG", "2"), ("F", "0" * 5000 + "1"),
        ("W", "0" * 5000 + "1000001"), ("R", ""), ("SCM", ""), ("F", "1" + "0" * 30)])
    if key == "F" and value == "6":
        tokens["B"] = str(rng.randint(3, 6))  # Fn + Bn beyond the tiny model's 8 blocks
    if key == "O" and tokens.get("T") != "1":
        tokens["T"] = "1"
    tokens[key] = value
    return tokens


def _twice(rng: random.Random, tokens: dict[str, str]) -> str:
    """A valid config with one of its tokens written a second time."""
    key = rng.choice(list(tokens))
    return _join(rng, tokens) + "_" + key + tokens[key]


def _garbage(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 6)):
        roll = rng.random()
        if roll < 0.6:
            parts.append(rng.choice(TOKENS) + rng.choice(["", "1", "0.2", "-3", "x", "1e5", "01", "nan", "inf"]))
        elif roll < 0.8:
            parts.append("".join(rng.choice("xQ _-+.eEC9\t") for _ in range(rng.randint(1, 4))))
        else:
            parts.append(rng.choice(["F1B0_W4MC2_R0.2", "fn1", "F1 B0", "R0,2", "F1;B0", "F١", "ＦＦ1"]))
        parts.append(rng.choice(["", "_", "__"]))
    return "".join(parts)


def group_of(text: str, num_blocks: int) -> Optional[tuple[int, int, int]]:
    """``(Fn, Bn, TaylorSeer order or 0)`` of a config that parses and fits a model of ``num_blocks``, else None."""
    from dbcache_compile import DBCacheConfig
    try:
        cfg = DBCacheConfig.from_string(text)
        cfg.validate_for(num_blocks)
    except (ValueError, TypeError):
        return None
    return cfg.Fn_compute_blocks, cfg.Bn_compute_blocks, cfg.taylorseer_order if cfg.taylorseer else 0


def draw_cases(count: int, seed: int, groups: tuple = GROUPS, num_blocks: int = 8) -> list[Case]:
    """``count`` cases, the same for the same seed and groups. A config that parses, fits the model and falls
    outside ``groups`` (a corruption that stayed valid) is drawn again, so that every valid config reuses one of the
    groups' graphs."""
    rng = random.Random(seed)
    cases: list[Case] = []
    while len(cases) < count:
        roll, kind = rng.random(), KINDS[-1][0]
        for name, share in KINDS:
            if roll < share:
                kind = name
                break
            roll -= share
        group = rng.choice(groups)
        if kind == "valid":
            text = _join(rng, _valid_tokens(rng, group))
        elif kind == "out_of_range":
            tokens = _valid_tokens(rng, group)
            text = _twice(rng, tokens) if rng.random() < 0.15 else _join(rng, _corrupt(rng, tokens))
        else:
            text = _garbage(rng)
        steps, true_cfg = rng.randint(1, 12), rng.random() < 0.25
        found = group_of(text, num_blocks)
        if found is not None and found not in groups:
            continue
        cases.append(Case(len(cases), text, kind, steps, true_cfg, found))
    return cases


_FIELDS: Optional[tuple[str, ...]] = None


def names_config(message: str) -> bool:
    """Whether an error message names a :class:`DBCacheConfig` field or a config token (``token 'W'``, ``unknown
    token``, ``has no tokens``...)."""
    global _FIELDS
    if _FIELDS is None:
        from dbcache_compile import DBCacheConfig
        _FIELDS = tuple(f.name for f in dataclasses.fields(DBCacheConfig))
    return any(name in message for name in _FIELDS) or re.search(r"\btokens?\b", message) is not None


def classify(error: BaseException) -> str:
    """``clear_error`` for a ``ValueError`` / ``NotImplementedError`` naming a config field or token, else
    ``failure``."""
    return "clear_error" if isinstance(error, CLEAR_ERRORS) and names_config(str(error)) else "failure"


def _inputs(case: Case) -> dict[str, Any]:
    from dbcache_compile.testing import flux_inputs
    kwargs = dict(flux_inputs(), num_inference_steps=case.steps)
    if case.true_cfg:
        negative = flux_inputs(seed=7)
        kwargs.update(negative_prompt_embeds=negative["prompt_embeds"],
                      negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=4.0)
    return kwargs


class _Compiles:
    """Dynamo compile ids seen (a compile-start callback): ``n/k`` with ``k > 0`` is a recompile of frame ``n``."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, args: Any) -> None:
        self.ids.append(str(args.compile_id))

    @staticmethod
    def recompiles(ids: list[str]) -> list[str]:
        from .soak import Soak
        return [i for i in ids if Soak.is_recompile(i)]


def run_fuzz(count: int, seed: int = 0, lowerings: tuple[str, ...] = LOWERINGS, backend: str = "inductor",
             groups: tuple = GROUPS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Draw ``count`` cases and run each through ``lowerings`` (module doc). Returns ``{"records": [...],
    "counts": {lowering: {outcome: n}}, "failures": [...], "disagreements": [...], "compile_s": {...}, ...}``."""
    import torch

    import dbcache_compile as dbc
    from dbcache_compile.testing import FLUX_BLOCKS, tiny_flux_pipeline

    cases = draw_cases(count, seed, groups, FLUX_BLOCKS)
    pipe, probe = tiny_flux_pipeline(seed), tiny_flux_pipeline(seed)
    options = {} if backend == "inductor" else {"backend": backend}
    records: list[dict[str, Any]] = []
    eager_steps: dict[int, Any] = {}
    compile_s: dict[str, float] = {}
    compiles = _Compiles()
    torch._dynamo.callback_handler.register_start_callback(compiles)

    def record(case: Case, lowering: str, outcome: str, started: float, **extra: Any) -> dict[str, Any]:
        row = {"index": case.index, "config": case.text if len(case.text) <= 200 else case.text[:197] + "...",
               "kind": case.kind, "group": case.group, "steps": case.steps, "true_cfg": case.true_cfg,
               "lowering": lowering, "outcome": outcome, "seconds": round(time.perf_counter() - started, 3), **extra}
        records.append(row)
        return row

    def error_record(case: Case, lowering: str, error: BaseException, started: float) -> None:
        outcome = classify(error)
        detail = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        if outcome == "failure":
            detail["traceback"] = "".join(traceback.format_exception(error))[-2000:]
        record(case, lowering, outcome, started, **detail)

    def generate(case: Case, lowering: str, started: float, ids_before: int, check_recompiles: bool) -> None:
        images = pipe(**_inputs(case), generator=torch.Generator().manual_seed(case.index)).images
        summary = dbc.summary(pipe)
        steps = {"cond": summary.cached_steps, "uncond": summary.cfg_cached_steps}
        if not bool(torch.isfinite(images).all()):
            record(case, lowering, "failure", started, error="non-finite images", cached_steps=steps)
            return
        recompiled = _Compiles.recompiles(compiles.ids[ids_before:]) if check_recompiles else []
        if recompiled:
            record(case, lowering, "failure", started, error=f"recompiled: {recompiled}", cached_steps=steps)
            return
        extra: dict[str, Any] = {"cached_steps": steps}
        if lowering == "eager":
            eager_steps[case.index] = steps
        elif case.index in eager_steps:
            extra["agrees_with_eager"] = steps == eager_steps[case.index]
        record(case, lowering, "ok", started, **extra)

    try:
        # configs that do not parse or do not fit the model: optimize() must refuse them, naming the field
        for case in (c for c in cases if c.group is None):
            for lowering in lowerings:
                started = time.perf_counter()
                mode = None if lowering == "eager" else "default"
                try:
                    dbc.optimize(probe, cache=case.text, mode=mode, graph="auto" if mode is None else lowering,
                                 compile_options=None if mode is None else options)
                except Exception as error:  # noqa: BLE001 - every outcome is recorded
                    error_record(case, lowering, error, started)
                    continue
                dbc.disable(probe)
                record(case, lowering, "failure", started, error="optimize() accepted a config that from_string or "
                                                                  "validate_for refused")
        for group in groups:
            members = [c for c in cases if c.group == group]
            if not members:
                continue
            log(f"[fuzz] group F{group[0]}B{group[1]} order {group[2]}: {len(members)} configs")
            for lowering in lowerings:
                started_group = time.perf_counter()
                if lowering == "eager":
                    for case in members:
                        started = time.perf_counter()
                        try:
                            dbc.optimize(pipe, cache=case.text)
                            try:
                                generate(case, lowering, started, len(compiles.ids), False)
                            finally:
                                dbc.disable(pipe)
                        except Exception as error:  # noqa: BLE001
                            error_record(case, lowering, error, started)
                    continue
                try:
                    dbc.optimize(pipe, cache=members[0].text, mode="default", graph=lowering, compile_options=options)
                except Exception as error:  # noqa: BLE001 - optimize refused the group: each config records why
                    for case in members:
                        error_record(case, lowering, error, time.perf_counter())
                    continue
                try:
                    for i, case in enumerate(members):
                        started = time.perf_counter()
                        ids_before = len(compiles.ids)
                        try:
                            if i:
                                dbc.runtime_of(pipe).reconfigure(case.text)
                            generate(case, lowering, started, ids_before, check_recompiles=i > 0)
                        except Exception as error:  # noqa: BLE001
                            error_record(case, lowering, error, started)
                        if i == 0:
                            compile_s[f"F{group[0]}B{group[1]}O{group[2]}/{lowering}"] = round(
                                time.perf_counter() - started, 1)
                finally:
                    dbc.disable(pipe)
                log(f"[fuzz]   {lowering}: {time.perf_counter() - started_group:.1f} s")
    finally:
        if compiles in torch._dynamo.callback_handler.start_callbacks:
            torch._dynamo.callback_handler.remove_start_callback(compiles)
    counts: dict[str, dict[str, int]] = {}
    for row in records:
        per = counts.setdefault(row["lowering"], {"ok": 0, "clear_error": 0, "failure": 0})
        per[row["outcome"]] += 1
    return {"cases": len(cases), "lowerings": list(lowerings), "backend": backend, "seed": seed,
            "groups": [list(g) for g in groups], "counts": counts,
            "kinds": {k: sum(c.kind == k for c in cases) for k, _ in KINDS},
            "failures": [r for r in records if r["outcome"] == "failure"],
            "disagreements": [r for r in records if r.get("agrees_with_eager") is False],
            "compile_s": compile_s, "records": records}


def per_config(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run records folded per config: ``{index, config, kind, group, steps, true_cfg, runs: {lowering: {outcome,
    seconds, cached_steps / error, ...}}}`` (what ``results.json`` keeps: one entry per config, not per run)."""
    case_keys = ("index", "config", "kind", "group", "steps", "true_cfg")
    folded: dict[int, dict[str, Any]] = {}
    for row in records:
        entry = folded.setdefault(row["index"], {**{k: row[k] for k in case_keys}, "runs": {}})
        entry["runs"][row["lowering"]] = {k: v for k, v in row.items() if k not in case_keys and k != "lowering"}
    return [folded[i] for i in sorted(folded)]


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench fuzz``."""
    parser.add_argument("--count", type=int, default=1500, help="fuzzed configs (default: 1500)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the configs and the calls (default: 0)")
    parser.add_argument("--lowerings", default=",".join(LOWERINGS),
                        help=f"comma-separated from {', '.join(LOWERINGS)} (default: all)")
    parser.add_argument("--backend", default="inductor", choices=BACKENDS,
                        help="torch.compile backend of the compiled lowerings (default: inductor; aot_eager checks "
                             "what AOTAutograd checks without Inductor's code generation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; 0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("out/fuzz"), help="output directory (default: out/fuzz)")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .cli import choices_from
    args.lowerings = tuple(choices_from(parser, args.lowerings, LOWERINGS, "--lowerings"))
    if args.count < 1:
        parser.error("--count must be at least 1")


def execute(args: argparse.Namespace) -> int:
    """Run the fuzz, write results.md / results.json; 1 when any run failed."""
    import torch

    from .report import markdown_table, metadata, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = metadata(args.command_line, torch.device("cpu"))
    started = time.perf_counter()
    result = run_fuzz(args.count, args.seed, args.lowerings, args.backend)
    seconds = time.perf_counter() - started
    meta.update({"seed": args.seed, "count": args.count, "backend": args.backend, "threads": torch.get_num_threads(),
                 "seconds": round(seconds, 1)})
    counts, failures = result["counts"], result["failures"]
    rows = [[lo, c["ok"], c["clear_error"], c["failure"], sum(c.values()),
             None if lo == "eager" else sum(r.get("agrees_with_eager") is True for r in result["records"]
                                            if r["lowering"] == lo),
             None if lo == "eager" else sum(r["lowering"] == lo for r in result["disagreements"])]
            for lo, c in counts.items()]
    total = sum(sum(c.values()) for c in counts.values())
    body = [f"{result['cases']} configs ({', '.join(f'{n} {k}' for k, n in result['kinds'].items())}) x "
            f"{len(args.lowerings)} lowerings = {total} runs on the tiny FLUX pipeline, backend `{args.backend}`, "
            f"mode `default`, seed {args.seed}; {seconds / 60:.1f} min in all. Valid configs come in the block groups "
            f"{', '.join(f'F{f}B{b}' + (f'T1O{o}' if o else '') for f, b, o in result['groups'])}; each compiled "
            f"lowering compiles once per group and swaps configs in with reconfigure().", "",
            *markdown_table(["lowering", "ok", "clear error", "failure", "runs", "agrees with eager",
                             "differs from eager"], rows), "",
            "`clear error`: a ValueError / NotImplementedError naming the config field or token. `failure`: any other "
            "exception, an unnamed error, a recompile after a group's first generation, non-finite images. "
            "`agrees with eager`: the compiled run cached the same steps (both CFG branches) as the eager run of the "
            "same config and call.", "",
            "First generation of each group (compile included), seconds:", "",
            *markdown_table(["group / lowering", "s"], [[k, v] for k, v in result["compile_s"].items()])]
    if failures:
        body += ["", f"## Failures ({len(failures)})", ""]
        body += [f"- #{r['index']} `{r['config'][:80]}` ({r['lowering']}): {r['error'][:300]}" for r in failures[:50]]
    if result["disagreements"]:
        body += ["", f"## Cached steps that differ from eager ({len(result['disagreements'])})", ""]
        body += [f"- #{r['index']} `{r['config'][:80]}` ({r['lowering']}): {r['cached_steps']}"
                 for r in result["disagreements"][:50]]
    errors: dict[str, int] = {}
    for r in result["records"]:
        if r["outcome"] == "clear_error":
            key = re.sub(r"'[^']*'|\d+", "…", r["error"])[:90]
            errors[key] = errors.get(key, 0) + 1
    body += ["", "Clear errors, most frequent messages (numbers and quoted text elided):", "",
             *markdown_table(["message", "runs"], sorted(errors.items(), key=lambda kv: -kv[1])[:15])]
    md, _ = write_report(args.out / "results", f"Config fuzz over the lowerings ({result['cases']} configs)", meta,
                         body, {**{k: v for k, v in result.items() if k != "records"},
                                "per_config": per_config(result["records"])})
    print(md.read_text()[:4000])
    return 1 if failures else 0

