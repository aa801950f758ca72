"""The mean over batches (Appendix E.3): each activation's per-batch candidates, kept with their global
batch index so that the parts of several processes merge into what one process would have seen."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .scales import MethodScales, TargetScales
from .target import Target


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
