"""Cache state: per-(transformer, CFG branch) counters on the host and preallocated device buffers, plus TaylorSeer.

Buffers are allocated once per shape and then updated in place (``copy_``), gpt-fast style, so that compiled
segments can treat them as static addresses and CUDA graphs can replay over them. Counters are Python ints: the
host knows every decision (it reads the predicate once per non-forced step), so they never need a device sync.

TaylorSeer follows cache-dit 1.5.3 (``TaylorSeerState``): on a compute step at branch step ``s`` the ladder becomes
``d0 = Y``, ``d(i+1) = (d_i - d_i_prev) / (s - s_last)`` for as many derivatives as the previous ladder supports, but
none while ``s <= 2``; a hit at ``k = s - s_last`` steps forecasts ``sum_i d_i k^i / i!``. (cache-dit forms no
derivative while its state's step counter is ``<= 1``; that state is created lazily by the first update, at step 0,
with its counter at -1, so the counter runs one behind the denoising step and the rule reads ``s <= 2`` here.)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["BranchState", "taylor_coefficients", "taylor_coefficients_tensor", "taylor_forecast", "taylor_update"]


def taylor_coefficients(elapsed: int, valid: int, terms: int) -> list[float]:
    """Weights ``k^i / i!`` of the ladder entries for a forecast ``elapsed`` steps ahead; 0 beyond ``valid``."""
    return [(elapsed ** i) / math.factorial(i) if i < valid else 0.0 for i in range(terms)]


def taylor_forecast(ladder: Sequence[torch.Tensor], coeffs: Union[Sequence[float], torch.Tensor]) -> torch.Tensor:
    """``sum_i coeffs[i] * ladder[i]``; with one term and coefficient 1 this is the cached residual itself."""
    if len(ladder) == 1:
        return ladder[0]
    out = ladder[0] * coeffs[0]
    for i in range(1, len(ladder)):
        out = out + ladder[i] * coeffs[i]
    return out


def taylor_update(ladder: Sequence[torch.Tensor], y: torch.Tensor, window: Union[int, torch.Tensor],
                  n_derivatives: Union[int, torch.Tensor]) -> list[torch.Tensor]:
    """New ladder after a compute step: ``[y, (y - d0)/w, ((y - d0)/w - d1)/w, ...]`` (``n_derivatives`` of them).

    Entries past ``n_derivatives`` keep their old (now invalid) values; forecasts mask them with zero coefficients.
    With a tensor ``n_derivatives`` (compiled lowerings) every entry is computed and selected with ``torch.where``.
    """
    new = [y]
    for i in range(len(ladder) - 1):
        if isinstance(n_derivatives, torch.Tensor):
            new.append(torch.where(n_derivatives > i, (new[i] - ladder[i]) / window, ladder[i + 1]))
        elif i < n_derivatives:
            new.append((new[i] - ladder[i]) / window)
        else:
            new.append(ladder[i + 1])
    return new


def taylor_coefficients_tensor(elapsed: torch.Tensor, valid: torch.Tensor, terms: int) -> torch.Tensor:
    """Device-side :func:`taylor_coefficients` (float32, shape ``(terms,)``) for the ``cond`` lowering."""
    i = torch.arange(terms, device=elapsed.device)
    fact = torch.tensor([float(math.factorial(k)) for k in range(terms)], device=elapsed.device)
    powers = elapsed.to(torch.float32) ** i.to(torch.float32) / fact
    return torch.where(i < valid, powers, torch.zeros_like(powers))


class BranchState:
    """Counters and buffers of one chain in one CFG branch (one cache context) of one cached transformer; the
    branch's first chain is the branch object itself, its other chains (:meth:`chain`) are more of these.

    Host counters (reset every generation): ``calls`` (forwards of this branch so far: the denoising step index of
    the next one), ``cached_steps`` (step indices), ``diffs`` (step -> diff, only steps whose gates allowed a diff),
    ``consecutive`` (cached steps in a row), ``has_prev`` (an Fn residual is stored), ``last_compute`` / ``valid``
    (TaylorSeer: step of the last compute, number of valid ladder entries).

    Device buffers (kept across generations while the input signature ``key`` holds, so compiled graphs and CUDA
    graphs keep their static addresses): ``fn_residual`` (hidden-stream residual of the first Fn blocks at the last
    compute), ``ladders`` (per block list of the chain: the cached middle residual of the hidden and encoder
    streams and, with TaylorSeer, their divided differences; ``ladder_h`` / ``ladder_e`` are list 0's),
    ``step_scalars`` (per-step numbers for graphs). The ``cond`` lowering and loaded packages keep their counters on
    the device (``device_counters``) and their per-step (predicate, diff) records in ``records`` until
    :func:`~dbcache_compile.step.fold_records` reads them.
    """

    def __init__(self, terms: int) -> None:
        self.terms = terms
        self.fn_residual: Optional[torch.Tensor] = None
        self.ladders: dict[int, tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]] = {}
        self.step_scalars: tuple[torch.Tensor, ...] = ()
        self.key: Optional[tuple] = None  # input signature the buffers were allocated for (set by the runtime)
        self.device_counters: Optional[torch.Tensor] = None
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.chains: list["BranchState"] = []  # this branch's chains after the first
        self.reset()

    def chain(self, c: int) -> "BranchState":
        """The state of chain ``c`` in this branch (0: this object)."""
        if c == 0:
            return self
        while len(self.chains) < c:
            self.chains.append(BranchState(self.terms))
        return self.chains[c - 1]

    @property
    def ladder_h(self) -> list[torch.Tensor]:
        return self.ladders[0][0] if 0 in self.ladders else []

    @property
    def ladder_e(self) -> list[torch.Tensor]:
        return self.ladders[0][1] if 0 in self.ladders else []

    def reset(self) -> None:
        """Start a new generation: host counters and records cleared (every chain's), buffers kept."""
        self.calls = 0
        self.cached_steps: list[int] = []
        self.diffs: dict[int, float] = {}
        self.consecutive = 0
        self.has_prev = False
        self.last_compute = -1
        self.valid = 0
        self.records = []
        for chain in self.chains:
            chain.reset()

    def drop_buffers(self) -> None:
        """Forget the buffers of every chain (new input signature: they are allocated again)."""
        for state in (self, *self.chains):
            state.fn_residual, state.ladders, state.step_scalars = None, {}, ()

    def begin_step(self, step: int) -> None:
        """cache-dit's ``mark_step_begin``: a step whose previous step computed breaks the cached streak."""
        if not self.cached_steps or self.cached_steps[-1] != step - 1:
            self.consecutive = 0

    def allocate(self, hidden: torch.Tensor, encoder: torch.Tensor) -> None:
        """Allocate zeroed buffers shaped like these streams leaving the Fn blocks (the encoder stream can enter the
        blocks with a smaller batch than the hidden stream and be broadcast by the first block, e.g. FLUX with
        ``prompt_embeds`` and ``num_images_per_prompt > 1``: pass the Fn outputs, not the inputs)."""
        self.allocate_shapes(hidden.shape, hidden.dtype, encoder.shape, encoder.dtype, hidden.device)

    def allocate_shapes(self, hidden_shape: Sequence[int], hidden_dtype: torch.dtype, encoder_shape: Sequence[int],
                        encoder_dtype: torch.dtype, device: torch.device) -> None:
        """:meth:`allocate` from shapes (a family's ``stream_shapes``): the Fn residual and list 0's ladders."""
        self.fn_residual = torch.zeros(hidden_shape, dtype=hidden_dtype, device=device)
        self.ladders = {0: ([torch.zeros(hidden_shape, dtype=hidden_dtype, device=device) for _ in range(self.terms)],
                            [torch.zeros(encoder_shape, dtype=encoder_dtype, device=device)
                             for _ in range(self.terms)])}
        self.allocate_scalars(device)

    def allocate_ladder(self, j: int, hidden: torch.Tensor, encoder: Optional[torch.Tensor]) -> None:
        """Zeroed ladders of list ``j`` shaped like these middle residuals (``encoder``: ``None`` for a list without
        an encoder stream)."""
        self.ladders[j] = ([torch.zeros_like(hidden) for _ in range(self.terms)],
                           [torch.zeros_like(encoder) if encoder is not None else None for _ in range(self.terms)])

    def allocate_scalars(self, device: torch.device) -> None:
        # per-step numbers handed to graphs as static tensors: TaylorSeer window, derivative count, coefficients
        self.step_scalars = (torch.zeros((), dtype=torch.float32, device=device),
                             torch.zeros((), dtype=torch.int64, device=device),
                             torch.zeros(self.terms, dtype=torch.float32, device=device))

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Every device buffer a graph may read or update in place (this chain's)."""
        ladders = [t for h, e in self.ladders.values() for t in (*h, *e) if t is not None]
        residual = [self.fn_residual] if self.fn_residual is not None else []
        return [*residual, *ladders, *self.step_scalars]
    def fill_update_scalars(self, window: int, n_derivatives: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static (window, derivative count) tensors, filled in place (kernel launches, no host copy). Without
        TaylorSeer (one term) nothing reads them and nothing is launched."""
        window_t, n_t, _ = self.step_scalars
        if self.terms > 1:
            window_t.fill_(float(window))
            n_t.fill_(n_derivatives)
        return window_t, n_t

    def fill_coefficients(self, coeffs: Sequence[float]) -> torch.Tensor:
        """The static forecast-coefficient tensor, filled in place (unused, and not filled, with one term)."""
        coeffs_t = self.step_scalars[2]
        if self.terms > 1:
            for i, c in enumerate(coeffs):
                coeffs_t[i].fill_(c)
        return coeffs_t

    def record_hit(self, step: int) -> None:
        self.cached_steps.append(step)
        self.consecutive += 1

    def forecast_coefficients(self, step: int) -> list[float]:
        return taylor_coefficients(step - self.last_compute, self.valid, self.terms)

    def derivatives_for_update(self, step: int) -> int:
        """How many derivatives a compute at ``step`` can form (none while ``step <= 2``, see the module doc)."""
        return min(self.valid, self.terms - 1) if step > 2 else 0

    def record_compute(self, step: int, n_derivatives: int) -> None:
        self.has_prev = True
        self.valid = 1 + n_derivatives
        self.last_compute = step
