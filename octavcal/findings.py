"""What `compare` concludes: Appendix G findings, per-method summaries and Appendix F's timing table.

Frozen dataclasses read by render.py and report.py; ``as_dict`` gives the JSON schema users' scripts read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AppendixGFinding:
    """One target at one bit width whose MSE curve is non-convex, or where OCTAV and the sweep disagree."""

    target: str
    """The target's id, e.g. ``fc1:input``."""
    bits: int
    """The bit width of the run."""
    minima_per_batch: list[int]
    """Per calibration batch: how many significant local minima its MSE curve has."""
    nonconvex_batches: list[int]
    """The batches with a minimum near the bulk and another at least 2x further out."""
    disagreeing_batches: list[int]
    """The batches whose own OCTAV and sweep clipping scalars are more than 2x apart."""
    octav_amax: float | None
    """OCTAV's clipping scalar; None when OCTAV was not run."""
    sweep_amax: float | None
    """The sweep's clipping scalar; None when the sweep was not run."""
    octav_mse: float | None
    """OCTAV's MSE on the calibration batches; None when OCTAV was not run."""
    sweep_mse: float | None
    """The sweep's MSE on the calibration batches; None when the sweep was not run."""
    ratio: float | None
    """The larger clipping scalar of the two over the smaller (>= 1); None: a weight, or a method not run."""
    sweep_small_zeroed_fraction: float | None
    """Fraction of the bulk (values below OCTAV's scalar) that the sweep's scalar rounds to zero."""
    per_batch_amax: dict[str, list[float]]
    """Each batch's own clipping scalar, under "octav" and "sweep"; empty unless both were run."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MethodSummary:
    """One method at one bit width, over every target."""

    method: str
    """The method's name, e.g. ``octav`` or ``p99.99``."""
    bits: int
    """The bit width of the run."""
    mean_relative_mse: float | None
    """Mean over targets of the MSE over the best method's MSE there (1.0: the best); None: no targets."""
    worst_relative_mse: float | None
    """The largest such ratio over targets; None: no targets."""
    wins: int
    """How many targets this method had the lowest MSE on (ties count for every method tied)."""
    seconds_per_weight: float | None
    """Calibration seconds per weight tensor; None: no weight targets."""
    seconds_per_activation: float | None
    """Calibration seconds per activation tensor (one per target and batch); None: no activation targets."""
    total_seconds: float
    """Calibration seconds over every tensor."""
    weight_tensors: int
    """How many weight tensors were timed."""
    activation_tensors: int
    """How many activation tensors were timed (targets x batches)."""

    @property
    def key(self) -> str:
        """``method@bits``: this summary's key in the JSON."""
        return f"{self.method}@{self.bits}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AppendixFRow:
    """Appendix F: one method's calibration time per tensor, averaged over the bit widths run."""

    method: str
    """The method's name."""
    seconds_per_weight: float | None
    """Seconds per weight tensor; None: no weight targets."""
    seconds_per_activation: float | None
    """Seconds per activation tensor; None: no activation targets."""
    total_seconds: float
    """Seconds over every tensor, averaged over the bit widths."""
    octav_speedup: float | None
    """This method's total_seconds over OCTAV's (a ratio); None when OCTAV was not run or took no time."""


@dataclass(frozen=True)
class ComparisonSummary:
    """Everything `compare` concludes across targets: the methods table, Appendix F and Appendix G."""

    methods: list[MethodSummary]
    """One per method and bit width, bit widths outer, methods in the order they were run."""
    appendix_f: list[AppendixFRow]
    """One per method, in the order they were run."""
    appendix_g: list[AppendixGFinding]
    """Every target's findings, in target order."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``report.json``'s "summary", ``compare --json``): keys as in earlier versions."""
        octav_run = any(row.method == "octav" for row in self.appendix_f)
        appendix_f = {}
        for row in self.appendix_f:
            fields = dataclasses.asdict(row)
            del fields["method"]  # the key already says it
            if not octav_run:
                del fields["octav_speedup"]  # no OCTAV to compare with: the key is left out
            appendix_f[row.method] = fields
        return {
            "methods": {m.key: m.as_dict() for m in self.methods},
            "appendix_f": appendix_f,
            "appendix_g": [finding.as_dict() for finding in self.appendix_g],
        }
