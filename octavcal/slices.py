"""What every clipping method shares: the grid's side of the data per slice, and the shaped result.

Pure tensor code; the methods themselves live in ``methods.py`` and ``octav.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from .grid import AMAX_OF_ZEROS, rows_from


def resolve_signed(x: torch.Tensor, signed: bool | None) -> bool:
    """``signed=None`` means: unsigned when every element is >= 0 (e.g. after ReLU)."""
    if signed is None:
        return bool(x.min() < 0)
    return bool(signed)


def magnitude_rows(x: torch.Tensor, signed: bool, axis: int | None) -> torch.Tensor:
    """(rows, n) of the values the clipping scalar bounds: |x| when signed, max(x, 0) when not.

    Negative values on an unsigned grid are clipped to 0 whatever s is, so they never move s*.
    """
    rows = rows_from(x, axis)
    return rows.abs() if signed else rows.clamp(min=0)


def amax_from_rows(
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
