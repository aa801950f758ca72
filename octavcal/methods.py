"""Clipping methods by name (one registry and parser), the MSE sweep, percentiles, max and J(s).

Every method takes a tensor and returns ``amax`` of shape [] (``axis=None``) or [C] (one per index
along ``axis``). OCTAV itself lives in ``octav.py``; it is re-exported here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .errors import SpecError
from .grid import Convention, Grid, check_bits, check_tensor, rows_from
from .octav import OctavResult, octav, solves_by_sorting
from .slices import amax_from_rows, magnitude_rows, resolve_signed
from .sweep import (
    mse_sweep,
    sweep_candidates,
    sweep_mse_curve,
)

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

# ---------------------------------------------------------------------------------------------
# Percentiles and max-scaling


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
        return percentile_of_tails(top_magnitudes(a, top) if tail is None else tail, q, n)
    else:
        v_low = torch.kthvalue(a, low + 1, dim=1).values
        v_high = torch.kthvalue(a, low + 2, dim=1).values if low + 1 < n else v_low
    return v_low.double() + frac * (v_high.double() - v_low.double())


def percentile_of_tails(tail: torch.Tensor, q: float, n: int) -> torch.Tensor:
    """``percentile_of_rows`` of rows of ``n`` values from their largest values, descending:
    ``tail`` (R, k), k >= ``tail_length(q, n)``."""
    pos = q / 100.0 * (n - 1)
    low = min(math.floor(pos), n - 1)
    top = n - low
    v_low = tail[:, top - 1]
    v_high = tail[:, top - 2] if top >= 2 else v_low
    return v_low.double() + (pos - low) * (v_high.double() - v_low.double())


def top_magnitudes(a: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest values of every row of ``a`` (R, n), sorted descending: (R, count).

    A long row first keeps only the values above a threshold read from a strided subsample (with a
    margin); when fewer than ``count`` pass, it falls back to ``topk`` on the whole row. Exact either
    way: every value at least as large as the count-th largest passes the threshold. On the CPU the
    selection is NumPy's (one thread; a boolean index in torch cost 7x as much, measured here).
    """
    rows, n = a.shape
    if rows == 1 and n >= 1 << 16 and count * 64 <= n:
        step = max(1, n // (1 << 15)) | 1
        while step % 3 == 0:  # coprime with 2 and 3: every feature of (tokens, features) is visited
            step += 2
        if a.device.type == "cpu":
            row = a[0].contiguous().numpy()
            sample = row[::step]
            k = min(sample.size, 2 * count * sample.size // n + 16)
            threshold = np.partition(sample, sample.size - k)[sample.size - k]  # the k-th largest
            kept = row.take(np.flatnonzero(row >= threshold))
            if kept.size >= count:
                return torch.from_numpy(np.sort(kept)[::-1][:count].copy())[None]
        else:
            strided = a[0, ::step]
            k = min(strided.numel(), 2 * count * strided.numel() // n + 16)
            cut = torch.topk(strided, k, sorted=False).values.min()
            kept_t = a[0][a[0] >= cut]
            if kept_t.numel() >= count:
                return torch.topk(kept_t, count, sorted=True).values[None]
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
