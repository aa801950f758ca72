"""Terminal rendering (rich) and machine summaries of results; no computation happens here."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .findings import AppendixFRow, AppendixGFinding, MethodSummary
from .metrics import sqnr_db
from .scales import ScaleTable

if TYPE_CHECKING:
    from .compare import ComparisonReport

# Results go to stdout; piped output gets a wide page rather than rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)


@contextmanager
def progress_bar(disabled: bool) -> Iterator[Any]:
    """A progress callback drawing one tqdm bar per stage on stderr (off when not a TTY or disabled)."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    off = disabled or not sys.stderr.isatty()

    def progress(stage: str, done: int, total: int | None) -> None:
        if off:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(
                total=total, desc=stage, unit=stage.rstrip("s"), file=sys.stderr, leave=False
            )
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        for bar in bars.values():
            bar.close()


def _fmt(values: Any) -> str:
    flat = values.reshape(-1)
    if flat.numel() == 1:
        return f"{flat.item():.5g}"
    return f"[{flat.min().item():.4g} .. {flat.max().item():.4g}] ({flat.numel()})"


def scales_summary(
    table: ScaleTable, path: Path, *, full: bool = False, method: str | None = None
) -> dict[str, Any]:
    """JSON-able summary: counts by role, seconds per method, and (full) every target's amax."""
    seconds: dict[str, float] = {}
    for entry in table.targets.values():
        for name, result in entry.methods.items():
            seconds[name] = seconds.get(name, 0.0) + result.seconds
    out: dict[str, Any] = {
        "output": str(path),
        "targets": len(table.targets),
        "weights": sum(e.kind == "weight" for e in table.targets.values()),
        "activations": sum(e.kind == "activation" for e in table.targets.values()),
        "unsigned": sorted(t for t, e in table.targets.items() if not e.signed),
        "masked": sorted(t for t, e in table.targets.items() if e.masked),
        "skipped": table.meta.get("skipped", []),
        "uncovered": table.meta.get("uncovered", []),
        "tied": {t: e.tied for t, e in sorted(table.targets.items()) if e.tied},
        "methods": table.methods,
        "seconds_per_method": {k: round(v, 6) for k, v in seconds.items()},
        "meta": {k: v for k, v in table.meta.items() if k != "targets"},
    }
    if full:
        out["scales"] = {
            tid: {
                **e.describe(table.convention),
                "amax": {m: r.amax.tolist() for m, r in e.methods.items() if method in (None, m)},
                "scale": {
                    m: r.scale(e.grid(table.convention)).tolist()
                    for m, r in e.methods.items()
                    if method in (None, m)
                },
            }
            for tid, e in table.targets.items()
        }
    return out


def render_calibration(table: ScaleTable, path: Path) -> None:
    """Summary after `calibrate`: targets by role, bits and grid; time per method; the output path."""
    groups: dict[tuple[str, int, str, str], int] = {}
    for e in table.targets.values():
        role = e.role if e.kind == "weight" or e.role == "input" else e.role.split(".")[-1]
        key = (
            f"{e.kind}: {e.op} {role}",
            e.bits,
            "signed" if e.signed else "unsigned",
            "per-channel" if e.axis is not None else "per-tensor",
        )
        groups[key] = groups.get(key, 0) + 1
    tbl = Table(title=f"Calibrated {len(table.targets)} targets over {table.meta.get('batches')} batches")
    for col in ("targets", "bits", "grid", "granularity", "count"):
        tbl.add_column(col, justify="right" if col in ("bits", "count") else "left")
    for (what, bits, grid, gran), count in sorted(groups.items()):
        tbl.add_row(what, str(bits), grid, gran, str(count))
    console.print(tbl)
    summary = scales_summary(table, path)
    timing = Table(title="Time per method (all targets)")
    timing.add_column("method")
    timing.add_column("seconds", justify="right")
    for name, sec in summary["seconds_per_method"].items():
        timing.add_row(name, f"{sec:.3f}")
    console.print(timing)
    if summary["masked"]:
        console.print(f"Padding left out of {len(summary['masked'])} targets (attention_mask == 0).")
    if summary["skipped"]:
        console.print(f"Skipped: {', '.join(summary['skipped'])}")
    for tid, others in summary["tied"].items():
        console.print(f"Tied: {tid} is also {', '.join(others)} (one weight target)")
    render_uncovered(summary["uncovered"])
    console.print(f"Wrote {path}")


def render_uncovered(uncovered: list[dict[str, Any]]) -> None:
    """The weights no target calibrates, with why: never a silent partial scale file."""
    if not uncovered:
        console.print("Coverage: every weight (floating point, 2+ dimensions) is calibrated.")
        return
    tbl = Table(title=f"Not calibrated: {len(uncovered)} weights")
    for col in ("parameter", "shape", "reason"):
        tbl.add_column(col, overflow="fold")
    for u in uncovered:
        tbl.add_row(u["parameter"], "x".join(map(str, u["shape"])), u["reason"])
    console.print(tbl)


def render_scales(table: ScaleTable, method: str | None) -> None:
    """`inspect`: one row per target, one column per method's amax."""
    methods = [m for m in table.methods if method in (None, m)]
    tbl = Table(
        title=f"{len(table.targets)} targets, grid {table.convention}, "
        f"{table.meta.get('batches')} batches, seed {table.meta.get('seed')}"
    )
    tbl.add_column("target", overflow="fold")
    for col in ("bits", "grid", "axis", *methods):
        tbl.add_column(col)
    for tid, e in table.targets.items():
        tbl.add_row(
            tid,
            str(e.bits),
            "signed" if e.signed else "unsigned",
            "-" if e.axis is None else str(e.axis),
            *[_fmt(e.methods[m].amax) if m in e.methods else "-" for m in methods],
        )
    console.print(tbl)


def render_comparison(report: ComparisonReport) -> None:
    """`compare`: methods by relative MSE, Appendix F's timing, Appendix G's findings, worst targets."""
    from .compare import comparison_summary

    summary = comparison_summary(report)
    _render_methods(report, summary.methods)
    _render_appendix_f(summary.appendix_f)
    _render_appendix_g(summary.appendix_g)
    _render_worst_targets(report)


def _render_methods(report: ComparisonReport, methods: list[MethodSummary]) -> None:
    tbl = Table(
        title=f"Methods over {len(report.targets)} targets ({report.batches} calibration, "
        f"{report.heldout_batches} held-out batches); MSE relative to the best method per target"
    )
    for col in (
        "method",
        "bits",
        "mean rel. MSE",
        "worst rel. MSE",
        "wins",
        "s/weight",
        "s/activation",
        "total s",
    ):
        tbl.add_column(col, justify="left" if col == "method" else "right")
    for m in methods:
        tbl.add_row(
            m.method,
            str(m.bits),
            _num(m.mean_relative_mse),
            _num(m.worst_relative_mse),
            str(m.wins),
            _num(m.seconds_per_weight),
            _num(m.seconds_per_activation),
            _num(m.total_seconds),
        )
    console.print(tbl)


def _render_appendix_f(rows: list[AppendixFRow]) -> None:
    tbl = Table(title="Appendix F: calibration time per tensor (averaged over bit widths)")
    for col in ("method", "s/weight", "s/activation", "total s", "x OCTAV's time"):
        tbl.add_column(col, justify="left" if col == "method" else "right")
    for row in rows:
        tbl.add_row(
            row.method,
            _num(row.seconds_per_weight),
            _num(row.seconds_per_activation),
            _num(row.total_seconds),
            _num(row.octav_speedup),
        )
    console.print(tbl)


def _render_appendix_g(findings: list[AppendixGFinding]) -> None:
    if not findings:
        console.print(
            "Appendix G: every target's MSE had one minimum, and OCTAV and the sweep agreed within 2x."
        )
        return
    tbl = Table(title="Appendix G: non-convex MSE, or OCTAV and the sweep more than 2x apart")
    for col in (
        "target",
        "bits",
        "octav",
        "sweep",
        "MSE octav",
        "MSE sweep",
        "bulk zeroed by sweep",
        "non-convex batches",
        "disagreeing batches",
    ):
        tbl.add_column(col, overflow="fold")
    for f in findings:
        tbl.add_row(
            f.target,
            str(f.bits),
            _num(f.octav_amax),
            _num(f.sweep_amax),
            _num(f.octav_mse),
            _num(f.sweep_mse),
            _num(f.sweep_small_zeroed_fraction),
            str(f.nonconvex_batches),
            str(f.disagreeing_batches),
        )
    console.print(tbl)


def _render_worst_targets(report: ComparisonReport, count: int = 8) -> None:
    worst = sorted(
        ((rep.relative_mse(r), rep.target, r) for rep in report.targets.values() for r in rep.rows),
        key=lambda x: -x[0],
    )[:count]
    tbl = Table(title="Worst targets (method, bits: MSE relative to the best method)")
    for col in ("target", "method", "bits", "rel. MSE", "SQNR dB", "clipped", "zeroed"):
        tbl.add_column(col)
    for rel, tid, r in worst:
        tbl.add_row(
            tid,
            r.method,
            str(r.bits),
            _num(rel),
            _num(sqnr_db(r.calib)),
            _num(r.calib.clipped / max(r.calib.values, 1)),
            _num(r.calib.zeroed / max(r.calib.values, 1)),
        )
    console.print(tbl)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def render_evaluation(rows: list[Any]) -> None:
    """`evaluate`: one row per method and bit width."""
    tbl = Table(title="Simulated quantized model vs float model on held-out data")
    several = len({r.scales for r in rows}) > len({r.bits for r in rows})
    for col in (
        "method",
        "bits",
        *(["scales"] if several else []),
        "top-1",
        "float top-1",
        "agreement",
        "cosine",
        "MSE",
        "SQNR dB",
    ):
        tbl.add_column(col, justify="left" if col in ("method", "scales") else "right")
    for r in sorted(rows, key=lambda r: (r.bits, r.scales, r.method)):
        tbl.add_row(
            r.method,
            str(r.bits),
            *([r.scales] if several else []),
            _num(r.accuracy),
            _num(r.float_accuracy),
            _num(r.agreement),
            _num(r.cosine),
            _num(r.mse),
            _num(r.sqnr_db),
        )
    console.print(tbl)
