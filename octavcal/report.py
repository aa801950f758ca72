"""Write a comparison to files: report.json, targets.csv, PNG plots and one self-contained report.html."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .compare import ComparisonReport, comparison_summary
from .files import atomic_write
from .findings import ComparisonSummary
from .metrics import sqnr_db

CSV_COLUMNS = [
    "target",
    "target_bits",
    "kind",
    "op",
    "signed",
    "bits",
    "method",
    "amax_min",
    "amax_max",
    "mse",
    "heldout_mse",
    "relative_mse",
    "sqnr_db",
    "heldout_sqnr_db",
    "clipped_fraction",
    "zeroed_fraction",
    "seconds_per_call",
    "calls",
]


# report.html's summary tables: one column per field of MethodSummary, AppendixFRow, AppendixGFinding
_TIME_COLUMNS = ["seconds_per_weight", "seconds_per_activation", "total_seconds"]
METHOD_COLUMNS = ["method", "bits", "mean_relative_mse", "worst_relative_mse", "wins", *_TIME_COLUMNS]
APPENDIX_F_COLUMNS = ["method", *_TIME_COLUMNS, "octav_speedup"]
APPENDIX_G_COLUMNS = [
    "target",
    "bits",
    "octav_amax",
    "sweep_amax",
    "octav_mse",
    "sweep_mse",
    "ratio",
    "sweep_small_zeroed_fraction",
    "nonconvex_batches",
    "disagreeing_batches",
]


def target_rows(report: ComparisonReport) -> list[dict[str, Any]]:
    rows = []
    for rep in report.targets.values():
        for r in rep.rows:
            rows.append(
                {
                    "target": rep.target,
                    "target_bits": r.target_bits,
                    "kind": rep.kind,
                    "op": rep.op,
                    "signed": rep.signed,
                    "bits": r.bits,
                    "method": r.method,
                    "amax_min": min(r.amax),
                    "amax_max": max(r.amax),
                    "mse": r.mse,
                    "heldout_mse": r.heldout_mse,
                    "relative_mse": rep.relative_mse(r),
                    "sqnr_db": sqnr_db(r.calib),
                    "heldout_sqnr_db": sqnr_db(r.heldout) if r.heldout.values else None,
                    "clipped_fraction": r.calib.clipped / max(r.calib.values, 1),
                    "zeroed_fraction": r.calib.zeroed / max(r.calib.values, 1),
                    "seconds_per_call": r.seconds,
                    "calls": r.calls,
                }
            )
    return rows


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(
    report: ComparisonReport, out: Path, *, plots: bool = True, max_curve_plots: int = 6
) -> dict[str, Path]:
    """Write every file into ``out`` and return their paths by kind."""
    summary = comparison_summary(report)
    rows = target_rows(report)
    paths = {"json": out / "report.json", "csv": out / "targets.csv", "html": out / "report.html"}
    curves = {
        t: {"s": rep.curve_s, "mse_per_batch": rep.curves} for t, rep in report.targets.items() if rep.curves
    }
    doc = {
        "summary": summary.as_dict(),
        "targets": rows,
        "curves": curves,
        "batches": report.batches,
        "heldout_batches": report.heldout_batches,
        "bits": report.bits,
        "methods": report.methods,
        "meta": report.meta,
    }
    atomic_write(paths["json"], json.dumps(_json_safe(doc), indent=1))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(paths["csv"], table.getvalue())
    images: dict[str, bytes] = _plots(report, summary, max_curve_plots) if plots else {}
    for name, png in images.items():
        paths[name] = out / f"{name}.png"
        atomic_write(paths[name], png)
    atomic_write(paths["html"], _html(report, summary, rows, images))
    return paths


def _plots(report: ComparisonReport, summary: ComparisonSummary, max_curve_plots: int) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    images = {}
    bits = report.bits[0]
    flagged = [f.target for f in summary.appendix_g if f.bits == bits]
    worst = sorted(
        (rep for rep in report.targets.values() if rep.curves.get(bits)),
        key=lambda rep: -max((rep.relative_mse(r) for r in rep.rows if r.bits == bits), default=1),
    )
    chosen = list(dict.fromkeys(flagged + [rep.target for rep in worst]))[:max_curve_plots]
    for i, tid in enumerate(chosen):  # Figures 1 and 5d/e: MSE vs s, per batch, each method's choice
        rep = report.targets[tid]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for j, curve in enumerate(rep.curves[bits]):
            ax.plot(rep.curve_s[bits], curve, lw=1, alpha=0.7, label=f"batch {j}" if j < 10 else None)
        for r in rep.rows:
            if r.bits == bits:
                ax.axvline(r.amax[0], ls="--", lw=1, color="k" if r.method == "octav" else "gray")
                ax.text(r.amax[0], ax.get_ylim()[1], r.method, rotation=90, va="top", fontsize=7)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set(title=f"{tid} ({bits}-bit)", xlabel="clipping scalar s", ylabel="MSE, eq. (1)")
        ax.legend(fontsize=6, ncol=2)
        images[f"curve_{i}"] = png(fig)
    for kind in ("activation", "weight"):  # Figures 2a and 5a: calibrated scalars per layer
        reps = [rep for rep in report.targets.values() if rep.kind == kind]
        if not reps:
            continue
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for m in report.methods:
            ys = [
                next((max(r.amax) for r in rep.rows if r.method == m and r.bits == bits), math.nan)
                for rep in reps
            ]
            ax.plot(range(len(reps)), ys, marker="o", ms=3, lw=1, label=m)
        ax.set(
            title=f"{kind} clipping scalars per target ({bits}-bit; per-channel: the largest)",
            xlabel="target index",
            ylabel="amax",
        )
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        images[f"scalars_{kind}"] = png(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([row.method for row in summary.appendix_f], [row.total_seconds for row in summary.appendix_f])
    ax.set(title="Calibration time per method (Appendix F)", ylabel="seconds")
    images["time"] = png(fig)
    return images


def _table(columns: list[str], rows: list[Sequence[Any]]) -> str:
    """An HTML table: one heading per column, one cell per value of each row."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_tables(summary: ComparisonSummary) -> str:
    """The Methods, Appendix F and Appendix G sections of report.html: one column per field named."""

    def table(items: Sequence[Any], fields: list[str]) -> str:
        return _table(fields, [[getattr(item, name) for name in fields] for item in items])

    return (
        "<h2>Methods</h2>"
        + table(summary.methods, METHOD_COLUMNS)
        + "<h2>Appendix F: time</h2>"
        + table(summary.appendix_f, APPENDIX_F_COLUMNS)
        + "<h2>Appendix G: non-convex MSE or OCTAV vs sweep &gt; 2x</h2>"
        + (table(summary.appendix_g, APPENDIX_G_COLUMNS) if summary.appendix_g else "<p>None.</p>")
    )


def _html(
    report: ComparisonReport, summary: ComparisonSummary, rows: list[dict[str, Any]], images: dict[str, bytes]
) -> str:
    figs = "".join(
        f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
        f"<figcaption>{n}</figcaption></figure>"
        for n, b in images.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:12px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{background:#eee}figure{display:inline-block;margin:0.5em}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>octavcal comparison</title>'
        f"<style>{style}</style></head><body><h1>octavcal comparison</h1>"
        f"<p>{report.batches} calibration batches, {report.heldout_batches} held-out batches, bits "
        f"{', '.join(map(str, report.bits))}, methods {', '.join(report.methods)}.</p>"
        + _summary_tables(summary)
        + f"<h2>Plots</h2>{figs}<h2>Targets</h2>"
        + _table(CSV_COLUMNS, [[r[c] for c in CSV_COLUMNS] for r in rows])
        + "</body></html>"
    )


def write_evaluation(rows: list[Any], out: Path) -> dict[str, Path]:
    """evaluation.json and fidelity.png (fidelity vs bits per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {"json": out / "evaluation.json", "png": out / "fidelity.png"}
    atomic_write(paths["json"], json.dumps(_json_safe([r.as_dict() for r in rows]), indent=1))
    metric = "accuracy" if all(r.accuracy is not None for r in rows) else "cosine"
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method in dict.fromkeys(r.method for r in rows):
        pts = sorted((r.bits, getattr(r, metric)) for r in rows if r.method == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if metric == "accuracy" and rows and rows[0].float_accuracy is not None:
        ax.axhline(rows[0].float_accuracy, color="k", ls="--", lw=1, label="float")
    ax.set(xlabel="bits", ylabel=metric, title=f"Simulated quantization: {metric} vs bits")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    atomic_write(paths["png"], buf.getvalue())
    return paths
