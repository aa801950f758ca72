"""Model-output fidelity of simulated quantization, per method and bit width (PTQ's Tables 3 and 5)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .collect import capture_activations
from .core import Batch, LoadedModel, as_loaded
from .coverage import check_targets
from .data import batch_source, check_finite_inputs
from .distributed import share_of
from .errors import CalibrationError
from .metrics import sqnr_from
from .scales import ScaleTable
from .simulate import apply_scales


@dataclass
class Fidelity:
    method: str
    bits: int
    scales: str  # which scale file (or calibration) the row comes from
    samples: int
    accuracy: float | None  # top-1 against labels, when the data has labels
    float_accuracy: float | None
    agreement: float | None  # top-1 agreement with the float model, for (N, classes) outputs
    cosine: float  # mean per-sample cosine similarity of outputs
    mse: float
    sqnr_db: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)  # type: ignore[no-any-return]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CalibrationError(f"Cannot compare model outputs of type {type(out).__name__}; expected a tensor.")


def evaluate(
    model: LoadedModel | nn.Module,
    tables: list[ScaleTable],
    batches: Callable[[], Iterable[Any]] | Iterable[Any],
    methods: list[str] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    names: list[str] | None = None,
    group: Any = None,
) -> list[Fidelity]:
    """Run the float model and each (scale file, method) simulation on ``batches``; compare outputs.

    ``batches``: a function giving a pass over them, or a re-iterable collection (a list, a
    DataLoader) of anything ``calibrate`` takes as a batch. ``names`` label the tables in the results
    (default: their position). Several processes (``group``, or an initialized default process group):
    each runs its share of the batches, and every process returns the whole result.
    """
    model = as_loaded(model)
    share = share_of(group)
    batches = batch_source(batches)
    labels = names or [str(i) for i in range(len(tables))]
    first = next(iter(batches()), None)
    sims = []
    for name, table in zip(labels, tables, strict=True):
        if first is not None:
            check_targets(table, model, first)
        bits = int(table.meta.get("bits", 0))
        for method in methods or table.methods:
            sims.append((method, bits, name, apply_scales(model, table, method)))
    acc: dict[tuple[str, int, str], dict[str, float]] = {(m, b, n): {} for m, b, n, _ in sims}
    counts = {"float_correct": 0, "labelled": 0, "samples": 0}
    with torch.no_grad(), capture_activations(model, lambda target, x: None) as float_run:

        def step(i: int, batch: Batch) -> None:
            check_finite_inputs(batch, f"Evaluation batch {i}")
            ref = _output(float_run(batch)).float()
            counts["samples"] += ref.shape[0]
            classes = ref.dim() == 2 and ref.shape[1] > 1
            if batch.labels is not None and classes:
                counts["labelled"] += ref.shape[0]
                counts["float_correct"] += int((ref.argmax(1) == batch.labels.to(ref.device)).sum())
            for method, bits, name, sim in sims:
                out = _output(sim(*batch.args, **batch.kwargs)).float()
                _add_agreement(
                    acc[(method, bits, name)], out, ref, batch.labels if classes else None, classes
                )

        tick = (lambda done: progress("evaluating", done, None)) if progress else None
        if share is None:
            for i, batch in enumerate(batches()):
                step(i, batch)
                if tick:
                    tick(i + 1)
        else:  # each process runs its share; sums are added up in float64, in rank order
            share.each_batch(batches(), step, progress=tick)
            parts = share.gather("gathering the metrics", lambda: (acc, counts))
            acc = {key: _summed([a[key] for a, _ in parts]) for key in acc}
            counts = _summed([c for _, c in parts])  # type: ignore[assignment]
    if not counts["samples"]:
        raise CalibrationError("No evaluation batches were given.")
    return [
        _fidelity(key, a, counts["samples"], counts["labelled"], counts["float_correct"])
        for key, a in acc.items()
    ]


def _summed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def _add_agreement(
    a: dict[str, float], out: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None, classes: bool
) -> None:
    """Add one batch's sums: cosine, squared error, energy, and (class outputs) agreement and hits."""
    n = ref.shape[0]
    a["cos"] = a.get("cos", 0.0) + float(
        torch.nn.functional.cosine_similarity(out.reshape(n, -1), ref.reshape(n, -1)).sum()
    )
    a["sse"] = a.get("sse", 0.0) + float((out - ref).double().square().sum())
    a["energy"] = a.get("energy", 0.0) + float(ref.double().square().sum())
    a["count"] = a.get("count", 0.0) + ref.numel()
    if classes:
        a["agree"] = a.get("agree", 0.0) + int((out.argmax(1) == ref.argmax(1)).sum())
        if labels is not None:
            a["correct"] = a.get("correct", 0.0) + int((out.argmax(1) == labels.to(out.device)).sum())


def _fidelity(
    key: tuple[str, int, str], a: dict[str, float], samples: int, labelled: int, float_correct: int
) -> Fidelity:
    method, bits, name = key
    return Fidelity(
        method,
        bits,
        name,
        samples,
        a["correct"] / labelled if labelled and "correct" in a else None,
        float_correct / labelled if labelled else None,
        a["agree"] / samples if "agree" in a else None,
        a["cos"] / samples,
        a["sse"] / a["count"],
        sqnr_from(a["energy"], a["sse"]),
    )
