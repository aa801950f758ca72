"""The integer grid every method, report and export refers to; validation of tensors and bits.

Two conventions (README, "The integer grid"); scale = amax / qmax and zero point 0 in both:
- ``runtime`` (default; ONNX QDQ, TensorRT): signed [-(2^(B-1)-1), 2^(B-1)-1], unsigned [0, 2^B-1];
  noise coefficient 1 / (12 qmax^2).
- ``paper`` (eq. 3, Appendix A): signed [-2^(B-1), 2^(B-1)], unsigned [0, 2^B]; 4^-B/3, 4^-B/12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import DataError, SpecError

Convention = Literal["runtime", "paper"]
CONVENTIONS: tuple[str, ...] = ("runtime", "paper")
MIN_BITS, MAX_BITS = 2, 16
# An all-zero slice has no preferred clipping scalar; any positive amax quantizes zeros exactly.
# 1.0 keeps the derived scale far from underflow in fp16 runtimes (see README, edge cases).
AMAX_OF_ZEROS = 1.0


@dataclass(frozen=True)
class Grid:
    """A symmetric integer grid: ``qmin..qmax`` integers, zero point 0, step ``amax / qmax``.

    Example: ``Grid(4, signed=True)`` -> integers -7..7; amax 0.7 -> step 0.1.
    """

    bits: int
    signed: bool
    convention: Convention = "runtime"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.convention not in CONVENTIONS:
            raise SpecError(
                f"Unknown grid convention {self.convention!r}. Expected one of: {', '.join(CONVENTIONS)}."
            )

    @property
    def qmax(self) -> int:
        levels = self.bits - 1 if self.signed else self.bits
        return 2**levels - (1 if self.convention == "runtime" else 0)

    @property
    def qmin(self) -> int:
        return -self.qmax if self.signed else 0

    @property
    def noise_coefficient(self) -> float:
        """(step / amax)^2 / 12: the discretization-noise factor of eq. (4), for this grid."""
        return 1.0 / (12.0 * self.qmax**2)

    def describe(self) -> dict[str, object]:
        """The grid as plain JSON-able values, for scale files and reports."""
        return {
            "convention": self.convention,
            "bits": self.bits,
            "signed": self.signed,
            "qmin": self.qmin,
            "qmax": self.qmax,
            "narrow_range": self.convention == "runtime",
            "zero_point": 0,
            "scale": "amax / qmax",
            "rounding": "half to even",
        }


def check_bits(bits: object) -> int:
    """Return ``bits`` if it is an integer in [2, 16], else raise SpecError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise SpecError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}]: got {bits!r}.")
    return bits


def check_tensor(x: torch.Tensor, what: str = "Tensor", *, finite: bool = True) -> None:
    """Raise a clear error for non-tensor, non-floating or empty input, and (``finite``) NaN or Inf."""
    if not isinstance(x, torch.Tensor):
        raise SpecError(f"{what} must be a torch.Tensor: got {type(x).__name__}.")
    if not x.is_floating_point():
        raise SpecError(
            f"{what} has dtype {x.dtype}; clipping scalars need a floating dtype. Convert with .float()."
        )
    if x.numel() == 0:
        raise DataError(f"{what} of shape {tuple(x.shape)} is empty; there is nothing to calibrate.")
    if finite:
        check_finite(x.abs().amax(), x, what)


def check_finite(reduced: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Raise DataError naming shape and count if ``x`` has NaN or Inf.

    ``reduced`` is a max of |x| already computed (it is NaN or Inf exactly when x holds one), so
    the clean path costs no extra pass; the count is taken only on the error path.
    """
    if not math.isfinite(float(reduced.detach().double().sum())):  # one host sync; NaN/Inf survive the sum
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(
            f"{what} of shape {tuple(x.shape)} contains NaN or Inf ({bad} of {x.numel()} values)."
        )


def _in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its dimensions permuted into memory order (a contiguous view) when it is a permuted
    dense tensor, such as a transposed attention operand; else ``x``."""
    if x.is_contiguous() or x.dim() < 2:
        return x
    strides, sizes = x.stride(), x.shape
    y = x.permute(sorted(range(x.dim()), key=lambda d: (-strides[d], -sizes[d])))
    return y if y.is_contiguous() else x


def rows_from(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as (rows, elements): one row per index along ``axis`` (the axis kept), or one row.

    Computation dtype: float64 stays float64; everything else is computed in float32.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if axis is None:  # one row, in memory order: a transposed tensor is not copied
        return _in_memory_order(x).reshape(1, -1).to(dtype)
    if not -x.dim() <= axis < x.dim():
        raise SpecError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}.")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1).to(dtype)


def amax_view(amax: torch.Tensor | float, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Shape ``amax`` ([] or [C]) so it broadcasts against ``x`` along ``axis``."""
    amax = torch.as_tensor(
        amax, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device
    )
    if axis is None:
        if amax.numel() != 1:
            raise SpecError(f"Per-tensor amax must be a scalar: got shape {tuple(amax.shape)}.")
        return amax.reshape(())
    axis = axis % x.dim()
    if amax.shape != (x.shape[axis],):
        raise SpecError(
            f"Per-channel amax for axis {axis} of a tensor of shape {tuple(x.shape)} must have shape "
            f"({x.shape[axis]},): got {tuple(amax.shape)}."
        )
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return amax.reshape(shape)


def scale_from_amax(amax: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The quantization step of ``grid`` for clipping scalar ``amax``: amax / qmax."""
    return amax / grid.qmax


def fake_quantize(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    bits: int,
    *,
    signed: bool = True,
    axis: int | None = None,
    convention: Convention = "runtime",
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid: clamp(round(x / scale), qmin, qmax) * scale, eq. (3).

    Rounding is half-to-even (as ONNX QuantizeLinear). Returns a tensor of x's dtype and shape.
    Example: 4-bit signed, amax 0.7 -> step 0.1; x = 0.33 -> 0.3, x = 0.9 -> 0.7, x = -0.06 -> -0.1.
    """
    grid = Grid(bits, signed, convention)
    if not x.is_floating_point():
        raise SpecError(f"fake_quantize needs a floating tensor: got dtype {x.dtype}.")
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    amax_b = amax_view(amax, work, axis)
    if bool((amax_b <= 0).any()) or not bool(torch.isfinite(amax_b).all()):
        raise SpecError("amax must be positive and finite for every slice.")
    scale = scale_from_amax(amax_b, grid)
    q = torch.clamp(torch.round(work / scale), grid.qmin, grid.qmax)
    return (q * scale).to(x.dtype)


def quant_mse(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    bits: int,
    *,
    signed: bool = True,
    axis: int | None = None,
    convention: Convention = "runtime",
) -> torch.Tensor:
    """The empirical quantization MSE of eq. (1): mean((Q(x) - x)^2), per slice along ``axis``.

    Returns a float64 tensor of shape [] (per tensor) or [C] (per channel).
    """
    err = fake_quantize(x, amax, bits, signed=signed, axis=axis, convention=convention).double()
    err = rows_from(err - x.double(), axis)
    return err.square().mean(dim=1).reshape(()) if axis is None else err.square().mean(dim=1)
