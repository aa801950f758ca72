"""Clipping methods by name (one registry and parser), the MSE sweep, percentiles, max and J(s).

Every method takes a tensor and returns ``amax`` of shape [] (``axis=None``) or [C] (one per index
along ``axis``). OCTAV itself lives in ``octav.py``; it is re-exported here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, overload

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
    cand = sweep_candidates(torch.where(smax > 0, smax, 1.0), points)
    sse = _sweep_sse(a, cand, qmax)
    best = sse.argmin(dim=0)  # first minimum: the smallest candidate among ties
    chosen = torch.where(smax > 0, cand.gather(0, best[None]).squeeze(0), 0.0)  # all-zero -> amax_from_rows
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
    return amax_from_rows(value, a.amax(dim=1).double(), axis, x)


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
