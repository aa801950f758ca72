"""OCTAV's passes over the data: blocked, vectorized kernels for E(s), N1(s) and the magnitude statistics,
and (CPU) the one pass that gathers each row's tail above a floor.

No iteration logic here (``_octav_iterate.py``) and no public API (``octav.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

# OCTAV's passes work on blocks of this many elements, in scratch buffers kept between calls.
_BLOCK = 1 << 21
# NumPy passes (tail_above) work on blocks of this many elements: they stay in a core's cache.
_HOST_BLOCK = 1 << 20
# Per-thread scratch buffers for OCTAV's passes (see work_buffer).
_scratch = threading.local()


def work_buffer(x: torch.Tensor, count: int = 1) -> torch.Tensor:
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


class Stats(NamedTuple):
    smax: np.ndarray  # (R,) largest magnitude
    total: np.ndarray  # (R,) sum of magnitudes
    nnz: np.ndarray  # (R,) count of non-zero magnitudes


def magnitude_stats(
    x: torch.Tensor, signed: bool, work: torch.Tensor, s: np.ndarray | None = None
) -> tuple[Stats, tuple[np.ndarray, np.ndarray] | None]:
    """One blocked pass over rows ``x`` (R, n): max, sum and non-zero count of the magnitudes.

    With ``s`` (R,), the same pass also returns ``excess_and_count`` at s, which saves re-reading
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
        return Stats(smax, total, nnz), None
    return Stats(smax, total, nnz), (_excess_at(excess, above, s, s_work), above)


def excess_and_count(
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


def smallest_above(
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


# ---------------------------------------------------------------------------------------------
# One-pass tails (CPU): NumPy, on one thread. torch's CPU kernels run a thread team per call; when
# another process holds a core, each of those calls waits for a time slice (measured on 2 cores:
# 4-8 ms per call against 0.1 ms), while these passes take a few such calls' worth in all.


class Tail(NamedTuple):
    values: np.ndarray  # (T,) the magnitudes above each row's floor, row after row, in x's dtype
    counts: np.ndarray  # (R,) int64: how many of them per row
    nnz: np.ndarray  # (R,) non-zero magnitudes per row
    low: np.ndarray  # (R,) smallest magnitude per row: NaN exactly when the row holds a NaN


def host_magnitude_blocks(
    x: torch.Tensor, signed: bool, work: torch.Tensor, ready: bool = False
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (positions, |x| or max(x, 0)) for blocks of CPU rows ``x`` (R, n), computed by NumPy
    into ``work`` (NaN stays NaN): all of ``x`` at once when it fits there, else blocks of
    ``_HOST_BLOCK`` values (long rows in column blocks, so a position can repeat: callers
    accumulate). ``ready``: ``x`` fits, and the previous call left its magnitudes in ``work``.
    """
    rows, n = x.shape
    flat = work.reshape(-1).numpy()
    if x.numel() > flat.size:  # blocks that stay in the caches between the passes over them
        flat = flat[:_HOST_BLOCK]
    elif ready:
        yield slice(0, rows), flat[: x.numel()].reshape(rows, n)
        return
    step = max(1, flat.size // n)
    for r in range(0, rows, step):
        for c in range(0, n, flat.size):
            block = x[r : r + step, c : c + flat.size].numpy()
            mags = flat[: block.size].reshape(block.shape)
            if signed:
                np.abs(block, out=mags)
            else:
                np.maximum(block, 0, out=mags)
            yield slice(r, r + block.shape[0]), mags


def _flags(shape: tuple[int, ...]) -> np.ndarray:
    """A boolean scratch array of ``shape``, kept per thread like ``work_buffer``'s."""
    size = math.prod(shape)
    flags = _scratch.__dict__.get("flags")
    if flags is None or flags.size < size:
        flags = _scratch.flags = np.empty(size, dtype=bool)
    return flags[:size].reshape(shape)


def row_sums(x: torch.Tensor, signed: bool, work: torch.Tensor) -> np.ndarray:
    """The sum of each CPU row's magnitudes, (R, n) -> (R,), by NumPy."""
    total = np.zeros(x.shape[0])
    with np.errstate(over="ignore"):  # a float32 sum may overflow: the caller sees inf
        for r, mags in host_magnitude_blocks(x, signed, work):
            total[r] += mags.sum(axis=1)
    return total


def tail_above(
    x: torch.Tensor, signed: bool, floor: np.ndarray, work: torch.Tensor, ready: bool = False
) -> Tail:
    """One NumPy pass over CPU rows ``x`` (R, n): every magnitude above ``floor`` (R,), in x's dtype.

    A tail of a few percent is cheap to gather (about 20 ns per value kept, against 0.1-0.4 ns per
    value scanned): with it, E and N1 are known exactly at every s above the floor. ``ready``: as
    for ``host_magnitude_blocks``.
    """
    rows = x.shape[0]
    counts, nnz, low = np.zeros(rows, np.int64), np.zeros(rows), np.full(rows, np.inf)
    values = []
    for r, mags in host_magnitude_blocks(x, signed, work, ready):
        block_low = mags.min(axis=1)
        low[r] = np.minimum(low[r], block_low)
        nnz[r] += mags.shape[1]
        if not block_low.min() > 0:  # dense data has no zeros to count
            nnz[r] -= mags.shape[1] - np.count_nonzero(mags > 0, axis=1)
        # Positions, then values: cheaper than a boolean index, and the positions give the rows.
        where = np.flatnonzero(np.greater(mags, floor[r, None], out=_flags(mags.shape)))
        values.append(mags.reshape(-1).take(where))
        ends = np.searchsorted(where, np.arange(1, mags.shape[0] + 1) * mags.shape[1])
        counts[r] += np.diff(ends, prepend=0)
    return Tail(np.concatenate(values), counts, nnz, low)
