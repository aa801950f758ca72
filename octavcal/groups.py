"""Weight granularity (tensor, channel, group:G) and per-group scales: one amax per block of G input
features of each output channel, the blocks that ONNX Runtime's blocked DequantizeLinear and MatMulNBits
read. A group is a row: every method runs on the (C * in/G, G) view of a weight, as per channel on (C, in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .errors import SpecError
from .grid import Convention, fake_quantize

MIN_GROUP, MAX_GROUP = 16, 1024
GRANULARITIES = ("tensor", "channel", "group:G")


@dataclass(frozen=True)
class Granularity:
    """How many amax a weight gets: one (``tensor``), one per output channel (``channel``), or one
    per block of ``group_size`` input features of each output channel (``group``)."""

    kind: Literal["tensor", "channel", "group"]
    group_size: int | None = None

    def __str__(self) -> str:
        return f"group:{self.group_size}" if self.kind == "group" else self.kind


def parse_granularity(spec: str) -> Granularity:
    """'tensor', 'channel' or 'group:128' -> Granularity; anything else raises SpecError."""
    text = spec.strip().lower()
    if text in ("tensor", "channel"):
        return Granularity(text)  # type: ignore[arg-type]
    head, sep, size = text.partition(":")
    if head == "group" and sep:
        try:
            value = int(size)
        except ValueError:
            value = None
        if value is not None:
            return Granularity("group", check_group_size(value))
    raise SpecError(
        f"Unknown weight granularity {spec!r}. Expected one of: tensor, channel, group:G "
        f"(G an integer in {MIN_GROUP}..{MAX_GROUP}, e.g. group:128)."
    )


def check_group_size(size: object) -> int:
    """Return ``size`` if it is an integer in 16..1024, else raise SpecError."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_GROUP <= size <= MAX_GROUP:
        raise SpecError(f"Group size must be an integer in {MIN_GROUP}..{MAX_GROUP}: got {size!r}.")
    return size


def input_axis(shape: tuple[int, ...] | list[int], axis: int, what: str = "The weight") -> int:
    """The axis of a 2-D weight that holds input features: the one that is not the output axis.

    Linear stores (out, in) with output axis 0; transformers' Conv1D stores (in, out) with output axis 1.
    Convolutions are refused: runtimes block only one axis, not in_channels * kernel.
    """
    if len(shape) != 2:
        raise SpecError(
            f"{what} has shape {list(shape)}: per-group scales need a 2-D weight (Linear, Conv1D, a "
            "matrix product); convolutions are not grouped. Calibrate it per channel or skip it."
        )
    return 1 - axis % 2


def group_rows(w: torch.Tensor, axis: int, group_size: int, what: str = "The weight") -> torch.Tensor:
    """View a 2-D weight as one row per group: (C, in) in the output-first layout -> (C * in/G, G).

    Row ``c * (in/G) + g`` holds input features ``g*G .. (g+1)*G - 1`` of output channel ``c``.
    """
    inner = input_axis(tuple(w.shape), axis, what)
    features = w.shape[inner]
    if features % group_size:
        raise SpecError(
            f"{what} has {features} input features, which group size {group_size} does not divide. "
            f"Expected a group size that divides {features}."
        )
    rows = w.movedim(axis % 2, 0)  # (C, in)
    return rows.reshape(-1, group_size)


def rows_to_weight(rows: torch.Tensor, shape: tuple[int, ...] | list[int], axis: int) -> torch.Tensor:
    """Undo ``group_rows``: (C * in/G, G) -> the weight's own shape and layout."""
    out, inner = shape[axis % 2], shape[1 - axis % 2]
    return rows.reshape(out, inner).movedim(0, axis % 2)


def group_shape(shape: tuple[int, ...] | list[int], axis: int, group_size: int) -> list[int]:
    """The amax shape of a grouped weight: [C, in/G]."""
    return [shape[axis % 2], shape[1 - axis % 2] // group_size]


def fake_quantize_groups(
    w: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    *,
    axis: int,
    group_size: int,
    convention: Convention = "runtime",
) -> torch.Tensor:
    """Quantize-dequantize a 2-D weight with one amax per group (``amax`` [C, in/G], signed grid).

    Equals ``fake_quantize`` of each group with its own amax. Example: group size 2, 4-bit, weight
    row [0.33, -0.06, 2.0, 0.9] with amax [0.7, 1.4] -> steps 0.1 and 0.2 -> [0.3, -0.1, 1.4, 0.8].
    """
    rows = group_rows(w, axis, group_size)  # (C * in/G, G)
    expected = group_shape(tuple(w.shape), axis, group_size)
    if list(amax.shape) != expected:
        raise SpecError(
            f"Per-group amax of a weight of shape {list(w.shape)} (group size {group_size}) must have "
            f"shape {expected}: got {list(amax.shape)}."
        )
    q = fake_quantize(rows, amax.reshape(-1), bits, signed=True, axis=0, convention=convention)
    return rows_to_weight(q, tuple(w.shape), axis)


def check_weight_granularity(per_channel: bool, group_size: int | None) -> None:
    """Per-group scales are per channel too: refuse per-tensor weights with a group size."""
    if group_size is not None:
        check_group_size(group_size)
        if not per_channel:
            raise SpecError(
                f"Group size {group_size} needs per-channel weights: groups split each output channel."
            )


def weight_granularity(per_channel: bool, group_size: int | None) -> str:
    """The granularity as the scale file's metadata and the CLI spell it: 'tensor', 'channel', 'group:G'."""
    if group_size is not None:
        return f"group:{group_size}"
    return "channel" if per_channel else "tensor"
