"""``python -m bench soak``: many generations over a shape / config / lowering mix on the tiny models, watching for
exceptions, recompiles, interrupted generations that leak state, and memory that grows.

    python -m bench soak --generations 400 --out out/soak                          # CPU: ~12 minutes, 1 thread
    python -m bench soak --minutes 8 --device cuda --out $OUT/soak                 # a GPU: Inductor by default

The run is a sequence of **sessions**, as in a notebook sweep: ``optimize`` the tiny FLUX or tiny Qwen-Image pipeline
of :mod:`dbcache_compile.testing` with one cache config and one lowering, generate several times, ``disable``, then
optimize again with another config / lowering. The two pipelines are built once and reused by every session.

* Lowerings (:data:`LOWERINGS`, from the registry of :mod:`dbcache_compile.lowerings`): every registered lowering
  (``eager``; the compiled ones with ``mode="default"``), and ``<name>-graphs`` for each that captures its segments
  by hand (e.g. ``regional-graphs``: ``regional`` with the hand-captured segment graphs: real CUDA graphs on CUDA, the
  same capture/replay bookkeeping emulated on a CPU). Compiled lowerings use ``compile_options={"backend": "eager"}``
  on a CPU by default (Dynamo traces, recompiles and guards exactly as with Inductor, without Inductor's codegen
  time); ``--backend inductor`` compiles for real (the default on CUDA).
* Cache configs: :data:`CONFIGS`, and ``uncached`` (``optimize(cache=None)``, the compiled baseline) for the
  compiled lowerings that run without a cache (:func:`runs_uncached`: not those that decide on the device, whose
  graph's predicate needs one, nor ``segments-graphs``: without a cache nothing is captured by hand there).
* Inputs per generation: resolution 32 / 48 / 64, batch 1 / 2, prompt length, true CFG on / off (FLUX:
  ``negative_prompt_embeds`` + ``true_cfg_scale=4``; Qwen-Image: ``qwen_inputs(cfg=True)``), 5 or 8 steps, a fresh
  seed. A session draws most generations from a small pool of shapes it has already seen (so a recompile at a seen
  shape shows up) and sometimes a new one.
* Interruptions: every session holds one check (more with ``--interrupt-rate``): a clean generation X (the
  reference), X again with a ``callback_on_step_end`` that raises :class:`PlannedInterruption` at a random step, then
  X once more, which must be **bit-identical** to the reference (images and cached steps) and compile nothing.

Per generation (``results.json``, ``generations``): kind, inputs, wall seconds (:func:`bench.measure.timed_call`),
the exception if any, Dynamo compiles (a compile-start callback; compile id ``n/k`` with ``k > 0`` is a recompile),
new graphs (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``), graph breaks, uncompiled calls at the
recompile limit (``summary().compile_fallbacks``), cached steps, the process RSS (psutil, else ``VmRSS`` of
``/proc/self/status``) and on CUDA ``torch.cuda.memory_allocated``. Per session: the same memory readings after
``disable`` + ``gc.collect()``, and the seconds that collection took. The summary reports memory growth over the run
(last reading minus first) and between the first and last quarter (median of the last quarter's readings minus the
first quarter's), and the RSS growth per model and lowering.

Exit status 1 when anything failed: an exception other than the planned interruptions (``optimize`` and ``disable``
included), an interruption that did not arrive, an output mismatch after an interruption, a Dynamo compile while
re-running a reference's inputs, a summary that contradicts the call (steps, separate CFG), non-finite outputs, or
first-to-last-quarter growth of RSS / CUDA memory above ``--max-rss-growth-mib`` / ``--max-cuda-growth-mib``. The
plan depends only on ``--seed`` and the flags: the same command runs the same generations (``--minutes`` only cuts the
plan short).

**Warm-up** (on by default, ``--no-warmup`` to measure without it): before the measured plan, one session per model x
lowering x config of the mix generates over :data:`WARMUP_SHAPES` (every resolution, batch 1 and 2, three prompt
lengths, CFG on and off), as a server does before it takes traffic (``python -m dbcache_compile warmup``). It fills the
process-wide compile store with the graphs the mix needs, so the measured plan's memory rule judges what the
re-optimizations and generations do to memory, not the store's first fill. The warm-up is reported on its own (its
generations, graphs, RSS before / after, seconds); its failures count like any other. Without the warm-up the first
compiles of the mix spread over the first quarters and the quarter rule measures them (see
``bench/results/soak-cpu-2026-12-06``: +296 MiB, flat over the last 100 generations).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import random
import re
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

from dbcache_compile.lowerings import Lowering, lowering_named, registered

__all__ = ["CONFIGS", "LOWERINGS", "MODELS", "PlannedInterruption", "Inputs", "Session", "plan", "warmup_plan",
           "configure",
           "validate", "execute"]

#: cached configs of the mix (valid for both tiny models: FLUX 2 + 6 blocks, Qwen-Image 6 blocks): a plain one, one
#: with Bn > 0, TaylorSeer, and a forced schedule (R >= 1: every step the gates allow is a hit)
CONFIGS = ("F1B0_W2M0MC2_T0O1_R0.4", "F2B1_W1M0MC3_T0O1_R0.3", "F1B0_W2M0MC2_T1O1_R0.45", "F1B0_W4MC6_R1.0")
UNCACHED = "uncached"
#: the suffix of a soak lowering that is a registered lowering with its segments captured by hand
GRAPHS_SUFFIX = "-graphs"
#: every registered lowering (eager first), then ``<name>-graphs`` for each that captures its segments by hand
LOWERINGS = (tuple(c.name for c in registered())
             + tuple(c.name + GRAPHS_SUFFIX for c in registered() if c.captures))
MODELS = ("flux", "qwen-image")
RESOLUTIONS = (32, 48, 64)
BATCHES = (1, 2)
TOKENS = {"flux": (8, 12, 16), "qwen-image": (7, 10, 13)}
STEPS = (5, 8)
SESSION_LENGTH = (4, 8)
#: chance that a generation drawn for a session is a shape it has not seen yet
NEW_SHAPE = 0.35
#: the warm-up's generations per session, as (resolution, batch, index into TOKENS[model], true CFG): every
#: resolution, batch 1 and 2, each prompt length, CFG on and off, each dimension changing from one call to the next
#: (Dynamo's automatic dynamic shapes settle after a dimension has changed once; batch 1 stays specialised)
WARMUP_SHAPES = ((32, 1, 0, False), (48, 2, 1, True), (64, 1, 2, True), (32, 2, 2, False), (64, 2, 0, True))


def lowering_of(name: str) -> tuple[type[Lowering], bool]:
    """The registered lowering a soak lowering names, and whether its segments are captured by hand (``-graphs``)."""
    base = name.removesuffix(GRAPHS_SUFFIX)
    return lowering_named(base), base != name


def runs_uncached(name: str) -> bool:
    """Whether the soak lowering ``name`` runs the ``uncached`` config (``optimize(cache=None)``): a compiled lowering
    whose decision is not a device predicate; with hand-captured graphs (``-graphs``), one with block regions: without
    a cache, the others compile the whole forward, which ``use_segment_graphs`` does not capture
    (``dbcache_compile.runtime.UncachedRuntime``)."""
    cls, graphs = lowering_of(name)
    return cls.compiled and not cls.decides_on_device and (cls.region_blocks or not graphs)


class PlannedInterruption(RuntimeError):
    """What the soak's ``callback_on_step_end`` raises to interrupt a generation on purpose."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One generation's inputs; ``shape`` is what can make Dynamo compile (everything but steps and seed)."""

    model: str
    resolution: int
    batch: int
    tokens: int
    cfg: bool
    steps: int
    seed: int

    @property
    def shape(self) -> tuple:
        return (self.resolution, self.batch, self.tokens, self.cfg)


@dataclasses.dataclass
class Session:
    """``optimize(model, config, lowering)``, then ``items``: ``("clean", inputs, None)`` or an interruption check
    ``("check", inputs, interrupt_step)`` (three generations: reference, interrupted, repeat)."""

    index: int
    model: str
    lowering: str
    config: str
    items: list[tuple[str, Inputs, Optional[int]]]

    @property
    def generations(self) -> int:
        return sum(3 if kind == "check" else 1 for kind, _, _ in self.items)


def plan(seed: int, generations: int, models: list[str], lowerings: list[str], configs: list[str],
         interrupt_rate: float = 0.0) -> Iterator[Session]:
    """The sessions of a soak, ``generations`` generations in all, drawn from ``random.Random(seed)``.

    Every (model, lowering) pair comes once per cycle, in a shuffled order; the config is drawn per session
    (``uncached`` only for the lowerings that :func:`runs_uncached`). A session has 4-8 generations, one of them an
    interruption check (three generations) when it has room, plus one more check per later slot with probability
    ``interrupt_rate``."""
    rng = random.Random(seed)
    left, index, cycle = generations, 0, []
    while left > 0:
        if not cycle:
            cycle = [(m, lw) for m in models for lw in lowerings]
            rng.shuffle(cycle)
        model, lowering = cycle.pop()
        choices = [c for c in configs if c != UNCACHED or runs_uncached(lowering)]
        config = rng.choice(choices)
        length = min(left, rng.randint(*SESSION_LENGTH))
        check_at = rng.randrange(0, length - 2) if length >= 3 else None
        pool: list[tuple] = []
        items: list[tuple[str, Inputs, Optional[int]]] = []
        count = 0
        while count < length:
            if not pool or rng.random() < NEW_SHAPE:
                shape = (rng.choice(RESOLUTIONS), rng.choice(BATCHES), rng.choice(TOKENS[model]), rng.random() < 0.4)
                pool.append(shape)
            else:
                shape = rng.choice(pool)
            inputs = Inputs(model, *shape, steps=rng.choice(STEPS), seed=rng.randrange(10**6))
            room = length - count >= 3
            if room and (count == check_at or (count > (check_at or 0) and rng.random() < interrupt_rate)):
                items.append(("check", inputs, rng.randrange(1, inputs.steps - 1)))
                count += 3
            else:
                items.append(("clean", inputs, None))
                count += 1
        yield Session(index, model, lowering, config, items)
        left -= count
        index += 1


def warmup_plan(models: list[str], lowerings: list[str], configs: list[str]) -> list[Session]:
    """The warm-up's sessions: one per model x lowering x config of the mix (``uncached`` where the lowering
    :func:`runs_uncached`), each generating :data:`WARMUP_SHAPES` in 5 steps (no interruption check). Their indexes
    are negative so that they never collide with the measured plan's."""
    sessions = []
    for model in models:
        for lowering in lowerings:
            for config in configs:
                if config == UNCACHED and not runs_uncached(lowering):
                    continue
                items = [("clean", Inputs(model, res, batch, TOKENS[model][t], cfg, steps=5, seed=i), None)
                         for i, (res, batch, t, cfg) in enumerate(WARMUP_SHAPES)]
                sessions.append(Session(-1 - len(sessions), model, lowering, config, items))
    return sessions


# ---------------------------------------------------------------------------------------------------- measuring
def _rss_reader() -> tuple[str, Any]:
    """(what is read, a function returning bytes or ``None``): psutil's RSS, else ``VmRSS`` of /proc/self/status."""
    try:
        import psutil
        process = psutil.Process()
        return "psutil RSS", lambda: int(process.memory_info().rss)
    except ImportError:
        pass
    status = Path("/proc/self/status")
    if status.is_file():
        def vmrss() -> Optional[int]:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
            return None
        return "VmRSS (/proc/self/status)", vmrss
    return "n/a: neither psutil nor /proc/self/status", lambda: None


def _quarters(values: list[Optional[float]]) -> dict[str, Optional[float]]:
    """first / last / max reading, the growth over the run (last - first), the median of the first and last quarter
    and their difference, and a least-squares slope per 100 generations."""
    xs = [(i, v) for i, v in enumerate(values) if v is not None]
    if not xs:
        return {"first": None, "last": None, "max": None, "growth": None, "first_quarter": None,
                "last_quarter": None, "quarter_growth": None, "slope_per_100": None}
    vals = [v for _, v in xs]
    q = max(1, len(vals) // 4)
    first_q, last_q = statistics.median(vals[:q]), statistics.median(vals[-q:])
    slope = None
    if len(xs) > 1:
        mx, my = statistics.fmean(i for i, _ in xs), statistics.fmean(vals)
        den = sum((i - mx) ** 2 for i, _ in xs)
        slope = 100 * sum((i - mx) * (v - my) for i, v in xs) / den if den else None
    return {"first": vals[0], "last": vals[-1], "max": max(vals), "growth": vals[-1] - vals[0],
            "first_quarter": first_q, "last_quarter": last_q, "quarter_growth": last_q - first_q,
            "slope_per_100": slope}


class Soak:
    """Runs the plan and keeps the records."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from dbcache_compile.testing import tiny_flux_pipeline, tiny_qwen_pipeline
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        self.builders = {"flux": tiny_flux_pipeline, "qwen-image": tiny_qwen_pipeline}
        self.pipes = {m: self._build(m) for m in args.models}
        self.rss_kind, self._rss = _rss_reader()
        self.records: list[dict[str, Any]] = []
        self.compile_ids: list[str] = []
        self.sessions: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.warmup: Optional[dict[str, Any]] = None

    def warm_up(self, sessions: list[Session], bar: Any, deadline: Optional[float] = None) -> None:
        """Run the warm-up ``sessions`` (no session starts after ``deadline``), then set their records aside
        (``self.warmup``) so that the measured plan's numbers start after them; failures stay in ``self.failures``."""
        start, rss_before = time.monotonic(), self.memory()[0]
        graphs_before = self.counters()[0]
        cut = 0
        for session in sessions:
            if deadline is not None and time.monotonic() > deadline:
                cut += 1
                continue
            self.run_session(session, bar, deadline)
        gc.collect()
        self.warmup = {"sessions": len(self.sessions), "generations": len(self.records),
                       "graphs": self.counters()[0] - graphs_before, "seconds": round(time.monotonic() - start, 1),
                       "rss_before_mib": None if rss_before is None else round(rss_before, 2),
                       "rss_after_mib": None if self.memory()[0] is None else round(self.memory()[0], 2),
                       "exceptions": sum(f["what"] == "exception" for f in self.failures),
                       "sessions_cut": cut,
                       "records": self.records, "session_info": self.sessions}
        self.records, self.sessions, self.compile_ids = [], [], []

    def _build(self, model: str) -> Any:
        import torch
        pipe = self.builders[model](self.args.seed)  # float32 on the CPU
        if self.device.type != "cpu" or self.dtype != torch.float32:
            pipe = pipe.to(device=self.device, dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------------------------------- one generation
    def kwargs(self, x: Inputs) -> dict[str, Any]:
        import torch

        from dbcache_compile.testing import flux_inputs, qwen_inputs
        if x.model == "flux":
            kw = flux_inputs(batch=x.batch, seed=x.seed, tokens=x.tokens)
            if x.cfg:
                negative = flux_inputs(batch=x.batch, seed=x.seed + 7, tokens=x.tokens)
                kw.update(negative_prompt_embeds=negative["prompt_embeds"],
                          negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=4.0)
        else:
            kw = qwen_inputs(batch=x.batch, seed=x.seed, cfg=x.cfg, tokens=x.tokens)
        kw = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
              if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        kw.update(height=x.resolution, width=x.resolution, num_inference_steps=x.steps, output_type="pt",
                  generator=torch.Generator("cpu").manual_seed(x.seed))
        return kw

    def on_compile_start(self, args: Any) -> None:
        """Dynamo's compile-start callback: ``compile_id`` is ``"<frame>/<compile of that frame>"``."""
        self.compile_ids.append(str(args.compile_id))

    def counters(self) -> tuple[int, int]:
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    @staticmethod
    def is_recompile(compile_id: str) -> bool:
        """Whether a Dynamo compile id (``"3/0"``, ``"3/1"``, ``"[0/1] 3/2"``...) is a frame's second or later compile:
        guards of its earlier graphs failed."""
        match = re.search(r"(\d+)/(\d+)(?:_\d+)?\s*$", compile_id)
        return match is not None and int(match.group(2)) > 0

    @staticmethod
    def fallbacks(pipe: Any) -> int:
        import dbcache_compile as dbc
        try:
            rt = dbc.runtime_of(pipe)
        except ValueError:
            return 0
        found = getattr(rt, "compile_fallbacks", None)
        if found is None:
            found = getattr(rt, "fallbacks", {})
        return sum(found.values())

    def memory(self) -> tuple[Optional[float], Optional[float]]:
        import torch
        rss = self._rss()
        cuda = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            cuda = torch.cuda.memory_allocated(self.device) / 2**20
        return (None if rss is None else rss / 2**20), cuda

    def generate(self, session: Session, kind: str, x: Inputs, interrupt_step: Optional[int],
                 seen: set) -> tuple[Optional[Any], Optional[Any], dict[str, Any]]:
        """One pipeline call; returns (images or None, the cache summary or None, the record)."""
        import torch

        import dbcache_compile as dbc

        from .measure import timed_call
        pipe = self.pipes[x.model]
        kw = self.kwargs(x)
        if interrupt_step is not None:
            def interrupt(p: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
                if step == interrupt_step:
                    raise PlannedInterruption(f"planned interruption at step {step}")
                return callback_kwargs
            kw["callback_on_step_end"] = interrupt
        graphs0, breaks0 = self.counters()
        compiles0 = len(self.compile_ids)
        fallbacks0 = self.fallbacks(pipe)
        record: dict[str, Any] = {
            "index": len(self.records), "session": session.index, "model": x.model, "lowering": session.lowering,
            "config": session.config, "kind": kind, **{k: v for k, v in dataclasses.asdict(x).items() if k != "model"},
            "interrupt_step": interrupt_step, "seen_shape": x.shape in seen, "wall_s": None, "error": None,
            "planned_interruption": False}
        images = summary = None
        start = time.perf_counter()
        try:
            seconds, out = timed_call(pipe, kw, self.device)
            record["wall_s"] = round(seconds, 4)
            images = out.images
        except PlannedInterruption:
            record["planned_interruption"] = interrupt_step is not None
            record["wall_s"] = round(time.perf_counter() - start, 4)
        except Exception as err:  # noqa: BLE001 - a soak records every failure and goes on
            record["wall_s"] = round(time.perf_counter() - start, 4)
            record["error"] = f"{type(err).__name__}: {err}"
            self.fail("exception", record, record["error"], traceback.format_exc(limit=8))
        seen.add(x.shape)
        graphs1, breaks1 = self.counters()
        compiles = self.compile_ids[compiles0:]
        record.update(new_graphs=graphs1 - graphs0, new_graph_breaks=breaks1 - breaks0,
                      new_fallbacks=self.fallbacks(pipe) - fallbacks0, compiles=len(compiles),
                      recompiles=sum(map(self.is_recompile, compiles)))
        if interrupt_step is not None and not record["planned_interruption"] and record["error"] is None:
            self.fail("interruption not delivered", record,
                      f"callback_on_step_end raising at step {interrupt_step} of {x.steps} did not interrupt")
        if session.config != UNCACHED and record["error"] is None:
            try:
                summary = dbc.summary(pipe)
                record.update(cached_steps=sum(len(b["cached_steps"]) for b in summary.branches.values()),
                              calls=sum(b["calls"] for b in summary.branches.values()),
                              separate_cfg=summary.separate_cfg)
            except Exception as err:  # noqa: BLE001
                self.fail("exception", record, f"summary(): {type(err).__name__}: {err}",
                          traceback.format_exc(limit=8))
        if images is not None:
            if not torch.isfinite(images).all():
                self.fail("non-finite output", record, "the images hold NaN or inf")
            if summary is not None and (summary.num_steps != x.steps or summary.separate_cfg != x.cfg):
                self.fail("summary mismatch", record,
                          f"summary(): num_steps {summary.num_steps}, separate_cfg {summary.separate_cfg} for a call "
                          f"of {x.steps} steps with true CFG {x.cfg}")
        rss, cuda = self.memory()
        record.update(rss_mib=None if rss is None else round(rss, 2),
                      cuda_allocated_mib=None if cuda is None else round(cuda, 3))
        self.records.append(record)
        return (None if images is None else images.detach().cpu()), summary, record

    def fail(self, what: str, record: Optional[dict], message: str, trace: str = "") -> None:
        entry = {"what": what, "generation": None if record is None else record["index"],
                 "session": None if record is None else record["session"], "message": message[:2000],
                 "traceback": trace[-4000:]}
        self.failures.append(entry)
        if record is not None:
            record.setdefault("failures", []).append(what)

    # ---------------------------------------------------------------------------------------------- one session
    def attach(self, session: Session) -> None:
        import dbcache_compile as dbc
        pipe = self.pipes[session.model]
        lowering, graphs = lowering_of(session.lowering)
        options = {"backend": "eager"} if lowering.compiled and self.args.backend == "eager" else None
        # without a mode the cache runs eagerly: optimize's graph is then "auto"
        dbc.optimize(pipe, cache=None if session.config == UNCACHED else session.config,
                     mode=self.args.mode if lowering.compiled else None,
                     graph=lowering.name if lowering.compiled else "auto", compile_options=options)
        if graphs:
            try:
                dbc.runtime_of(pipe).use_segment_graphs(emulate=self.device.type != "cuda")
            except Exception:
                dbc.disable(pipe)  # the session does not start: the next one gets the pipeline as it was
                raise

    def run_session(self, session: Session, bar: Any, deadline: Optional[float]) -> None:
        import torch

        import dbcache_compile as dbc
        info = {"session": session.index, "model": session.model, "lowering": session.lowering,
                "config": session.config, "planned": session.generations, "generations": 0,
                "first_generation": len(self.records), "error": None}
        self.sessions.append(info)
        pipe = self.pipes[session.model]
        try:
            self.attach(session)
        except Exception as err:  # noqa: BLE001
            info["error"] = f"optimize(): {type(err).__name__}: {err}"
            self.fail("exception", None, info["error"], traceback.format_exc(limit=8))
            self.failures[-1]["session"] = session.index
            bar.update(session.generations)
            return
        seen: set = set()
        try:
            for kind, x, step in session.items:
                if deadline is not None and time.monotonic() > deadline:
                    info["cut"] = "time budget spent"
                    break
                if kind == "clean":
                    self.generate(session, "clean", x, None, seen)
                    bar.update(1)
                    continue
                reference, ref_summary, ref_record = self.generate(session, "reference", x, None, seen)
                _, _, int_record = self.generate(session, "interrupted", x, step, seen)
                repeat, rep_summary, rep_record = self.generate(session, "repeat", x, None, seen)
                bar.update(3)
                check = {"session": session.index, "generations": [ref_record["index"], int_record["index"],
                                                                    rep_record["index"]],
                         "model": x.model, "lowering": session.lowering, "config": session.config,
                         "inputs": dataclasses.asdict(x), "interrupt_step": step, "result": None}
                if reference is None or repeat is None or not int_record["planned_interruption"]:
                    check["result"] = "not checked (a generation of the check failed)"
                elif not torch.equal(reference, repeat):
                    diff = (reference.float() - repeat.float()).abs().max().item()
                    check["result"] = f"MISMATCH: images differ (max abs diff {diff:.3g})"
                elif ref_summary is not None and (
                        (ref_summary.cached_steps, ref_summary.cfg_cached_steps)
                        != (rep_summary.cached_steps, rep_summary.cfg_cached_steps)):
                    check["result"] = (f"MISMATCH: cached steps {ref_summary.cached_steps}/"
                                       f"{ref_summary.cfg_cached_steps} before, {rep_summary.cached_steps}/"
                                       f"{rep_summary.cfg_cached_steps} after the interruption")
                else:
                    check["result"] = "identical"
                if check["result"].startswith("MISMATCH"):
                    self.fail("mismatch after interruption", rep_record, check["result"])
                check["compiles_on_repeat"] = int_record["compiles"] + rep_record["compiles"]
                if check["compiles_on_repeat"]:
                    self.fail("compile on an exact repeat", rep_record,
                              f"{check['compiles_on_repeat']} Dynamo compile(s) while re-running (interrupted, then "
                              f"in full) the inputs the reference generation had just run")
                self.checks.append(check)
        finally:
            info["generations"] = len(self.records) - info["first_generation"]
            try:
                dbc.disable(pipe)
            except Exception as err:  # noqa: BLE001
                message = f"disable(): {type(err).__name__}: {err}"
                info["error"] = (info["error"] + "; " if info["error"] else "") + message
                self.fail("exception", None, message, traceback.format_exc(limit=8))
                self.failures[-1]["session"] = session.index
                self.pipes[session.model] = self._build(session.model)  # start the next session from a clean one
            start = time.perf_counter()
            gc.collect()
            info["gc_s"] = round(time.perf_counter() - start, 3)
            rss, cuda = self.memory()
            info["rss_after_disable_mib"] = None if rss is None else round(rss, 2)
            info["cuda_allocated_after_disable_mib"] = None if cuda is None else round(cuda, 3)
            bar.set_postfix(fail=len(self.failures), rss=f"{self.records[-1]['rss_mib']:.0f}M"
                            if self.records and self.records[-1]["rss_mib"] is not None else "n/a")


# ------------------------------------------------------------------------------------------------------- report
def _fmt(value: Optional[float], digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def _median(values: list[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(soak: Soak, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """The numbers of the run and the verdict (appends the memory failures to ``soak.failures``)."""
    recs = soak.records
    n = len(recs)
    q, qs = max(1, n // 4), max(1, len(soak.sessions) // 4)
    rss = _quarters([r["rss_mib"] for r in recs])
    cuda = _quarters([r["cuda_allocated_mib"] for r in recs])
    if rss["quarter_growth"] is not None and rss["quarter_growth"] > args.max_rss_growth_mib:
        soak.fail("memory growth", None, f"RSS grew {rss['quarter_growth']:.1f} MiB from the first to the last "
                                         f"quarter (limit {args.max_rss_growth_mib} MiB)")
    if cuda["quarter_growth"] is not None and cuda["quarter_growth"] > args.max_cuda_growth_mib:
        soak.fail("memory growth", None, f"CUDA allocated grew {cuda['quarter_growth']:.2f} MiB from the first to "
                                         f"the last quarter (limit {args.max_cuda_growth_mib} MiB)")
    seen = [r for r in recs if r["seen_shape"]]
    steady = [r["wall_s"] for r in recs if r["kind"] in ("clean", "reference", "repeat") and r["seen_shape"]
              and r["error"] is None]
    steady_first = [r["wall_s"] for r in recs[:q] if r in seen and r["kind"] != "interrupted" and not r["error"]]
    steady_last = [r["wall_s"] for r in recs[-q:] if r in seen and r["kind"] != "interrupted" and not r["error"]]
    kinds: dict[str, int] = {}
    for r in recs:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    by_what: dict[str, int] = {}
    for f in soak.failures:
        by_what[f["what"]] = by_what.get(f["what"], 0) + 1
    per_lowering: dict[str, dict[str, Any]] = {}
    previous: dict[str, Any] = {}
    for s in soak.sessions:
        entry = per_lowering.setdefault(f"{s['model']} / {s['lowering']}", {"sessions": 0, "generations": 0,
                                                                             "graphs": 0, "rss_growth_mib": 0.0})
        entry["sessions"] += 1
        entry["generations"] += s["generations"]
        entry["graphs"] += sum(r["new_graphs"] for r in recs if r["session"] == s["session"])
        before = previous.get("rss_after_disable_mib")
        if before is not None and s.get("rss_after_disable_mib") is not None:
            entry["rss_growth_mib"] = round(entry["rss_growth_mib"] + s["rss_after_disable_mib"] - before, 2)
        previous = s
    after_disable = _quarters([x.get("rss_after_disable_mib") for x in soak.sessions])
    warmup = None if soak.warmup is None else {k: v for k, v in soak.warmup.items()
                                                if k not in ("records", "session_info")}
    return {
        "warmup": warmup,
        "rss_growth_per_100_generations_mib": rss["slope_per_100"],
        # a session is one re-optimization (optimize -> generations -> disable): the trend of RSS after each disable
        "rss_growth_per_10_reoptimizations_mib": (None if after_disable["slope_per_100"] is None
                                                 else after_disable["slope_per_100"] / 10),
        "generations": n, "planned": args.generations, "sessions": len(soak.sessions), "seconds": round(seconds, 1),
        "kinds": kinds, "failures_by_kind": by_what, "exceptions": by_what.get("exception", 0),
        "planned_interruptions": sum(r["planned_interruption"] for r in recs),
        "interruption_checks": len(soak.checks),
        "interruption_identical": sum(c["result"] == "identical" for c in soak.checks),
        "interruption_mismatches": sum(c["result"].startswith("MISMATCH") for c in soak.checks),
        "graphs": sum(r["new_graphs"] for r in recs), "graph_breaks": sum(r["new_graph_breaks"] for r in recs),
        "compile_fallbacks": sum(r["new_fallbacks"] for r in recs),
        "compiles": sum(r["compiles"] for r in recs), "recompiles": sum(r["recompiles"] for r in recs),
        "recompiles_at_seen_shapes": sum(r["recompiles"] for r in seen),
        "compiles_on_exact_repeats": sum(r["compiles"] for r in recs if r["kind"] in ("interrupted", "repeat")),
        "graphs_at_seen_shapes": sum(r["new_graphs"] for r in seen),
        "generations_at_seen_shapes": len(seen),
        "graphs_first_quarter": sum(r["new_graphs"] for r in recs[:q]),
        "graphs_last_quarter": sum(r["new_graphs"] for r in recs[-q:]),
        "wall_s_median_seen_shape": statistics.median(steady) if steady else None,
        "wall_s_median_seen_shape_first_quarter": statistics.median(steady_first) if steady_first else None,
        "wall_s_median_seen_shape_last_quarter": statistics.median(steady_last) if steady_last else None,
        "rss_mib": rss, "rss_kind": soak.rss_kind, "cuda_allocated_mib": cuda, "per_model_lowering": per_lowering,
        "rss_after_disable_mib": after_disable,
        "gc_s_first_quarter_sessions": _median([x.get("gc_s") for x in soak.sessions[:qs]]),
        "gc_s_last_quarter_sessions": _median([x.get("gc_s") for x in soak.sessions[-qs:]]),
        "passed": not soak.failures}


def write(soak: Soak, args: argparse.Namespace, meta: dict[str, Any], s: dict[str, Any]) -> Path:
    from .report import markdown_table, write_report

    def mib(d: dict, key: str, digits: int = 1) -> str:
        v = d[key]
        return "n/a" if v is None else f"{v:.{digits}f} MiB"

    verdict = "**PASS**" if s["passed"] else "**FAIL**: " + ", ".join(f"{k} x{v}" for k, v in
                                                                      s["failures_by_kind"].items())
    lowered = "Inductor" if args.backend == "inductor" else "Dynamo with `backend=\"eager\"` (no Inductor codegen)"
    w = s["warmup"]
    warm = ("No warm-up (`--no-warmup`): the store's first compiles fall inside the measured plan." if w is None else
            f"Warm-up first (not in the numbers below): {w['generations']} generations in {w['sessions']} sessions "
            f"(each model x lowering x config over every warm-up shape), {w['graphs']} Dynamo graphs, "
            f"{w['seconds'] / 60:.1f} min, RSS {_fmt(w['rss_before_mib'])} -> {_fmt(w['rss_after_mib'])} MiB, "
            f"{w['exceptions']} exceptions" + (f"; {w['sessions_cut']} warm-up sessions not run (half of --minutes "
                                               f"spent)." if w["sessions_cut"] else "."))
    body = [f"{s['generations']} generations (of {s['planned']} planned) in {s['sessions']} sessions, "
            f"{s['seconds'] / 60:.1f} min, seed {args.seed}; models {', '.join(args.models)}; lowerings "
            f"{', '.join(args.lowerings)}; compiled lowerings: mode `{args.mode}`, {lowered}; {args.dtype}.", "",
            warm, "",
            f"Verdict: {verdict}.", "",
            *markdown_table(["what", "value"], [
                ["generations: clean / reference / interrupted / repeat",
                 " / ".join(str(s["kinds"].get(k, 0)) for k in ("clean", "reference", "interrupted", "repeat"))],
                ["exceptions (other than planned interruptions)", s["exceptions"]],
                ["planned interruptions delivered", s["planned_interruptions"]],
                ["interruption checks: identical / mismatches / total",
                 f"{s['interruption_identical']} / {s['interruption_mismatches']} / {s['interruption_checks']}"],
                ["Dynamo graphs compiled (unique_graphs)", s["graphs"]],
                ["of which recompiles (a frame's 2nd+ compile: its guards failed)", s["recompiles"]],
                ["compiles while re-running a reference's inputs (interrupted + repeat of each check)",
                 s["compiles_on_exact_repeats"]],
                ["recompiles at a shape the session had already run",
                 f"{s['recompiles_at_seen_shapes']} (over {s['generations_at_seen_shapes']} generations; graphs "
                 f"compiled there, first compiles of a segment included: {s['graphs_at_seen_shapes']})"],
                ["graphs in the first / last quarter", f"{s['graphs_first_quarter']} / {s['graphs_last_quarter']}"],
                ["graph breaks", s["graph_breaks"]],
                ["calls run uncompiled at the recompile limit (compile_fallbacks)", s["compile_fallbacks"]],
                [f"{s['rss_kind']}: first / last / max", f"{mib(s['rss_mib'], 'first')} / "
                 f"{mib(s['rss_mib'], 'last')} / {mib(s['rss_mib'], 'max')}"],
                ["RSS growth over the run (last - first)", mib(s["rss_mib"], "growth")],
                ["RSS growth, first to last quarter (medians)", f"{mib(s['rss_mib'], 'quarter_growth')} "
                 f"(limit {args.max_rss_growth_mib} MiB)"],
                ["RSS trend (least squares)", "n/a" if s["rss_mib"]["slope_per_100"] is None else
                 f"{s['rss_mib']['slope_per_100']:.2f} MiB per 100 generations"],
                ["RSS trend after each session's disable (least squares)",
                 "n/a" if s["rss_growth_per_10_reoptimizations_mib"] is None else
                 f"{s['rss_growth_per_10_reoptimizations_mib']:.2f} MiB per 10 re-optimizations"],
                ["RSS after each session's disable + gc.collect: first / last",
                 f"{mib(s['rss_after_disable_mib'], 'first')} / {mib(s['rss_after_disable_mib'], 'last')}"],
                ["gc.collect() after a session: median s, first / last quarter of the sessions",
                 f"{_fmt(s['gc_s_first_quarter_sessions'], 3)} / {_fmt(s['gc_s_last_quarter_sessions'], 3)}"],
                ["CUDA allocated: first / last, first to last quarter",
                 "n/a (not CUDA)" if s["cuda_allocated_mib"]["first"] is None else
                 f"{mib(s['cuda_allocated_mib'], 'first', 3)} / {mib(s['cuda_allocated_mib'], 'last', 3)}, "
                 f"{mib(s['cuda_allocated_mib'], 'quarter_growth', 3)} (limit {args.max_cuda_growth_mib} MiB)"],
                ["wall s per generation at a seen shape: median (first / last quarter)",
                 f"{_fmt(s['wall_s_median_seen_shape'], 3)} ({_fmt(s['wall_s_median_seen_shape_first_quarter'], 3)}"
                 f" / {_fmt(s['wall_s_median_seen_shape_last_quarter'], 3)})"],
            ]), "",
            "Memory is read at the end of every generation, and after each session's `disable` + `gc.collect()`; "
            "the quarter growth compares the median reading of the last quarter of the generations with that of the "
            "first. A session is `optimize` → its generations → `disable`; graphs are compiled once per process "
            "and model class x lowering x Fn/Bn x shapes (the compile store), so a later session with another "
            "config compiles nothing. A recompile is a Dynamo compile "
            "whose compile id is not a frame's first (`3/1`, `3/2`, ...). Re-running the inputs of the generation "
            "just before must compile nothing (a failure otherwise); at a shape the session ran before with "
            "other steps or seed, a segment a generation uses for the first time can still compile (e.g. `hit` "
            "once a step is cached, recompiled for Qwen-Image's shorter negative prompt).", "",
            "## Per model and lowering", "",
            "RSS growth: the sum over its sessions of (RSS after the session's disable + gc) - (RSS after the "
            "session before it).", "",
            *markdown_table(["model / lowering", "sessions", "generations", "graphs compiled", "RSS growth"],
                            [[k, v["sessions"], v["generations"], v["graphs"], f"{v['rss_growth_mib']:.1f} MiB"]
                             for k, v in sorted(s["per_model_lowering"].items())])]
    if soak.failures:
        body += ["", "## Failures", "",
                 *markdown_table(["what", "session", "generation", "message"],
                                 [[f["what"], f["session"], f["generation"], f["message"][:300]]
                                  for f in soak.failures[:50]])]
        if len(soak.failures) > 50:
            body.append(f"\n... {len(soak.failures) - 50} more in results.json")
    body += ["", "## Sessions", "",
             *markdown_table(["session", "model", "lowering", "config", "generations", "graphs", "wall s median",
                              "RSS after disable + gc", "error"],
                             [[x["session"], x["model"], x["lowering"], x["config"], x["generations"],
                               sum(r["new_graphs"] for r in soak.records if r["session"] == x["session"]),
                               _fmt(statistics.median(w) if (w := [r["wall_s"] for r in soak.records
                                                                   if r["session"] == x["session"]]) else None, 3),
                               "n/a" if x.get("rss_after_disable_mib") is None else
                               f"{x['rss_after_disable_mib']:.0f} MiB",
                               x["error"] or x.get("cut") or ""] for x in soak.sessions])]
    md, _ = write_report(args.out / "results", f"Soak: {s['generations']} generations on the tiny models "
                         f"({soak.device.type})", meta, body,
                         {"summary": s, "failures": soak.failures, "interruption_checks": soak.checks,
                          "warmup_generations": [] if soak.warmup is None else soak.warmup["records"],
                          "sessions": soak.sessions, "generations": soak.records})
    return md


# ---------------------------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench soak``."""
    import torch
    parser.add_argument("--generations", type=int, default=400, help="generations in all (default: 400)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop starting generations after this many minutes (default: no limit); the "
                             "warm-up may take at most half of them")
    parser.add_argument("--seed", type=int, default=0, help="seeds the plan, the models and every input (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--models", type=_csv, default=list(MODELS), help=f"comma-separated from {MODELS}")
    parser.add_argument("--lowerings", type=_csv, default=list(LOWERINGS), help=f"comma-separated from {LOWERINGS}")
    parser.add_argument("--configs", type=_csv, default=[*CONFIGS, UNCACHED],
                        help="comma-separated cache configs; 'uncached' = optimize(cache=None), for the compiled "
                             "lowerings that run without a cache (default: %(default)s)")
    parser.add_argument("--backend", default=None, choices=("eager", "inductor"),
                        help="torch.compile backend of the compiled lowerings (default: eager on a CPU, Dynamo "
                             "tracing only; inductor on CUDA)")
    parser.add_argument("--mode", default="default", help="torch.compile mode of the compiled lowerings")
    parser.add_argument("--interrupt-rate", type=float, default=0.0,
                        help="chance of an extra interruption check per later slot of a session (each session has "
                             "one; default: 0)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                        help="fail when RSS grows more than this from the first to the last quarter (default: 64)")
    parser.add_argument("--max-cuda-growth-mib", type=float, default=16.0,
                        help="fail when torch.cuda.memory_allocated grows more than this from the first to the last "
                             "quarter (default: 16)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="first run one session per model x lowering x config over every warm-up shape and "
                             "measure after it (default: on; --no-warmup measures the store's first fill too)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; 0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("out/soak"), help="output directory (default: out/soak)")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Names from the lists, a positive size, a reachable device; the backend default per device."""
    import torch

    from dbcache_compile import DBCacheConfig
    from dbcache_compile.optimize import COMPILE_MODES
    if args.generations < 1:
        parser.error("--generations must be >= 1")
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be > 0")
    for name, given, allowed in (("--models", args.models, MODELS), ("--lowerings", args.lowerings, LOWERINGS)):
        bad = [x for x in given if x not in allowed]
        if bad or not given:
            parser.error(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    for config in args.configs:
        if config != UNCACHED:
            try:
                DBCacheConfig.from_string(config)
            except ValueError as err:
                parser.error(f"--configs: {config!r}: {err}")
    cached_only = [lw for lw in args.lowerings if not runs_uncached(lw)]
    if not args.configs or args.configs == [UNCACHED] and cached_only:
        parser.error(f"--configs: the lowerings {', '.join(cached_only)} need a cache config ('uncached' is for the "
                     f"compiled lowerings that run without a cache)")
    if args.mode not in COMPILE_MODES or args.mode is None:
        parser.error(f"--mode must be one of {[m for m in COMPILE_MODES if m]}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    if args.backend is None:
        args.backend = "inductor" if args.device.startswith("cuda") else "eager"


def execute(args: argparse.Namespace) -> int:
    """Run the plan, write results.md / results.json; 1 when anything failed."""
    import torch
    from tqdm.auto import tqdm

    from .report import metadata

    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    meta = metadata(args.command_line, args.device, started)
    clock = time.monotonic()
    deadline = None if args.minutes is None else clock + 60 * args.minutes
    soak = Soak(args)
    sessions = plan(args.seed, args.generations, args.models, args.lowerings, args.configs, args.interrupt_rate)
    handler = torch._dynamo.callback_handler
    handler.register_start_callback(soak.on_compile_start)
    try:
        if args.warmup:
            # with --minutes the warm-up may take at most half of them; the measured plan gets the rest
            warm = warmup_plan(args.models, args.lowerings, args.configs)
            with tqdm(total=sum(x.generations for x in warm), desc="soak warm-up", unit="gen",
                      dynamic_ncols=True) as bar:
                soak.warm_up(warm, bar, None if deadline is None else clock + 30 * args.minutes)
            clock = time.monotonic()
            deadline = None if deadline is None else max(deadline, clock + 30 * args.minutes)
        with tqdm(total=args.generations, desc="soak", unit="gen", dynamic_ncols=True) as bar:
            for session in sessions:
                if deadline is not None and time.monotonic() > deadline:
                    break
                soak.run_session(session, bar, deadline)
    finally:
        handler.remove_start_callback(soak.on_compile_start)
    s = summarize(soak, args, time.monotonic() - clock)
    meta.update({"seed": args.seed, "backend": args.backend, "mode": args.mode, "dtype": args.dtype,
                 "threads": torch.get_num_threads(), "minutes": args.minutes, "warmup": args.warmup})
    md = write(soak, args, meta, s)
    text = md.read_text()
    print(text[:text.index("## Per model")] if "## Per model" in text else text)
    if soak.failures:
        print(f"FAIL: {len(soak.failures)} failures, see {md}")
    return 0 if s["passed"] else 1
