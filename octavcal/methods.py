"""Clipping methods by name (one registry and parser), the MSE sweep, percentiles, max and J(s).

Every method takes a tensor and returns ``amax`` of shape [] (``axis=None``) or [C] (one per index
along ``axis``). OCTAV itself lives in ``octav.py``; it is re-exported here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from .errors import SpecError
from .grid import Convention, Grid, check_bits, check_tensor, rows_from
from .octav import OctavResult, octav, solves_by_sorting
from .slices import amax_from_rows, magnitude_rows, resolve_signed

__all__ = [
    "METHOD_NAMES",
    "Method",
    "OctavResult",
    "analytic_mse",
    "compute_amax",
    "max_scaling",
    "mse_sweep",
    "octav",
    "parse_method",
    "parse_methods",
    "percentile",
    "resolve_signed",
    "solves_by_sorting",
    "sweep_candidates",
    "sweep_mse_curve",
]

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


# ---------------------------------------------------------------------------------------------
# Percentiles and max-scaling


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


def percentile(x: torch.Tensor, q: float, *, axis: int | None = None) -> torch.Tensor:
    """The q-th percentile of |x| with linear interpolation (NumPy's default), exact at any size.

    Position p = q/100 * (n-1) in ascending order; only the top n - floor(p) values are selected
    (``top_magnitudes``) when that tail is small, otherwise a selection (``kthvalue``) finds both
    neighbours: never a full sort, and no 2^24-element limit as in ``torch.quantile``.
    Example: |x| = [1, 2, 3, 4, 5], q = 90 -> p = 3.6 -> 4 + 0.6 * (5 - 4) = 4.6.
    """
    check_tensor(x, "Tensor passed to percentile")
    x = x.detach()  # a statistic of the data, not a function to differentiate
    check_percentile(q)
    a = rows_from(x, axis).abs()
    return amax_from_rows(percentile_of_rows(a, q), a.amax(dim=1).double(), axis, x)


def check_percentile(q: float) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 100:
        raise SpecError(f"Percentile q must be in (0, 100]: got {q!r}.")


def tail_length(q: float, n: int) -> int:
    """How many of the largest of n values the q-th percentile reads: n - floor(q/100 (n-1))."""
    return n - min(math.floor(q / 100.0 * (n - 1)), n - 1)


def percentile_of_rows(
    a: torch.Tensor, q: float, tail: torch.Tensor | None = None, ordered: np.ndarray | None = None
) -> torch.Tensor:
    """The q-th percentile of every row of magnitudes ``a`` (R, n), float64 (R,).

    Reads the row sorted ascending (``ordered``, one row) or its largest values sorted descending
    (``tail`` (R, k), k >= ``tail_length``) when the caller has them, else selects them itself.
    """
    n = a.shape[1]
    pos = q / 100.0 * (n - 1)
    low = min(math.floor(pos), n - 1)
    frac = pos - low
    top = n - low  # values at ascending ranks low .. n-1
    if ordered is not None:
        v_low = torch.tensor([float(ordered[low])], dtype=torch.float64)
        v_high = torch.tensor([float(ordered[min(low + 1, n - 1)])], dtype=torch.float64)
    elif tail is not None or top <= max(64, n // 8):
        tail = top_magnitudes(a, top) if tail is None else tail  # descending
        v_low = tail[:, top - 1]
        v_high = tail[:, top - 2] if top >= 2 else v_low
    else:
        v_low = torch.kthvalue(a, low + 1, dim=1).values
        v_high = torch.kthvalue(a, low + 2, dim=1).values if low + 1 < n else v_low
    return v_low.double() + frac * (v_high.double() - v_low.double())


def top_magnitudes(a: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest values of every row of ``a`` (R, n), sorted descending: (R, count).

    A long row first keeps only the values above a threshold read from a strided subsample (with a
    margin); when fewer than ``count`` pass, it falls back to ``topk`` on the whole row. Exact either
    way: every value at least as large as the count-th largest passes the threshold.
    """
    rows, n = a.shape
    if rows == 1 and n >= 1 << 16 and count * 64 <= n:
        step = max(1, n // (1 << 15)) | 1
        while step % 3 == 0:  # coprime with 2 and 3: every feature of (tokens, features) is visited
            step += 2
        sample = a[0, ::step]
        k = min(sample.numel(), 2 * count * sample.numel() // n + 16)
        threshold = torch.topk(sample, k, sorted=False).values.min()
        kept = a[0][a[0] >= threshold]
        if kept.numel() >= count:
            return torch.topk(kept, count, sorted=True).values[None]
    return torch.topk(a, count, dim=1, sorted=True).values


def max_scaling(x: torch.Tensor, *, signed: bool | None = None, axis: int | None = None) -> torch.Tensor:
    """The max-scaled quantizer's scalar (eq. 2): max |x| (signed) or max x (unsigned)."""
    check_tensor(x, "Tensor passed to max_scaling")
    x = x.detach()  # a statistic of the data, not a function to differentiate
    signed = resolve_signed(x, signed)
    smax = magnitude_rows(x, signed, axis).amax(dim=1).double()
    return amax_from_rows(smax, smax, axis, x)


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
    a = magnitude_rows(x, signed, axis).double()
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
        return octav(x, bits, signed=signed, axis=axis, convention=convention)
    if m.kind == "sweep":
        return mse_sweep(x, bits, signed=signed, axis=axis, convention=convention)
    if m.kind == "max":
        check_bits(bits)
        return max_scaling(x, signed=signed, axis=axis)
    check_bits(bits)
    assert m.q is not None  # a parsed percentile always has q
    return percentile(x, m.q, axis=axis)
