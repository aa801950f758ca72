"""Pure error statistics of a quantizer on data, and the shape of an MSE curve (Appendix G)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .grid import Convention, Grid, rows_from


class ErrorStats(NamedTuple):
    """Sums over one tensor (float64), so that batches add up: divide at the end."""

    sse: float  # sum of squared quantization errors, eq. (1) times n
    energy: float  # sum of squared values (SQNR's signal)
    values: int  # how many values
    clipped: int  # values beyond amax (clipped to the grid's ends)
    zeroed: int  # non-zero values that quantize to 0
    small: int  # non-zero values with |x| <= small_below (the bulk, for Appendix G)
    small_zeroed: int  # of those, quantized to 0

    def __add__(self, other: tuple) -> ErrorStats:  # type: ignore[override]
        return ErrorStats(*(a + b for a, b in zip(self, other, strict=True)))


EMPTY_STATS = ErrorStats(0.0, 0.0, 0, 0, 0, 0, 0)


def error_stats(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    bits: int,
    *,
    signed: bool,
    axis: int | None = None,
    convention: Convention = "runtime",
    small_below: float | None = None,
) -> ErrorStats:
    """Quantize ``x`` with ``amax`` on the grid and count what happened (eq. 1's error and more).

    Example: 4-bit signed, amax 0.7 (step 0.1), x = [0.01, 0.33, 2.0] -> sse = 0.01^2 + 0.03^2 + 1.3^2,
    clipped 1, zeroed 1.
    """
    grid = Grid(bits, signed, convention)
    rows = rows_from(x, axis).double()  # (R, n)
    a = torch.as_tensor(amax, dtype=torch.float64, device=rows.device).reshape(-1, 1)
    scale = a / grid.qmax
    levels = torch.round(rows / scale)
    q = torch.clamp(levels, grid.qmin, grid.qmax) * scale
    nonzero = rows != 0
    zeroed = nonzero & (q == 0)
    small = nonzero & (rows.abs() <= small_below) if small_below is not None else torch.zeros_like(nonzero)
    return ErrorStats(
        sse=float((q - rows).square().sum()),
        energy=float(rows.square().sum()),
        values=rows.numel(),
        clipped=int(((levels > grid.qmax) | (levels < grid.qmin)).sum()),
        zeroed=int(zeroed.sum()),
        small=int(small.sum()),
        small_zeroed=int((small & zeroed).sum()),
    )


def sqnr_db(stats: ErrorStats) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (Q(x) - x)^2)."""
    return sqnr_from(stats.energy, stats.sse)


def sqnr_from(energy: float, sse: float) -> float:
    """10 log10(energy / sse): +inf without error, -inf for error on a zero signal."""
    if sse == 0:
        return float("inf")
    if energy == 0:
        return float("-inf")
    return 10.0 * math.log10(energy / sse)


def significant_minima(curve: torch.Tensor, prominence: float = 0.05) -> list[int]:
    """Indices of the local minima of ``curve`` that stand out by ``prominence`` (relative rise).

    A minimum counts when, on each side, the curve climbs at least ``prominence`` times its value
    before it falls below it again (or the curve ends: an end point can be a minimum). Wiggles of
    the empirical MSE from rounding do not count.
    Example: [5, 3, 4, 2, 6] -> [1, 3]; [5, 3, 3.05, 2, 6] -> [3].
    """
    values = curve.double().tolist()
    found: list[int] = []
    for i, v in enumerate(values):
        if (i > 0 and values[i - 1] < v) or (i + 1 < len(values) and values[i + 1] < v):
            continue
        ok = True
        for side in (range(i - 1, -1, -1), range(i + 1, len(values))):
            peak = v
            for j in side:
                if values[j] < v:
                    break
                peak = max(peak, values[j])
            else:
                continue  # reached the end without going lower: this side is fine
            if peak < v * (1 + prominence) + 1e-300:
                ok = False
        if ok and (not found or values[found[-1]] != v or i - found[-1] > 1):
            found.append(i)
    return found
