"""Model-output fidelity of simulated quantization, per method and bit width (PTQ's Tables 3 and 5)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .collect import capture_activations
from .core import LoadedModel, as_loaded
from .coverage import check_targets
from .data import batch_source, check_finite_inputs
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
) -> list[Fidelity]:
    """Run the float model and each (scale file, method) simulation on ``batches``; compare outputs.

    ``batches``: a function giving a pass over them, or a re-iterable collection (a list, a
    DataLoader) of anything ``calibrate`` takes as a batch. ``names`` label the tables in the results
    (default: their position).
    """
    model = as_loaded(model)
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
    float_correct = labelled = samples = 0
    with torch.no_grad(), capture_activations(model, lambda target, x: None) as float_run:
        for i, batch in enumerate(batches()):
            check_finite_inputs(batch, f"Evaluation batch {i}")
            ref = _output(float_run(batch)).float()
            samples += ref.shape[0]
            classes = ref.dim() == 2 and ref.shape[1] > 1
            if batch.labels is not None and classes:
                labelled += ref.shape[0]
                float_correct += int((ref.argmax(1) == batch.labels.to(ref.device)).sum())
            for method, bits, name, sim in sims:
                out = _output(sim(*batch.args, **batch.kwargs)).float()
                _add_agreement(
                    acc[(method, bits, name)], out, ref, batch.labels if classes else None, classes
                )
            if progress:
                progress("evaluating", i + 1, None)
    if not samples:
        raise CalibrationError("No evaluation batches were given.")
    return [_fidelity(key, a, samples, labelled, float_correct) for key, a in acc.items()]


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
