"""OCTAV (Corollary 3.2, eq. 6; Appendix A): the public solver, its warm start, the exact sorted fixed point.

The passes are in ``_octav_kernels.py``, the iteration and its stopping rules in ``_octav_iterate.py``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import numpy as np
import torch

from ._octav_iterate import solve_rows
from ._octav_kernels import Stats, magnitude_stats, work_buffer
from .errors import SpecError
from .grid import Convention, Grid, check_bits, check_finite, check_tensor, rows_from
from .slices import amax_from_rows, resolve_signed

# OCTAV on more elements than this first solves a strided subsample, for a warm start.
_WARM_START_MIN = 1 << 12
_WARM_START_SAMPLE = 1 << 15
# Tensors up to this size, in rows up to the second size, are solved by one sort (exact; iterations
# reported as 0). Measured here: sorting (128, 128) takes 0.6 ms against 1.1 ms iterating, but one row
# of 16K values 1.0 ms against 0.6 ms.
_SORT_BELOW = 1 << 14
_SORT_ROW_BELOW = 1 << 12

Init = Literal["auto", "paper"] | float | torch.Tensor


class OctavResult(NamedTuple):
    amax: torch.Tensor
    iterations: torch.Tensor  # int64, same shape as amax


# ---------------------------------------------------------------------------------------------
# The exact fixed point by sorting


def sorted_fixed_point(mags: np.ndarray, c: float) -> np.ndarray:
    """Eq. (6)'s exact fixed point for every row of magnitudes (R, n) -> (R,), float64, by sorting.

    With the m non-zero values of a row sorted descending, v_1 >= v_2 >= ..., and k of them above s,
    the map is constant, S_k / (c (m - k) + k), on [v_{k+1}, v_k) (S_k: the sum of the k largest):
    the fixed point is the value that lands in its own interval. Where none does, h(s) = c s N0 - E
    jumps over zero at a data point (Appendix B's point mass) and the root is the smallest data point
    v with h(v) >= 0. An all-zero row gives 0. One row first tries only its upper tail (the root
    usually lies there; a mask and a short sort cost less than a full sort), with the same result.
    (The interval below the smallest value, k = m, holds its own value only by rounding: a constant
    row may give the cumulative sum's mean, a few ulps from the value.)
    Example: c = 1/588, magnitudes [1, 1, 1, 1, 100] -> 100 / (4c + 1) = 99.32.
    """
    if mags.shape[0] == 1:
        found = _fixed_point_in_tail(mags[0], c)
        if found is not None:
            return np.array([found])
    return _fixed_point_of_rows(mags, c)


def _fixed_point_in_tail(row: np.ndarray, c: float) -> float | None:
    """The fixed point of one row if it lies among the values above twice the mean (then above half
    of it): those intervals are the first k of the full sort, so the first one that holds its own
    value is the answer. None when neither tail has one."""
    nonzero = row[row > 0]
    m = nonzero.size
    if m == 0:
        return None
    mean = nonzero.mean()
    for floor in (2 * mean, mean / 2):
        v = np.sort(nonzero[nonzero >= floor])[::-1]  # the top values, descending
        if v.size == 0:
            continue
        k = np.arange(v.size, dtype=np.float64)
        tail_sums = np.concatenate([[0.0], np.cumsum(v)[:-1]])  # S_k: the sum of the k values above
        root = tail_sums / (c * (m - k) + k)
        upper = np.concatenate([[np.inf], v[:-1]])
        fixed = np.flatnonzero((root >= v) & (root < upper))
        if fixed.size:
            return float(root[fixed[0]])
    return None


def _fixed_point_of_rows(mags: np.ndarray, c: float) -> np.ndarray:
    """``sorted_fixed_point`` on whole rows (R, n), all at once."""
    rows, n = mags.shape
    v = -np.sort(-mags, axis=1)  # (R, n) descending, zeros last
    m = (v > 0).sum(axis=1, keepdims=True)  # (R, 1)
    v_ext = np.concatenate([v, np.zeros((rows, 1))], axis=1)  # (R, n+1): v_ext[:, k] = lower end
    sums = np.concatenate([np.zeros((rows, 1)), np.cumsum(v, axis=1)], axis=1)  # S_k, (R, n+1)
    k = np.arange(n + 1, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):  # k = m = 0: an all-zero row
        root = sums / (c * (m - k) + k)
    upper = np.concatenate([np.full((rows, 1), np.inf), v], axis=1)
    valid = (root >= v_ext) & (root < upper) & (k <= m)
    inside = root[np.arange(rows), valid.argmax(axis=1)]
    # At a data point v: A = #values strictly above (the first index of v's run);
    # h(v) = c v (m - A) - (S_A - v A).
    j = np.arange(n)[None, :]
    first = np.maximum.accumulate(
        np.where(np.concatenate([np.ones((rows, 1), bool), v[:, 1:] != v[:, :-1]], 1), j, 0), 1
    )
    h_at = c * v * (m - first) - (np.take_along_axis(sums, first, axis=1) - v * first)
    ok = (h_at >= 0) & (j < m)
    last_ok = n - 1 - np.argmax(ok[:, ::-1], axis=1)  # descending order: the smallest such v
    jump = v[np.arange(rows), last_ok]
    return np.where(valid.any(axis=1), inside, np.where(ok.any(axis=1), jump, 0.0))


def _host_magnitudes(x: torch.Tensor, signed: bool) -> np.ndarray:
    """|x| (signed) or max(x, 0) of rows (R, n), as float64 on the host."""
    return (x.abs() if signed else x.clamp(min=0)).double().cpu().numpy()


def solves_by_sorting(x: torch.Tensor, axis: int | None) -> bool:
    """Whether ``octav(x, axis=axis)`` with ``init="auto"`` solves by one sort rather than iterating."""
    row = x.numel() if axis is None or x.numel() == 0 else x.numel() // x.shape[axis]
    return x.numel() <= _SORT_BELOW and row <= _SORT_ROW_BELOW


# ---------------------------------------------------------------------------------------------
# Starting points


def _warm_start(x: torch.Tensor, signed: bool, c: float, mean: np.ndarray | None = None) -> np.ndarray:
    """Initial guesses from the exact fixed point on a strided subsample: n/128 values (4K-32K) of
    one long row, 8K pooled values of channels.

    Channels are pooled after dividing each by its mean magnitude ``mean`` (the paper's s_1):
    channels of one tensor tend to share a shape, not a scale. One row needs no ``mean``: the fixed
    point scales with the data. Lands within a few percent of the answer.
    """
    rows, n = x.shape
    # Larger tensors cost more per pass, so a larger (more accurate) sample pays for itself there.
    total = (
        _WARM_START_SAMPLE // 4
        if rows > 1
        else min(_WARM_START_SAMPLE, max(_WARM_START_SAMPLE // 8, n // 128))
    )
    per_row = max(1, total // rows)
    step = max(1, n // per_row) | 1
    while step % 3 == 0:  # a stride coprime with 2 and 3 visits every feature of (tokens, features)
        step += 2
    mags = _host_magnitudes(x[:, ::step], signed)
    if mean is None:
        return np.full(rows, sorted_fixed_point(mags.reshape(1, -1), c)[0])
    return sorted_fixed_point((mags / mean[:, None]).reshape(1, -1), c)[0] * mean


def _start(
    rows: torch.Tensor, signed: bool, c: float, auto: bool
) -> tuple[Stats, tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
    """The statistics pass and the starting points: (stats, E and N1 at s0 when the pass took them, s0).

    s0 is the paper's s_1, or with ``auto`` the fixed point of a subsample. For one long row the
    subsample needs no statistics, so the first evaluation joins their pass. With NaN or Inf in
    ``rows`` the results are meaningless, and stats.smax says so.
    """
    work = work_buffer(rows, 2)
    if auto and rows.shape[0] == 1 and rows.numel() >= _WARM_START_MIN:
        s0 = _warm_start(rows, signed, c)
        stats, first = magnitude_stats(rows, signed, work, s0)
        return stats, first, s0
    stats, _ = magnitude_stats(rows, signed, work)
    s0 = stats.total / np.maximum(stats.nnz, 1)
    if auto and rows.numel() >= _WARM_START_MIN and np.isfinite(s0).all():
        s0 = np.where(stats.nnz > 0, _warm_start(rows, signed, c, np.maximum(s0, 1e-30)), s0)
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
        check_finite(rows.amin(), x, "Tensor passed to octav")
    if auto and solves_by_sorting(x, axis):
        stats, _ = magnitude_stats(rows, signed, work_buffer(rows, 2))
        check_finite(torch.from_numpy(stats.smax), x, "Tensor passed to octav")
        amax = amax_from_rows(sorted_fixed_point(_host_magnitudes(rows, signed), c), stats.smax, axis, x)
        return OctavResult(amax, torch.zeros(amax.shape, dtype=torch.int64, device=amax.device))
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
