"""``cond``: the whole forward is ONE graph; the decision is ``torch.cond`` on a device predicate, the counters and the
config's gate numbers (threshold, warm-up, limits, steps mask: graph inputs, so ``reconfigure`` needs no recompile)
live on the device and the state is carried functionally. No host sync per step, no graph break, exportable
(:func:`dbcache_compile.export`). Inductor disables CUDA graphs for any graph with a cond (torch 2.11-2.14), which
:meth:`Cond.cudagraph_status` reports; ``torch.cond`` rejects tensor-subclass (torchao) weights. Needs a family with
a prologue (the whole forward written out)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..compiled import CUDAGRAPH_MODES
from ..decision import Gates, gate_tensors
from ..step import CacheStep, counters_from_host, fold_records, initial_counters
from . import Lowering, register_lowering


@register_lowering
class Cond(Lowering):
    name, description = "cond", "one graph per step with torch.cond on a device predicate; no host sync; exportable"
    needs_prologue = decides_on_device = exportable = True
    captures = runs_quantized = False

    def __init__(self, mode: Optional[str], options: dict[str, Any], store_key: tuple = (), scope: tuple = ()) -> None:
        super().__init__(mode, options, store_key, scope)
        self._cond_step: Any = None
        self._gates: dict[torch.device, tuple[Any, Gates]] = {}
        self._steps: dict[torch.device, torch.Tensor] = {}

    def gates(self, config: Any, device: torch.device) -> Gates:
        """The config's gate numbers as device tensors, inputs of the graph (refilled in place when ``reconfigure``
        changed the config; the mask's length is dynamic): a new config needs no recompile."""
        current, gates = self._gates.get(device, (None, None))
        if current is not config:
            gates = gate_tensors(config, device, out=gates)
            torch._dynamo.mark_dynamic(gates.mask, 0)
            self._gates[device] = (config, gates)
        return gates

    def new_buffers(self, buffers: list[torch.Tensor]) -> None:
        for buf in buffers:
            torch._dynamo.mark_static_address(buf)

    def prepare(self, state: Any) -> None:
        """A branch allocated its buffers: its device counters, equal to its host counters."""
        state.device_counters = counters_from_host(state, state.fn_residual.device)
        torch._dynamo.mark_static_address(state.device_counters)

    def start_generation(self, state: Any) -> None:
        if state.device_counters is not None:
            state.device_counters.copy_(initial_counters(state.device_counters.device))

    def run_step(self, runtime: Any, state: Any, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        step_fns: CacheStep = runtime.whole_step
        if self._cond_step is None:
            self._cond_step = self.compiled_fns.compile_method("cond_step", CacheStep.cond_step, step_fns,
                                                               self.options)
        # the step in a static device scalar filled in place: a fresh torch.tensor(step, device="cuda") would be a
        # synchronizing host-to-device copy at every step
        step_t = self._steps.get(state.fn_residual.device)
        if step_t is None:
            step_t = self._steps[state.fn_residual.device] = torch.zeros((), dtype=torch.int64,
                                                                         device=state.fn_residual.device)
        step_t.fill_(step)
        out, pred, diff = self._cond_step(step_t, state.device_counters, state.fn_residual, state.ladder_h,
                                          state.ladder_e, *args, gates=self.gates(step_fns.config, step_t.device),
                                          **kwargs)
        state.records.append((step, pred, diff))
        return out

    def fold(self, states: list[Any]) -> None:
        fold_records(states)

    def cudagraph_status(self, device: torch.device) -> str:
        if device.type != "cuda":
            return f"n/a ({device.type})"
        if self.mode not in CUDAGRAPH_MODES:
            return f"off (mode={self.mode})"
        return "skipped: Inductor disables CUDA graphs for graphs with torch.cond (torch 2.11-2.14)"
