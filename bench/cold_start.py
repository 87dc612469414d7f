"""Time to the first image: compiling cold, warm in the same process with a new config, and warm in a new process
from a compile cache (``optimize(..., compile_cache=DIR)``); eager and the AOTInductor package for reference.

    python -m bench cold-start --out bench/results/cold-start-cpu-<date> [--model tiny,flux-tiny] \\
        [--graph segments,regional] [--mode default] [--steps 10] [--package]
    python -m bench cold-start --model flux --graph regional --mode max-autotune --steps 28 --out ...   # GPU, 1024²

Each row runs in its own Python process (:func:`bench.measure.run_child`) with its own empty default Inductor cache
(``$TORCHINDUCTOR_CACHE_DIR``), one thread on a CPU:

* ``eager``: ``optimize(pipe, cache=C)`` without compiling (the floor: imports, model build, one generation).
* ``cold``: ``optimize(pipe, cache=C, mode, graph, compile_cache=DIR)`` on an empty ``DIR``: everything compiles
  (and is written to ``DIR`` as it compiles). The same process then measures two **warm, same process** rows: a
  new config with the same block split (``runtime_of(pipe).reconfigure(C2)``: nothing recompiles) and one with
  another split (``disable`` + ``optimize(cache=C3)``: new graphs where the split changes them).
* ``warm, new process (compile_cache)``: a fresh process (a fresh, empty default Inductor cache) with the same
  ``DIR``: torch loads the FX graph / AOTAutograd entries and compiled kernels; Dynamo traces again.
* ``package`` (``--package``, FLUX models): ``dbc.load`` of an AOTInductor package exported once.

Per row: seconds from process start to the first image, seconds of the **first compiled generation**
(``optimize`` + the first pipeline call: what compile_cache shortens), its split into Dynamo tracing
(``entire_frame_compile - backend_compile`` of ``torch._dynamo.utils.calculate_time_spent``) and AOTAutograd +
Inductor (``backend_compile``: lowering, code generation, C++/Triton compiles, or cache loads), a second call of the
same config (steady), torch's FX graph cache hits / misses and the cached steps. ``% of cold``: first compiled
generation / the cold row's. Writes ``cold_start_<device>.md`` / ``.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

#: per model: (config, same-split new config, new-split config)
CONFIGS = {
    "tiny": ("F1B0_W2MC2_R0.3", "F1B0_W4MC3_R0.2", "F2B1_W2MC2_R0.3"),
    "flux-tiny": ("F1B0_W2M0MC2_T1O1_R0.45", "F1B0_W4MC3_T1O1_R0.3", "F2B1_W2MC2_T1O1_R0.45"),
    "flux": ("F1B0_W4MC6_R0.24", "F1B0_W4MC2_R0.2", "F4B0_W4MC3_R0.12"),
}
MODELS = tuple(CONFIGS)
_NAMES = {"tiny": "digits demo model (dbcache_compile.digits, 16x16, 2 + 6 blocks)",
          "flux-tiny": "tiny FLUX (dbcache_compile.testing, random weights, 2 + 6 blocks)",
          "flux": "FLUX.1-dev architecture (random weights, bf16, 19 + 38 blocks)"}
_MARK = "COLD_START_RESULT "


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench cold-start``."""
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", default="tiny,flux-tiny", help=f"comma-separated, of {', '.join(MODELS)} "
                                                                  f"(flux: the 1024² FLUX.1-dev row, a GPU)")
    parser.add_argument("--graph", default="segments,regional", help="comma-separated lowerings")
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--height", type=int, default=None, help="pixels (default: 32 for flux-tiny, 1024 flux)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--per-class", type=int, default=4, help="digits per class of the digits model's call "
                                                                 "(the demo's 4: 40 images)")
    parser.add_argument("--package", action="store_true", help="add the AOTInductor package row (FLUX models; the "
                                                               "export costs about a cold compile, once)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per row (its process group is killed)")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.models = [m for m in args.model.split(",") if m]
    args.graphs = [g for g in args.graph.split(",") if g]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        parser.error(f"--model: unknown {bad}; choose from {', '.join(MODELS)}")
    if not args.graphs or any(g not in ("segments", "regional", "cond") for g in args.graphs):
        parser.error("--graph: comma-separated of segments, regional, cond")
    if args.steps < 2:
        parser.error("--steps must be >= 2")


# ------------------------------------------------------------------------------------------------- the child side
def _build(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(pipeline, device, make_inputs()) of ``spec["model"]``, through :func:`bench.models.load_model`."""
    import torch

    from .models import load_model

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec["model"] == "tiny":
        from dbcache_compile.digits.demo import balanced_labels
        model = load_model("tiny", None, device, dtype, spec["steps"], None, None, 0)
        labels = balanced_labels(spec["per_class"])
        return model.pipe, device, lambda: dict(model.make_inputs(0, ""), labels=labels)
    model = load_model(None, spec["model"], device, dtype, spec["steps"], spec["height"], spec["width"], 0)
    return model.pipe, device, lambda: model.make_inputs(0, "")


def _timings() -> dict[str, float]:
    from torch._dynamo.utils import calculate_time_spent
    return dict(calculate_time_spent())


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters
    return {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"]}


def _generation(pipe: Any, device: Any, make_inputs: Any, before: Optional[tuple] = None) -> dict[str, Any]:
    """One pipeline call timed (plus what ran before it since ``before``: optimize), with the compile split."""
    import time

    import torch

    import dbcache_compile as dbc

    start, times0, counts0 = before or (time.perf_counter(), _timings(), _counts())
    pipe(**make_inputs())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    times, counts = _timings(), _counts()
    delta = {k: times.get(k, 0.0) - times0.get(k, 0.0) for k in ("entire_frame_compile", "backend_compile")}
    try:
        summary = dbc.summary(pipe)
        cached = len(summary.cached_steps) + len(summary.cfg_cached_steps)
    except ValueError:
        cached = None
    return {"seconds": round(seconds, 2), "dynamo": round(delta["entire_frame_compile"] - delta["backend_compile"], 2),
            "backend": round(delta["backend_compile"], 2), "cached_steps": cached,
            **{k: counts[k] - counts0[k] for k in counts}}


def child(t0: float, spec_json: str) -> None:
    """One row, in a fresh process started at ``t0``: prints ``COLD_START_RESULT {json}``."""
    import time

    import torch

    import dbcache_compile as dbc

    spec = json.loads(spec_json)
    if spec["device"] == "cpu":
        torch.set_num_threads(1)
    pipe, device, make_inputs = _build(spec)
    result: dict[str, Any] = {"loaded": round(time.perf_counter() - t0, 2)}
    before = (time.perf_counter(), _timings(), _counts())
    if spec["variant"] == "package":
        dbc.load(spec["package"], pipe=pipe)
    elif spec["variant"] == "eager":
        dbc.optimize(pipe, cache=spec["config"])
    else:
        dbc.optimize(pipe, cache=spec["config"], mode=spec["mode"], graph=spec["graph"],
                     compile_cache=spec["compile_cache"])
    result["first"] = _generation(pipe, device, make_inputs, before)
    result["to_first_image"] = round(time.perf_counter() - t0, 2)
    result["steady"] = _generation(pipe, device, make_inputs)
    if spec["variant"] == "cold":  # the same process, new configs (a failure is that row's, not the cold row's)
        same, split = spec["new_configs"]

        def switch_same() -> None:
            dbc.runtime_of(pipe).reconfigure(same)

        def switch_split() -> None:
            dbc.disable(pipe)
            dbc.optimize(pipe, cache=split, mode=spec["mode"], graph=spec["graph"],
                         compile_cache=spec["compile_cache"])

        for key, switch in (("same_split", switch_same), ("new_split", switch_split)):
            start = (time.perf_counter(), _timings(), _counts())
            try:
                switch()
                result[key] = _generation(pipe, device, make_inputs, start)
            except Exception as e:  # noqa: BLE001 - recorded in the table
                result[key] = {"error": f"failed: {type(e).__name__}: {str(e)[:200]!r}"}
    print(_MARK + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ the parent side
def execute(args: argparse.Namespace) -> int:
    """Every row of every model and lowering, each in a fresh process; 1 when a row failed."""
    import torch

    from .report import markdown_table, metadata, write_report

    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = metadata(args.command_line, device)
    work = Path(tempfile.mkdtemp(prefix="dbc_cold_"))
    rows: list[dict[str, Any]] = []
    try:
        for model in args.models:
            rows += _measure_model(args, model, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # packages, compile caches, the default Inductor caches
    meta.update({"steps": args.steps, "mode": args.mode, "threads": 1 if device == "cpu" else None,
                 "configs": {m: dict(zip(("config", "same_split", "new_split"), CONFIGS[m])) for m in args.models}})
    columns = ["model", "lowering", "row", "s to first image", "first compiled generation s", "% of cold",
               "Dynamo s", "AOT + Inductor s", "steady call s", "FX graph hits / misses", "cached steps"]
    table = [[r["model"], r["lowering"], r["row"], r.get("to_first_image"), r.get("seconds"), r.get("percent"),
              r.get("dynamo"), r.get("backend"), r.get("steady"),
              None if r.get("fxgraph_hit") is None else f"{r['fxgraph_hit']} / {r['fxgraph_miss']}",
              r.get("cached_steps")] if "error" not in r else
             [r["model"], r["lowering"], r["row"], r["error"]] + [None] * (len(columns) - 4) for r in rows]
    body = [f"{args.steps} steps, mode {args.mode}, one thread per process on a CPU. Configs (cold / same split / "
            f"new split): " + "; ".join(f"{m}: {' / '.join(CONFIGS[m])}" for m in args.models) + ".", "",
            "*s to first image*: from process start (imports, model build, optimize, first call). *first compiled "
            "generation*: optimize + the first call (the warm same-process rows: the switch + the first call). "
            "*% of cold*: of the cold row's first compiled generation. *Dynamo* = entire_frame_compile - "
            "backend_compile; *AOT + Inductor* = backend_compile (torch._dynamo.utils.calculate_time_spent).", "",
            *markdown_table(columns, table)]
    md, _ = write_report(args.out / f"cold_start_{device}", f"Time to first image: cold, warm, compile cache "
                         f"({device})", meta, body, {"rows": rows})
    print(md.read_text())
    return 0 if all("error" not in r for r in rows) else 1


def _measure_model(args: argparse.Namespace, model: str, device: str, work: Path) -> list[dict[str, Any]]:
    from .measure import run_child
    from .report import ROOT

    config, same, split = CONFIGS[model]
    height = args.height or {"flux-tiny": 32, "flux": 1024}.get(model)
    width = args.width or height
    base = {"model": model, "device": device, "steps": args.steps, "height": height, "width": width,
            "per_class": args.per_class, "mode": args.mode, "config": config, "new_configs": [same, split]}
    specs: list[tuple[str, str, dict[str, Any]]] = [("-", "eager", dict(base, variant="eager", graph=None,
                                                                         compile_cache=None))]
    if args.package and model != "tiny":
        specs.append(("-", "package (AOTInductor)", dict(base, variant="package", graph="cond", compile_cache=None,
                                                         package=str(_export(base, work)))))
    for graph in args.graphs:
        cache_dir = str(work / f"compile-cache-{model}-{graph}")
        specs.append((graph, "cold", dict(base, variant="cold", graph=graph, compile_cache=cache_dir)))
        specs.append((graph, "warm, new process (compile_cache)", dict(base, variant="warm", graph=graph,
                                                                        compile_cache=cache_dir)))
    rows: list[dict[str, Any]] = []
    for lowering, name, spec in specs:
        default_dir = Path(tempfile.mkdtemp(prefix="inductor-", dir=work))  # every process: an empty default cache
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(default_dir))
        code = (f"import time; t0 = time.perf_counter()\nfrom bench.cold_start import child\n"
                f"child(t0, {json.dumps(spec)!r})\n")
        print(f"[bench cold-start] {model} {lowering} {name} ...", file=sys.stderr, flush=True)
        run = run_child([sys.executable, "-c", code], cap=args.timeout, env=env, cwd=ROOT)
        line = next((line for line in run.output.splitlines() if line.startswith(_MARK)), None)
        if run.returncode != 0 or line is None:
            reason = f"timed out after {args.timeout} s" if run.timed_out else run.output.strip()[-300:]
            print(f"[bench cold-start] {model} {lowering} {name} failed:\n{run.output[-3000:]}", file=sys.stderr)
            rows.append({"model": model, "lowering": lowering, "row": name, "error": f"failed: {reason!r}"})
            continue
        result = json.loads(line[len(_MARK):])
        rows.append({"model": model, "lowering": lowering, "row": name, "to_first_image": result["to_first_image"],
                     **result["first"], "steady": result["steady"]["seconds"]})
        for key, label in (("same_split", f"warm, same process, new config {same} (reconfigure)"),
                           ("new_split", f"warm, same process, new split {split} (disable + optimize)")):
            if key in result:
                rows.append({"model": model, "lowering": lowering, "row": label, **result[key]})
    cold = {r["lowering"]: r["seconds"] for r in rows if r["row"] == "cold" and "seconds" in r}
    for r in rows:
        if r["lowering"] in cold and "seconds" in r and r["row"] != "cold":
            r["percent"] = round(100 * r["seconds"] / cold[r["lowering"]], 1)
    return rows


def _export(spec: dict[str, Any], work: Path) -> Path:
    """The AOTInductor package of the model's config (``cond`` lowering), exported once in this process."""
    import dbcache_compile as dbc
    from dbcache_compile.export import capture_transformer_inputs

    pipe, _, make_inputs = _build(spec)
    example = capture_transformer_inputs(pipe, **make_inputs())
    return dbc.export(pipe, example, work / f"{spec['model']}.pt2", cache=spec["config"])
