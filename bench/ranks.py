"""Start ``N`` ranks of a ``torch.distributed`` run on this machine and collect their results: the one launcher of
``python -m bench run --cp N`` (:mod:`bench.run`) and of the context-parallel tests (``tests/cp_harness.py``).

    from bench.ranks import launch

    def work(rank, world_size, steps):            # module-level: it is pickled by reference
        ...                                       # joins the process group itself (process_group=None), or runs in it
        return picklable_result

    results = launch(work, 2, args=(4,), process_group="gloo")   # [result of rank 0, result of rank 1]

Each rank is a process of Python's ``multiprocessing`` (``start_method``: ``"forkserver"``, whose server imports the
``preload`` modules once so that a rank starts in ~0.1 s; ``"spawn"``, which CUDA needs; ``"fork"``, for a parent that
holds no threads) with the environment ``torchrun`` would set (``MASTER_ADDR`` / ``MASTER_PORT`` on a free localhost
port, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, plus ``env``). With ``process_group`` the rank
joins ``init_process_group(process_group, timeout=collective_timeout)`` before ``fn`` and leaves it after a barrier
(rank 0 hosts the TCP store: nobody tears the group down while another rank may still use it); without, ``fn`` joins
it (``python -m bench run`` does, as under ``torchrun``). ``logs[r]``: a file that receives rank ``r``'s stdout and
stderr (``None``: the console).

Nothing hangs:

* ``timeout`` (optional) bounds the whole run: ranks still running then are killed and :class:`RankTimeout` names
  them; ``collective_timeout`` bounds the rendezvous and every collective of the group the launcher made;
* when a rank raises, it prints its traceback (into its log) and reports; the others get ``grace`` seconds to finish
  (they are usually stuck in a collective waiting for it), then are killed (SIGTERM, then SIGKILL), and
  :func:`launch` raises :class:`RankError` for the first failure in time (a rank that died without reporting, if any:
  its peers' errors are the consequence), with the rank's own exception (when it unpickles) as ``.exception``, its
  formatted traceback as ``__cause__`` (:class:`RemoteTraceback`) and the other ranks' failures as notes.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

__all__ = ["launch", "rank_env", "free_port", "kill_ranks", "RankError", "RankTimeout", "RemoteTraceback"]


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a rank (the ``__cause__`` of :class:`RankError`)."""

    def __init__(self, rank: int, tb: str) -> None:
        super().__init__(f"\n--- traceback of rank {rank} ---\n{tb}")
        self.rank = rank
        self.tb = tb


class RankError(RuntimeError):
    """A rank failed (raised, or died without reporting); the first failure in time of a :func:`launch`.

    Attributes: ``rank``; ``summary`` (``"Type: message"`` on one line, or how the rank died); ``tb`` (its formatted
    traceback, ``""`` when it died); ``exception`` (the rank's exception, unpickled, or ``None``); ``died``."""

    def __init__(self, rank: int, summary: str, tb: str = "", exception: Optional[BaseException] = None,
                 died: bool = False) -> None:
        super().__init__(f"rank {rank} {summary}" if died else f"rank {rank} failed: {summary}")
        self.rank, self.summary, self.tb, self.exception, self.died = rank, summary, tb, exception, died


class RankTimeout(TimeoutError):
    """Ranks did not finish within ``timeout`` seconds (they were killed)."""


def rank_env() -> Optional[tuple[int, int, int]]:
    """``(rank, world_size, local_rank)`` when this process is one rank of a multi-process run (``torchrun`` or
    :func:`launch` set ``RANK`` and ``WORLD_SIZE``), else ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_ranks(procs: Sequence[Any], wait: float = 3.0) -> None:
    """Terminate the rank processes still alive (SIGTERM, then SIGKILL after ``wait`` seconds) and reap them."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + wait
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.join(1.0)


# ------------------------------------------------------------------------------------------------------- one rank
def _redirect(log: str) -> None:
    """Send this process's stdout and stderr to ``log``: file descriptors 1 and 2 (child processes, C code) and
    Python's ``sys.stdout`` / ``sys.stderr`` (which a parent may have pointed elsewhere, e.g. pytest's capture)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115


def _thread_lock_for_tqdm() -> None:
    """tqdm (diffusers' progress bars, even disabled ones) creates a class-level multiprocessing lock, a named
    semaphore that a forked rank never unlinks (it leaves with ``os._exit``): the resource tracker then warns about
    leaked semaphores at shutdown. A rank is one process: a thread lock is all tqdm needs there."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    import threading

    tqdm.set_lock(threading.RLock())


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, conn: Any,
            process_group: Optional[str], collective_timeout: float, log: Optional[str], env: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                       **env})
    if log is not None:
        _redirect(log)
    failed_at: Optional[float] = None
    try:
        _thread_lock_for_tqdm()
        if process_group is None:
            out = fn(rank, world_size, *args, **kwargs)
        else:
            import torch.distributed as dist

            dist.init_process_group(process_group, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=collective_timeout))
            try:
                out = fn(rank, world_size, *args, **kwargs)
                # diffusers' init_device_mesh makes sub-groups through rank 0's store: a rank leaving early resets them
                dist.barrier()
            except BaseException:
                failed_at = time.time()  # before the teardown below breaks the other ranks' collectives
                raise
            finally:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
        message = ("ok", pickle.dumps(out))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the launcher, KeyboardInterrupt included
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, end="")
        try:
            payload: Optional[bytes] = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:  # noqa: BLE001 - an exception that does not travel: its summary and traceback do
            payload = None
        message = ("error", (failed_at or time.time(), payload, tb, " ".join(f"{type(exc).__name__}: {exc}".split())))
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        conn.send(message)
    conn.close()


def _start_forkserver(preload: list[str]) -> None:
    """Start multiprocessing's fork server (once per process) with ``preload`` imported in it, so that every rank is
    a fork of a process that already imported torch, diffusers and the rank function's module. Python 3.11's fork
    server ignores the parent's ``sys.path`` (it is passed to ``forkserver.main`` but not applied), so a test
    directory would not be importable there and the preload would fail silently: the server is started with
    ``PYTHONPATH`` set to the parent's ``sys.path``."""
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


# -------------------------------------------------------------------------------------------------------- launcher
def _exit_status(proc: Any) -> str:
    proc.join(1.0)
    code = proc.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def launch(fn: Callable, world_size: int, args: tuple = (), kwargs: Optional[dict] = None, *,
           start_method: str = "forkserver", preload: Sequence[str] = (), timeout: Optional[float] = None,
           grace: float = 5.0, process_group: Optional[str] = None, collective_timeout: float = 60.0,
           logs: Optional[Sequence[Optional[str]]] = None, env: Optional[dict[str, str]] = None) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` new processes; return the per-rank results in
    rank order (each must pickle). Raises :class:`RankError` when a rank fails, :class:`RankTimeout` past
    ``timeout`` (module docstring).

    Args:
        fn: a module-level function (pickled by reference, except under ``"fork"``).
        start_method: ``"forkserver"``, ``"spawn"`` or ``"fork"``.
        preload: modules the fork server imports when this call starts it (``fn``'s module is added).
        timeout: wall-clock limit for all ranks together, from their start (``None``: none).
        grace: seconds the other ranks get to finish after one rank failed, before they are killed.
        process_group: a ``torch.distributed`` backend (``"gloo"``, ``"nccl"``) the launcher joins each rank to
            around ``fn``, or ``None`` when ``fn`` joins one itself.
        collective_timeout: ``init_process_group(timeout=...)`` of that group: rendezvous and each collective.
        logs: per rank, a file for its stdout and stderr, or ``None`` for the console.
        env: more environment variables for every rank.
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        _start_forkserver(list(preload) + ([fn.__module__] if fn.__module__ != "__main__" else []))
    logs = list(logs) if logs is not None else [None] * world_size
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [ctx.Process(target=_worker, name=f"rank{r}", daemon=False,
                         args=(r, world_size, port, fn, tuple(args), dict(kwargs or {}), pipes[r][1], process_group,
                               collective_timeout, logs[r], dict(env or {})))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        for _, send in pipes:
            send.close()  # the children hold their ends: EOF on ours means the child is gone
        done, failures, died = _collect(procs, {pipes[r][0]: r for r in range(world_size)}, timeout, grace)
    finally:
        kill_ranks(procs)
        for recv, _ in pipes:
            recv.close()
    if failures:
        raise _first_failure(failures, died, [r for r in range(world_size) if r not in done and r not in failures])
    return [done[r] for r in range(world_size)]


def _collect(procs: list, readers: dict, timeout: Optional[float],
             grace: float) -> tuple[dict[int, Any], dict[int, tuple], list[int]]:
    """Wait for every rank's report: ``(results, failures, ranks that died without reporting)``; after the first
    failure the others only get ``grace`` seconds."""
    world_size = len(procs)
    done: dict[int, Any] = {}
    failures: dict[int, tuple] = {}
    died: list[int] = []
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    while readers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if failures:
                break
            missing = [r for r in range(world_size) if r not in done]
            raise RankTimeout(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s (killed); "
                              f"finished: {sorted(done)}")
        for conn in mp_connection.wait(list(readers), timeout=None if remaining == float("inf") else remaining):
            rank = readers.pop(conn)
            try:
                status, payload = conn.recv()
            except EOFError:  # the rank is gone without a word (segfault, os._exit, killed)
                how = f"died without reporting ({_exit_status(procs[rank])})"
                status, payload = "died", (time.time(), None, "", how)
            if status == "ok":
                done[rank] = pickle.loads(payload)
                continue
            if not failures:
                deadline = min(deadline, time.monotonic() + grace)
            failures[rank] = payload
            if status == "died":
                died.append(rank)
    return done, failures, died


def _first_failure(failures: dict[int, tuple], died: list[int], stopped: list[int]) -> RankError:
    """The :class:`RankError` of the cause: a rank that died silently (its peers' collectives fail because it is
    gone), else the first failure in time (a failing rank's teardown makes its peers fail a moment later)."""
    rank = died[0] if died else min(failures, key=lambda r: failures[r][0])
    _, exc_bytes, tb, summary = failures[rank]
    exception = None
    if exc_bytes is not None:
        with contextlib.suppress(Exception):
            exception = pickle.loads(exc_bytes)
    err = RankError(rank, summary, tb, exception, died=rank in died)
    for other in sorted(set(failures) - {rank}):
        err.add_note(f"(rank {other} failed after it: {failures[other][3]})")
    if stopped:
        err.add_note(f"(ranks {stopped} were stopped)")
    if tb:
        err.__cause__ = RemoteTraceback(rank, tb)
    return err
