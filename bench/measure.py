"""Wall-clock and memory measurement.

* Pipeline wall time: ``time.perf_counter`` around the pipeline call, with ``torch.cuda.synchronize()`` before and
  after on CUDA (seconds).
* Transformer time: the same clock around every transformer forward, from forward pre/post hooks on the
  transformer module (CUDA events on CUDA, read after the call's final synchronize), summed per call (seconds).
  The hooks sit outside any compiled region (ours compiles the forward, the peers compile the blocks).
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (bytes held by tensors, reset per row); on Linux CPUs the
  process's peak resident set size (``VmHWM``, reset per row through ``/proc/self/clear_refs``); else ``None``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = ["timed_call", "TransformerTimer", "PeakMemory"]


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

    Attributes:
        calls: transformer forwards since :meth:`start`.
    """

    def __init__(self, transformer: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.calls = 0
        self._spans: list[Any] = []
        self._open: Any = None
        self._handles = [transformer.register_forward_pre_hook(self._begin),
                         transformer.register_forward_hook(self._end)]

    def _now(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _begin(self, module: torch.nn.Module, args: Any) -> None:
        self._open = self._now()

    def _end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._spans.append((self._open, self._now()))
        self.calls += 1

    def start(self) -> None:
        """Forget the previous call's forwards."""
        self.calls = 0
        self._spans.clear()

    def seconds(self) -> float:
        """Total transformer time since :meth:`start`, in seconds (call after the pipeline call returned)."""
        if self.device.type == "cuda":
            _sync(self.device)
            return sum(begin.elapsed_time(end) for begin, end in self._spans) / 1000.0
        return sum(end - begin for begin, end in self._spans)

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
