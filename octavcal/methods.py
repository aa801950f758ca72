"""Pure clipping-scalar methods (OCTAV, MSE sweep, percentiles, max) and the method-name parser.

Every method takes a tensor and returns ``amax`` of shape [] (``axis=None``) or [C] (one per index
along ``axis``, computed for all channels at once). No I/O, no printing, no device moves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from .errors import SpecError
from .grid import AMAX_OF_ZEROS, Convention, Grid, check_bits, check_finite, check_tensor, rows_from

# Per-tensor OCTAV on more elements than this first solves a strided subsample, for a warm start.
_WARM_START_MIN = 1 << 16
_WARM_START_SAMPLE = 1 << 15
# The MSE sweep works on blocks of about this many elements per candidate, to stay in cache.
_SWEEP_BLOCK = 1 << 13
# OCTAV's passes work on blocks of this many elements, reusing one cache-sized buffer.
_BLOCK = 1 << 21
# Tensors up to this size are solved by one sort (exact; iterations reported as 0).
_SORT_BELOW = 1 << 14
# Rows this long stop on OCTAV's contraction estimate; shorter ones when a step is below tol.
_SMOOTH_ROW = 1 << 16


# ---------------------------------------------------------------------------------------------
# Shared preparation


def resolve_signed(x: torch.Tensor, signed: bool | None) -> bool:
    """``signed=None`` means: unsigned when every element is >= 0 (e.g. after ReLU)."""
    if signed is None:
        return bool(x.min() < 0)
    return bool(signed)


def _magnitudes(x: torch.Tensor, signed: bool, axis: int | None) -> torch.Tensor:
    """(rows, n) of the values the clipping scalar bounds: |x| when signed, max(x, 0) when not.

    Negative values on an unsigned grid are clipped to 0 whatever s is, so they never move s*.
    """
    rows = rows_from(x, axis)
    return rows.abs() if signed else rows.clamp(min=0)


def _finish(
    amax_rows: torch.Tensor, smax_rows: torch.Tensor, axis: int | None, x: torch.Tensor
) -> torch.Tensor:
    """Replace amax 0 (never a valid runtime scale) and shape the result [] or [C].

    All-zero slice -> AMAX_OF_ZEROS; a slice whose method answered 0 (say, a percentile that falls
    on zeros) -> its max, i.e. no clipping.
    """
    # A handful of values: NumPy on the host is cheaper than several tiny torch ops.
    amax, smax = amax_rows.double().cpu().numpy(), smax_rows.double().cpu().numpy()
    fixed = np.where(amax > 0, amax, np.where(smax > 0, smax, AMAX_OF_ZEROS))
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    result = torch.from_numpy(fixed).to(device=x.device, dtype=out_dtype)
    return result.reshape(()) if axis is None else result


# ---------------------------------------------------------------------------------------------
# OCTAV (Corollary 3.2, eq. 6; Appendix A for unsigned data)


class OctavResult(NamedTuple):
    amax: torch.Tensor
    iterations: torch.Tensor  # int64, same shape as amax


def _work_buffer(x: torch.Tensor) -> torch.Tensor:
    """One block-sized scratch buffer for rows ``x``, reused by every pass of a call."""
    rows, n = x.shape
    return torch.empty(min(rows, max(1, _BLOCK // n)), min(n, _BLOCK), dtype=x.dtype, device=x.device)


def _magnitude_blocks(
    x: torch.Tensor, signed: bool, work: torch.Tensor, rows: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (positions, magnitudes) for cache-sized blocks of rows ``x`` (R, n), in ``work``.

    Magnitudes are |x| (signed grid) or max(x, 0) (unsigned: negatives clip to 0 whatever s is).
    ``rows`` picks a subset of rows; positions then index into that subset. Long rows come in
    column blocks, so a position can repeat: callers accumulate.
    """
    n = x.shape[1]
    if rows is not None and n > work.shape[1]:
        x, rows = x.index_select(0, rows), None  # long rows: few of them, a copy is cheap
    count = x.shape[0] if rows is None else rows.numel()
    if n > work.shape[1]:
        for r in range(count):
            for c in range(0, n, work.shape[1]):
                blk = x[r : r + 1, c : c + work.shape[1]]
                out = work[:, : blk.shape[1]]
                yield slice(r, r + 1), torch.abs(blk, out=out) if signed else torch.clamp(blk, min=0, out=out)
        return
    step = work.shape[0]
    for r in range(0, count, step):
        if rows is None:
            blk = x[r : r + step]
            out = work[: blk.shape[0]]
            mags = torch.abs(blk, out=out) if signed else torch.clamp(blk, min=0, out=out)
        else:  # gather straight into the buffer: no allocation per iteration
            idx = rows[r : r + step]
            mags = torch.index_select(x, 0, idx, out=work[: idx.numel()])
            mags = mags.abs_() if signed else mags.clamp_(min=0)
        yield slice(r, r + mags.shape[0]), mags


class _Stats(NamedTuple):
    smax: torch.Tensor  # (R,) largest magnitude
    total: torch.Tensor  # (R,) sum of magnitudes
    nnz: torch.Tensor  # (R,) count of non-zero magnitudes


def _magnitude_stats(x: torch.Tensor, signed: bool, work: torch.Tensor) -> _Stats:
    """One blocked pass over rows ``x`` (R, n): max, sum and non-zero count of the magnitudes."""
    smax = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    total, nnz = torch.zeros_like(smax), torch.zeros_like(smax)
    for r, mags in _magnitude_blocks(x, signed, work):
        smax[r] = torch.maximum(smax[r], mags.amax(dim=1).double())
        total[r] += mags.sum(dim=1).double()
        nnz[r] += mags.sign_().sum(dim=1).double()
    return _Stats(smax, total, nnz)


def _excess_and_count(
    x: torch.Tensor, signed: bool, s: torch.Tensor, work: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: E = sum(max(m - s, 0)) and N1 = #(m > s) for magnitudes m of rows ``x`` (R, n).

    (R, n), (R,) -> (R,), (R,), or for the subset ``rows`` only. S1 = E + s N1 then follows without
    cancellation. Clamp, sign and sum are vectorized kernels (masked selection and ``where`` cost
    several times more on CPU); blocks stay in cache and their sums are accumulated in float64.
    """
    excess = torch.zeros_like(s)
    count = torch.zeros_like(s)
    s_work = s.to(work.dtype)
    for r, mags in _magnitude_blocks(x, signed, work, rows):
        mags.sub_(s_work[r, None]).clamp_(min=0)
        excess[r] += mags.sum(dim=1).double()
        count[r] += mags.sign_().sum(dim=1).double()
    return excess, count


def _smallest_above(
    x: torch.Tensor, signed: bool, lo: torch.Tensor, work: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """For the subset ``rows``: the smallest magnitude strictly above ``lo`` (inf if none)."""
    best = torch.full_like(lo, math.inf)
    lo_work = lo.to(work.dtype)
    for r, mags in _magnitude_blocks(x, signed, work, rows):
        mags = torch.where(mags > lo_work[r, None], mags, math.inf)
        best[r] = torch.minimum(best[r], mags.amin(dim=1).double())
    return best


def _octav_rows(
    x: torch.Tensor,
    signed: bool,
    c: float,
    s0: torch.Tensor,
    stats: _Stats,
    *,
    tol: float,
    max_iter: int,
    iterations: int | None,
    work: torch.Tensor,
) -> OctavResult:
    """Solve eq. (6) for every row of ``x`` (R, n) from initial guesses ``s`` (R,).

    With E(s) = sum(max(m - s, 0)) and N1, N0 the counts above s and in (0, s], the iterate of eq. (6)
    is s <- (E + s N1) / (c N0 + N1): the Newton step towards the root of h(s) = c s N0 - E, which
    increases strictly in s. So each evaluation also brackets the root, and an iterate that leaves
    the bracket (point masses, Appendix B) is replaced by bisection. ``iterations`` runs the literal
    recursion that many times, unguarded, as the paper does.
    """
    rows, n = x.shape
    # Per-row bookkeeping is a handful of length-R vectors: NumPy on the host does it in
    # microseconds, where each tiny torch op would cost more than a pass over a small tensor.
    nnz, hi = stats.nnz.cpu().numpy(), stats.smax.cpu().numpy().copy()
    lo = np.zeros(rows)
    above_lo, above_hi = nnz.copy(), np.zeros(rows)  # N1 at the bracket's ends
    map_lo, map_hi = stats.total.cpu().numpy() / np.maximum(nnz, 1), np.zeros(rows)  # eq. (6) there
    done = nnz == 0
    s = np.where(done, hi, s0.cpu().numpy())
    counts = np.zeros(rows, dtype=np.int64)
    prev_s, prev_above = np.full(rows, np.nan), np.full(rows, np.nan)
    pending = np.zeros(rows, dtype=bool)  # rows whose bracket holds one data point
    # The contraction estimate needs a map that is smooth at the scale of tol: many values per row.
    smooth = n >= _SMOOTH_ROW
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(iterations if iterations is not None else max_iter):
            active = np.flatnonzero(~done)
            # Finished channels drop out: later iterations read only the few rows still moving.
            subset = None if active.size == rows else torch.from_numpy(active).to(x.device)
            excess, above = np.zeros(rows), np.zeros(rows)
            sub_excess, sub_above = _excess_and_count(
                x, signed, torch.from_numpy(s[active]).to(x.device), work, subset
            )
            excess[active], above[active] = sub_excess.cpu().numpy(), sub_above.cpu().numpy()
            inside_count = nnz - above
            newton = (excess + s * above) / np.where(done, 1.0, c * inside_count + above)
            counts += ~done
            if iterations is not None:
                s = np.where(done, s, newton)
                continue
            step = np.abs(newton - s)
            # Near the root the map g has slope -c s f / D (f: values per unit of s, estimated from the
            # last two evaluations and doubled for safety), and its error grows with f d^2 / (2 D) at a
            # distance d ~ step. On long rows, stop once that estimate of g(s)'s error is within tol.
            density = 2 * np.abs(above - prev_above) / np.abs(s - prev_s)
            slope = c * inside_count + above
            rho = c * s * density / slope
            error = rho * step / (1 - rho) + density * step**2 / (2 * slope)
            estimated = smooth & np.isfinite(error) & (rho < 0.5) & (error <= tol * newton)
            prev_s, prev_above = s, above
            below = ~done & (c * s * inside_count < excess)  # h(s) < 0: the root is above s
            upper = ~done & ~below
            lo, above_lo, map_lo = (
                np.where(below, s, lo),
                np.where(below, above, above_lo),
                np.where(below, newton, map_lo),
            )
            hi, above_hi, map_hi = (
                np.where(upper, s, hi),
                np.where(upper, above, above_hi),
                np.where(upper, newton, map_hi),
            )
            # The estimate is trusted only for a value inside the bracket (not across a point mass).
            converged = (step <= tol * newton) | (estimated & (newton >= lo) & (newton <= hi))
            # Far from the root, h is concave (E(s) falls off like a tail), so the map creeps up from
            # below and overshoots from above. Newton on log E(s) - log(c s N0), whose root is the same,
            # follows tails closely; it is used while it stays inside the bracket. The map's own value
            # still decides convergence, so the answer is the exact fixed point all the same.
            log_step = (np.log(excess) - np.log(c * s * inside_count)) / (above / excess + 1 / s)
            tail = s + log_step
            use_tail = smooth & np.isfinite(tail) & (tail > lo) & (tail < hi) & ~converged
            inside = (newton > lo) & (newton < hi)
            nxt = np.where(use_tail, tail, np.where(inside | converged, newton, 0.5 * (lo + hi)))
            # One data point v left in (lo, hi]: the map is constant on [lo, v) and on [v, hi], so the
            # root is its value on one side if that lands there, else h jumps over zero at v itself
            # (Appendix B's point of positive mass, where the recursion would cycle). Finish exactly.
            single = ~done & ~converged & (above_lo - above_hi == 1)
            pending |= single  # resolved together after the loop: one pass for all such rows
            # A collapsed bracket means the root sits on a point mass at hi: take hi.
            collapsed = ~converged & ~single & (hi - lo <= tol * hi)
            nxt = np.where(collapsed, hi, nxt)
            s = np.where(done, s, nxt)
            done = done | converged | collapsed | single
            if done.all():
                break
    if pending.any():
        which = np.flatnonzero(pending)
        idx = torch.from_numpy(which).to(x.device)
        v = _smallest_above(x, signed, torch.from_numpy(lo[which]).to(x.device), work, idx).cpu().numpy()
        s[which] = np.where(map_lo[which] < v, map_lo[which], np.where(map_hi[which] >= v, map_hi[which], v))
    return OctavResult(torch.from_numpy(s).to(x.device), torch.from_numpy(counts).to(x.device))


def _sorted_fixed_point(mags: np.ndarray, c: float) -> float:
    """The exact fixed point of eq. (6) on a small 1-D sample, by sorting instead of iterating.

    With the m non-zero values sorted descending and k of them above s, the map is constant,
    S_k / (c (m - k) + k), on [v_{k+1}, v_k): the fixed point is the value that lands in its own
    interval, or the data point where h jumps over zero. Only the top 1/16, then the top quarter, is
    sorted first (the root lies in the tail); the whole sample when it is not there.
    """
    nonzero = mags[mags > 0]
    m = nonzero.size
    for top in (max(64, m // 16), max(64, m // 4), m):
        top = min(top, m)
        v = np.sort(np.partition(nonzero, m - top)[m - top :])[::-1]  # the top values, descending
        k = np.arange(top, dtype=np.float64)
        tail_sums = np.concatenate([[0.0], np.cumsum(v)[:-1]])  # S_k: sum of the k values above
        root = tail_sums / (c * (m - k) + k)
        upper = np.concatenate([[np.inf], v[:-1]])
        fixed = np.flatnonzero((root >= v) & (root < upper))
        if fixed.size:
            return float(root[fixed[0]])
        crossing = np.flatnonzero(root >= v)  # h jumps over zero at a data point (coarse grids)
        if crossing.size and crossing[0] > 0:
            return float(v[crossing[0] - 1])
    return float(nonzero.mean()) if m else 0.0


def _octav_by_sorting(x: torch.Tensor, signed: bool, c: float) -> torch.Tensor:
    """Eq. (6)'s fixed point for every row of a small (R, n) tensor at once, exactly, by sorting.

    With k values above s the map is constant, S_k / (c (m - k) + k), on [v_{k+1}, v_k) (values sorted
    descending, m non-zero): the root is the value that lands in its own interval; where none does, h
    jumps over zero at a data point and the root is the smallest data point v with h(v) >= 0.
    Iterating costs a few passes plus per-call overhead; for small tensors one sort is cheaper.
    """
    mags = (x.abs() if signed else x.clamp(min=0)).double().cpu().numpy()
    rows, n = mags.shape
    v = -np.sort(-mags, axis=1)  # (R, n) descending, zeros last
    m = (v > 0).sum(axis=1, keepdims=True)  # (R, 1)
    v_ext = np.concatenate([v, np.zeros((rows, 1))], axis=1)  # (R, n+1): v_ext[:, k] = lower end
    sums = np.concatenate([np.zeros((rows, 1)), np.cumsum(v, axis=1)], axis=1)  # S_k, (R, n+1)
    k = np.arange(n + 1, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
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
    result = np.where(valid.any(axis=1), inside, np.where(ok.any(axis=1), jump, 0.0))
    return torch.from_numpy(result).to(x.device)


def _octav_warm_start(x: torch.Tensor, signed: bool, c: float, mean: torch.Tensor) -> torch.Tensor:
    """Initial guesses from the exact fixed point on a strided subsample: n/128 values (4K-32K) of
    one long row, 16K pooled values of channels.

    Channels are pooled after dividing each by its mean magnitude (the paper's s_1): channels of
    one tensor tend to share a shape, not a scale. Lands within a few percent of the answer.
    """
    rows, n = x.shape
    # Larger tensors cost more per pass, so a larger (more accurate) sample pays for itself there.
    total = (
        _WARM_START_SAMPLE // 2
        if rows > 1
        else min(_WARM_START_SAMPLE, max(_WARM_START_SAMPLE // 8, n // 128))
    )
    per_row = max(1, total // rows)
    step = max(1, n // per_row) | 1
    while step % 3 == 0:  # a stride coprime with 2 and 3 visits every feature of (tokens, features)
        step += 2
    sample = x[:, ::step]
    mags = (sample.abs() if signed else sample.clamp(min=0)).double() / mean[:, None]
    return _sorted_fixed_point(mags.reshape(-1).cpu().numpy(), c) * mean


def octav(
    x: torch.Tensor,
    bits: int,
    *,
    signed: bool | None = None,
    axis: int | None = None,
    convention: Convention = "runtime",
    init: Literal["auto", "paper"] | float | torch.Tensor = "auto",
    tol: float = 1e-6,
    max_iter: int = 100,
    iterations: int | None = None,
    return_iterations: bool = False,
) -> torch.Tensor | OctavResult:
    """Compute the MSE-optimal clipping scalar by OCTAV (Corollary 3.2, eq. 6; Appendix A).

    Minimizes J(s) = c s^2 E[1{0<|x|<=s}] + E[(|x|-s)^2 1{|x|>s}] (eq. 12, zeros excluded from the
    noise term) with c = (step/amax)^2/12 of the grid: 1/(12 qmax^2) (``runtime``), 4^-B/3 signed or
    4^-B/12 unsigned (``paper``). Iterates until an update moves s by at most ``tol`` (relative);
    ``iterations=10`` instead runs the paper's fixed count. ``init``: "paper" is sum|x| / #nonzero
    (the paper's s_1); "auto" starts from OCTAV on a 16K-value subsample when the tensor is large; a
    number or a [C] tensor is used as given. With ``init="auto"`` and no ``iterations``, tensors of
    up to 16384 values are solved exactly by sorting instead (the iteration count is then 0).
    Example: 4-bit signed runtime grid (c = 1/588), x = [1, 1, 1, 1, 100] -> with only the outlier
    above s, s = 100 / (4c + 1) = 99.32; a unit Gaussian -> amax about 2.49.
    Returns amax ([] or [C]); with ``return_iterations`` an ``OctavResult(amax, iterations)``.
    """
    check_bits(bits)
    check_tensor(x, "Tensor passed to octav", finite=False)
    if iterations is not None and (
        isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1
    ):
        raise SpecError(f"iterations must be a positive integer or None: got {iterations!r}.")
    signed = resolve_signed(x, signed)
    c = Grid(bits, signed, convention).noise_coefficient
    rows = rows_from(x, axis)
    work = _work_buffer(rows)
    stats = _magnitude_stats(rows, signed, work)
    check_finite(stats.smax, x, "Tensor passed to octav")
    if init == "auto" and iterations is None and rows.numel() <= _SORT_BELOW:
        amax = _finish(_octav_by_sorting(rows, signed, c), stats.smax, axis, x)
        if not return_iterations:
            return amax
        return OctavResult(amax, torch.zeros(amax.shape, dtype=torch.int64, device=amax.device))
    if isinstance(init, str):
        if init not in ("auto", "paper"):
            raise SpecError(f"init must be 'auto', 'paper' or a number: got {init!r}.")
        s0 = stats.total / stats.nnz.clamp(min=1)
        if init == "auto" and iterations is None and rows.numel() >= _WARM_START_MIN:
            s0 = torch.where(stats.nnz > 0, _octav_warm_start(rows, signed, c, s0.clamp(min=1e-30)), s0)
    else:
        s0 = torch.as_tensor(init, dtype=torch.float64, device=rows.device).expand(rows.shape[0]).clone()
    result = _octav_rows(
        rows, signed, c, s0, stats, tol=tol, max_iter=max_iter, iterations=iterations, work=work
    )
    amax = _finish(result.amax, stats.smax, axis, x)
    if not return_iterations:
        return amax
    return OctavResult(amax, result.iterations.reshape(()) if axis is None else result.iterations)


# ---------------------------------------------------------------------------------------------
# MSE sweep (Appendix E.3)


def sweep_candidates(smax: torch.Tensor, points: int) -> torch.Tensor:
    """k/points * smax for k = 1..points: (R,) -> (points, R)."""
    k = torch.arange(1, points + 1, dtype=torch.float64, device=smax.device)
    return k[:, None] / points * smax.to(torch.float64)[None, :]


def _sweep_sse(a: torch.Tensor, cand: torch.Tensor, qmax: int) -> torch.Tensor:
    """Sum of squared quantization errors of every candidate on every row: (R,n),(K,R) -> (K,R).

    ``a`` holds magnitudes on the grid's non-negative side, so the grid is [0, qmax]. Works block by
    block so that the (K, block) intermediate stays in cache and no (K, n) tensor is ever made.
    """
    rows, n = a.shape
    scale = cand / qmax  # (K, R), float64
    inv = (1.0 / scale).to(a.dtype)
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
    With ``return_curve`` returns (amax, candidates (points, R), mse (points, R)).
    """
    check_bits(bits)
    check_tensor(x, "Tensor passed to mse_sweep")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise SpecError(f"points must be a positive integer: got {points!r}.")
    signed = resolve_signed(x, signed)
    qmax = Grid(bits, signed, convention).qmax
    a = _magnitudes(x, signed, axis)
    smax = a.amax(dim=1).to(torch.float64)
    cand = sweep_candidates(torch.where(smax > 0, smax, 1.0), points)
    sse = _sweep_sse(a, cand, qmax)
    best = sse.argmin(dim=0)  # first minimum: the smallest candidate among ties
    chosen = torch.where(smax > 0, cand.gather(0, best[None]).squeeze(0), 0.0)  # all-zero -> _finish
    amax = _finish(chosen, smax, axis, x)
    if not return_curve:
        return amax
    mse = sse / a.shape[1]
    if not signed:  # add the constant error of negative values, clipped to 0 by every candidate
        neg = rows_from(x, axis).clamp(max=0).double().square().mean(dim=1)
        mse = mse + neg[None, :]
    return amax, cand, mse


# ---------------------------------------------------------------------------------------------
# Percentiles and max-scaling


def percentile(x: torch.Tensor, q: float, *, axis: int | None = None) -> torch.Tensor:
    """The q-th percentile of |x| with linear interpolation (NumPy's default), exact at any size.

    Position p = q/100 * (n-1) in ascending order; only the top n - floor(p) values are selected
    (``topk``) when that tail is small, otherwise a selection (``kthvalue``) finds both neighbours:
    never a full sort, and no 2^24-element limit as in ``torch.quantile``.
    Example: |x| = [1, 2, 3, 4, 5], q = 90 -> p = 3.6 -> 4 + 0.6 * (5 - 4) = 4.6.
    """
    check_tensor(x, "Tensor passed to percentile")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 100:
        raise SpecError(f"Percentile q must be in (0, 100]: got {q!r}.")
    a = rows_from(x, axis).abs()
    n = a.shape[1]
    pos = q / 100.0 * (n - 1)
    low = min(math.floor(pos), n - 1)
    frac = pos - low
    top = n - low  # values at ascending ranks low .. n-1
    if top <= max(64, n // 8):
        tail = torch.topk(a, top, dim=1, sorted=True).values  # descending
        v_low = tail[:, top - 1]
        v_high = tail[:, top - 2] if top >= 2 else v_low
    else:
        v_low = torch.kthvalue(a, low + 1, dim=1).values
        v_high = torch.kthvalue(a, low + 2, dim=1).values if low + 1 < n else v_low
    value = v_low.double() + frac * (v_high.double() - v_low.double())
    return _finish(value, a.amax(dim=1).double(), axis, x)


def max_scaling(x: torch.Tensor, *, signed: bool | None = None, axis: int | None = None) -> torch.Tensor:
    """The max-scaled quantizer's scalar (eq. 2): max |x| (signed) or max x (unsigned)."""
    check_tensor(x, "Tensor passed to max_scaling")
    signed = resolve_signed(x, signed)
    smax = _magnitudes(x, signed, axis).amax(dim=1).double()
    return _finish(smax, smax, axis, x)


def analytic_mse(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    bits: int,
    *,
    signed: bool | None = None,
    axis: int | None = None,
    convention: Convention = "runtime",
) -> torch.Tensor:
    """Evaluate J(s) of eq. (4)/(12) on the data: [c s^2 #{0<|x|<=s} + sum_{|x|>s} (|x|-s)^2] / n.

    The additive-noise model OCTAV minimizes, per slice (float64, [] or [C]); compare with
    ``quant_mse`` to see where the model holds.
    """
    check_tensor(x, "Tensor passed to analytic_mse")
    signed = resolve_signed(x, signed)
    c = Grid(check_bits(bits), signed, convention).noise_coefficient
    a = _magnitudes(x, signed, axis).double()
    s = torch.as_tensor(amax, dtype=torch.float64, device=a.device).reshape(-1, 1)
    inside = ((a > 0) & (a <= s)).sum(dim=1)
    clipped = (a - s).clamp(min=0).square().sum(dim=1)
    j = (c * s[:, 0] ** 2 * inside + clipped) / a.shape[1]
    return j.reshape(()) if axis is None else j


# ---------------------------------------------------------------------------------------------
# Method names


_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")
METHOD_NAMES = ("octav", "sweep", "max", "pNN.NNN")


@dataclass(frozen=True)
class Method:
    """A parsed clipping method: kind 'octav', 'sweep', 'max' or 'percentile' (with q)."""

    kind: Literal["octav", "sweep", "max", "percentile"]
    q: float | None = None

    @property
    def name(self) -> str:
        return f"p{self.q:.10g}" if self.kind == "percentile" else self.kind


def parse_method(name: str) -> Method:
    """Parse 'octav', 'sweep' (alias 'mse'), 'max' or 'pNN.NNN' (percentile in (0, 100])."""
    if not isinstance(name, str):
        raise SpecError(f"Clipping method must be a string: got {name!r}.")
    key = name.strip().lower()
    if key in ("octav", "sweep", "max"):
        return Method(key)  # type: ignore[arg-type]
    if key == "mse":
        return Method("sweep")
    match = _PERCENTILE.match(key)
    if match and 0 < float(match.group(1)) <= 100:
        return Method("percentile", float(match.group(1)))
    raise SpecError(f"Unknown clipping method {name!r}. Expected one of: {', '.join(METHOD_NAMES)}.")


def parse_methods(names: str | list[str] | tuple[str, ...]) -> list[Method]:
    """Parse a comma-separated list (or a sequence) of method names, keeping order, dropping repeats."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    methods: list[Method] = []
    for part in parts:
        if isinstance(part, str) and not part.strip():
            continue
        method = parse_method(part)
        if method not in methods:
            methods.append(method)
    if not methods:
        raise SpecError(f"No clipping method given. Expected one of: {', '.join(METHOD_NAMES)}.")
    return methods


def compute_amax(
    x: torch.Tensor,
    method: Method | str,
    bits: int,
    *,
    signed: bool | None = None,
    axis: int | None = None,
    convention: Convention = "runtime",
) -> torch.Tensor:
    """Dispatch to one clipping method by parsed or textual name."""
    m = parse_method(method) if isinstance(method, str) else method
    if m.kind == "octav":
        return octav(x, bits, signed=signed, axis=axis, convention=convention)  # type: ignore[return-value]
    if m.kind == "sweep":
        return mse_sweep(x, bits, signed=signed, axis=axis, convention=convention)  # type: ignore[return-value]
    if m.kind == "max":
        check_bits(bits)
        return max_scaling(x, signed=signed, axis=axis)
    check_bits(bits)
    assert m.q is not None  # a parsed percentile always has q
    return percentile(x, m.q, axis=axis)
