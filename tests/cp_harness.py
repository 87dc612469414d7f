"""Run a function on N CPU ranks of a real ``torch.distributed`` gloo process group and collect each rank's result.

Used by the context-parallel tests (``tests/test_context_parallel.py``); nothing here is a home-made transport: each
rank is a process of Python's ``multiprocessing`` (default start method "forkserver": a clean single-threaded server
process imports torch, diffusers and ``fn``'s module once, each rank is a fork of it; "spawn" works too, at the cost
of every rank re-importing diffusers), the process group is
``torch.distributed.init_process_group("gloo", init_method="env://")`` (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
``WORLD_SIZE`` set per rank, a free localhost port), and parallelism is whatever the function sets up with it
(diffusers' own ``enable_parallelism``).

    from cp_harness import run_ranks

    def work(rank, world_size, steps):           # module-level: it is pickled by reference
        ...                                      # the process group is initialised here
        return picklable_result

    results = run_ranks(work, 2, args=(4,))     # [result of rank 0, result of rank 1]

Failure handling — nothing may hang:

* ``init_process_group(timeout=...)`` bounds the rendezvous and every gloo collective (``collective_timeout``);
* the parent waits at most ``timeout`` seconds for all ranks; ranks still running then are killed (SIGTERM, then
  SIGKILL) and :class:`RankTimeout` names them;
* when a rank raises, the parent gives the other ranks ``grace`` seconds to finish (they are usually stuck in a
  collective waiting for the dead rank), kills them, and re-raises the failing rank's exception — the original type
  when it unpickles, else :class:`RankError` — with the rank's formatted traceback chained as ``__cause__``
  (:class:`RemoteTraceback`), so pytest shows where in the child it failed;
* a rank that dies without reporting (segfault, ``os._exit``) raises :class:`RankError` with its exit code, after
  the other ranks had ``grace`` seconds to report how their collectives failed (added as notes: a surviving rank
  must fail, not hang — within ``collective_timeout`` at worst).

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
import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import socket
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

from bench.cp import cpu_accelerator_count, kill_ranks

__all__ = ["run_ranks", "cpu_accelerator_count", "free_port", "RankError", "RankTimeout", "RemoteTraceback"]


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a rank (chained as ``__cause__``)."""

    def __init__(self, rank: int, tb: str) -> None:
        super().__init__(f"\n--- traceback of rank {rank} ---\n{tb}")
        self.rank = rank
        self.tb = tb


class RankError(RuntimeError):
    """A rank failed with an exception that does not unpickle in the parent, or died without reporting."""


class RankTimeout(TimeoutError):
    """Ranks did not finish within ``timeout`` seconds (they were killed)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _thread_lock_for_tqdm() -> None:
    """tqdm (diffusers' progress bars, even disabled ones) creates a class-level multiprocessing lock, a named
    semaphore that a forkserver child never unlinks (it leaves with ``os._exit``): the resource tracker then warns
    about leaked semaphores at shutdown. A rank is one process: a thread lock is all tqdm needs there."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    import threading

    tqdm.set_lock(threading.RLock())


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, conn: Any,
            collective_timeout: float, threads: int, patch_device_count: bool) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
    failed_at: Optional[float] = None
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        _thread_lock_for_tqdm()
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            with cpu_accelerator_count() if patch_device_count else contextlib.nullcontext():
                out = fn(rank, world_size, *args, **kwargs)
            # rank 0 hosts the TCP store: nobody tears the group down while another rank may still use it
            # (diffusers' init_device_mesh creates sub-groups through the store; a rank leaving early resets them)
            dist.barrier()
        except BaseException:
            failed_at = time.time()  # before the teardown below breaks the other ranks' collectives
            raise
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        message = ("ok", pickle.dumps(out))
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        tb = traceback.format_exc()
        try:
            payload: Optional[bytes] = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:
            payload = None
        message = ("error", (failed_at or time.time(), payload, tb, f"{type(exc).__name__}: {exc}"))
    conn.send(message)
    conn.close()


def _start_forkserver(preload: list[str]) -> None:
    """Start multiprocessing's fork server (once per process) with ``preload`` imported in it, so that every rank is
    a fork of a process that already imported torch, diffusers and the rank function's module: a rank starts in
    ~0.1 s instead of re-importing for seconds. Python 3.11's fork server ignores the parent's ``sys.path`` (it is
    passed to ``forkserver.main`` but not applied), so the test directory would not be importable there and the
    preload would fail silently: the server is started with ``PYTHONPATH`` set to the parent's ``sys.path``."""
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(preload)
    old = os.environ.get("PYTHONPATH")
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    try:
        forkserver.ensure_running()  # a no-op when it already runs
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


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
        preload: modules the fork server imports when this call starts it (``fn``'s module is added).
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        _start_forkserver(list(preload) + ([fn.__module__] if fn.__module__ != "__main__" else []))
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [ctx.Process(target=_worker, name=f"cp-rank{r}", daemon=True,
                         args=(r, world_size, port, fn, tuple(args), dict(kwargs or {}), pipes[r][1],
                               collective_timeout, threads, patch_device_count))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()  # the children hold their ends; EOF on ours means the child is gone
    readers = {pipes[r][0]: r for r in range(world_size)}
    done: dict[int, Any] = {}
    failures: dict[int, Any] = {}
    died: list[int] = []
    deadline = time.monotonic() + timeout
    grace_end = float("inf")
    try:
        while readers:
            if failures:  # after a failure the others only get the grace period
                deadline = min(deadline, grace_end)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if failures:
                    break
                missing = [r for r in range(world_size) if r not in done]
                raise RankTimeout(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s "
                                  f"(killed); finished: {sorted(done)}")
            for conn in mp_connection.wait(list(readers), timeout=remaining):
                rank = readers.pop(conn)
                try:
                    status, payload = conn.recv()
                except EOFError:  # the rank is gone without a word (segfault, os._exit, killed)
                    procs[rank].join(1.0)
                    status, payload = "died", (time.time(), None, "",
                                               f"died without reporting (exit code {procs[rank].exitcode})")
                if status == "ok":
                    done[rank] = pickle.loads(payload)
                else:
                    if not failures:
                        grace_end = time.monotonic() + grace
                    failures[rank] = payload
                    if status == "died":
                        died.append(rank)
        if failures:
            # a rank that died silently is the cause (its peers' collectives fail because it is gone); otherwise the
            # first failure in time is, the others are usually collectives that lost their peer
            rank = died[0] if died else min(failures, key=lambda r: failures[r][0])
            _, exc_bytes, tb, summary = failures[rank]
            exc: BaseException = RankError(f"rank {rank} {summary}" if died else f"rank {rank} failed: {summary}")
            if exc_bytes is not None:
                with contextlib.suppress(Exception):
                    exc = pickle.loads(exc_bytes)
            for other in sorted(set(failures) - {rank}):
                with contextlib.suppress(Exception):
                    exc.add_note(f"(rank {other} failed after it: {failures[other][3]})")
            raise exc from (RemoteTraceback(rank, tb) if tb else None)
        return [done[r] for r in range(world_size)]
    finally:
        kill_ranks(procs)
        for recv, _ in pipes:
            recv.close()
