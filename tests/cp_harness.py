"""Run a function on N CPU ranks of a real ``torch.distributed`` gloo process group and collect each rank's result:
the context-parallel tests' front to the one launcher of ranks, :func:`bench.ranks.launch` (also the launcher of
``python -m bench run --cp N``).

    from cp_harness import run_ranks

    def work(rank, world_size, steps):           # module-level: it is pickled by reference
        ...                                      # runs inside the process group
        return picklable_result

    results = run_ranks(work, 2, args=(4,))     # [result of rank 0, result of rank 1]

What this front adds to the launcher, for tests: the gloo group (``init_process_group("gloo", env://)`` on a free
localhost port, bounded by ``collective_timeout``), the fork server preloading torch, diffusers and ``fn``'s module,
``threads`` torch threads per rank, the accelerator-count patch below, and the rank's own exception type: when the
failing rank's exception unpickles it is re-raised as itself (so ``pytest.raises(ValueError)`` matches what the rank
raised), with the rank's traceback chained as ``__cause__`` (:class:`RemoteTraceback`) and the other ranks' failures
as notes; otherwise :class:`RankError` (e.g. a rank that died without reporting: segfault, ``os._exit``). Nothing
hangs: past ``timeout`` the ranks are killed and :class:`RankTimeout` names them; after a failure the others get
``grace`` seconds, then are killed.

**diffusers 0.42.1 on a CPU-only machine.** ``ModelMixin._resolve_parallel_config`` (called by
``enable_parallelism``, ``diffusers/models/modeling_utils.py``) computes
``torch.device(device_type, rank % torch.accelerator.device_count())``; without an accelerator
``device_type`` is ``"cpu"`` and ``device_count()`` is 0, so ``enable_parallelism`` raises ``ZeroDivisionError``
before doing anything. With a count of 1 the device is ``cpu:0`` and Ulysses over gloo works (the mesh is
``init_device_mesh("cpu", ...)``, the collectives are gloo's). Each rank therefore runs ``fn`` under
:func:`cpu_accelerator_count`, which makes ``torch.accelerator.device_count()`` return 1 *only* when there is no
accelerator (it returned 0) and restores the original function afterwards; diffusers is not edited. Set
``patch_device_count=False`` to see the raw behaviour.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

from bench.cp import cpu_accelerator_count
from bench.ranks import RankError, RankTimeout, RemoteTraceback, launch

__all__ = ["run_ranks", "cpu_accelerator_count", "RankError", "RankTimeout", "RemoteTraceback"]


def _test_rank(rank: int, world_size: int, fn: Callable, threads: int, patch_device_count: bool, args: tuple,
               kwargs: dict) -> Any:
    import torch

    torch.set_num_threads(threads)
    with cpu_accelerator_count() if patch_device_count else contextlib.nullcontext():
        return fn(rank, world_size, *args, **kwargs)


def run_ranks(fn: Callable, world_size: int = 2, args: tuple = (), kwargs: Optional[dict] = None,
              timeout: float = 120.0, collective_timeout: float = 60.0, grace: float = 5.0, threads: int = 1,
              patch_device_count: bool = True, start_method: str = "forkserver",
              preload: Sequence[str] = ("torch", "torch.distributed", "diffusers")) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` new processes sharing a gloo process group;
    return the per-rank results in rank order (each must pickle).

    Args:
        fn: a module-level function (pickled by reference; the ranks import its module).
        timeout: wall-clock limit for all ranks together, from their start (the imports inside ``fn`` count, the
            one-time fork-server start with its preloads does not).
        collective_timeout: ``init_process_group(timeout=...)``: rendezvous and each gloo collective.
        grace: seconds the other ranks get to finish after one rank failed, before they are killed.
        threads: ``torch.set_num_threads`` in each rank (tiny models are fastest single-threaded, and ``world_size``
            ranks share the machine's cores).
        patch_device_count: run ``fn`` under :func:`cpu_accelerator_count`.
        start_method: ``"forkserver"`` (default) or ``"spawn"``; not ``"fork"`` (a pytest process may hold threads).
        preload: modules the fork server imports when this call starts it (``fn``'s module and this one are added).
    """
    preload = [*preload, __name__] + ([fn.__module__] if fn.__module__ != "__main__" else [])
    try:
        return launch(_test_rank, world_size, args=(fn, threads, patch_device_count, tuple(args), dict(kwargs or {})),
                      start_method=start_method, preload=preload, timeout=timeout, grace=grace,
                      process_group="gloo", collective_timeout=collective_timeout)
    except RankError as err:
        if err.exception is None:
            raise
        exc = err.exception
        for note in getattr(err, "__notes__", []):
            exc.add_note(note)
        raise exc from err.__cause__
