"""compare: each method's quantization error and cost per target (the paper's Appendices F and G).

Calibrate (or read a scale file), then make one more streaming pass over the calibration batches and
the held-out batches: per target, method and bit width, add up eq. (1)'s error, the signal energy,
clipped and zeroed counts, and each batch's MSE curve sampled at ``curve_points`` clipping scalars.
Nothing per element is kept. The summary over targets (Appendix F) is in ``compare_summary``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibrate import CalibrationConfig, calibrate_each
from .calibrator import without_padding
from .collect import capture_activations
from .compare_summary import comparison_summary as comparison_summary  # re-exported
from .compare_summary import summarize as summarize  # re-exported
from .core import Batch, LoadedModel, Progress, as_loaded
from .coverage import check_targets
from .data import batch_source, check_finite_inputs
from .distributed import SharedWork, share_of
from .errors import CalibrationError
from .findings import AppendixGFinding
from .graphs import weight_targets
from .grid import rows_from
from .groups import group_rows
from .methods import sweep_mse_curve
from .metrics import EMPTY_STATS, ErrorStats, error_stats, significant_minima
from .scales import ScaleTable
from .target import Target

_SPLIT_NAMES = {"calib": "Calibration", "heldout": "Held-out"}
DISAGREEMENT = 2.0  # Appendix G: OCTAV and the sweep more than 2x apart
PROMINENCE = 0.1  # a local minimum of the MSE curve counts when the curve rises 10% around it


@dataclass
class MethodRow:
    """One method at one bit width on one target."""

    method: str
    bits: int
    amax: list[float]
    calib: ErrorStats
    heldout: ErrorStats
    seconds: float  # per call (per tensor), Appendix F's timer
    calls: int
    target_bits: int = 0  # the target's own width when it differs from the run's (first/last, --layer-bits)

    @property
    def mse(self) -> float:
        return self.calib.sse / max(self.calib.values, 1)

    @property
    def heldout_mse(self) -> float | None:
        return (
            self.heldout.sse / self.heldout.values if self.heldout.values else None
        )  # None: no held-out data


@dataclass
class TargetReport:
    target: str
    kind: str
    op: str
    signed: bool
    rows: list[MethodRow] = field(default_factory=list)
    # per bit width: the clipping scalars of the curve and each batch's MSE there (batches, points)
    curve_s: dict[int, list[float]] = field(default_factory=dict)
    curves: dict[int, list[list[float]]] = field(default_factory=dict)
    findings: list[AppendixGFinding] = field(default_factory=list)

    def best_mse(self, bits: int) -> float:
        return min(r.mse for r in self.rows if r.bits == bits)

    def relative_mse(self, row: MethodRow) -> float:
        best = self.best_mse(row.bits)
        return row.mse / best if best > 0 else (1.0 if row.mse == 0 else float("inf"))


@dataclass
class ComparisonReport:
    targets: dict[str, TargetReport]
    methods: list[str]
    bits: list[int]
    batches: int
    heldout_batches: int
    meta: dict[str, Any]


class _Evaluator:
    """Accumulates error statistics and curves for every (target, bits, method) as tensors stream by."""

    def __init__(self, tables: dict[int, ScaleTable], curve_points: int):
        self.tables, self.curve_points = tables, curve_points
        self.stats: dict[tuple[str, int, str, str], ErrorStats] = {}
        self.curves: dict[tuple[str, int], list[tuple[int, list[float]]]] = {}  # (batch, curve)
        self.curve_s: dict[tuple[str, int], torch.Tensor] = {}
        self.split = "calib"
        self.mask: torch.Tensor | None = None
        self.weights_seen: set[str] = set()
        self.batch = 0  # the global batch being run: curves are kept in batch order
        self.work: SharedWork | None = None  # several processes: weights shared out

    def part(self) -> dict[str, Any]:
        """What this process measured, for the merge."""
        return {"stats": self.stats, "curves": self.curves, "curve_s": self.curve_s}

    def absorb(self, parts: list[dict[str, Any]]) -> None:
        """Every process's part (in rank order): sums added up in float64, curves in batch order."""
        self.stats, self.curves, self.curve_s = {}, {}, {}
        for part in parts:
            for key, s in part["stats"].items():
                self.stats[key] = self.stats.get(key, EMPTY_STATS) + s
            for key, curves in part["curves"].items():
                self.curves.setdefault(key, []).extend(curves)
            self.curve_s |= part["curve_s"]
        for curves in self.curves.values():
            curves.sort(key=lambda c: c[0])  # stable: a batch's own order is kept

    def add_weight(self, tid: str, weight: torch.Tensor) -> None:
        """A weight is the same tensor on any data: measured once, for both splits."""
        if tid not in self.weights_seen:
            self.weights_seen.add(tid)
            for split in ("calib", "heldout"):
                self.add(tid, weight, split, with_curve=split == "calib")

    def add(self, tid: str, x: torch.Tensor, split: str, with_curve: bool) -> None:
        for bits, table in self.tables.items():
            entry = table.targets.get(tid)
            if entry is None:
                continue
            octav = entry.methods.get("octav")
            small_below = float(octav.amax.max()) if octav is not None else None
            data, axis = x, entry.axis
            if entry.group_size is not None and entry.axis is not None:  # one row per group, as calibrated
                data, axis = group_rows(x, entry.axis, entry.group_size), 0
            for name, result in entry.methods.items():
                key = (tid, bits, name, split)
                s = error_stats(
                    data,
                    result.amax.reshape(-1) if axis is not None else result.amax,
                    entry.bits,  # a target's own width (first/last layers, --layer-bits)
                    signed=entry.signed,
                    axis=axis,
                    convention=table.convention,  # type: ignore[arg-type]
                    small_below=small_below,
                )  # type: ignore[arg-type]
                self.stats[key] = self.stats.get(key, EMPTY_STATS) + s
            if with_curve and entry.axis is None:
                grid_s = self.curve_s.get((tid, bits))
                if grid_s is None:
                    # One fixed, geometric s-axis per target, from a quarter of the smallest scalar to a
                    # little beyond the largest: both of Appendix G's minima get resolved.
                    top = max(float(r.amax.max()) for r in entry.methods.values()) * 1.05
                    low = min(float(r.amax.min()) for r in entry.methods.values()) / 4
                    frac = torch.linspace(0, 1, self.curve_points, dtype=torch.float64)
                    grid_s = low * (top / low) ** frac
                    self.curve_s[(tid, bits)] = grid_s
                mags = rows_from(x, None)
                mags = mags.abs() if entry.signed else mags.clamp(min=0)
                qmax = entry.grid(table.convention).qmax
                mse = sweep_mse_curve(mags, grid_s[:, None], qmax)[:, 0]
                if not entry.signed:
                    mse = mse + rows_from(x, None).clamp(max=0).double().square().mean()
                self.curves.setdefault((tid, bits), []).append((self.batch, mse.tolist()))

    def deliver(self, target: Target, tensor: torch.Tensor) -> None:
        if not tensor.is_floating_point():
            return
        if target.kind == "weight":
            if self.work is not None:
                self.work.offer(target.id, (target.id, tensor), first=not target.param)
            else:
                self.add_weight(target.id, tensor)
            return
        x, _ = without_padding(tensor.detach(), self.mask)
        if x.numel():
            self.add(target.id, x, self.split, with_curve=self.split == "calib")


def compare(
    model: LoadedModel | nn.Module,
    calib_batches: Callable[[], Iterable[Any]] | Iterable[Any],
    heldout_batches: Callable[[], Iterable[Any]] | Iterable[Any] | None,
    config: CalibrationConfig | None = None,
    bits: list[int] | None = None,
    *,
    tables: dict[int, ScaleTable] | None = None,
    seed: int | None = None,
    curve_points: int = 100,
    progress: Progress | None = None,
    group: Any = None,
    reductions: tuple[str, ...] | None = None,
) -> ComparisonReport:
    """Calibrate at every bit width (unless ``tables`` are given), then measure every method.

    ``calib_batches``/``heldout_batches``: functions giving a fresh pass over the same batches, or
    re-iterable collections (a list, a DataLoader), of anything ``calibrate`` takes as a batch.
    ``bits`` defaults to ``config.bits``. Several processes (``group``, or an initialized default
    process group): each measures its share of the batches, and every process returns the whole report.
    ``reductions`` (default: ``config.reduction`` alone): with several, each is calibrated and the later
    ones' methods are reported as ``<method>@<reduction>`` (e.g. ``octav@union``) next to the first's.
    """
    model = as_loaded(model)
    share = share_of(group)
    config = config or CalibrationConfig()
    bits = bits or [config.bits]
    calib_batches = batch_source(calib_batches, "calibration batches")
    heldout_batches = (
        batch_source(heldout_batches, "held-out batches") if heldout_batches is not None else None
    )
    if tables is not None:
        first = next(iter(calib_batches()), None)
        for table in tables.values():
            if first is not None:
                check_targets(table, model, first)
    else:
        reductions = reductions or (config.reduction,)
        first_config = dataclasses.replace(config, reduction=reductions[0])
        tables = calibrate_each(
            model, calib_batches, first_config, bits, seed=seed, progress=progress, group=share
        )
        for reduction in reductions[1:]:
            other = dataclasses.replace(config, reduction=reduction)
            more = calibrate_each(
                model, calib_batches, other, bits, seed=seed, progress=progress, group=share
            )
            _add_reduction(tables, more, reduction)
    evaluator = _Evaluator(tables, curve_points)
    counts = {"calib": 0, "heldout": 0}
    passes = [("calib", calib_batches)] + ([("heldout", heldout_batches)] if heldout_batches else [])
    if share is not None:  # weights are shared out: each is measured by one process
        evaluator.work = SharedWork(share.rank, lambda w: evaluator.add_weight(*w))
    if model.hookable:
        with capture_activations(model, evaluator.deliver) as run:
            for split, source in passes:
                evaluator.split = split

                def step(i: int, batch: Batch, split: str = split) -> None:
                    check_finite_inputs(batch, f"{_SPLIT_NAMES[split]} batch {i}")
                    mask = batch.kwargs.get("attention_mask") if config.mask_padding else None
                    evaluator.mask = (
                        mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                    )
                    evaluator.batch = i
                    run(batch)

                tick = (
                    (lambda done, split=split: progress(f"evaluating {split}", done, None))
                    if progress
                    else None
                )
                if share is None:
                    for i, batch in enumerate(source()):
                        step(i, batch)
                        counts[split] = i + 1
                        if tick:
                            tick(i + 1)
                else:
                    counts[split] = share.each_batch(source(), step, evaluator.work, tick)
    fixed = weight_targets(model.module)  # TorchScript and exported graphs

    def measure_fixed() -> None:
        for i, (target, weight, _) in enumerate(fixed):
            if share is None or i % share.world == share.rank:
                evaluator.add_weight(target.id, weight)

    if share is None:
        measure_fixed()
    else:

        def part() -> dict[str, Any]:
            if evaluator.work is not None:
                evaluator.work.run()
            measure_fixed()
            return evaluator.part()

        evaluator.absorb(share.gather("gathering the error statistics", part))
    if not evaluator.stats:
        raise CalibrationError("Nothing to compare: no target was calibrated.")
    return _assemble(tables, evaluator, bits, counts)


def _add_reduction(tables: dict[int, ScaleTable], more: dict[int, ScaleTable], reduction: str) -> None:
    """``more``'s methods into ``tables`` as ``<method>@<reduction>`` (weights: the same values)."""
    for b, table in tables.items():
        names = table.methods
        for tid, entry in table.targets.items():
            extra = more[b].targets.get(tid)
            if extra is not None:
                entry.methods |= {f"{name}@{reduction}": result for name, result in extra.methods.items()}
        table.meta["methods"] = names + [f"{name}@{reduction}" for name in names]


def _assemble(
    tables: dict[int, ScaleTable], ev: _Evaluator, bits: list[int], counts: dict[str, int]
) -> ComparisonReport:
    first = tables[bits[0]]
    reports: dict[str, TargetReport] = {}
    for b, table in tables.items():
        for tid, entry in table.targets.items():
            rep = reports.setdefault(tid, TargetReport(tid, entry.kind, entry.op, entry.signed))
            for name, result in entry.methods.items():
                calls = 1 if entry.kind == "weight" else max(table.meta.get("batches", 1), 1)
                rep.rows.append(
                    MethodRow(
                        name,
                        b,
                        result.amax.reshape(-1).tolist(),
                        ev.stats.get((tid, b, name, "calib"), EMPTY_STATS),
                        ev.stats.get((tid, b, name, "heldout"), EMPTY_STATS),
                        result.seconds / calls,
                        calls,
                        target_bits=entry.bits,
                    )
                )
            if (tid, b) in ev.curves:
                rep.curve_s[b] = ev.curve_s[(tid, b)].tolist()
                rep.curves[b] = [curve for _, curve in ev.curves[(tid, b)]]
            finding = _appendix_g(rep, b, table)
            if finding is not None:
                rep.findings.append(finding)
    return ComparisonReport(
        reports,
        first.methods,
        bits,
        counts["calib"],
        counts["heldout"],
        {k: v for k, v in first.meta.items() if k not in ("targets", "bits")},
    )


def _appendix_g(rep: TargetReport, bits: int, table: ScaleTable) -> AppendixGFinding | None:
    """Flag a non-convex MSE (more than one significant minimum) or OCTAV vs sweep more than 2x apart."""
    rows = {r.method: r for r in rep.rows if r.bits == bits}
    octav, sweep = rows.get("octav"), rows.get("sweep")
    curves, grid_s = rep.curves.get(bits, []), rep.curve_s.get(bits, [])
    minima = [significant_minima(torch.tensor(c), PROMINENCE) for c in curves]
    # Appendix G's shape: a minimum near the bulk and another at least 2x further out (near the outliers);
    # the jagged curve of coarse, discrete data has close minima that are not this phenomenon.
    nonconvex = [i for i, m in enumerate(minima) if len(m) > 1 and grid_s[m[-1]] >= 2 * grid_s[m[0]]]
    ratio = None
    if octav and sweep and rep.kind == "activation":
        ratio = max(sweep.amax[0] / octav.amax[0], octav.amax[0] / sweep.amax[0])
    if not nonconvex and (ratio is None or ratio <= DISAGREEMENT):
        return None
    methods = table.targets[rep.target].methods
    octav_per_batch = methods["octav"].per_batch if octav else None
    sweep_per_batch = methods["sweep"].per_batch if sweep else None
    per_batch: dict[str, list[float]] = {}
    disagree: list[int] = []
    if octav_per_batch is not None and sweep_per_batch is not None:
        per_batch = {"octav": octav_per_batch.tolist(), "sweep": sweep_per_batch.tolist()}
        ratios = [
            max(float(s / o), float(o / s)) for o, s in zip(octav_per_batch, sweep_per_batch, strict=True)
        ]
        disagree = [i for i, batch_ratio in enumerate(ratios) if batch_ratio > DISAGREEMENT]
    return AppendixGFinding(
        target=rep.target,
        bits=bits,
        minima_per_batch=[len(m) for m in minima],
        nonconvex_batches=nonconvex,
        disagreeing_batches=disagree,
        octav_amax=octav.amax[0] if octav else None,
        sweep_amax=sweep.amax[0] if sweep else None,
        octav_mse=octav.mse if octav else None,
        sweep_mse=sweep.mse if sweep else None,
        ratio=ratio,
        sweep_small_zeroed_fraction=(
            sweep.calib.small_zeroed / sweep.calib.small if sweep and sweep.calib.small else None
        ),
        per_batch_amax=per_batch,
    )
