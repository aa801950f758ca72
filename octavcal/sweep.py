"""The 100-point MSE sweep (Appendix E.3): every candidate k/points * s_max scored by eq. (1)'s MSE.

One long float32 row is swept from its sort (float64 segment sums); other rows block by block.
``methods.py`` re-exports the public names.
"""

from __future__ import annotations

from typing import Literal, overload

import numpy as np
import torch

from .errors import SpecError
from .grid import Convention, Grid, check_bits, check_tensor, rows_from
from .slices import amax_from_rows, magnitude_rows, resolve_signed

# The MSE sweep works on blocks of about this many elements per candidate, to stay in cache.
_SWEEP_BLOCK = 1 << 13
# One long float32 row is swept from its sorted values when its grid has at most this many positive
# levels and the binary searches (points * qmax) are at most twice the values: there a sort and the
# searches cost less than 100 passes (measured here on 1M values at 8 bits: 18 ms against 79 ms), and
# float64 segment sums are more accurate than float32 blocks (1e-11 against 6e-7 relative at 8 bits;
# 4e-7 against 2e-6 at 12). Above 12 bits they cancel, and the blocks are cheaper anyway.
SORTED_SWEEP_MAX_QMAX = 4095


def sweep_candidates(smax: torch.Tensor, points: int) -> torch.Tensor:
    """k/points * smax for k = 1..points: (R,) -> (points, R)."""
    k = torch.arange(1, points + 1, dtype=torch.float64, device=smax.device)
    return k[:, None] / points * smax.to(torch.float64)[None, :]


def sweeps_by_sorting(a: torch.Tensor, qmax: int, points: int = 100) -> bool:
    """Whether the sweep of magnitude rows ``a`` (R, n) on a grid of ``qmax`` works from a sort."""
    rows, n = a.shape
    return rows == 1 and a.dtype == torch.float32 and qmax <= SORTED_SWEEP_MAX_QMAX and points * qmax <= 2 * n


def sorted_magnitudes(a: torch.Tensor) -> np.ndarray:
    """One row of magnitudes (1, n) sorted ascending on the host (NumPy's sort: 30x torch's on CPU)."""
    return np.sort(a.reshape(-1).cpu().numpy())


def _sweep_sse_sorted(v: np.ndarray, cand: torch.Tensor, qmax: int) -> torch.Tensor:
    """``_sweep_sse`` of one row from its values sorted ascending ``v`` (n,): (n,), (K, 1) -> (K, 1).

    Level j of candidate s (step s/qmax) holds the values that round to j: a contiguous run of ``v``
    between the midpoints (j +- 1/2) step, the last level also every clipped value. Its squared error
    sum(v - j step)^2 = S2 - 2 j step S1 + (j step)^2 count follows from the sums S1 of v and S2 of v^2
    over the run: binary searches find the runs' ends, and one pass adds v and v^2 between all of
    them (segment sums in float64, then prefix sums over the few thousand segments).
    """
    n, k = v.size, cand.shape[0]
    step = cand[:, 0].cpu().numpy() / qmax  # (K,)
    midpoints = ((np.arange(qmax, dtype=np.float64) + 0.5)[None, :] * step[:, None]).ravel()  # (K*qmax,)
    order = np.argsort(midpoints, kind="stable")  # searching sorted keys walks the row once
    v64 = v.astype(np.float64)
    # values below each midpoint (a tie's error is the same either way), with 0 and n around them
    bounds = np.concatenate([[0], np.searchsorted(v64, midpoints[order]), [n]])  # non-decreasing
    new = np.concatenate([[True], bounds[1:] != bounds[:-1]])
    cuts = bounds[new]  # distinct, from 0 to n
    place = np.cumsum(new) - 1  # where each bound sits among the cuts
    at = np.empty(k * qmax, np.int64)
    at[order] = place[1:-1]
    at = np.concatenate([np.zeros((k, 1), np.int64), at.reshape(k, qmax), np.full((k, 1), place[-1])], 1)
    s1 = np.concatenate([[0.0], np.cumsum(np.add.reduceat(v64, cuts[:-1]))])  # sum of v below each cut
    s2 = np.concatenate([[0.0], np.cumsum(np.add.reduceat(v64 * v64, cuts[:-1]))])
    level = np.arange(qmax + 1, dtype=np.float64)[None, :] * step[:, None]  # (K, qmax+1)
    count = np.diff(cuts[at], axis=1)
    sse = np.diff(s2[at], axis=1) - 2 * level * np.diff(s1[at], axis=1) + level * level * count
    return torch.from_numpy(sse.sum(axis=1, keepdims=True)).to(cand.device)


def _sweep_sse(
    a: torch.Tensor, cand: torch.Tensor, qmax: int, ordered: np.ndarray | None = None
) -> torch.Tensor:
    """Sum of squared quantization errors of every candidate on every row: (R,n),(K,R) -> (K,R).

    ``a`` holds magnitudes on the grid's non-negative side, so the grid is [0, qmax]. One long
    float32 row is done from its sort (``ordered``, when the caller has it); otherwise block by block,
    so that the (K, block) intermediate stays in cache and no (K, n) tensor is ever made.
    """
    if sweeps_by_sorting(a, qmax, cand.shape[0]):
        return _sweep_sse_sorted(sorted_magnitudes(a) if ordered is None else ordered, cand, qmax)
    rows, n = a.shape
    scale = cand / qmax  # (K, R), float64
    inv = (1.0 / scale).to(a.dtype)
    if not bool(torch.isfinite(inv).all()):  # steps below float32's range (data near 1e-38): float64
        a, inv = a.double(), 1.0 / scale
    sse_steps = torch.zeros(cand.shape, dtype=torch.float64, device=a.device)  # in units of step^2
    row_block = max(1, min(rows, _SWEEP_BLOCK // n)) if n < _SWEEP_BLOCK else 1
    col_block = min(n, _SWEEP_BLOCK)
    steps = torch.empty(cand.shape[0], row_block, col_block, dtype=a.dtype, device=a.device)
    levels = torch.empty_like(steps)
    for r0 in range(0, rows, row_block):
        r1 = min(rows, r0 + row_block)
        iv = inv[:, r0:r1, None]  # (K, rb, 1)
        for c0 in range(0, n, col_block):
            blk = a[None, r0:r1, c0 : c0 + col_block]  # (1, rb, cb)
            t = torch.mul(blk, iv, out=steps[:, : r1 - r0, : blk.shape[2]])  # x / step
            q = torch.round(t, out=levels[:, : r1 - r0, : blk.shape[2]]).clamp_(0, qmax)
            # float32 sums within a block are fast and exact enough; blocks add up in float64
            sse_steps[:, r0:r1] += t.sub_(q).square_().sum(dim=2).double()
    return sse_steps * scale**2


def sweep_sse(a: torch.Tensor, candidates: torch.Tensor, qmax: int) -> torch.Tensor:
    """The summed squared error of every candidate on every row of magnitudes: (R, n), (K, R) -> (K, R),
    float64 (``sweep_mse_curve`` times n); the union sums it over batches."""
    return _sweep_sse(a, candidates, qmax)


def sweep_mse_curve(magnitudes: torch.Tensor, candidates: torch.Tensor, qmax: int) -> torch.Tensor:
    """Eq. (1)'s MSE of every candidate amax on every row of magnitudes: (R, n), (K, R) -> (K, R).

    ``magnitudes`` lie on the grid's non-negative side (|x| signed, max(x, 0) unsigned), so the grid
    is [0, qmax]; the MSE is in float64. Negative values on an unsigned grid add a constant, left out.
    Example: magnitudes [[0.3, 1.0]], candidates [[1.0]], qmax 1 -> levels 0 and 1 -> 0.3^2 / 2 = 0.045.
    """
    return _sweep_sse(magnitudes, candidates, qmax) / magnitudes.shape[1]


@overload
def mse_sweep(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = ...,
    axis: int | None = ...,
    convention: Convention = ...,
    points: int = ...,
    return_curve: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def mse_sweep(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = ...,
    axis: int | None = ...,
    convention: Convention = ...,
    points: int = ...,
    return_curve: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
@overload
def mse_sweep(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = ...,
    axis: int | None = ...,
    convention: Convention = ...,
    points: int = ...,
    return_curve: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def mse_sweep(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = None,
    axis: int | None = None,
    convention: Convention = "runtime",
    points: int = 100,
    return_curve: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute-force the clipping scalar over k/points * s_max, k = 1..points (Appendix E.3).

    Each candidate is scored by the empirical MSE of eq. (1) on the same grid as ``fake_quantize``;
    per channel, s_max is each row's maximum. Ties go to the smallest candidate.
    Example: x = [0.1, 0.2, 10], 2-bit signed -> candidates 0.1..10; amax 10 keeps the outlier.
    With ``return_curve=True`` returns (amax, candidates (points, R), mse (points, R)).
    """
    check_bits(bits)
    check_tensor(x, "Tensor passed to mse_sweep")
    x = x.detach()  # a statistic of the data, not a function to differentiate
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise SpecError(f"points must be a positive integer: got {points!r}.")
    signed = resolve_signed(x, signed)
    qmax = Grid(bits, signed, convention).qmax
    a = magnitude_rows(x, signed, axis)
    smax = a.amax(dim=1).to(torch.float64)
    chosen, cand, sse = sweep_rows(a, smax, qmax, points)
    amax = amax_from_rows(chosen, smax, axis, x)
    if not return_curve:
        return amax
    mse = sse / a.shape[1]
    if not signed:  # add the constant error of negative values, clipped to 0 by every candidate
        neg = rows_from(x, axis).clamp(max=0).double().square().mean(dim=1)
        mse = mse + neg[None, :]
    return amax, cand, mse


def sweep_rows(
    a: torch.Tensor, smax: torch.Tensor, qmax: int, points: int = 100, ordered: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sweep on magnitude rows ``a`` (R, n) with maxima ``smax`` (R,), float64: (chosen (R,),
    candidates (points, R), SSE (points, R)); an all-zero row chooses 0. ``ordered``: the row already
    sorted ascending, when the caller has it."""
    cand = sweep_candidates(torch.where(smax > 0, smax, 1.0), points)
    sse = _sweep_sse(a, cand, qmax, ordered)
    best = sse.argmin(dim=0)  # first minimum: the smallest candidate among ties
    chosen = torch.where(smax > 0, cand.gather(0, best[None]).squeeze(0), 0.0)  # all-zero -> amax_from_rows
    return chosen, cand, sse
