"""A comparison's summary: per method and bit width, relative MSE, wins and time; the paper's Appendix F.

Pure arithmetic over a ``ComparisonReport``'s rows; ``compare`` makes the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .findings import AppendixFRow, ComparisonSummary, MethodSummary

if TYPE_CHECKING:
    from .compare import ComparisonReport


def comparison_summary(report: ComparisonReport) -> ComparisonSummary:
    """Per method and bit width: mean and worst relative MSE, wins, seconds; Appendices F and G."""
    methods = [_method_summary(report, m, b) for b in report.bits for m in report.methods]
    return ComparisonSummary(
        methods=methods,
        appendix_f=_appendix_f(report.methods, methods),
        appendix_g=[f for rep in report.targets.values() for f in rep.findings],
    )


def summarize(report: ComparisonReport) -> dict[str, Any]:
    """``comparison_summary`` as JSON-able dicts (report.json's "summary", ``compare --json``)."""
    return comparison_summary(report).as_dict()


def _method_summary(report: ComparisonReport, method: str, bits: int) -> MethodSummary:
    """One method at one bit width over every target that has it: relative MSE, wins, time per tensor."""
    relative, wins, sec_w, sec_a, n_w, n_a = [], 0, 0.0, 0.0, 0, 0
    for rep in report.targets.values():
        row = next((r for r in rep.rows if r.bits == bits and r.method == method), None)
        if row is None:
            continue
        relative.append(rep.relative_mse(row))
        wins += row.mse <= rep.best_mse(bits)
        if rep.kind == "weight":
            sec_w, n_w = sec_w + row.seconds * row.calls, n_w + row.calls
        else:
            sec_a, n_a = sec_a + row.seconds * row.calls, n_a + row.calls
    return MethodSummary(
        method=method,
        bits=bits,
        mean_relative_mse=sum(relative) / len(relative) if relative else None,
        worst_relative_mse=max(relative) if relative else None,
        wins=wins,
        seconds_per_weight=sec_w / n_w if n_w else None,
        seconds_per_activation=sec_a / n_a if n_a else None,
        total_seconds=sec_w + sec_a,
        weight_tensors=n_w,
        activation_tensors=n_a,
    )


def _appendix_f(names: list[str], summaries: list[MethodSummary]) -> list[AppendixFRow]:
    """Each method's time per tensor averaged over the bit widths, and its total time over OCTAV's."""
    per_method = {name: [s for s in summaries if s.method == name] for name in names}
    totals = {
        name: sum(s.total_seconds for s in runs) / max(len(runs), 1) for name, runs in per_method.items()
    }
    octav_total = totals.get("octav")
    return [
        AppendixFRow(
            method=name,
            seconds_per_weight=_mean([s.seconds_per_weight for s in runs]),
            seconds_per_activation=_mean([s.seconds_per_activation for s in runs]),
            total_seconds=totals[name],
            octav_speedup=totals[name] / octav_total if octav_total else None,
        )
        for name, runs in per_method.items()
    ]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
