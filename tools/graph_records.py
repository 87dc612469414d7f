"""Golden graph records: how each (model, lowering) compiles on the tiny pipelines, guarded by the test suite.

    python tools/graph_records.py --update                        # rewrite every record in graphs/
    python tools/graph_records.py --update --only family-wan      # some (comma-separated record names)
    python tools/graph_records.py                                 # compare, exit status 1 on a difference

``graphs/<name>-<lowering>.json`` holds the number of compiled graphs, graph breaks, ``torch.cond`` nodes and
recompiles after warm-up. ``flux`` and ``qwen-image`` (the tiny pipelines of :mod:`dbcache_compile.testing`, compiled
with Inductor) are measured over three pipeline calls that exercise warmup, hits, misses, the MC limit, a TaylorSeer
forecast and (Qwen-Image) a CFG pair, with ``torch.compiler.set_stance("fail_on_recompile")`` after the first call.
A change in graph structure then shows up as a reviewed diff of these files.

Every case of ``tests/families/`` with a record threshold (``Case.record``) gets ``family-<case>-<lowering>.json``
for each of ``regional`` and ``segments`` that its family runs and its ``Case.record_lowerings`` names: the graph
structure measured with Dynamo's eager backend (graph count, breaks, recompiles after warm-up; Inductor would only
add compile time here) and the cached steps of every chain and branch (the recorded run must hit the cache: the
compiled hit path is what the record vouches for).

Both lowerings capture their segments by hand as CUDA graphs on CUDA; the records run them with the capture/replay
bookkeeping emulated on CPU (:mod:`dbcache_compile.cudagraphs`), so a record also counts the graphs captured. For
``regional`` the compiled graphs are the block regions (one per block class; Qwen-Image compiles a second one, with a
dynamic text length, for the unconditional branch's shorter prompt); for ``segments`` the segments themselves (a
family with a prologue: whole head / miss / hit steps; any other: its Fn group, each list's middle group, its Bn
group).

It imports the tiny pipelines from ``tests/families/`` (which are not part of the package), so it runs from a
checkout; the tests import it from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/graph_records.py`: tests.families lives in the repository root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dbcache_compile.lowerings import lowering_named  # noqa: E402
from dbcache_compile.optimize import disable, optimize, runtime_of, summary  # noqa: E402
from dbcache_compile.stats import CacheSummary  # noqa: E402

__all__ = ["SCENARIOS", "LOWERINGS", "FAMILY_LOWERINGS", "GraphRun", "measure", "measure_family", "family_records",
           "record_path", "main"]

#: the golden records: the repository's ``graphs/``
RECORD_DIR = ROOT / "graphs"
#: what a test says when a record differs (``.format(record name)``)
UPDATE_HINT = "graph structure changed: review the diff and run `python tools/graph_records.py --update --only {}`"
SCENARIO_CONFIG = "F1B0_W2M0MC2_T1O1_R0.45"
STEPS = 10
CALLS = 3


def _case(name: str) -> Callable[[], tuple[Any, dict]]:
    def build() -> tuple[Any, dict]:
        from tests.families import CASES
        return CASES[name].builder(), CASES[name].inputs()
    return build


#: record name -> its case of ``tests/families/``: the tiny FLUX.1 and Qwen-Image (with true CFG)
SCENARIO_CASES = {"flux": "flux", "qwen-image": "qwen_image"}
#: record name -> ``() -> (pipeline, call kwargs)``
SCENARIOS: dict[str, Callable[[], tuple[Any, dict]]] = {name: _case(case) for name, case in SCENARIO_CASES.items()}
LOWERINGS = ("cond", "segments", "regional")
#: the lowerings a family case is recorded with (each one its family runs)
FAMILY_LOWERINGS = ("regional", "segments")


@dataclasses.dataclass
class GraphRun:
    """A measured scenario: the record (what the golden file holds) plus the outputs, for comparison with eager."""

    record: dict
    images: list[torch.Tensor]
    summaries: list[CacheSummary]


def record_path(name: str, lowering: str, directory: Optional[Path] = None) -> Path:
    return (directory or RECORD_DIR) / f"{name}-{lowering}.json"


def run_scenario(pipe: Any, inputs: dict, calls: int = CALLS) -> tuple[list[torch.Tensor], list[CacheSummary]]:
    images, summaries = [], []
    for _ in range(calls):
        images.append(pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images)
        summaries.append(summary(pipe))
    return images, summaries


def measure(scenario: str, lowering: str) -> GraphRun:
    """Compile the tiny ``scenario`` pipeline with ``lowering`` (Inductor, mode "default") and record its graphs."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    graphs: list[torch.fx.GraphModule] = []

    def recording_inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    pipe, inputs = SCENARIOS[scenario]()
    optimize(pipe, cache=SCENARIO_CONFIG, mode="default", graph=lowering,
             compile_options={"backend": recording_inductor})
    runtime = runtime_of(pipe)
    if lowering_named(lowering).captures:  # the CUDA-graph capture/replay bookkeeping, emulated on CPU
        runtime.use_segment_graphs(emulate=True)
    try:
        images, summaries = run_scenario(pipe, inputs, 1)
        warm = len(graphs)
        with torch.compiler.set_stance("fail_on_recompile"):
            more_images, more_summaries = run_scenario(pipe, inputs, CALLS - 1)
        segment_graphs = runtime.graphs.captures if runtime.graphs is not None else None
    finally:
        disable(pipe)
    cond_nodes = sum(1 for gm in graphs for node in gm.graph.nodes if node.target is torch.ops.higher_order.cond)
    record = {
        "adapter": scenario, "lowering": lowering, "config": SCENARIO_CONFIG, "steps": STEPS, "calls": CALLS,
        "graphs": len(graphs), "graph_breaks": sum(counters["graph_break"].values()),
        "cond_nodes": cond_nodes, "recompiles_after_warmup": len(graphs) - warm,
        "cudagraphs": (f"emulated on CPU: {segment_graphs} segment graphs captured by hand (head/miss/hit per "
                       f"CFG branch), replayed without recapture" if segment_graphs is not None else
                       "not measurable on CPU (Inductor skips CUDA graphs for cond graphs in torch 2.11-2.14)"),
    }
    return GraphRun(record, images + more_images, summaries + more_summaries)


FAMILY_STEPS = 6
FAMILY_CALLS = 2


def family_config(case: str) -> str:
    """The cache config of ``case``'s records (its record threshold: one that makes the compiled run hit the cache
    in ``FAMILY_STEPS`` steps)."""
    from tests.families import RECORDS
    return f"F1B0_W2M0MC2_T0O1_R{RECORDS[case].record}"


def family_call(pipe: Any, case: str) -> Any:
    """One recorded pipeline call of ``case``."""
    from tests.families import CASES
    return pipe(**CASES[case].inputs(), num_inference_steps=FAMILY_STEPS, generator=torch.Generator().manual_seed(0))


def cached_steps(s: CacheSummary) -> dict:
    """Cached steps of every chain of every transformer, per branch: ``{"[transformer_2.]<chain>": {branch: steps}}``
    (a record whose every list is empty never ran the compiled hit path)."""
    out = {}
    for prefix, one in [("", s), *((f"{name}.", other) for name, other in s.transformers.items())]:
        # a family with a prologue (Qwen-Image-Edit) has one chain and no per-chain entries
        chains = one.chains or {"all blocks": {"branches": {n: b["cached_steps"] for n, b in one.branches.items()}}}
        for chain, entry in chains.items():
            out[prefix + chain] = entry["branches"]
    return out


def family_records() -> list[tuple[str, str]]:
    """``(case, lowering)`` of every family record: each case of ``tests/families/`` with a record threshold, with
    each lowering of :data:`FAMILY_LOWERINGS` in its ``record_lowerings`` that its family runs."""
    from dbcache_compile.lowerings import lowerings_for
    from tests.families import RECORDS, case_family
    return [(case, lowering) for case in RECORDS for lowering in FAMILY_LOWERINGS
            if lowering in RECORDS[case].record_lowerings and lowering in lowerings_for(case_family(case))]


def measure_family(case: str, lowering: str, pipe: Any = None) -> GraphRun:
    """The ``lowering`` graph record of the tiny pipeline ``case`` (``pipe``: that pipeline already built, left
    unoptimized), with the hand-captured segment graphs emulated; plus the outputs and summaries of its calls."""
    from torch._dynamo.utils import counters

    from tests.families import CASES

    config = family_config(case)
    graphs: list[torch.fx.GraphModule] = []

    def recording_eager(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    pipe = CASES[case].builder() if pipe is None else pipe
    optimize(pipe, cache=config, mode="default", graph=lowering, compile_options={"backend": recording_eager})
    # every optimized transformer (Wan 2.2's transformer_2 has its own runtime)
    captured = [runtime_of(t).use_segment_graphs(emulate=True)
                for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
                if isinstance(t, torch.nn.Module)]
    try:
        outputs, summaries = [family_call(pipe, case)], [summary(pipe)]
        warm = len(graphs)
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(FAMILY_CALLS - 1):
                outputs.append(family_call(pipe, case))
                summaries.append(summary(pipe))
    finally:
        disable(pipe)
    record = {"family": case, "lowering": lowering, "config": config, "steps": FAMILY_STEPS, "calls": FAMILY_CALLS,
              "backend": "eager (Dynamo graph structure)", "graphs": len(graphs),
              "graph_breaks": sum(counters["graph_break"].values()), "recompiles_after_warmup": len(graphs) - warm,
              "segment_graphs": sum(g.captures for g in captured), "cached_steps": cached_steps(summaries[-1])}
    return GraphRun(record, outputs, summaries)


def jobs() -> list[tuple[str, str, Callable[[], dict]]]:
    """``(record name, lowering, () -> record)`` of every golden record."""
    out: list[tuple[str, str, Callable[[], dict]]] = [
        (scenario, lowering, lambda s=scenario, lo=lowering: measure(s, lo).record)
        for scenario in SCENARIOS for lowering in LOWERINGS]
    out += [(f"family-{case}", lowering, lambda c=case, lo=lowering: measure_family(c, lo).record)
            for case, lowering in family_records()]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/graph_records.py", description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the golden records instead of comparing")
    parser.add_argument("--dir", type=Path, default=RECORD_DIR,
                        help=f"where the records are (default: the repository's {RECORD_DIR})")
    parser.add_argument("--only", default=None,
                        help="comma-separated record names: flux, qwen-image and/or family-<case> (a case of "
                             "tests/families/, every lowering recorded for it), or family-<case>-<lowering>")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    todo = jobs()
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        known = {name for name, _, _ in todo} | {f"{name}-{lowering}" for name, lowering, _ in todo}
        if wanted - known:
            parser.error(f"no record named {', '.join(sorted(wanted - known))}; known: {', '.join(sorted(known))}")
        todo = [job for job in todo if job[0] in wanted or f"{job[0]}-{job[1]}" in wanted]
    failed = False
    for name, lowering, run in todo:
        record = run()
        path = record_path(name, lowering, args.dir)
        if args.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {path}: {record['graphs']} graphs, {record['graph_breaks']} breaks")
        else:
            golden = json.loads(path.read_text()) if path.exists() else None
            failed |= golden != record
            print(f"{path.name}: {'ok' if golden == record else 'DIFFERS' if golden else 'MISSING'}"
                  + ("" if golden == record else f"\n  golden {golden}\n  now    {record}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
