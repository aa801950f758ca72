"""One blocked pass over a CPU activation for the methods that read only its extremes and its largest
magnitudes (OCTAV, the percentiles, max), without copying it first.

The padded positions are left out by reading only the valid tokens' rows in place (``valid_segments``),
in the order ``without_padding`` would copy them. Each block of the pass stays in a core's cache while
it is read for its smallest value, its zeros, and the magnitudes above a floor (``gather_above``). What
the methods make of that lives in ``candidates.py``.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import torch

from .grid import _in_memory_order

# Blocks of this many float32 values: the passes after the first read the block from a core's cache.
# Measured here over a BERT batch's activations: 0.71 ns per value, against 0.79 for 1 << 16 and
# 1.22 for 1 << 14 (NumPy's cost per call).
_BLOCK = 1 << 17
# More separate runs of valid tokens than this (a scattered mask) are copied instead.
_MAX_SEGMENTS = 4096
_scratch = threading.local()


def token_runs(mask: torch.Tensor) -> np.ndarray:
    """The runs of valid positions of a (B, T) mask, row-major (the order of the valid positions):
    (runs, 3) of (row, start, end)."""
    valid = mask.to("cpu").numpy().astype(np.int8)
    edges = np.diff(valid, axis=1, prepend=0, append=0)
    rows, starts = np.nonzero(edges == 1)
    return np.stack([rows, starts, np.nonzero(edges == -1)[1]], axis=1)


def valid_segments(
    x: torch.Tensor, mask: torch.Tensor | None, runs: np.ndarray | None = None
) -> tuple[list[np.ndarray], bool] | None:
    """1-D NumPy views of ``x``'s values without padding, in the order in which
    ``rows_from(without_padding(x, mask)[0], None)`` reads them, and whether the mask applied.
    ``runs``: ``token_runs(mask)``, when the caller keeps them for the batch.

    None (then the caller copies ``x``) when it is not a dense float32 CPU tensor, requires grad, or
    is masked but not contiguous, or when its valid tokens form more than ``_MAX_SEGMENTS`` runs.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad:
        return None
    if mask is None or x.dim() not in (2, 3) or tuple(x.shape[:2]) != tuple(mask.shape):
        ordered = _in_memory_order(x)
        return ([ordered.reshape(-1).numpy()], False) if ordered.is_contiguous() else None
    runs = token_runs(mask) if runs is None else runs
    if not x.is_contiguous() or len(runs) > _MAX_SEGMENTS:
        return None
    tokens = x.reshape(x.shape[0], x.shape[1], -1).numpy()
    return [tokens[r, s:e].reshape(-1) for r, s, e in runs.tolist()], True


def strided_sample(segments: list[np.ndarray], step: int) -> np.ndarray:
    """Every ``step``-th value of the segments read as one row, starting with the first."""
    parts, offset = [], 0
    for segment in segments:
        parts.append(segment[(-offset) % step :: step])
        offset += segment.size
    return np.concatenate(parts)


class Gathered(NamedTuple):
    n: int  # values read
    nonnegative: bool  # no value below 0
    finite: bool  # no NaN or Inf
    zeros: int  # values with |x| == 0
    top: np.ndarray  # every |x| above the floor, descending, float32


def gather_above(segments: list[np.ndarray], floor: np.float32, signed: bool) -> Gathered:
    """One pass over float32 ``segments``: whether they hold negative values, NaN or Inf, their zeros,
    and every magnitude strictly above ``floor`` (> 0), sorted descending.

    ``signed``: the caller has seen a negative value already (in a subsample), so no block needs its
    smallest value read. Otherwise a block whose smallest value is at least -floor has no magnitude
    above the floor among its negative values, and is compared as it is, not turned into |x| first.
    """
    blocks = [segment[i : i + _BLOCK] for segment in segments for i in range(0, segment.size, _BLOCK)]
    # One thread: the pass is bound by memory here (sharing the blocks with a second thread took
    # 1.08-1.26x the time of one on a BERT batch's activations).
    seen = [_gather_block(block, floor, signed) for block in blocks]
    parts = [part for part, _, _, _ in seen]
    top = np.sort(np.concatenate(parts) if parts else np.zeros(0, np.float32))[::-1]
    finite = not any(nan for _, _, _, nan in seen) and (top.size == 0 or bool(np.isfinite(top[0])))
    return Gathered(
        sum(b.size for b in blocks),
        not signed and bool(blocks) and all(nonnegative for _, _, nonnegative, _ in seen),
        finite,
        sum(zeros for _, zeros, _, _ in seen),
        np.ascontiguousarray(top),
    )


def _gather_block(block: np.ndarray, floor: np.float32, signed: bool) -> tuple[np.ndarray, int, bool, bool]:
    """``gather_above`` of one block: (its magnitudes above the floor, zeros, non-negative, NaN)."""
    buffer, flags = _buffers()
    marks = flags[: block.size]
    low = -np.inf if signed else block.min()
    zeros, nan = 0, False
    if low >= -floor:
        nan = bool(low != low)
        if low <= 0:
            zeros = int(np.count_nonzero(np.equal(block, 0, out=marks)))
        values = block
    else:  # NaN lands here too, and stays out of the tail
        values = np.abs(block, out=buffer[: block.size])
        least = values.min()
        nan = bool(least != least)
        if least == 0:
            zeros = block.size - int(np.count_nonzero(np.greater(values, 0, out=marks)))
    return np.compress(np.greater(values, floor, out=marks), values), zeros, bool(low >= 0), nan


def _buffers() -> tuple[np.ndarray, np.ndarray]:
    """Per-thread scratch for one block: its magnitudes and its flags (fresh arrays this size cost
    page faults on every call)."""
    kept = getattr(_scratch, "kept", None)
    if kept is None:
        kept = _scratch.kept = (np.empty(_BLOCK, np.float32), np.empty(_BLOCK, bool))
    return kept
