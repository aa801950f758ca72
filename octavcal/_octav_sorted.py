"""OCTAV's exact answers from sorted values: the fixed point of whole rows, warm starts from a strided
subsample, and on the CPU the one-pass tail (gather the values above a floor under the root, solve
only those, sorted). The public solver is ``octav.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ._octav_kernels import Tail, row_sums, tail_above, work_buffer

# OCTAV on more elements than this first solves a strided subsample, for a warm start.
WARM_START_MIN = 1 << 12
_WARM_START_SAMPLE = 1 << 15
# Tensors up to this size, in rows up to the second size, are solved by one sort (exact; iterations
# reported as 0). Measured here: sorting (128, 128) takes 0.6 ms against 1.1 ms iterating, but one row
# of 16K values 1.0 ms against 0.6 ms.
_SORT_BELOW = 1 << 14
_SORT_ROW_BELOW = 1 << 12
# The one-pass tail (``_tail_floor``): its margins, the largest tail worth gathering (more costs
# more than iterating: gathering costs about 20 ns per value kept), and how many values of channels
# left below their floor are sorted rather than iterated.
_TAIL_SIGMAS = 4.0
_TAIL_SLACK = 8
_CHANNEL_SIGMAS = 2.0
_TAIL_MAX_FRACTION = 1 / 16
_SORT_LEFT_BELOW = 1 << 18


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


def host_magnitudes(x: torch.Tensor, signed: bool) -> np.ndarray:
    """|x| (signed) or max(x, 0) of rows (R, n), as float64 on the host."""
    return (x.abs() if signed else x.clamp(min=0)).double().cpu().numpy()


def solves_by_sorting(x: torch.Tensor, axis: int | None) -> bool:
    """Whether ``octav(x, axis=axis)`` with ``init="auto"`` solves by one sort rather than iterating."""
    row = x.numel() if axis is None or x.numel() == 0 else x.numel() // x.shape[axis]
    return sorts(x.numel(), row)


def sorts(numel: int, row: int) -> bool:
    """``solves_by_sorting`` for a tensor of ``numel`` values in rows of ``row``."""
    return numel <= _SORT_BELOW and row <= _SORT_ROW_BELOW


# ---------------------------------------------------------------------------------------------
# Starting points


def sample_step(rows: int, n: int) -> int:
    """The stride of ``_warm_sample`` in rows (rows, n): n/128 values (4K-32K) of one long row, 8K
    of channels."""
    # Larger tensors cost more per pass, so a larger (more accurate) sample pays for itself there.
    total = (
        _WARM_START_SAMPLE // 4
        if rows > 1
        else min(_WARM_START_SAMPLE, max(_WARM_START_SAMPLE // 8, n // 128))
    )
    step = max(1, n // max(1, total // rows)) | 1
    while step % 3 == 0:  # a stride coprime with 2 and 3 visits every feature of (tokens, features)
        step += 2
    return step


def _warm_sample(x: torch.Tensor, signed: bool, mean: np.ndarray | None) -> np.ndarray:
    """A strided subsample's magnitudes (``_sample_step``), pooled into one row (1, N), each
    channel divided by its ``mean`` magnitude.

    Channels of one tensor tend to share a shape, not a scale; one row needs no ``mean``: the fixed
    point scales with the data.
    """
    mags = host_magnitudes(x[:, :: sample_step(*x.shape)], signed)
    return (mags if mean is None else mags / mean[:, None]).reshape(1, -1)


class Sample(NamedTuple):
    """A strided subsample's largest magnitudes, for ``floor_from_sample``."""

    head: np.ndarray  # its largest values, descending, float64: at least size / 16 of them, or all
    nnz: int  # its non-zero values
    size: int  # its values
    mags: np.ndarray  # all of them, unsorted, for the rare case that needs more than ``head``


def _warm_sample_head(x: torch.Tensor, signed: bool, mean: np.ndarray | None) -> Sample:
    """``_warm_sample`` as a ``Sample``; one CPU row is ordered in its own dtype."""
    if mean is None:
        return sample_head(x.numpy()[0, :: sample_step(*x.shape)], signed)
    return sample_head(_warm_sample(x, signed, mean)[0], True)


def sample_head(strided: np.ndarray, signed: bool) -> Sample:
    """One row's strided subsample as magnitudes (|x|, or max(x, 0) unsigned): the largest
    sixteenth of them in order (a partition, then a sort of those), and its counts."""
    mags = np.abs(strided) if signed else np.maximum(strided, 0)
    size = mags.size
    keep = min(size, int(size * _TAIL_MAX_FRACTION) + 2)
    largest = mags if keep == size else np.partition(mags, size - keep)[size - keep :]
    head = np.sort(largest)[::-1].astype(np.float64)
    return Sample(head, int(np.count_nonzero(mags)), size, mags)


def warm_start(x: torch.Tensor, signed: bool, c: float, mean: np.ndarray | None = None) -> np.ndarray:
    """Initial guesses from the exact fixed point on a strided subsample (``_warm_sample``), scaled
    back by each channel's ``mean`` magnitude (the paper's s_1). Lands within a few percent."""
    root = sorted_fixed_point(_warm_sample(x, signed, mean), c)[0]
    return np.full(x.shape[0], root) if mean is None else root * mean


# ---------------------------------------------------------------------------------------------
# The one-pass tail (CPU): gather every value above a floor under the root, then sort only those


def _tail_floor(x: torch.Tensor, signed: bool, c: float, mean: np.ndarray | None) -> np.ndarray | None:
    """Per row, a floor under eq. (6)'s root with a few percent of the values above it, or None when
    that tail would be too large to gather (few bits, point masses, non-finite values)."""
    floor = floor_from_sample(_warm_sample_head(x, signed, mean), c, x.shape[1], mean)
    # In x's dtype: NumPy then compares the data with it as it is, without converting the data.
    return None if floor is None else np.broadcast_to(floor, (x.shape[0],)).astype(x.numpy().dtype)


def floor_from_sample(sample: Sample, c: float, n: int, mean: np.ndarray | None) -> np.ndarray | float | None:
    """``_tail_floor`` from the strided subsample of rows of ``n`` values.

    The subsample's own fixed point has k values of it above; over seeds and distributions (Gaussian,
    Laplace, Student-t, softmax, ReLU; 2-8 bits) the full tensor's root lay within 3.3 sqrt(k + 1)
    sample values of it. The floor leaves ``_TAIL_SIGMAS`` of those, plus ``_TAIL_SLACK`` values.
    Channels (``mean``: pooled, as ``_warm_sample``) vary around the pooled count by their own
    sampling noise: their floor leaves ``_CHANNEL_SIGMAS`` of that, counted in the channel.
    A larger c (a coarser grid) gives a lower root, so a lower (or equal) floor.
    """
    head, size = sample.head, sample.size
    if size == 0 or not np.isfinite(head[0]):
        return None
    nnz = np.array([sample.nnz])
    if head.size < size and _count_positive_h(head, np.cumsum(head), c, sample.nnz) >= head.size:
        # The root lies below the head (its point mass may still leave few values above): all of it
        head = np.sort(sample.mags)[::-1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = _fixed_point_of_tails(head[None], c, nnz)[0]
    above = int(np.searchsorted(-head, -root))  # sample values strictly above the root
    rank = above + _TAIL_SIGMAS * math.sqrt(above + 1)
    if mean is None:
        rank += _TAIL_SLACK
    else:
        own = above * n / size  # the values above the root expected in one channel
        rank += (_CHANNEL_SIGMAS * math.sqrt(own + 1) + _CHANNEL_SIGMAS) * size / n
    if rank > size * _TAIL_MAX_FRACTION or not head[max(int(rank), 0)] > 0:
        return None
    return head[max(int(rank), 0)] * (1.0 if mean is None else mean)


def _fixed_point_of_tails(v: np.ndarray, c: float, nnz: np.ndarray) -> np.ndarray:
    """Eq. (6)'s exact fixed point from each row's top values ``v`` (R, K), descending and zero
    padded, for rows of ``nnz`` (R,) non-zero values whose root lies above the rest (``solve_by_tail``).

    On the interval with the k largest values above s, h(s) = (c (m - k) + k) s - S_k; at its lower
    end v_k that is H_k = v_k (c (m - k) + k) - S_k, which falls with k (by at least c v_k a step).
    So k* = #{k: H_k > 0} values lie above the root, which is that interval's own root if it lands
    below v_{k*-1} (H_{k*-1} > c v_{k*-1}), else v_{k*-1} itself (Appendix B's point mass). Few
    vectorized operations, against ``_fixed_point_of_rows``' test of every interval.
    """
    rows, width = v.shape
    m = np.asarray(nnz, dtype=np.float64)
    sums = np.cumsum(v, axis=1)  # (R, K): S_{k+1}
    if rows == 1:  # one long row: a binary search on H, then the same arithmetic on Python floats
        return np.array([_fixed_point_of_one_tail(v[0], sums[0], c, float(m[0]))])
    # in place: fresh arrays this size cost page faults that outweigh the arithmetic
    h_low = np.add.outer(c * m, (1 - c) * np.arange(width))  # (R, K): c (m - k) + k
    h_low *= v
    h_low -= sums
    h_low += v  # H_k = v_k (c (m - k) + k) - S_k
    above = np.count_nonzero(h_low > 0, axis=1)  # (R,): k*
    r, prev = np.arange(rows), np.maximum(above - 1, 0)
    has = above > 0
    v_prev = np.where(has, v[r, prev], np.inf)
    s_prev = np.where(has, sums[r, prev], 0.0)  # S_{k*}
    root = s_prev / (c * (m - above) + above)
    # H_{k*-1} > c v_{k*-1}, with H_{k*-1} = v_{k*-1} (c (m - k*) + k*) - S_{k*}
    inside = ~has | (v_prev * (c * (m - above) + above) - s_prev > 0)
    return np.where(m > 0, np.where(inside, root, v_prev), 0.0)


def _fixed_point_of_one_tail(v: np.ndarray, sums: np.ndarray, c: float, m: float) -> float:
    """``_fixed_point_of_tails`` of one row (its cumulative ``sums`` given), as its scalar steps:
    tens of NumPy calls on one-element arrays cost more than the search itself."""
    if not m > 0:
        return 0.0
    above = _count_positive_h(v, sums, c, m)
    if above == 0:  # (the vectorized form's 0 / (c m))
        return 0.0
    v_prev, s_prev = float(v[above - 1]), float(sums[above - 1])
    scale = c * (m - above) + above
    return s_prev / scale if v_prev * scale - s_prev > 0 else v_prev


def _count_positive_h(v: np.ndarray, sums: np.ndarray, c: float, m: float) -> int:
    """#{k: H_k > 0} for one row (``_fixed_point_of_tails``), by bisection: H falls with k."""
    lo, hi = 0, v.size
    while lo < hi:
        k = (lo + hi) // 2
        if float(v[k]) * (c * (m - k) + k) - (float(sums[k]) - float(v[k])) > 0:
            lo = k + 1
        else:
            hi = k
    return lo


def _sorted_tails(tail: Tail) -> np.ndarray:
    """The tail of each row in descending order, zero padded: (R, max count), float64."""
    rows, width = tail.counts.size, int(tail.counts.max(initial=0))
    if rows == 1:
        return np.sort(tail.values)[None, ::-1].astype(np.float64)
    # int32 positions: fresh int64 arrays this size cost page faults that outweigh the arithmetic
    padded = np.zeros(rows * width, dtype=tail.values.dtype)
    counts = tail.counts.astype(np.int32)
    skip = np.repeat(np.arange(rows, dtype=np.int32) * width - (np.cumsum(counts) - counts), counts)
    skip += np.arange(skip.size, dtype=np.int32)  # row * width + rank in the row
    padded[skip] = tail.values
    padded = padded.reshape(rows, width)
    padded.sort(axis=1)
    return padded[:, ::-1].astype(np.float64)


def solve_by_tail(rows: torch.Tensor, signed: bool, c: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact fixed point of CPU rows (R, n) from one pass that gathers their tails, or None
    (then the iteration runs: it also reports NaN and Inf).

    With every value above a floor f in hand, S_k and the intervals of eq. (6)'s map are known
    above f, and h(f) = c f N0(f) - E(f) < 0 proves the root lies there: the sorted fixed point of
    the tail (with the row's full non-zero count) is the root. Channels whose root lies below their
    floor are sorted whole (up to ``_SORT_LEFT_BELOW`` values). Iterations are reported as 1.
    """
    work = work_buffer(rows, 2)
    count, n = rows.shape
    mean = None
    if count > 1:
        mean = row_sums(rows, signed, work) / n
        if not np.isfinite(mean).all():
            return None
        mean = np.maximum(mean, np.finfo(np.float64).tiny)
    floor = _tail_floor(rows, signed, c, mean)
    if floor is None:
        return None
    tail = tail_above(rows, signed, floor, work, ready=count > 1 and rows.numel() <= work.numel())
    if not (np.isfinite(tail.low).all() and np.isfinite(tail.values).all()):
        return None
    amax, known = solve_sorted_tails(_sorted_tails(tail), floor.astype(np.float64), tail.counts, tail.nnz, c)
    left = np.flatnonzero(~known)
    if left.size:
        if count == 1 or left.size * n > _SORT_LEFT_BELOW:
            return None
        whole = rows.numpy()[left]  # (L, n): sorted whole, then the same solver (their tail is all)
        whole = np.abs(whole) if signed else np.maximum(whole, 0)
        whole.sort(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            amax[left] = _fixed_point_of_tails(whole[:, ::-1].astype(np.float64), c, tail.nnz[left])
    return amax, np.ones(count, dtype=np.int64)


def solve_sorted_tails(
    v: np.ndarray, floor: np.ndarray, counts: np.ndarray, nnz: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (6)'s root per row from every magnitude above the row's ``floor``: ``v`` (R, K) float64,
    descending and zero padded (``counts`` (R,) of them real), rows of ``nnz`` non-zero values.
    Returns (amax (R,), known (R,)): known where h(floor) < 0 proves the root lies in the tail
    (elsewhere amax is 0 and the caller finds the root another way)."""
    excess = v.sum(axis=1) - counts * floor  # E(f)
    known = (c * floor * (nnz - counts) < excess) | (nnz == 0)
    amax = np.zeros(counts.size)
    if v.shape[1]:
        with np.errstate(divide="ignore", invalid="ignore"):
            amax = np.where(known, _fixed_point_of_tails(v, c, nnz), 0.0)
    return amax, known


def solve_from_ascending(
    rows: torch.Tensor, ascending: np.ndarray, signed: bool, c: float
) -> np.ndarray | None:
    """``solve_by_tail``'s answer (R,) for one CPU row (1, n) whose magnitudes a caller holds
    sorted ascending: its tail is their end (the same values, so the same answer), or None where
    ``octav`` would not take that route (then the caller runs ``octav``)."""
    n = ascending.size
    if solves_by_sorting(rows, None) or rows.device.type != "cpu":
        return None
    floor = floor_from_sample(_warm_sample_head(rows, signed, None), c, n, None)
    if floor is None:
        return None
    f = np.asarray(floor, dtype=rows.numpy().dtype)  # as _tail_floor compares it with the data
    count = n - int(np.searchsorted(ascending, f, side="right"))
    nnz = n - int(np.searchsorted(ascending, 0, side="right"))
    values = ascending[n - count :][None, ::-1].astype(np.float64)
    amax, known = solve_sorted_tails(
        values, f.astype(np.float64)[None], np.array([count]), np.array([float(nnz)]), c
    )
    return amax if known[0] else None
