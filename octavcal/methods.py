"""Pure clipping-scalar methods (OCTAV, MSE sweep, percentiles, max) and the method-name parser.

Every method takes a tensor and returns ``amax`` of shape [] (``axis=None``) or [C] (one per index
along ``axis``, computed for all channels at once). No I/O, no printing, no device moves.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from .errors import SpecError
from .grid import AMAX_OF_ZEROS, Convention, Grid, check_bits, check_finite, check_tensor, rows_from

# OCTAV on more elements than this first solves a strided subsample, for a warm start.
_WARM_START_MIN = 1 << 12
_WARM_START_SAMPLE = 1 << 15
# The MSE sweep works on blocks of about this many elements per candidate, to stay in cache.
_SWEEP_BLOCK = 1 << 13
# OCTAV's passes work on blocks of this many elements, in scratch buffers kept between calls.
_BLOCK = 1 << 21
# Tensors up to this size, in rows up to the second size, are solved by one sort (exact; iterations
# reported as 0). Measured here: sorting (128, 128) takes 0.6 ms against 1.1 ms iterating, but one row
# of 16K values 1.0 ms against 0.6 ms.
_SORT_BELOW = 1 << 14
_SORT_ROW_BELOW = 1 << 12
# Every row stops at a proven fixed point; rows this long may also stop on a contraction estimate.
_SMOOTH_ROW = 1 << 16
# ... and measure the density of values near the root from evaluations this many values apart.
_MIN_CROSSINGS = 16
# Long rows take Newton steps on log E(s) while the map still moves s by more than this (relative).
_TAIL_STEP = 1e-3
# Per-thread scratch buffers for OCTAV's passes (see _work_buffer).
_scratch = threading.local()


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
    amax_rows: torch.Tensor | np.ndarray,
    smax_rows: torch.Tensor | np.ndarray,
    axis: int | None,
    x: torch.Tensor,
) -> torch.Tensor:
    """Replace amax 0 (never a valid runtime scale) and shape the result [] or [C].

    All-zero slice -> AMAX_OF_ZEROS; a slice whose method answered 0 (say, a percentile that falls
    on zeros) -> its max, i.e. no clipping.
    """
    # A handful of values: NumPy on the host is cheaper than several tiny torch ops.
    amax, smax = (
        a if isinstance(a, np.ndarray) else a.double().cpu().numpy() for a in (amax_rows, smax_rows)
    )
    fixed = np.where(amax > 0, amax, np.where(smax > 0, smax, AMAX_OF_ZEROS))
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    result = torch.from_numpy(fixed).to(device=x.device, dtype=out_dtype)
    return result.reshape(()) if axis is None else result


# ---------------------------------------------------------------------------------------------
# OCTAV (Corollary 3.2, eq. 6; Appendix A for unsigned data)


class OctavResult(NamedTuple):
    amax: torch.Tensor
    iterations: torch.Tensor  # int64, same shape as amax


def _work_buffer(x: torch.Tensor, count: int = 1) -> torch.Tensor:
    """``count`` block-sized scratch buffers for rows ``x``, (count, rows, cols), reused by every pass.

    On the CPU they are also reused across calls (one per thread and dtype, at most _BLOCK values
    each): a fresh multi-MB allocation is returned to the OS when freed, and faulting its pages
    back in cost more than the passes themselves (measured: 3 ms against 0.3 ms for a 2M-value
    pass). CUDA's caching allocator already reuses memory.
    """
    rows, n = x.shape
    shape = (count, min(rows, max(1, _BLOCK // n)), min(n, _BLOCK))
    size = shape[0] * shape[1] * shape[2]
    if x.device.type != "cpu":
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(x.dtype)
    if buffer is None or buffer.numel() < size:
        # A normal CPU tensor whatever the caller's mode: an inference-mode tensor could not be
        # written in place by a later call outside inference mode, nor one on the default device.
        with torch.inference_mode(False):
            buffer = buffers[x.dtype] = torch.empty(size, dtype=x.dtype, device="cpu")
    return buffer[:size].view(shape)


def _row_blocks(
    x: torch.Tensor, work: torch.Tensor, rows: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (positions, values) for cache-sized blocks of rows ``x`` (R, n): views of ``x``, or
    the subset ``rows`` gathered into ``work[0]``.

    Positions index into the subset when ``rows`` is given. Long rows come in column blocks, so a
    position can repeat: callers accumulate.
    """
    n, width = x.shape[1], work.shape[2]
    if rows is not None and n > width:
        x, rows = x.index_select(0, rows), None  # long rows: few of them, a copy is cheap
    count = x.shape[0] if rows is None else rows.numel()
    if n > width:
        for r in range(count):
            for c in range(0, n, width):
                yield slice(r, r + 1), x[r : r + 1, c : c + width]
        return
    step = work.shape[1]
    for r in range(0, count, step):
        if rows is None:
            yield slice(r, min(r + step, count)), x[r : r + step]
        else:  # gather straight into the buffer: no allocation per iteration
            idx = rows[r : r + step]
            yield slice(r, r + idx.numel()), torch.index_select(x, 0, idx, out=work[0, : idx.numel()])


def _magnitudes_of(block: torch.Tensor, signed: bool, work: torch.Tensor) -> torch.Tensor:
    """|x| (signed grid) or max(x, 0) (unsigned: negatives clip to 0 whatever s is), in ``work[0]``."""
    out = work[0, : block.shape[0], : block.shape[1]]
    return torch.abs(block, out=out) if signed else torch.clamp(block, min=0, out=out)


def _excess_of(block: torch.Tensor, signed: bool, s: np.ndarray, work: torch.Tensor) -> torch.Tensor:
    """max(m - s, 0) for the magnitudes m of ``block`` (R', n') and thresholds s (R',), in a buffer.

    Fewest passes: max(x - s, 0) on the unsigned grid (s > 0 makes the clamp to 0 redundant), and
    |softshrink(x, s)| for one signed row; |x| - s, clamped, for signed channels.
    """
    # A block gathered into work[0] is ours to overwrite; a view of x is not.
    owned = block.data_ptr() == work[0].data_ptr()
    out = block if owned else work[1, : block.shape[0], : block.shape[1]]
    if signed and block.shape[0] == 1:
        return torch.ops.aten.softshrink.out(block, float(s[0]), out=out).abs_()
    thresholds = torch.from_numpy(s[:, None]).to(block.device)
    if not signed:
        return torch.sub(block, thresholds, out=out).clamp_(min=0)
    return torch.abs(block, out=out).sub_(thresholds).clamp_(min=0)


def _count_positive(beyond: torch.Tensor, s: np.ndarray) -> np.ndarray:
    """Per row, how many entries of ``beyond = max(m - s, 0)`` are positive (overwrites it).

    A positive m - s is at least the float spacing above s (the subtraction is exact near s), so
    clamping to the smallest such spacing turns each into that power of two and the sum is the
    count times it, exactly (counts stay far below 2^24): one pass cheaper than sign + sum.
    """
    floor = float(np.spacing(s).min())
    if not floor >= np.finfo(s.dtype).tiny:  # subnormal spacings may be flushed to zero
        return _host(beyond.sign_().sum(dim=1))
    return _host(beyond.clamp_(max=floor).sum(dim=1)) / floor


def _in_work_precision(s: np.ndarray, work: torch.Tensor) -> np.ndarray:
    """Thresholds in the dtype the passes compute in, rounded down: for data in that dtype, m > s
    exactly when m > the rounded s, so the counts are those at s itself (rounding to nearest could
    step over a value, or a point mass, just above s)."""
    dtype = np.float64 if work.dtype == torch.float64 else np.float32
    rounded = s.astype(dtype)
    return np.where(rounded > s, np.nextafter(rounded, dtype(-np.inf)), rounded).astype(dtype)


def _excess_at(excess: np.ndarray, above: np.ndarray, s: np.ndarray, s_work: np.ndarray) -> np.ndarray:
    """E at s from E at its rounded-down s_work: the same values lie above both, each by s - s_work less."""
    return excess - above * (s - s_work.astype(np.float64))


def _host(partial: torch.Tensor) -> np.ndarray:
    """A block's per-row partial result as float64 on the host, where the few values are added up:
    NumPy adds on a handful of values cost a microsecond, torch's indexed adds several."""
    return partial.cpu().numpy().astype(np.float64)


class _Stats(NamedTuple):
    smax: np.ndarray  # (R,) largest magnitude
    total: np.ndarray  # (R,) sum of magnitudes
    nnz: np.ndarray  # (R,) count of non-zero magnitudes


def _magnitude_stats(
    x: torch.Tensor, signed: bool, work: torch.Tensor, s: np.ndarray | None = None
) -> tuple[_Stats, tuple[np.ndarray, np.ndarray] | None]:
    """One blocked pass over rows ``x`` (R, n): max, sum and non-zero count of the magnitudes.

    With ``s`` (R,), the same pass also returns ``_excess_and_count`` at s, which saves re-reading
    the tensor when a starting point is known before the statistics.
    """
    smax, total, nnz = np.zeros(x.shape[0]), np.zeros(x.shape[0]), np.zeros(x.shape[0])
    excess, above = np.zeros(x.shape[0]), np.zeros(x.shape[0])
    s_work = None if s is None else _in_work_precision(s, work)
    for r, block in _row_blocks(x, work):
        mags = _magnitudes_of(block, signed, work)
        if mags.shape[0] == 1:  # one kernel for both extremes (aminmax along a dim is slow)
            low, high = torch.aminmax(mags)
            smax[r] = np.maximum(smax[r], float(high))
        else:
            low = mags.amin()
            smax[r] = np.maximum(smax[r], _host(mags.amax(dim=1)))
        total[r] += _host(mags.sum(dim=1))
        # Dense data has no zeros: a min above 0 saves counting them (a sign pass and a sum).
        if bool(low > 0):
            nnz[r] += mags.shape[1]
        else:
            nnz[r] += _host(torch.sign(mags, out=work[1, : mags.shape[0], : mags.shape[1]]).sum(dim=1))
        if s_work is not None:  # the magnitudes are not needed any more: overwrite them
            thresholds = torch.from_numpy(s_work[r, None]).to(mags.device)
            beyond = mags.sub_(thresholds).clamp_(min=0)
            excess[r] += _host(beyond.sum(dim=1))
            above[r] += _count_positive(beyond, s_work[r])
    if s is None or s_work is None:
        return _Stats(smax, total, nnz), None
    return _Stats(smax, total, nnz), (_excess_at(excess, above, s, s_work), above)


def _excess_and_count(
    x: torch.Tensor, signed: bool, s: np.ndarray, work: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: E = sum(max(m - s, 0)) and N1 = #(m > s) for magnitudes m of rows ``x`` (R, n).

    (R, n), (R,) -> (R,), (R,), or for the subset ``rows`` only. S1 = E + s N1 then follows without
    cancellation. Clamp and sum are vectorized kernels (masked selection and ``where`` cost several
    times more on CPU); block sums are accumulated in float64.
    """
    excess, count = np.zeros(s.size), np.zeros(s.size)
    s_work = _in_work_precision(s, work)
    for r, block in _row_blocks(x, work, rows):
        beyond = _excess_of(block, signed, s_work[r], work)
        excess[r] += _host(beyond.sum(dim=1))
        count[r] += _count_positive(beyond, s_work[r])
    return _excess_at(excess, count, s, s_work), count


def _smallest_above(
    x: torch.Tensor, signed: bool, lo: np.ndarray, work: torch.Tensor, rows: torch.Tensor
) -> np.ndarray:
    """For the subset ``rows``: the smallest magnitude strictly above ``lo`` (inf if none)."""
    best = np.full(lo.size, math.inf)
    lo_work = torch.from_numpy(_in_work_precision(lo, work)).to(x.device)
    for r, block in _row_blocks(x, work, rows):
        mags = _magnitudes_of(block, signed, work)
        mags = torch.where(mags > lo_work[r, None], mags, math.inf)
        best[r] = np.minimum(best[r], _host(mags.amin(dim=1)))
    return best


def _octav_rows(
    x: torch.Tensor,
    signed: bool,
    c: float,
    s0: np.ndarray,
    stats: _Stats,
    *,
    tol: float,
    max_iter: int,
    iterations: int | None,
    work: torch.Tensor,
    first: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve eq. (6) for every row of ``x`` (R, n) from initial guesses ``s0`` (R,): (amax, iterations).

    With E(s) = sum(max(m - s, 0)) and N1, N0 the counts above s and in (0, s], the iterate of eq. (6)
    is s <- (E + s N1) / (c N0 + N1): the Newton step towards the root of h(s) = c s N0 - E, which
    increases strictly in s. So each evaluation also brackets the root, and an iterate that leaves
    the bracket (point masses, Appendix B) is replaced by bisection. ``iterations`` runs the literal
    recursion that many times, unguarded, as the paper does. ``first``: ``_excess_and_count`` at
    ``s0``, when the caller already has it.
    """
    rows, n = x.shape
    # Per-row bookkeeping is a handful of length-R vectors: NumPy on the host does it in
    # microseconds, where each tiny torch op would cost more than a pass over a small tensor.
    nnz, hi = stats.nnz, stats.smax.copy()
    lo = np.zeros(rows)
    above_lo, above_hi = nnz.copy(), np.zeros(rows)  # N1 at the bracket's ends
    map_lo, map_hi = stats.total / np.maximum(nnz, 1), np.zeros(rows)  # eq. (6) there
    done = nnz == 0
    s = np.where(done, hi, s0)
    counts = np.zeros(rows, dtype=np.int64)
    prev_s, prev_above, prev_below = np.full(rows, np.nan), np.full(rows, np.nan), np.zeros(rows, dtype=bool)
    prev_density = np.full(rows, np.nan)  # values per unit of s between the two evaluations before
    prev_gap = np.full(rows, np.nan)  # and the distance between them
    from_map = np.zeros(rows, dtype=bool)  # s is the map's value at the previous evaluation
    pending = np.zeros(rows, dtype=bool)  # rows whose bracket holds one data point
    # The contraction estimate needs a map that is smooth at the scale of tol: many values per row.
    smooth = n >= _SMOOTH_ROW
    with np.errstate(divide="ignore", invalid="ignore"):
        for iteration in range(iterations if iterations is not None else max_iter):
            active = np.flatnonzero(~done)
            if first is not None and iteration == 0:
                excess, above = first
            else:
                # Finished channels drop out: later iterations read only the few rows still moving.
                subset = None if active.size == rows else torch.from_numpy(active).to(x.device)
                sub_excess, sub_above = _excess_and_count(x, signed, s[active], work, subset)
                excess, above = np.zeros(rows), np.zeros(rows)
                excess[active], above[active] = sub_excess, sub_above
            inside_count = nnz - above
            newton = (excess + s * above) / np.where(done, 1.0, c * inside_count + above)
            counts[active] += 1
            if iterations is not None:
                s = np.where(done, s, newton)
                continue
            step = np.abs(newton - s)
            below = ~done & (c * s * inside_count < excess)  # h(s) < 0: the root is above s
            # Exact: s is the map's value at the previous point and no value lies between the two
            # (the same count above both), so the map takes that same value at s: s is its fixed
            # point. A small step alone proves nothing: a point mass between s and the map's value
            # makes the step tiny (its values weigh in the denominator) far from the root.
            converged = from_map & (above == prev_above)
            tighter_lo = below & (s > lo)  # an init outside [0, max] must not widen the bracket
            tighter_hi = ~done & ~below & (s < hi)
            lo, above_lo, map_lo = (
                np.where(tighter_lo, s, lo),
                np.where(tighter_lo, above, above_lo),
                np.where(tighter_lo, newton, map_lo),
            )
            hi, above_hi, map_hi = (
                np.where(tighter_hi, s, hi),
                np.where(tighter_hi, above, above_hi),
                np.where(tighter_hi, newton, map_hi),
            )
            use_tail = False
            if smooth:
                # Near the root the map g has slope -c s f / D (f: values per unit of s), and its error
                # grows with f d^2 / (2 D) at a distance d ~ step. Long rows stop once that estimate
                # of g(s)'s error is within tol. f is measured between the last two evaluations,
                # doubled for safety and taken as at least _MIN_CROSSINGS values there (fewer are too
                # few to measure it). The estimate is trusted only when those two evaluations
                # straddle the root, so that every value between s and the root was counted, and
                # when that count could not hide a point mass or a tight cluster next to s: either
                # all of them together move the map by less than tol, or there are no more of them
                # than the density of the pair before, at least four times wider, predicts. It also
                # needs the map smooth at the scale of tol: one value between s and the root moves
                # it by up to (c s + step) / D.
                crossed = np.abs(above - prev_above)
                gap = np.abs(s - prev_s)
                density = 2 * np.maximum(crossed, _MIN_CROSSINGS) / gap
                slope = c * inside_count + above
                rho = c * s * density / slope
                error = rho * step / (1 - rho) + density * step**2 / (2 * slope)
                one_point = (c * s + step) / slope
                all_together = crossed * (c * s + gap + step) / slope
                # (A mass inside both pairs inflates the older density too: it stands out only once
                # the pair has shrunk well below the one before.)
                as_predicted = (crossed <= 2 * prev_density * gap + 8) & (gap <= 0.25 * prev_gap)
                estimated = (
                    np.isfinite(error)
                    & (below != prev_below)
                    & ((all_together <= tol * newton) | as_predicted)
                    & (rho < 0.5)
                    & (one_point <= tol * newton)
                    & (error <= tol * newton)
                )
                prev_density = np.where(done, prev_density, crossed / gap)
                prev_gap = np.where(done, prev_gap, gap)
                converged |= estimated & (newton >= lo) & (newton <= hi)
                # Far from the root, h is concave (E(s) falls off like a tail), so the map creeps up
                # from below and overshoots from above. Newton on log E(s) - log(c s N0), whose root
                # is the same, follows tails closely; it is used while it stays inside the bracket.
                # The map's own value still decides convergence: the answer is the same fixed point.
                log_step = (np.log(excess) - np.log(c * s * inside_count)) / (above / excess + 1 / s)
                tail = s + log_step
                # Near the root the map itself is better: its steps alternate sides, so the next
                # evaluation straddles the root, and its own value can prove the fixed point.
                far = step > _TAIL_STEP * newton
                use_tail = far & np.isfinite(tail) & (tail > lo) & (tail < hi) & ~converged
            inside = (newton > lo) & (newton < hi)
            nxt = np.where(inside | converged, newton, 0.5 * (lo + hi))
            if smooth:
                nxt = np.where(use_tail, tail, nxt)
            # One data point v left in (lo, hi]: the map is constant on [lo, v) and on [v, hi], so the
            # root is its value on one side if that lands there, else h jumps over zero at v itself
            # (Appendix B's point of positive mass, where the recursion would cycle). Finish exactly.
            single = ~done & ~converged & (above_lo - above_hi == 1)
            pending |= single  # resolved together after the loop: one pass for all such rows
            # A bracket narrower than tol holds the root (on a point mass, it is hi itself): take hi.
            collapsed = ~converged & ~single & (hi - lo <= tol * hi)
            nxt = np.where(collapsed, hi, nxt)
            prev_s, prev_above, prev_below = s, above, below
            from_map = nxt == newton
            s = np.where(done, s, nxt)
            done = done | converged | collapsed | single
            if done.all():
                break
    if pending.any():
        which = np.flatnonzero(pending)
        idx = torch.from_numpy(which).to(x.device)
        v = _smallest_above(x, signed, lo[which], work, idx)
        s[which] = np.where(map_lo[which] < v, map_lo[which], np.where(map_hi[which] >= v, map_hi[which], v))
    return s, counts


def _sorted_fixed_point(mags: np.ndarray, c: float) -> float:
    """The exact fixed point of eq. (6) on a small 1-D sample, by sorting instead of iterating.

    With the m non-zero values sorted descending and k of them above s, the map is constant,
    S_k / (c (m - k) + k), on [v_{k+1}, v_k): the fixed point is the value that lands in its own
    interval, or the data point where h jumps over zero. Only the values above twice the mean, then
    above half of it, are sorted first (the root lies in the tail; a mask and a short sort cost less
    than a partition); the whole sample when the root is not there.
    """
    nonzero = mags[mags > 0]
    m = nonzero.size
    mean = nonzero.mean() if m else 0.0
    for floor in (2 * mean, mean / 2, 0.0):
        v = np.sort(nonzero[nonzero >= floor])[::-1]  # the top values, descending
        top = v.size
        if top == 0:
            continue
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


def _octav_warm_start(x: torch.Tensor, signed: bool, c: float, mean: np.ndarray | None = None) -> np.ndarray:
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
    sample = x[:, ::step]
    mags = (sample.abs() if signed else sample.clamp(min=0)).double().cpu().numpy()
    if mean is None:
        return np.full(rows, _sorted_fixed_point(mags.reshape(-1), c))
    return _sorted_fixed_point((mags / mean[:, None]).reshape(-1), c) * mean


def _octav_start(
    rows: torch.Tensor, signed: bool, c: float, auto: bool
) -> tuple[_Stats, tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
    """The statistics pass and the starting points: (stats, E and N1 at s0 when the pass took them, s0).

    s0 is the paper's s_1, or with ``auto`` the fixed point of a subsample. For one long row the
    subsample needs no statistics, so the first evaluation joins their pass. With NaN or Inf in
    ``rows`` the results are meaningless, and stats.smax says so.
    """
    work = _work_buffer(rows, 2)
    if auto and rows.shape[0] == 1 and rows.numel() >= _WARM_START_MIN:
        s0 = _octav_warm_start(rows, signed, c)
        stats, first = _magnitude_stats(rows, signed, work, s0)
        return stats, first, s0
    stats, _ = _magnitude_stats(rows, signed, work)
    s0 = stats.total / np.maximum(stats.nnz, 1)
    if auto and rows.numel() >= _WARM_START_MIN and np.isfinite(s0).all():
        s0 = np.where(stats.nnz > 0, _octav_warm_start(rows, signed, c, np.maximum(s0, 1e-30)), s0)
    return stats, None, s0


def solves_by_sorting(x: torch.Tensor, axis: int | None) -> bool:
    """Whether ``octav(x, axis=axis)`` with ``init="auto"`` solves by one sort rather than iterating."""
    row = x.numel() if axis is None or x.numel() == 0 else x.numel() // x.shape[axis]
    return x.numel() <= _SORT_BELOW and row <= _SORT_ROW_BELOW


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
    Returns amax ([] or [C]); with ``return_iterations`` an ``OctavResult(amax, iterations)``.
    """
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
        stats, _ = _magnitude_stats(rows, signed, _work_buffer(rows, 2))
        check_finite(torch.from_numpy(stats.smax), x, "Tensor passed to octav")
        amax = _finish(_octav_by_sorting(rows, signed, c), stats.smax, axis, x)
        if not return_iterations:
            return amax
        return OctavResult(amax, torch.zeros(amax.shape, dtype=torch.int64, device=amax.device))
    stats, first, s0 = _octav_start(rows, signed, c, auto)
    check_finite(torch.from_numpy(stats.smax), x, "Tensor passed to octav")
    if not np.isfinite(stats.total).all() and rows.dtype != torch.float64:
        # Finite values this large overflow float32 sums (the max alone cannot): redo in float64.
        rows = rows.double()
        stats, first, s0 = _octav_start(rows, signed, c, auto)
    if not (auto or isinstance(init, str)):
        given = init.double().cpu().numpy() if isinstance(init, torch.Tensor) else np.asarray(init, float)
        if not (np.isfinite(given).all() and (given >= 0).all()):
            raise SpecError(f"init must be a finite number >= 0 or a [C] tensor of them: got {init!r}.")
        # Above the max every value is below s alike: start there (and stay inside the dtype).
        s0 = np.minimum(np.broadcast_to(given, (rows.shape[0],)), stats.smax)
    work = _work_buffer(rows, 2)
    amax_rows, counts = _octav_rows(
        rows,
        signed,
        c,
        s0,
        stats,
        tol=tol,
        max_iter=max_iter,
        iterations=iterations,
        work=work,
        first=first,
    )
    amax = _finish(amax_rows, stats.smax, axis, x)
    iterations_run = torch.from_numpy(counts).to(amax.device)
    if not return_iterations:
        return amax
    return OctavResult(amax, iterations_run.reshape(()) if axis is None else iterations_run)


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
    x = x.detach()  # a statistic of the data, not a function to differentiate
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
    x = x.detach()  # a statistic of the data, not a function to differentiate
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
    x = x.detach()  # a statistic of the data, not a function to differentiate
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
    x = x.detach()  # a statistic of the data, not a function to differentiate
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
