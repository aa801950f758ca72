"""The union of all batches: OCTAV, the sweep, percentiles and max over every value of an activation
together, exactly, in streaming memory (README, "Union vs mean").

Pass 1 (``Summary``) counts |x| and sums it in fine bins; ``brackets`` picks the bins that hold each
answer; pass 2 (``Bracket``) keeps those bins' distinct values with counts and adds the sweep's errors;
the finishers solve exactly. Every state is an exact sum, so batch order never changes a bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import CalibrationError
from .sweep import sweep_candidates, sweep_sse

# A bin is a run of float32 bit patterns: the top bits of |x| (exponent and 7 mantissa bits), so 128
# bins per binade (each < 0.8% wide) and 2^16 distinct floats per bin. Inside one binade every float32
# is a multiple of its ulp, so a bin's float64 sum is exact up to 2^29 values: sums in any order agree.
MANTISSA_BITS = 7
_SHIFT = 23 - MANTISSA_BITS
BINS = 1 << (31 - _SHIFT)  # every non-negative float32 pattern: (32768,)
VALUES_PER_BIN = 1 << _SHIFT  # the most distinct values a kept bin can hold
# OCTAV's bin is found from float64 sums: its neighbours are kept too, so rounding cannot miss it.
_OCTAV_MARGIN = 1


def bin_of(a: torch.Tensor) -> torch.Tensor:
    """The bin of each float32 magnitude (n,) -> (n,) int64; bins ascend with the value."""
    return (a.view(torch.int32) >> _SHIFT).long()


def bin_floor(keys: np.ndarray | list[int]) -> np.ndarray:
    """The smallest float32 of each bin, float64 (the bin above the largest finite one floors at inf)."""
    floors = (np.asarray(keys, np.int64) << _SHIFT).astype(np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):  # the NaN patterns above inf
        return np.where(np.isfinite(floors), floors, np.float32(np.inf)).astype(np.float64)


@dataclass
class Summary:
    """Pass 1 for one target: per bin the count and exact sum of |x|; the count, zeros, max and sign."""

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(BINS, dtype=torch.int64))
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(BINS, dtype=torch.float64))
    n: int = 0
    zeros: int = 0
    smax: float = 0.0
    nonnegative: bool = True

    def add(self, x: torch.Tensor) -> None:
        """Count one batch's finite float32 values (any shape)."""
        a = x.reshape(-1).abs()
        keys = bin_of(a)
        self.counts += torch.bincount(keys, minlength=BINS).cpu()
        self.sums += torch.bincount(keys, weights=a.double(), minlength=BINS).cpu()
        self.n += a.numel()
        self.zeros += int((a == 0).sum())
        self.smax = max(self.smax, float(a.max()))
        self.nonnegative &= bool(x.min() >= 0)

    def merged(self, other: Summary) -> Summary:
        return Summary(
            self.counts + other.counts,
            self.sums + other.sums,  # exact per bin: the order of the parts does not matter
            self.n + other.n,
            self.zeros + other.zeros,
            max(self.smax, other.smax),
            self.nonnegative and other.nonnegative,
        )


def rank_bins(counts: np.ndarray, ranks: list[int]) -> list[int]:
    """The bin holding each 0-based ascending rank."""
    ends = np.cumsum(counts)  # values in bins <= k
    return [int(np.searchsorted(ends, r, side="right")) for r in ranks]


def percentile_ranks(n: int, q: float) -> tuple[int, int, float]:
    """NumPy's linear interpolation: the two ranks read and the weight of the upper one."""
    pos = q / 100.0 * (n - 1)
    low = min(math.floor(pos), n - 1)
    return low, min(low + 1, n - 1), pos - low


def octav_bin(s: Summary, c: float) -> int:
    """The bin holding eq. (6)'s root: the last bin whose floor f has h(f-) = c f N0(<f) - E(f) <= 0.

    h(s) = c s N0(s) - E(s) rises with s, and the root is the least s with h(s) >= 0, so it lies at
    or above such an f and below the next bin's floor. Float64 sums: ``_OCTAV_MARGIN`` bins around it.
    """
    counts, sums = s.counts.numpy(), s.sums.numpy()
    floor = bin_floor(np.arange(BINS))
    nonzero_below = np.concatenate([[0], np.cumsum(counts)[:-1]]) - s.zeros  # values in (0, f)
    at_or_above = counts[::-1].cumsum()[::-1]  # (BINS,)
    sum_above = sums[::-1].cumsum()[::-1]
    with np.errstate(invalid="ignore"):  # the top bin floors at inf and holds no finite value
        h = c * floor * np.maximum(nonzero_below, 0) - (sum_above - floor * at_or_above)
    used = np.flatnonzero(counts)
    top = int(used[-1]) if used.size else 0
    below = np.flatnonzero(h[: top + 1] <= 0)
    return int(below[-1]) if below.size else 0


@dataclass
class Bracket:
    """Pass 2 for one target: the distinct values (ascending) in the ``keep`` bins with their counts,
    and each sweep candidate's squared error summed exactly over every batch."""

    keep: torch.Tensor  # bins kept, int64 (k,)
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float32))
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    sweep_smax: float | None = None  # the sweep's s_max (the union's max), when the sweep is run
    sweep_qmax: int = 0
    sweep_sse: list[int] = field(default_factory=list)  # SSE * 2^1074 per candidate, exact integers

    def add(self, x: torch.Tensor) -> None:
        a = x.reshape(-1).abs()
        inside = a[torch.isin(bin_of(a), self.keep.to(a.device))]
        if inside.numel():
            values, counts = torch.unique(inside, return_counts=True)
            self._merge(values.cpu(), counts.cpu())
        if self.sweep_smax is not None:
            cand = sweep_candidates(
                torch.tensor([self.sweep_smax], dtype=torch.float64, device=a.device), 100
            )
            sse = sweep_sse(a[None], cand, self.sweep_qmax)[:, 0].cpu().tolist()  # (100,)
            exact = [_fixed(e) for e in sse]
            self.sweep_sse = _added(self.sweep_sse, exact)

    def _merge(self, values: torch.Tensor, counts: torch.Tensor) -> None:
        joined, where = torch.unique(torch.cat([self.values, values]), return_inverse=True)
        total = torch.zeros(joined.numel(), dtype=torch.int64)
        self.values, self.counts = joined, total.scatter_add_(0, where, torch.cat([self.counts, counts]))

    def merged(self, other: Bracket) -> Bracket:
        out = Bracket(self.keep, self.values, self.counts, self.sweep_smax, self.sweep_qmax, self.sweep_sse)
        out._merge(other.values, other.counts)
        if other.sweep_sse:
            out.sweep_sse = _added(self.sweep_sse, other.sweep_sse)
        return out

    def entries(self) -> int:
        return self.values.numel()


def _added(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b, strict=True)] if a and b else a or b


def _fixed(value: float) -> int:
    """A non-negative float64 as the exact integer value * 2^1074 (sums of these are exact)."""
    num, den = value.as_integer_ratio()
    return num << (1074 - den.bit_length() + 1)


def value_at_rank(s: Summary, b: Bracket, rank: int) -> float:
    """The value at 0-based ascending ``rank`` among every value, from its kept bin."""
    (k,) = rank_bins(s.counts.numpy(), [rank])
    before = int(s.counts[:k].sum())
    keys = bin_of(b.values)
    mine = keys == k
    ends = b.counts[mine].cumsum(0)
    if not mine.any() or int(ends[-1]) != int(s.counts[k]):
        raise CalibrationError(f"Internal error: bin {k} was not kept whole in the second pass.")
    j = int(torch.searchsorted(ends, torch.tensor([rank - before]), right=True))
    return float(b.values[mine][j])


def union_percentile(s: Summary, b: Bracket, q: float) -> float:
    low, high, frac = percentile_ranks(s.n, q)
    v_low, v_high = value_at_rank(s, b, low), value_at_rank(s, b, high)
    return v_low + frac * (v_high - v_low)


def union_octav(s: Summary, b: Bracket, c: float, k: int) -> float:
    """Eq. (6)'s exact fixed point of every value, its bin ``k`` (``octav_bin``) and neighbours kept.

    With the distinct values u_1 > u_2 > ... of the kept bins, K_j of all values above u_j (those of
    higher bins included) and S_j their sum, h(s) = s (c (m - K_j) + K_j) - S_j on [u_j, u_{j-1}):
    its root lands there (``_fixed_point_of_tails``' rule), or else h jumps over zero at the least
    u_j with h(u_j) >= 0 (Appendix B's point mass). m: the non-zero count.
    """
    m = s.n - s.zeros
    if m == 0:
        return 0.0
    lo_bin, hi_bin = max(k - _OCTAV_MARGIN, 0), min(k + _OCTAV_MARGIN, BINS - 1)
    counts, sums = s.counts.numpy(), s.sums.numpy()
    above = int(counts[hi_bin + 1 :].sum())
    sum_above = math.fsum(sums[hi_bin + 1 :].tolist())
    keys = bin_of(b.values).numpy()
    sel = (keys >= lo_bin) & (keys <= hi_bin) & (b.values.numpy() > 0)
    u = b.values.numpy()[sel].astype(np.float64)[::-1]  # descending
    w = b.counts.numpy()[sel][::-1]
    kept = int(w.sum())
    if kept != int(counts[lo_bin : hi_bin + 1].sum()) - (s.zeros if lo_bin == 0 else 0):
        raise CalibrationError(f"Internal error: OCTAV's bins {lo_bin}-{hi_bin} were not kept whole.")
    # interval j (0..len(u)): [u_j, u_{j-1}) with u_len = the region's floor and u_{-1} = its ceiling
    k_above = above + np.concatenate([[0], np.cumsum(w)])  # (J+1,)
    s_above = sum_above + np.concatenate([[0.0], np.cumsum(w * u)])
    floor = np.concatenate([u, bin_floor([lo_bin])])
    ceiling = np.concatenate([[np.inf if above == 0 else bin_floor([hi_bin + 1])[0]], u])
    denom = c * (m - k_above) + k_above
    root = s_above / denom
    inside = np.flatnonzero((root >= floor) & (root < ceiling))
    if inside.size:
        return float(root[inside[0]])
    h_at = c * u * (m - k_above[:-1]) - (s_above[:-1] - u * k_above[:-1])
    jumps = np.flatnonzero(h_at >= 0)
    if jumps.size:
        return float(u[jumps[-1]])
    raise CalibrationError("Internal error: OCTAV's root was not in the bins kept for it.")


def union_sweep(b: Bracket) -> float:
    """The candidate k/100 s_max with the least exact total SSE (ties: the smallest)."""
    if b.sweep_smax is None or not b.sweep_sse:
        return 0.0
    best = min(range(len(b.sweep_sse)), key=lambda i: (b.sweep_sse[i], i))
    cand = sweep_candidates(torch.tensor([b.sweep_smax], dtype=torch.float64), 100)
    return float(cand[best, 0])
