"""Every method's candidate for one tensor, the work the methods have in common done once.

When the methods read only an activation's extremes and largest magnitudes (OCTAV, the percentiles,
max), one blocked pass over its valid tokens in place gives all of them (``scanned_candidates``,
``scan.py``). Otherwise an activation is read once for its extremes (finite? non-negative? its max),
once for |x| when it has negative values, and at most once more for what the sweep and the percentiles
share: the sort of a long row (which also holds OCTAV's tail), or the largest values. The unsigned grid
of non-negative data reuses all of it; only OCTAV and the sweep's errors depend on the grid. The results
equal the public methods' (``octav``, ``mse_sweep``, ``percentile``, ``max_scaling``) on the same tensor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar, cast

import numpy as np
import torch

from ._octav_sorted import (
    floor_from_sample,
    sample_head,
    sample_step,
    solve_from_ascending,
    solve_sorted_tails,
    sorts,
)
from .grid import Convention, Grid, rows_from
from .methods import (
    Method,
    compute_amax,
    percentile_of_rows,
    percentile_of_tails,
    tail_length,
    top_magnitudes,
)
from .octav import octav
from .scan import gather_above, strided_sample
from .slices import amax_from_rows
from .spare import spare_core
from .sweep import sorted_magnitudes, sweep_rows, sweeps_by_sorting

T = TypeVar("T")

# method name -> (amax on the CPU in float32, seconds of work done for it)
Candidates = dict[str, tuple[torch.Tensor, float]]


@contextmanager
def statistics_threads(device: torch.device) -> Iterator[None]:
    """Compute statistics on one CPU thread.

    They are memory-bound passes that one thread reads nearly as fast as two, and their float sums
    then do not depend on the thread count: a run gives the same bytes with any ``torch`` thread
    setting or number of processes. Under contention it matters most: on this 2-core machine under
    load, two threads took a median 24 ms for a 3M-value max and min, one 0.6 ms.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    spare_core(True)
    try:
        yield
    finally:
        spare_core(False)
        torch.set_num_threads(threads)


def amax_floor(bits: int, signed: bool, convention: str) -> float:
    """The smallest amax whose scale is a normal float32 (the scale file's rule): only a channel of
    (near) zeros meets it, and it quantizes to zeros either way."""
    return torch.finfo(torch.float32).tiny * Grid(bits, signed, convention).qmax  # type: ignore[arg-type]


def _finished(amax: torch.Tensor, floor: float) -> torch.Tensor:
    if amax.is_cuda:
        torch.cuda.synchronize(amax.device)
    return amax.detach().to("cpu", torch.float32).clamp_min(floor)


def candidates_for(
    x: torch.Tensor, methods: list[Method], bits: int, *, signed: bool, axis: int | None, convention: str
) -> Candidates:
    """Every method's amax for one tensor (a weight: per channel along ``axis``), each computed on its
    own, with the seconds each took (Appendix F's timer)."""
    floor = amax_floor(bits, signed, convention)
    out = {}
    for method in methods:
        start = time.perf_counter()
        amax = compute_amax(x, method, bits, signed=signed, axis=axis, convention=convention)  # type: ignore[arg-type]
        out[method.name] = (_finished(amax, floor), time.perf_counter() - start)
    return out


@dataclass
class Extremes:
    """One pass over an activation: its smallest and largest value."""

    low: float
    high: float

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    @property
    def nonnegative(self) -> bool:
        return self.low >= 0


def extremes_of(x: torch.Tensor) -> Extremes:
    """NaN anywhere makes both NaN. Two reductions: on CPU they cost a tenth of one ``aminmax``."""
    x = x.detach()
    return Extremes(float(x.amin()), float(x.amax()))


@dataclass
class _Clock:
    """Seconds per method; work several methods share is split evenly among them."""

    seconds: dict[str, float] = field(default_factory=dict)

    def charge(self, names: list[str], seconds: float) -> None:
        for name in names:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds / max(len(names), 1)

    def timed(self, names: list[str], fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = fn()
        self.charge(names, time.perf_counter() - start)
        return out


def activation_candidates(
    x: torch.Tensor, extremes: Extremes, methods: list[Method], bits: int, convention: str, *, unsigned: bool
) -> dict[str, Candidates]:
    """Every method's per-tensor amax of one finite activation on the signed grid, and with
    ``unsigned`` (only for non-negative data) on the unsigned grid too: {'signed': ..., 'unsigned': ...}.

    ``extremes``: ``extremes_of(x)``, which the caller has already read (to check the values).
    """
    clock = _Clock()
    names = [m.name for m in methods]
    start = time.perf_counter()
    rows = rows_from(x.detach(), None)  # (1, n), float32 unless float64
    # |x| for the sweep and the percentiles (OCTAV reads the values as they are)
    grid_free = any(m.kind in ("sweep", "percentile") for m in methods)
    mags = rows if extremes.nonnegative or not grid_free else rows.abs()
    smax = max(extremes.high, -extremes.low)
    smax_t = torch.tensor([smax], dtype=torch.float64)
    clock.charge(names, time.perf_counter() - start)

    grids = [True, False] if unsigned and extremes.nonnegative else [True]
    qmaxes = {g: Grid(bits, g, convention).qmax for g in grids}  # type: ignore[arg-type]
    sweep = [m.name for m in methods if m.kind == "sweep"]
    pcts = [m for m in methods if m.kind == "percentile"]
    ordered = None
    if sweep and any(sweeps_by_sorting(mags, q) for q in qmaxes.values()):
        ordered = clock.timed(sweep + [m.name for m in pcts], lambda: sorted_magnitudes(mags))
    tail = None
    n = mags.shape[1]
    tails = [m for m in pcts if ordered is None and tail_length(m.q or 0.0, n) <= max(64, n // 8)]
    if tails:
        count = max(tail_length(m.q or 0.0, n) for m in tails)
        tail = clock.timed([m.name for m in tails], lambda: top_magnitudes(mags, count))

    # Grid-free methods: the same amax on both grids.
    free: dict[str, torch.Tensor] = {}
    for m in methods:
        start = time.perf_counter()
        if m.kind == "max":
            value = smax_t
        elif m.kind == "percentile":
            assert m.q is not None  # a parsed percentile always has q
            value = percentile_of_rows(mags, m.q, tail if m in tails else None, ordered)
        else:
            continue
        free[m.name] = amax_from_rows(value, smax_t, None, x)
        clock.charge([m.name], time.perf_counter() - start)

    def solve(m: Method, signed: bool) -> torch.Tensor:
        if m.kind == "octav":
            c = Grid(bits, signed, convention).noise_coefficient  # type: ignore[arg-type]
            solved = None if ordered is None else solve_from_ascending(rows, ordered, signed, c)
            if solved is not None:  # the sweep's sort holds OCTAV's tail
                return amax_from_rows(solved, solved, None, x)
            return octav(rows, bits, signed=signed, convention=cast(Convention, convention))
        qmax = qmaxes[signed]
        use = ordered if ordered is not None and sweeps_by_sorting(mags, qmax) else None
        return amax_from_rows(sweep_rows(mags, smax_t, qmax, ordered=use)[0], smax_t, None, x)

    out = _on_grids(grids, methods, free, clock, bits, convention, solve)
    assert out is not None  # (solve always answers here)
    return out


def _on_grids(
    grids: list[bool],
    methods: list[Method],
    free: dict[str, torch.Tensor],
    clock: _Clock,
    bits: int,
    convention: str,
    solve: Callable[[Method, bool], torch.Tensor | None],
) -> dict[str, Candidates] | None:
    """Every method's candidate on each grid: the grid-free ones from ``free`` (the work they share
    charged with the signed grid), the others from ``solve(method, signed)``; None as soon as
    ``solve`` gives None."""
    out: dict[str, Candidates] = {}
    for signed in grids:
        floor = amax_floor(bits, signed, convention)
        result: Candidates = {}
        for m in methods:
            shared = clock.seconds[m.name] if signed else 0.0  # paid once, with the signed grid
            if m.name in free:
                result[m.name] = (_finished(free[m.name], floor), shared)
                continue
            start = time.perf_counter()
            amax = solve(m, signed)
            if amax is None:
                return None
            result[m.name] = (_finished(amax, floor), time.perf_counter() - start + shared)
        out["signed" if signed else "unsigned"] = result
    return out


# Activations of at least this many values go through one blocked pass (``scan.py``) when no method
# needs them whole: below it, the fixed costs of the pass outweigh a copy.
SCAN_MIN = 1 << 16


def scanned_candidates(
    x: torch.Tensor,
    segments: list[np.ndarray],
    methods: list[Method],
    bits: int,
    convention: str,
    *,
    unsigned: bool,
) -> tuple[dict[str, Candidates], bool] | None:
    """``activation_candidates`` for methods that read only the extremes and the largest magnitudes
    (OCTAV, the percentiles, max), from one pass over the activation ``x`` read as ``segments``
    (``valid_segments``): (candidates, non-negative?), or None where the pass does not settle every
    method as the public function would (then the caller copies ``x`` and takes the general route;
    non-finite values among them).

    One floor serves them all: the lowest of OCTAV's on the signed grid (``floor_from_sample``; the
    unsigned grid's root and floor lie higher) and the percentiles' (their tail's rank in the same
    strided subsample, with OCTAV's margins).
    """
    n = sum(segment.size for segment in segments)
    if n < SCAN_MIN or any(m.kind not in ("octav", "percentile", "max") for m in methods):
        return None
    if sorts(n, n) and any(m.kind == "octav" for m in methods):
        return None  # octav() solves these by one sort, not from a tail
    clock, names = _Clock(), [m.name for m in methods]
    start = time.perf_counter()
    strided = strided_sample(segments, sample_step(1, n))
    sample = sample_head(strided, signed=True)
    own = {}  # octav()'s own floor on each grid
    if any(m.kind == "octav" for m in methods):
        own[True] = floor_from_sample(sample, Grid(bits, True, convention).noise_coefficient, n, None)  # type: ignore[arg-type]
    floors = list(own.values())
    for m in methods:
        if m.kind == "percentile":
            rank = tail_length(m.q or 0.0, n) * sample.size / n
            rank += 4.0 * math.sqrt(rank + 1) + 8
            floors.append(sample.head[int(rank)] if rank < sample.size / 16 else None)
    max_only = not floors  # then the floor is the subsample's largest magnitude: a value of the data
    if max_only:
        floors.append(sample.head[0] if sample.size else None)
    if any(f is None or not f > 0 for f in floors):
        return None
    floor = np.float32(min(floors))  # type: ignore[type-var]
    if not floor > 0:
        return None
    seen = gather_above(segments, floor, signed=bool(strided.min() < 0))
    top = seen.top
    if not seen.finite or (top.size == 0 and not max_only):
        return None
    smax = float(top[0]) if top.size else float(floor)  # (no value above the floor: it is the max)
    smax_t = torch.tensor([smax], dtype=torch.float64)
    values = top.astype(np.float64)  # descending, as one row of ``_sorted_tails``
    clock.charge(names, time.perf_counter() - start)

    nonnegative = seen.nonnegative
    free: dict[str, torch.Tensor] = {}
    for m in methods:
        if m.kind == "max":
            free[m.name] = amax_from_rows(smax_t, smax_t, None, x)
        elif m.kind == "percentile":
            if top.size < tail_length(m.q or 0.0, n):
                return None
            value = percentile_of_tails(torch.from_numpy(top[None]), m.q or 0.0, n)
            free[m.name] = amax_from_rows(value, smax_t, None, x)

    ascending = top[::-1]

    def solve(m: Method, signed: bool) -> torch.Tensor | None:  # OCTAV, from the one tail
        c = Grid(bits, signed, convention).noise_coefficient  # type: ignore[arg-type]
        if signed not in own:
            own[signed] = floor_from_sample(sample_head(strided, False), c, n, None)
        # octav()'s own floor for this grid, and below its test that the root lies above it
        f = np.float32(own[signed]) if own[signed] is not None else None
        if f is None or not f >= floor:
            return None
        count = top.size - int(np.searchsorted(ascending, f, side="right"))
        amax, known = solve_sorted_tails(
            values[None, :count],
            np.array([f], np.float64),
            np.array([count]),
            np.array([float(n - seen.zeros)]),
            c,
        )
        return amax_from_rows(amax, amax, None, x) if known[0] else None

    grids = [True, False] if unsigned and nonnegative else [True]
    out = _on_grids(grids, methods, free, clock, bits, convention, solve)
    if out is None:
        return None
    return out, nonnegative
