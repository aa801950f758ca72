"""The reductions over batches. ``mean`` (Appendix E.3): each activation's per-batch candidates, kept with
their global batch index so that the parts of several processes merge into what one process would have
seen. ``union``: the exact answer over every value of all batches together (``union.py``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .candidates import amax_floor
from .errors import CalibrationError
from .grid import Grid
from .methods import Method
from .scales import MethodScales, TargetScales
from .slices import amax_from_rows
from .target import Target
from .union import (
    BINS,
    Bracket,
    Summary,
    octav_bin,
    percentile_ranks,
    rank_bins,
    union_octav,
    union_percentile,
    union_sweep,
)


@dataclass
class Seen:
    """One delivery of an activation: its global batch and the candidates it gave."""

    batch: int
    nonnegative: bool
    masked: bool
    shared_with: str | None
    signed: dict[str, torch.Tensor]
    unsigned: dict[str, torch.Tensor] | None  # while every batch so far was non-negative


@dataclass
class Accumulator:
    target: Target
    bits: int
    shape: list[int]
    first: int  # the batch it was first seen in (several processes: the earliest one's shape is kept)
    nonnegative: bool = True  # every batch this process saw: unsigned candidates are still worth computing
    seen: list[Seen] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def merged(self, other: Accumulator) -> Accumulator:
        """This process's deliveries and another's, as one process would have seen them."""
        a, b = (self, other) if self.first <= other.first else (other, self)
        seconds = {k: a.seconds.get(k, 0.0) + b.seconds.get(k, 0.0) for k in a.seconds | b.seconds}
        seen = sorted(a.seen + b.seen, key=lambda s: s.batch)  # stable: a batch's own order is kept
        return Accumulator(a.target, a.bits, a.shape, a.first, a.nonnegative and b.nonnegative, seen, seconds)

    def scales(self) -> TargetScales:
        """The mean over batches of each method's candidates, on the unsigned grid when every batch was
        non-negative (and gave unsigned candidates)."""
        nonnegative = all(s.nonnegative for s in self.seen)
        unsigned = bool(self.seen) and nonnegative and all(s.unsigned is not None for s in self.seen)
        methods = {}
        for name in self.seen[0].signed if self.seen else ():
            per_batch = torch.stack([_grid_of(s, unsigned)[name] for s in self.seen])  # (N,)
            methods[name] = MethodScales(per_batch.mean(0), per_batch, self.seconds.get(name, 0.0))
        shared = [s.shared_with for s in self.seen if s.shared_with is not None]
        return TargetScales(
            self.target.module,
            self.target.role,
            self.target.op,
            "activation",
            self.bits,
            not unsigned,
            None,
            self.shape,
            methods,
            any(s.masked for s in self.seen),
            shared[-1] if shared else None,
            param=self.target.param,
        )


def _grid_of(seen: Seen, unsigned: bool) -> dict[str, torch.Tensor]:
    return seen.unsigned if unsigned and seen.unsigned is not None else seen.signed


@dataclass
class UnionAccumulator:
    """One activation over the union of all batches (``union.py``): pass 1's summary, then pass 2's
    bracket, then every method's exact answer."""

    target: Target
    bits: int
    shape: list[int]
    first: int
    masked: bool = False
    summary: Summary = field(default_factory=Summary)
    bracket: Bracket | None = None
    second_count: int = 0  # values seen by pass 2: must equal pass 1's
    seconds: dict[str, float] = field(default_factory=dict)

    def grid(self, convention: str) -> Grid:
        return Grid(self.bits, not self.summary.nonnegative, convention)  # type: ignore[arg-type]

    def prepare(self, methods: list[Method], convention: str) -> None:
        """Between the passes: the bins that bracket every method's answer."""
        s, grid = self.summary, self.grid(convention)
        keep: set[int] = set()
        for m in methods:
            if m.kind == "percentile" and s.n:
                low, high, _ = percentile_ranks(s.n, m.q or 0.0)
                keep |= set(rank_bins(s.counts.numpy(), [low, high]))
            elif m.kind == "octav":
                k = octav_bin(s, grid.noise_coefficient)
                keep |= set(range(max(k - 1, 0), min(k + 1, BINS - 1) + 1))
        sweep = any(m.kind == "sweep" for m in methods) and s.smax > 0
        self.bracket = Bracket(
            torch.tensor(sorted(keep), dtype=torch.int64),
            sweep_smax=s.smax if sweep else None,
            sweep_qmax=grid.qmax,
        )

    def merged(self, other: UnionAccumulator) -> UnionAccumulator:
        """This process's pass and another's (exact sums: the order of the parts does not matter)."""
        a, b = (self, other) if self.first <= other.first else (other, self)
        seconds = {k: a.seconds.get(k, 0.0) + b.seconds.get(k, 0.0) for k in a.seconds | b.seconds}
        bracket = (
            a.bracket
            if b.bracket is None
            else b.bracket
            if a.bracket is None
            else a.bracket.merged(b.bracket)
        )
        return UnionAccumulator(
            a.target,
            a.bits,
            a.shape,
            a.first,
            a.masked or b.masked,
            a.summary if bracket is not None else a.summary.merged(b.summary),
            bracket,
            a.second_count + b.second_count,
            seconds,
        )

    def scales(self, methods: list[Method], convention: str) -> TargetScales:
        s, b, grid = self.summary, self.bracket, self.grid(convention)
        if b is None or self.second_count != s.n:
            raise CalibrationError(
                f"Activations of '{self.target.module}' ({self.target.role}) differ between the two passes "
                f"over the batches ({s.n} values, then {self.second_count}). The union needs batches that "
                "give the same values on every pass."
            )
        floor = amax_floor(self.bits, grid.signed, convention)
        out = {}
        for m in methods:
            start = time.perf_counter()
            if m.kind == "max":
                value = s.smax
            elif m.kind == "percentile":
                value = union_percentile(s, b, m.q or 0.0)
            elif m.kind == "octav":
                value = union_octav(s, b, grid.noise_coefficient, octav_bin(s, grid.noise_coefficient))
            else:
                value = union_sweep(b)
            amax = amax_from_rows(np.array([value]), np.array([s.smax]), None, _FLOAT32)
            seconds = self.seconds.get(m.name, 0.0) + time.perf_counter() - start
            out[m.name] = MethodScales(amax.clamp_min(floor), None, seconds)
        return TargetScales(
            self.target.module,
            self.target.role,
            self.target.op,
            "activation",
            self.bits,
            grid.signed,
            None,
            self.shape,
            out,
            self.masked,
            None,
            param=self.target.param,
        )


_FLOAT32 = torch.zeros(0)
