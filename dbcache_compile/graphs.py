"""Golden graph records: how each (adapter, lowering) compiles on the tiny models, guarded by the test suite.

``python -m dbcache_compile.graphs --update`` regenerates ``graphs/<adapter>-<lowering>.json`` of the repository
checkout it runs from (``--dir`` another folder, required outside a checkout; ``--only flux,family-wan`` a subset);
without ``--update`` it compares. A record holds the number of compiled graphs, graph breaks, ``torch.cond`` nodes
and recompiles after warm-up, measured over three pipeline calls that exercise warmup, hits, misses, the MC limit, a
TaylorSeer forecast and (Qwen-Image) a CFG pair, with ``torch.compiler.set_stance("fail_on_recompile")`` after the
first call. A change in graph structure then shows up as a reviewed diff of these files.

Families on the generic adapter (:mod:`dbcache_compile.families`) get a ``family-<name>-regional.json`` record of
their block regions, measured with Dynamo's eager backend (the graph structure: graph count, breaks, recompiles after
warm-up; Inductor would only add compile time here).

For ``regional`` the graphs are the block regions (one per block class; Qwen-Image compiles a second one, with a
dynamic text length, for the unconditional branch's shorter prompt) and the run uses emulated segment CUDA graphs
(:mod:`dbcache_compile.cudagraphs`), so the record also counts the captures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .optimize import disable, optimize, runtime_of, summary
from .stats import CacheSummary

__all__ = ["SCENARIOS", "GraphRun", "measure", "record_path", "main"]


def repository_graphs(package_dir: Path = Path(__file__).resolve().parent) -> Optional[Path]:
    """The repository's ``graphs/`` when the package runs from a checkout (``package_dir``'s parent holds the
    project's ``pyproject.toml`` and a ``graphs/`` folder), else ``None`` (an installed package: its parent is
    ``site-packages``, where no records belong)."""
    root = package_dir.parent
    pyproject = root / "pyproject.toml"
    try:
        ours = pyproject.is_file() and 'name = "dbcache-compile"' in pyproject.read_text()
    except OSError:
        ours = False
    return root / "graphs" if ours and (root / "graphs").is_dir() else None


#: where the golden records are: the repository's ``graphs/``; ``None`` outside a checkout (``--dir`` required)
RECORD_DIR: Optional[Path] = repository_graphs()
SCENARIO_CONFIG = "F1B0_W2M0MC2_T1O1_R0.45"
STEPS = 10
CALLS = 3


def _flux() -> tuple[Any, dict]:
    from .testing import flux_inputs, tiny_flux_pipeline
    return tiny_flux_pipeline(), flux_inputs()


def _qwen() -> tuple[Any, dict]:
    from .testing import qwen_inputs, tiny_qwen_pipeline
    return tiny_qwen_pipeline(), qwen_inputs(cfg=True)


SCENARIOS: dict[str, Callable[[], tuple[Any, dict]]] = {"flux": _flux, "qwen-image": _qwen}
LOWERINGS = ("cond", "segments", "regional")


@dataclasses.dataclass
class GraphRun:
    """A measured scenario: the record (what the golden file holds) plus the outputs, for comparison with eager."""

    record: dict
    images: list[torch.Tensor]
    summaries: list[CacheSummary]


def record_path(adapter: str, lowering: str, directory: Optional[Path] = None) -> Path:
    directory = directory or RECORD_DIR
    if directory is None:
        raise ValueError("no repository graphs/ folder found next to the dbcache_compile package (an installed copy?): "
                         "give the records' folder")
    return directory / f"{adapter}-{lowering}.json"


def run_scenario(pipe: Any, inputs: dict, calls: int = CALLS) -> tuple[list[torch.Tensor], list[CacheSummary]]:
    images, summaries = [], []
    for _ in range(calls):
        images.append(pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images)
        summaries.append(summary(pipe))
    return images, summaries


def measure(adapter: str, lowering: str) -> GraphRun:
    """Compile the tiny ``adapter`` pipeline with ``lowering`` (Inductor, mode "default") and record its graphs."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    graphs: list[torch.fx.GraphModule] = []

    def recording_inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    pipe, inputs = SCENARIOS[adapter]()
    optimize(pipe, cache=SCENARIO_CONFIG, mode="default", graph=lowering,
             compile_options={"backend": recording_inductor})
    runtime = runtime_of(pipe)
    if lowering == "regional":  # the CUDA-graph capture/replay bookkeeping, emulated on CPU
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
        "adapter": adapter, "lowering": lowering, "config": SCENARIO_CONFIG, "steps": STEPS, "calls": CALLS,
        "graphs": len(graphs), "graph_breaks": sum(counters["graph_break"].values()),
        "cond_nodes": cond_nodes, "recompiles_after_warmup": len(graphs) - warm,
        "cudagraphs": {
            "cond": "not measurable on CPU (Inductor skips CUDA graphs for cond graphs in torch 2.11-2.14)",
            "segments": "not measurable on CPU (cudagraph trees on CUDA)",
            "regional": f"emulated on CPU: {segment_graphs} segment graphs captured by hand (head/miss/hit per "
                        f"CFG branch), replayed without recapture",
        }[lowering],
    }
    return GraphRun(record, images + more_images, summaries + more_summaries)


FAMILY_STEPS = 6
FAMILY_CALLS = 2


def _cached_steps(s: CacheSummary) -> dict:
    """Cached steps of every chain of every transformer, per branch: ``{"[transformer_2.]<chain>": {branch: steps}}``
    (a record whose every list is empty never ran the compiled hit path)."""
    out = {}
    for prefix, one in [("", s), *((f"{name}.", other) for name, other in s.transformers.items())]:
        # an explicit adapter (Qwen-Image-Edit) has one chain and no per-chain entries
        chains = one.chains or {"all blocks": {"branches": {n: b["cached_steps"] for n, b in one.branches.items()}}}
        for chain, entry in chains.items():
            out[prefix + chain] = entry["branches"]
    return out


def measure_family(name: str) -> dict:
    """The regional graph record of a tiny pipeline of family ``name`` (``testing_families.record_threshold``:
    one that makes the compiled run hit the cache in ``FAMILY_STEPS`` steps)."""
    from torch._dynamo.utils import counters

    from . import testing_families as tf

    builder, make_inputs = tf.FAMILIES[name]
    config = f"F1B0_W2M0MC2_T0O1_R{tf.record_threshold(name)}"
    graphs: list[torch.fx.GraphModule] = []

    def recording_eager(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    pipe = builder()
    optimize(pipe, cache=config, mode="default", graph="regional", compile_options={"backend": recording_eager})

    def call() -> None:
        pipe(**make_inputs(), num_inference_steps=FAMILY_STEPS, generator=torch.Generator().manual_seed(0))

    try:
        call()
        warm = len(graphs)
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(FAMILY_CALLS - 1):
                call()
        cached = _cached_steps(summary(pipe))
    finally:
        disable(pipe)
    return {"family": name, "lowering": "regional", "config": config, "steps": FAMILY_STEPS, "calls": FAMILY_CALLS,
            "backend": "eager (Dynamo graph structure)", "graphs": len(graphs),
            "graph_breaks": sum(counters["graph_break"].values()), "recompiles_after_warmup": len(graphs) - warm,
            "cached_steps": cached}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbcache_compile.graphs", description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the golden records instead of comparing")
    parser.add_argument("--dir", type=Path, default=RECORD_DIR,
                        help="where the records are (default: the repository's graphs/ when run from a checkout"
                             + (f", {RECORD_DIR}" if RECORD_DIR is not None else "; none found here, so required")
                             + ")")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset: adapter names (flux, qwen-image) and/or family-<name>")
    args = parser.parse_args(argv)
    if args.dir is None:
        parser.error("--dir is required: no repository graphs/ folder was found next to the dbcache_compile package "
                     "(it is installed, not run from a checkout), and the records do not belong in site-packages")
    torch.set_num_threads(1)
    from .testing_families import RECORD_FAMILIES
    jobs: list[tuple[str, str, Callable[[], dict]]] = [
        (adapter, lowering, lambda a=adapter, lo=lowering: measure(a, lo).record)
        for adapter in SCENARIOS for lowering in LOWERINGS]
    jobs += [(f"family-{name}", "regional", lambda n=name: measure_family(n)) for name in RECORD_FAMILIES]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        jobs = [job for job in jobs if job[0] in wanted]
    failed = False
    for name, lowering, run in jobs:
        record = run()
        path = record_path(name, lowering, args.dir)
        if args.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {path}: {record['graphs']} graphs, {record['graph_breaks']} breaks")
        else:
            golden = json.loads(path.read_text())
            failed |= golden != record
            print(f"{path.name}: {'ok' if golden == record else 'DIFFERS'}"
                  + ("" if golden == record else f"\n  golden {golden}\n  now    {record}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
