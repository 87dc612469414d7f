"""``python -m bench run ... --cp N``: the same rows on ``N`` ranks under diffusers' context parallelism (Ulysses).

Each rank is a process that builds the same pipeline (same seeds: the same weights and inputs everywhere), joins one
``torch.distributed`` process group (gloo on CPU, NCCL on CUDA with one GPU per rank, ``cuda:LOCAL_RANK``), calls
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (again on every fresh transformer
a quantized mode builds) and runs the rows; ``optimize`` then runs on the parallel transformer, whose cache decision
is all-reduced over the group (``dbcache_compile.parallel``), so every rank caches the same steps.

Two ways to start the ranks, the same code on each rank:

* ``python -m bench run ... --cp N``: this module's :func:`launch` starts ``N`` processes on this machine through
  the one launcher of ranks, :func:`bench.ranks.launch` (``fork`` on CPU, where the launcher has only imported
  modules, ``spawn`` on CUDA, whose contexts do not survive a fork) with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
  ``MASTER_ADDR`` / ``MASTER_PORT`` set, as ``torchrun`` would. Rank 0 prints to the console; the others write
  ``<out>/cp-rank<r>.log``.
* ``torchrun --nproc-per-node N -m bench run ... --cp N``: ``torchrun`` sets those variables; each rank sees them
  and runs directly (``--cp`` must equal ``WORLD_SIZE``).

After every row the ranks all-gather their measurements (``all_gather_object``): the row's wall time per call is the
**maximum over the ranks** (the call is done when the slowest rank is), so are the transformer time, the warm-up
call and the peak memory; each rank's own walls and cached calls are kept in the row's ``details["cp"]``. Rank 0
writes ``results.md`` / ``results.json`` (the same table as one process, from the gathered rows) plus a per-rank table.
TFLOPs are not counted under ``--cp`` (each rank runs a shard of the sequence).

Failures never hang the run. A row that fails the same way on every rank (a peer that does not support the model
under context parallelism, say) is recorded as failed and the run goes on, as in one process; a row that fails on
some ranks only stops every rank (their collectives no longer pair up). A rank that raises outside a row, or dies,
makes its peers fail at their next collective (gloo: connection closed; any backend: the ``--cp-timeout`` given to
``init_process_group``, which bounds every collective and the rendezvous); the launcher then gives the other ranks
10 seconds, kills them, and exits with status 1 and the first failure in time (the rank, its exception and, for ranks
other than 0, its traceback). Under ``torchrun``, its agent stops the other ranks the same way.

**CPU-only machines.** diffusers 0.42.1's ``enable_parallelism`` computes ``torch.device(device_type, rank %
torch.accelerator.device_count())`` (``ModelMixin._resolve_parallel_config``), which divides by zero without an
accelerator. :func:`cpu_accelerator_count` makes the count 1 for that call only when it is 0 (the same workaround as
the context-parallel tests' ``tests/cp_harness.py``, documented in ``docs/context_parallel.md``); diffusers is not
edited. Ring attention needs an attention backend that returns the log-sum-exp, which no CPU backend does: only
Ulysses is offered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import ranks

__all__ = ["launch", "RankContext", "setup", "cpu_accelerator_count", "append_rank_table", "GRACE_S"]

#: seconds the other ranks get after one rank failed, before the launcher kills them
GRACE_S = 10.0
#: why ``--cp`` leaves diffusers' First Block Cache out (measured: the ranks hung in mismatched collectives)
FBCACHE_UNDER_CP = ("diffusers 0.42.1's First Block Cache decides on each rank's shard of the sequence, so the ranks "
                    "take different paths and their collectives no longer pair up")


@contextlib.contextmanager
def cpu_accelerator_count() -> Iterator[None]:
    """``torch.accelerator.device_count()`` returns 1 instead of 0 for the duration (module docstring); a no-op when
    an accelerator is present."""
    import torch

    original = torch.accelerator.device_count
    if original() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


# ------------------------------------------------------------------------------------------------------------ ranks
@dataclasses.dataclass
class RankContext:
    """This process's place in the context-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def enable(self, transformer: Any) -> None:
        """``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=world_size))``."""
        from diffusers import ContextParallelConfig

        if getattr(transformer, "_cp_plan", None) is None:
            raise ValueError(f"--cp: {type(transformer).__name__} has no context-parallel plan (`_cp_plan`) in this "
                             f"diffusers, so enable_parallelism cannot shard it; of the bench's models FLUX, "
                             f"Qwen-Image and Wan have one")
        with cpu_accelerator_count():
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=self.world_size))

    def attach(self, model: Any) -> None:
        """Enable context parallelism on the model's transformer now and on every fresh one it builds later."""
        self.enable(model.pipe.transformer)
        previous: Optional[Callable[[Any], None]] = model.after_transformer

        def after(pipe: Any) -> None:
            if previous is not None:
                previous(pipe)
            self.enable(pipe.transformer)

        model.after_transformer = after

    def gather(self, result: Any) -> Any:
        """The row as all ranks ran it (a collective: every rank calls it after every row, whatever its status).
        Returns the merged row (walls: max over ranks per call; failed when it failed on every rank); raises
        :class:`RowFailedOnRank` on every rank when the ranks disagree (failed on some only)."""
        import torch.distributed as dist

        mine = {"rank": self.rank, "status": result.status, "reason": result.reason, "wall_s": result.wall_s,
                "transformer_s": result.transformer_s, "warmup_s": result.warmup_s, "calls": result.calls,
                "cached_calls": result.cached_calls, "peak_mem_bytes": result.peak_mem_bytes}
        everyone: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(everyone, mine)
        except Exception as err:
            note = f" (this rank's row failed first: {result.reason})" if result.status == "failed" else ""
            raise RowFailedOnRank(f"rank {self.rank}: gathering row {result.spec.label} ({result.spec.mode}) "
                                  f"failed{note}: {type(err).__name__}: {err}") from err
        return merge(result, everyone)

    def close(self, ok: bool) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if ok:
            # rank 0 hosts the TCP store: nobody tears the group down while another rank may still use it
            dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class RowFailedOnRank(RuntimeError):
    """A row failed on this rank: the rank stops (its peers would wait for its collectives)."""


def merge(result: Any, everyone: list[dict[str, Any]]) -> Any:
    """``result`` (this rank's row) with every rank's measurements ``everyone`` (rank order): per call the max over
    ranks of the wall and transformer time, the max warm-up and peak memory; per-rank walls / cached calls in
    ``details["cp"]``. A row that failed (or was skipped) on every rank stays failed (skipped) with rank 0's reason;
    one that failed on some ranks only raises :class:`RowFailedOnRank`."""
    statuses = {r["status"] for r in everyone}
    if len(statuses) > 1:
        bad = next(r for r in everyone if r["status"] != "ok")
        raise RowFailedOnRank(f"row {result.spec.label} ({result.spec.mode}) is {bad['status']} on rank "
                              f"{bad['rank']} ({bad['reason']}) but not on every rank: stopping, the ranks no longer "
                              f"run the same collectives")
    merged = dataclasses.replace(result, details=dict(result.details))
    if result.status != "ok":
        merged.reason = f"on all {len(everyone)} ranks: {everyone[0]['reason']}"
        return merged
    merged.wall_s = [max(walls) for walls in zip(*(r["wall_s"] for r in everyone))]
    merged.transformer_s = [max(ts) for ts in zip(*(r["transformer_s"] for r in everyone))]
    warmups = [r["warmup_s"] for r in everyone if r["warmup_s"] is not None]
    merged.warmup_s = max(warmups) if warmups else None
    peaks = [r["peak_mem_bytes"] for r in everyone if r["peak_mem_bytes"] is not None]
    merged.peak_mem_bytes = max(peaks) if peaks else None
    merged.details["cp"] = {
        "ranks": len(everyone), "gathered": "per call, the max over ranks of wall / transformer time",
        "wall_s_per_rank": [r["wall_s"] for r in everyone],
        "wall_s_median_per_rank": [statistics.median(r["wall_s"]) if r["wall_s"] else None for r in everyone],
        "cached_calls_per_rank": [r["cached_calls"] for r in everyone],
        "ranks_agree": all(r["cached_calls"] == everyone[0]["cached_calls"] for r in everyone)}
    return merged


def setup(args: Any) -> RankContext:
    """Join the process group of this rank (``torchrun`` or :func:`launch` set the environment) and point
    ``args.device`` at this rank's device."""
    import torch
    import torch.distributed as dist

    env = ranks.rank_env()
    assert env is not None
    rank, world, local = env
    if world != args.cp:
        raise ValueError(f"--cp {args.cp} but WORLD_SIZE is {world}: run `torchrun --nproc-per-node {args.cp}` "
                         f"(or drop torchrun: `python -m bench run --cp N` starts the ranks itself)")
    cuda = args.device.type == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        args.device = torch.device("cuda", local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.cp_timeout))
    launcher = os.environ.get("BENCH_CP_LAUNCHER", "torchrun")
    return RankContext(rank, world, local, backend, launcher)


def append_rank_table(path: Path, rows: list[Any], world_size: int) -> None:
    """Append the per-rank wall times of ``rows`` (merged rows) to the markdown report at ``path``."""
    from .report import markdown_table

    header = (["Config", "Mode", "Wall s/img (gathered)"] + [f"Wall s/img rank {r}" for r in range(world_size)]
              + ["Cached steps per rank"])
    body = []
    for r in rows:
        cp = r.details.get("cp") if r.ok else None
        if cp is None:
            body.append([r.spec.label, r.spec.mode, r.status] + [""] * world_size + [""])
            continue
        medians = [f"{m:.3f}" if m is not None else "n/a" for m in cp["wall_s_median_per_rank"]]
        cached = " / ".join(",".join(str(c) for c in calls) for calls in cp["cached_calls_per_rank"])
        body.append([r.spec.label, r.spec.mode, f"{statistics.median(r.wall_s):.3f}"] + medians
                    + [cached + ("" if cp["ranks_agree"] else " (ranks disagree)")])
    text = ["", f"Context parallel: {world_size} ranks (Ulysses). Wall s/img (gathered) is the median over prompts of "
                f"each call's maximum over the ranks (the Wall s/img of the table above); per rank, that rank's "
                f"own median. Cached steps per rank: cached transformer calls per prompt, per rank.", ""]
    with path.open("a") as f:
        f.write("\n".join(text + markdown_table(header, body)) + "\n")


# --------------------------------------------------------------------------------------------------------- launcher
def launch(args: Any, rank_main: Callable[[int, int, Any], int]) -> int:
    """Start ``args.cp`` ranks on this machine, each running ``rank_main(rank, world_size, args)`` (``bench.run``'s:
    ``python -m bench run`` with these flags), and wait for them. Returns rank 0's exit status, or 1 (with the first
    failing rank's error on stderr) when a rank failed or died."""
    world = args.cp
    args.out.mkdir(parents=True, exist_ok=True)
    logs = [None] + [str(args.out / f"cp-rank{r}.log") for r in range(1, world)]
    cuda = args.device.type == "cuda"
    print(f"python -m bench run --cp {world}: starting {world} ranks ({'nccl' if cuda else 'gloo'}, Ulysses degree "
          f"{world}); ranks 1-{world - 1} log to {args.out}/cp-rank<r>.log", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        statuses = ranks.launch(rank_main, world, args=(args,), start_method="spawn" if cuda else "fork",
                                grace=GRACE_S, logs=logs, env={"BENCH_CP_LAUNCHER": "python -m bench run --cp"})
    except ranks.RankError as err:
        print(failure_message(err, world, logs), file=sys.stderr)
        return 1
    return statuses[0]


def failure_message(err: ranks.RankError, world_size: int, logs: list[Optional[str]]) -> str:
    """What ``python -m bench run --cp N`` prints when a rank failed: the rank and its error, its traceback (rank 0
    printed its own on the console), the other ranks' failures and the ranks that were stopped."""
    lines = [f"python -m bench run --cp {world_size}: error: {err}"]
    if err.tb and err.rank != 0:
        lines += ["", f"traceback of rank {err.rank} (its log: {logs[err.rank]}):", err.tb.rstrip()]
    return "\n".join(lines + list(getattr(err, "__notes__", [])))
