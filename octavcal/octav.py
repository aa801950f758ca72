"""OCTAV (Corollary 3.2, eq. 6; Appendix A): the public solver.

Exact answers from sorted values (whole rows, warm starts, the CPU's one-pass tail) are in
``_octav_sorted.py``, the passes in ``_octav_kernels.py``, the iteration and its stopping rules in
``_octav_iterate.py``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import numpy as np
import torch

from ._octav_iterate import solve_rows
from ._octav_kernels import Stats, magnitude_stats, work_buffer
from ._octav_sorted import (
    WARM_START_MIN,
    host_magnitudes,
    solve_by_tail,
    solves_by_sorting,
    sorted_fixed_point,
    warm_start,
)
from .errors import SpecError
from .grid import Convention, Grid, check_bits, check_finite, check_tensor, rows_from
from .slices import amax_from_rows, resolve_signed

Init = Literal["auto", "paper"] | float | torch.Tensor


__all__ = ["OctavResult", "octav", "solves_by_sorting", "sorted_fixed_point"]


class OctavResult(NamedTuple):
    amax: torch.Tensor
    iterations: torch.Tensor  # int64, same shape as amax


def _start(
    rows: torch.Tensor, signed: bool, c: float, auto: bool
) -> tuple[Stats, tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
    """The statistics pass and the starting points: (stats, E and N1 at s0 when the pass took them, s0).

    s0 is the paper's s_1, or with ``auto`` the fixed point of a subsample. For one long row the
    subsample needs no statistics, so the first evaluation joins their pass. With NaN or Inf in
    ``rows`` the results are meaningless, and stats.smax says so.
    """
    work = work_buffer(rows, 2)
    if auto and rows.shape[0] == 1 and rows.numel() >= WARM_START_MIN:
        s0 = warm_start(rows, signed, c)
        stats, first = magnitude_stats(rows, signed, work, s0)
        return stats, first, s0
    stats, _ = magnitude_stats(rows, signed, work)
    s0 = stats.total / np.maximum(stats.nnz, 1)
    if auto and rows.numel() >= WARM_START_MIN and np.isfinite(s0).all():
        s0 = np.where(stats.nnz > 0, warm_start(rows, signed, c, np.maximum(s0, 1e-30)), s0)
    return stats, None, s0


def _given_start(init: float | torch.Tensor, stats: Stats) -> np.ndarray:
    """A numeric ``init`` (a number or a [C] tensor) as starting points, checked."""
    given = init.double().cpu().numpy() if isinstance(init, torch.Tensor) else np.asarray(init, float)
    if not (np.isfinite(given).all() and (given >= 0).all()):
        raise SpecError(f"init must be a finite number >= 0 or a [C] tensor of them: got {init!r}.")
    # Above the max every value is below s alike: start there (and stay inside the dtype).
    return np.minimum(np.broadcast_to(given, stats.smax.shape), stats.smax)


# ---------------------------------------------------------------------------------------------
# The solver


@overload
def octav(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = ...,
    axis: int | None = ...,
    convention: Convention = ...,
    init: Init = ...,
    tol: float = ...,
    max_iter: int = ...,
    iterations: int | None = ...,
    return_iterations: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def octav(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = ...,
    axis: int | None = ...,
    convention: Convention = ...,
    init: Init = ...,
    tol: float = ...,
    max_iter: int = ...,
    iterations: int | None = ...,
    return_iterations: Literal[True],
) -> OctavResult: ...
@overload
def octav(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = ...,
    axis: int | None = ...,
    convention: Convention = ...,
    init: Init = ...,
    tol: float = ...,
    max_iter: int = ...,
    iterations: int | None = ...,
    return_iterations: bool,
) -> torch.Tensor | OctavResult: ...
def octav(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = None,
    axis: int | None = None,
    convention: Convention = "runtime",
    init: Init = "auto",
    tol: float = 1e-6,
    max_iter: int = 100,
    iterations: int | None = None,
    return_iterations: bool = False,
) -> torch.Tensor | OctavResult:
    """Compute the MSE-optimal clipping scalar by OCTAV (Corollary 3.2, eq. 6; Appendix A).

    Minimizes J(s) = c s^2 E[1{0<|x|<=s}] + E[(|x|-s)^2 1{|x|>s}] (eq. 12, zeros excluded from the
    noise term) with c = (step/amax)^2/12 of the grid: 1/(12 qmax^2) (``runtime``), 4^-B/3 signed or
    4^-B/12 unsigned (``paper``). Iterates to the exact fixed point (the map's value at s lands where
    the map takes that value), or, on rows of 64K+ values, until an estimate of the distance left is
    within ``tol`` (relative), or until the bracket around the root is narrower than ``tol``;
    ``iterations=10`` instead runs the paper's fixed count. ``init``: "paper" is sum|x| / #nonzero
    (the paper's s_1); "auto" starts from OCTAV on a strided subsample when the tensor is large; a
    number or a [C] tensor is used as given. With ``init="auto"`` and no ``iterations``, tensors of
    up to 16384 values in rows of up to 4096 are solved exactly by sorting instead (the iteration count
    is then 0).
    Example: 4-bit signed runtime grid (c = 1/588), x = [1, 1, 1, 1, 100] -> with only the outlier
    above s, s = 100 / (4c + 1) = 99.32; a unit Gaussian -> amax about 2.49.
    Returns amax ([] or [C]); with ``return_iterations=True`` an ``OctavResult(amax, iterations)``.
    """
    result = _solve(x, bits, signed, axis, convention, init, tol, max_iter, iterations)
    return result if return_iterations else result.amax


def _solve(
    x: torch.Tensor,
    bits: int,
    signed: bool | None,
    axis: int | None,
    convention: Convention,
    init: Init,
    tol: float,
    max_iter: int,
    iterations: int | None,
) -> OctavResult:
    """``octav`` with its iteration counts."""
    check_bits(bits)
    check_tensor(x, "Tensor passed to octav", finite=False)
    x = x.detach()  # a statistic of the data, not a function to differentiate
    if iterations is not None and (
        isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1
    ):
        raise SpecError(f"iterations must be a positive integer or None: got {iterations!r}.")
    if isinstance(init, str) and init not in ("auto", "paper"):
        raise SpecError(f"init must be 'auto', 'paper' or a number: got {init!r}.")
    signed = resolve_signed(x, signed)
    c = Grid(bits, signed, convention).noise_coefficient
    rows = rows_from(x, axis)
    auto = init == "auto" and iterations is None
    if not signed:  # max(x, 0) hides -inf (and NaN) from the statistics below
        # NumPy on the CPU: one thread (see _octav_kernels.py's one-pass tails).
        low = torch.as_tensor(rows.numpy().min()) if rows.device.type == "cpu" else rows.amin()
        check_finite(low, x, "Tensor passed to octav")
    if auto and solves_by_sorting(x, axis):
        stats, _ = magnitude_stats(rows, signed, work_buffer(rows, 2))
        check_finite(torch.from_numpy(stats.smax), x, "Tensor passed to octav")
        amax = amax_from_rows(sorted_fixed_point(host_magnitudes(rows, signed), c), stats.smax, axis, x)
        return OctavResult(amax, torch.zeros(amax.shape, dtype=torch.int64, device=amax.device))
    if auto and rows.device.type == "cpu":
        solved = solve_by_tail(rows, signed, c)
        if solved is not None:
            amax = amax_from_rows(solved[0], solved[0], axis, x)
            passes = torch.from_numpy(solved[1])
            return OctavResult(amax, passes.reshape(()) if axis is None else passes)
    stats, first, s0 = _start(rows, signed, c, auto)
    check_finite(torch.from_numpy(stats.smax), x, "Tensor passed to octav")
    if not np.isfinite(stats.total).all() and rows.dtype != torch.float64:
        # Finite values this large overflow float32 sums (the max alone cannot): redo in float64.
        rows = rows.double()
        stats, first, s0 = _start(rows, signed, c, auto)
    if not (auto or isinstance(init, str)):
        s0 = _given_start(init, stats)
    work = work_buffer(rows, 2)
    amax_rows, counts = solve_rows(
        rows, signed, c, s0, stats, tol=tol, max_iter=max_iter, iterations=iterations, work=work, first=first
    )
    amax = amax_from_rows(amax_rows, stats.smax, axis, x)
    iterations_run = torch.from_numpy(counts).to(amax.device)
    return OctavResult(amax, iterations_run.reshape(()) if axis is None else iterations_run)
