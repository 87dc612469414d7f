"""Hand-captured CUDA graphs of the cached step's segments (the ``regional`` lowering).

Regional compile (each transformer block compiled once per block class) compiles in seconds where whole-segment
graphs take minutes on the FLUX-size model (docs/design.md, "Compile time"), but leaves the glue between the blocks (embeddings,
residuals, the decision, the output projection) to eager launches. :class:`SegmentGraphs` captures each segment
(``head`` / ``miss`` / ``hit``) as one ``torch.cuda.CUDAGraph`` instead, so a step is two graph replays and one
host read of the predicate, whatever runs inside. The uncached ``regional`` baseline captures its whole forward
the same way.

How a segment is captured, per input signature (shapes, dtypes, non-tensor values, and which static tensors):

1. Inputs are split into *static* tensors (registered with :meth:`SegmentGraphs.mark_static`: the cache's state
   buffers, the per-step scalars, and every captured output) and *dynamic* ones (what the pipeline passes in),
   which are copied into graph-owned tensors at capture and before every replay.
2. Warm-up calls on a side stream compile the regions (max-autotune benchmarks there, never inside a capture);
   the state the segment mutates in place is snapshotted first and restored afterwards, so the warm-up leaves no
   trace in the cache state.
3. ``torch.cuda.graph`` captures the call into one memory pool shared by the runtime's graphs. Sharing is safe
   because the segments never run concurrently and every output is consumed (``miss``/``hit`` read the ``head``
   outputs in the same step, and those outputs stay referenced, so no later capture reuses their memory) or
   copied (the runtime clones the step's output) before a replay that could overwrite it. (PyTorch's docs say the
   same since pytorch/pytorch#166975: graphs that never run concurrently may share a pool in any replay order.)
4. The first replay produces the call's result (capturing executes nothing).

``emulate=True`` runs the same bookkeeping on any device with a stand-in for ``torch.cuda.CUDAGraph`` that re-runs
the function on the captured static inputs and writes its results into the captured output tensors: the CPU test
suite uses it to check that no state is cloned by mistake, no warm-up leaks into the state and no output is held
across replays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

__all__ = ["SegmentGraphs"]


class _EmulatedGraph:
    """Stand-in for ``torch.cuda.CUDAGraph`` (tests): replay re-runs the captured call and writes into its outputs."""

    def __init__(self, fn: Callable[[], Any], outputs: Any) -> None:
        self.fn = fn
        self.outputs = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]

    def replay(self) -> None:
        fresh = [t for t in tree_leaves(self.fn()) if isinstance(t, torch.Tensor)]
        for out, new in zip(self.outputs, fresh):
            out.copy_(new)


@dataclasses.dataclass
class _Entry:
    graph: Any
    inputs: list  # the leaves the graph was captured on (dynamic ones are graph-owned copies)
    dynamic: list[int]  # indices of the leaves copied in before each replay
    outputs: Any


class SegmentGraphs:
    """Captures and replays segments as CUDA graphs (see the module doc); one instance per cached transformer."""

    def __init__(self, warmup: int = 2, emulate: bool = False) -> None:
        self.warmup = warmup
        self.emulate = emulate
        self.entries: dict[tuple, _Entry] = {}
        # tensors whose storage the graphs may read in place; strong references keep their ids unique
        self._static: dict[int, torch.Tensor] = {}
        self._pool: Optional[Any] = None
        self._recent: dict[tuple, tuple[tuple, _Entry]] = {}
        self.captures = 0
        self.replays = 0

    def mark_static(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors that stay at the same address and that graphs read (and may update) in place."""
        for t in tensors:
            self._static[id(t)] = t

    def _describe(self, leaf: Any) -> tuple:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) in self._static:
                return ("static", id(leaf))
            return ("input", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device)
        try:
            hash(leaf)
            return ("const", type(leaf), leaf)
        except TypeError:
            return ("const", type(leaf), repr(leaf))

    def __call__(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: Optional[dict] = None,
                 mutated: Sequence[torch.Tensor] = (), variant: Any = None) -> Any:
        """``fn(*args, **kwargs)`` as a replay of its graph for this input signature (captured on first use).
        ``mutated``: static tensors ``fn`` updates in place (restored after the warm-up calls). ``variant``: a
        hashable value that changes what ``fn`` computes without being one of its arguments (e.g. a LoRA scale the
        model reads from its modules): another value is another graph."""
        # fast path (miss / hit: every argument is the same static object as last time, e.g. the head's outputs
        # and the state lists): no flattening, no key, no copies; the GPU waits for this host work after the
        # decision read, so it is kept short
        recent_key = (name, variant, id(args[0]) if args else None)
        recent = self._recent.get(recent_key)
        if (recent is not None and not kwargs and len(args) == len(recent[0])
                and all(a is b for a, b in zip(args, recent[0]))):
            entry = recent[1]
        else:
            leaves, spec = tree_flatten((args, kwargs or {}))
            key = (name, variant, str(spec), tuple(self._describe(leaf) for leaf in leaves))
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = self._capture(name, fn, leaves, spec, mutated)
            else:
                for i in entry.dynamic:
                    if leaves[i] is not entry.inputs[i]:
                        entry.inputs[i].copy_(leaves[i])
            if not entry.dynamic and not kwargs:
                self._recent[recent_key] = (args, entry)  # holding args keeps the ids in the key unique
        entry.graph.replay()
        self.replays += 1
        return entry.outputs

    def _capture(self, name: str, fn: Callable[..., Any], leaves: list, spec: Any,
                 mutated: Sequence[torch.Tensor]) -> _Entry:
        dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and id(leaf) not in self._static]
        inputs = list(leaves)
        for i in dynamic:
            inputs[i] = leaves[i].clone()
        args, kwargs = tree_unflatten(inputs, spec)
        call = lambda: fn(*args, **kwargs)  # noqa: E731
        saved = [t.clone() for t in mutated]
        try:
            if self.emulate:
                for _ in range(self.warmup):
                    call()
                outputs = call()
                graph: Any = _EmulatedGraph(call, outputs)
            else:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        call()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                with torch.cuda.graph(graph, pool=self._pool):
                    outputs = call()
        except Exception as exc:
            raise RuntimeError(
                f"dbcache_compile: capturing the '{name}' segment as a CUDA graph failed ({type(exc).__name__}: "
                f"{exc}). Something in the transformer's forward synchronizes with the host or allocates host "
                f"memory; use optimize(..., graph='segments') (cudagraph trees) or a mode without CUDA graphs "
                f"('default' / 'max-autotune-no-cudagraphs')") from exc
        finally:  # the warm-up (and the emulated capture) ran the segment for real: undo its state updates
            self._restore(mutated, saved)
        self.mark_static(t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor))
        self.captures += 1
        return _Entry(graph, inputs, dynamic, outputs)

    @staticmethod
    def _restore(mutated: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
        for t, s in zip(mutated, saved):
            t.copy_(s)
