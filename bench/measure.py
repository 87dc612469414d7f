"""Wall-clock and memory measurement: the one way every subcommand of ``python -m bench`` times things.

* Pipeline wall time (:func:`timed_call`): ``time.perf_counter`` around the pipeline call, with
  ``torch.cuda.synchronize()`` before and after on CUDA (seconds).
* Transformer time (:class:`TransformerTimer`): forward pre/post hooks on the transformer module, outside any
  compiled region (ours compiles the forward, the peers compile the blocks), record CUDA events on CUDA (read after
  the pipeline call's final synchronize) and ``time.perf_counter`` everywhere. By default nothing synchronizes inside
  the pipeline call; ``sync_each_call=True`` synchronizes before and after every forward, so that each call's
  wall time is what the step costs the pipeline (``bench steps``: hit / miss ms), while its CUDA-event time stays
  the GPU time between the two events.
* Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` (bytes held by tensors, reset per
  row); on Linux CPUs the process's peak resident set size (``VmHWM``, reset per row through
  ``/proc/self/clear_refs``); else ``None``.
* Child processes (:func:`run_child`): wall time of a command run in its own process group, its output streamed to
  a log and killed with its whole group (compile workers included) at a hard cap.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["timed_call", "TransformerTimer", "PeakMemory", "Child", "run_child"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[..., Any], kwargs: dict[str, Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, fn(**kwargs))``, the device synchronized before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn(**kwargs)
    _sync(device)
    return time.perf_counter() - start, out


class TransformerTimer:
    """Counts and times the forwards of one transformer module; :meth:`start` before each pipeline call.

    Args:
        transformer: the module whose ``__call__`` is timed (hooks; nothing is patched).
        device: where it runs; CUDA adds events around each call.
        sync_each_call: synchronize the device before and after every forward (per-call wall times; adds syncs).

    Attributes:
        calls: transformer forwards since :meth:`start`.
    """

    def __init__(self, transformer: torch.nn.Module, device: torch.device, sync_each_call: bool = False) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.sync_each_call = sync_each_call
        self.calls = 0
        self._spans: list[tuple[float, float, Any, Any]] = []
        self._open: Optional[tuple[float, Any]] = None
        self._handles = [transformer.register_forward_pre_hook(self._begin),
                         transformer.register_forward_hook(self._end)]

    def _event(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _begin(self, module: torch.nn.Module, args: Any) -> None:
        if self.sync_each_call:
            _sync(self.device)
        self._open = (time.perf_counter(), self._event())

    def _end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        event = self._event()
        if self.sync_each_call:
            _sync(self.device)
        start, begin = self._open
        self._spans.append((start, time.perf_counter(), begin, event))
        self.calls += 1

    def start(self) -> None:
        """Forget the previous call's forwards."""
        self.calls = 0
        self._spans.clear()

    def per_call(self) -> list[tuple[float, Optional[float]]]:
        """``(wall s, device s)`` of each forward since :meth:`start` (call after the pipeline call returned).

        The wall time is the host's; on CUDA it is the call's cost only with ``sync_each_call``. The device time
        is the CUDA-event time (``None`` off CUDA)."""
        if self.cuda:
            _sync(self.device)
        return [(end - start, begin.elapsed_time(event) / 1e3 if self.cuda else None)
                for start, end, begin, event in self._spans]

    def seconds(self) -> float:
        """Total transformer time since :meth:`start`, in seconds: CUDA-event time on CUDA, wall time elsewhere."""
        return sum(device if self.cuda else wall for wall, device in self.per_call())

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


class PeakMemory:
    """Peak memory of one row: :meth:`reset` before it, :meth:`read` after it.

    ``kind`` says what is measured (``"CUDA allocated"`` / ``"peak RSS"``) or why nothing is (``"n/a: ..."``).
    """

    _CLEAR_REFS = Path("/proc/self/clear_refs")
    _STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "CUDA allocated"
        elif device.type == "cpu" and self._CLEAR_REFS.exists() and self._STATUS.exists():
            self.kind = "peak RSS"
        else:
            self.kind = f"n/a: no peak-memory counter for {device.type} on this OS"

    def reset(self) -> None:
        """Start a new measurement window."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "peak RSS":
            try:
                self._CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError as err:
                self.kind = f"n/a: cannot reset the peak RSS ({err})"

    def read(self) -> Optional[int]:
        """Peak bytes since :meth:`reset`, or ``None``."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind != "peak RSS":
            return None
        for line in self._STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None


@dataclasses.dataclass
class Child:
    """What :func:`run_child` saw: exit status (``None`` when killed at the cap), whether the cap killed it, its wall
    time and its output (stdout and stderr together)."""

    returncode: Optional[int]
    timed_out: bool
    seconds: float
    output: str


def run_child(argv: Sequence[str], cap: float, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
              log: Optional[Path] = None, echo: Optional[str] = None) -> Child:
    """Run ``argv`` in a new process group with at most ``cap`` seconds of wall time; at the cap the whole group is
    killed (SIGKILL), so compile workers die with it. Output lines go to ``log`` (if given) as they come and, when
    ``echo`` is a prefix, to stdout as ``[echo] line``."""
    start = time.perf_counter()
    chunks: list[str] = []
    sink = log.open("w") if log is not None else None
    try:
        if sink is not None:
            sink.write("$ " + " ".join(argv) + "\n")
            sink.flush()
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, bufsize=1)

        def pump() -> None:
            for line in proc.stdout:
                chunks.append(line)
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if echo is not None:
                    sys.stdout.write(f"[{echo}] {line}")
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
    finally:
        if sink is not None:
            sink.close()
    return Child(None if timed_out else proc.returncode, timed_out, time.perf_counter() - start, "".join(chunks))
