"""Which targets a model has: discovery, the weights no target calibrates (with why), and the check that a
scale file's targets are this model's."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from torch import nn

from .collect import Capture, capture_activations
from .core import LoadedModel, as_loaded
from .data import batches_of
from .errors import ScaleFileError
from .graphs import weight_targets
from .scales import ScaleTable
from .target import Target

# What a Parameter that no calibrated op reads is used for, when it is one of these ops.
_EMBEDDINGS = {"embedding", "embedding_bag"}
_RECURRENT = {
    "lstm",
    "gru",
    "rnn_tanh",
    "rnn_relu",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
}
# Ops that multiply by a weight but that octavcal does not model: --strict refuses these.
_UNMODELLED_PRODUCTS = {
    "einsum", "addbmm", "addmv", "mv", "bilinear", "tensordot", "conv_tbc", "dot", "inner",
    "_native_multi_head_attention", "_transformer_encoder_layer_fwd", "scaled_dot_product_attention",
}  # fmt: skip


def coverage(model: nn.Module, capture: Capture) -> list[dict[str, Any]]:
    """Every floating-point Parameter with 2 or more dimensions that no target calibrates, with why.

    Categories: 'embedding' (a lookup table), 'recurrent' (LSTM/GRU/RNN weights), 'unmodelled' (a
    product octavcal does not model, e.g. einsum), 'other-op' (read only by other ops, e.g. an added
    position embedding) and 'unused' (never read in the forward pass that was watched).
    """
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in capture.aliases or p.dim() < 2 or not p.is_floating_point():
            continue
        ops = sorted(capture.uses.get(name, ()))
        if name in capture.calibrated:
            other = sorted(set(ops) & (_UNMODELLED_PRODUCTS | _RECURRENT))
            if other:  # calibrated where a modelled op reads it, but not where this one does
                reason = f"also read by {', '.join(other)}, which octavcal does not model (that use is float)"
                out.append(
                    {"parameter": name, "shape": list(p.shape), "category": "unmodelled", "reason": reason}
                )
            continue
        if set(ops) & _EMBEDDINGS:
            category, reason = "embedding", "embedding table (a lookup, not a product)"
        elif set(ops) & _RECURRENT:
            category, reason = (
                "recurrent",
                f"recurrent weights ({', '.join(sorted(set(ops) & _RECURRENT))}), "
                "which octavcal does not model",
            )
        elif set(ops) & _UNMODELLED_PRODUCTS:
            products = ", ".join(sorted(set(ops) & _UNMODELLED_PRODUCTS))
            category, reason = "unmodelled", f"read by {products}, a product octavcal does not model"
        elif ops:
            category, reason = (
                "other-op",
                f"read only by {', '.join(ops[:4])}, not a product with activations",
            )
        else:
            category, reason = "unused", "never used in the forward pass"
        out.append({"parameter": name, "shape": list(p.shape), "category": category, "reason": reason})
    return out


STRICT_CATEGORIES = ("recurrent", "unmodelled")


def discover_targets(model: LoadedModel | nn.Module, batch: Any) -> list[Target]:
    """The targets one forward pass over ``batch`` meets, in call order (each once)."""
    loaded = as_loaded(model)
    found: list[Target] = []
    if not loaded.hookable:
        return [t for t, _, _ in weight_targets(loaded.module)]
    with capture_activations(loaded, lambda t, _: found.append(t)) as capture:
        capture(next(batches_of([batch])))
    return list(dict.fromkeys(found)) + [t for t, _, _ in weight_targets(loaded.module)]


def targets_fingerprint(targets: Iterable[Target]) -> str:
    """sha256 over the targets' ids, ops and kinds: which tensors a scale file's scalars belong to."""
    rows = sorted({(t.id, t.op, t.kind) for t in targets})
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def check_targets(table: ScaleTable, model: LoadedModel | nn.Module, batch: Any, path: Any = None) -> None:
    """Refuse a scale file whose targets are not this model's (same weights, other attention code:
    its matmul scales would land on other tensors), naming the first difference."""
    found = {t.id: t for t in discover_targets(model, batch)}
    calibrated = set(table.targets) | set(table.meta.get("skipped") or [])
    what = table.describe_source(path)
    extra = sorted(calibrated - set(found))
    missing = sorted(set(found) - calibrated)
    if extra or missing:
        first = (
            f"the file has '{extra[0]}', which this model does not compute"
            if extra
            else f"this model computes '{missing[0]}', which the file does not have"
        )
        raise ScaleFileError(
            f"{what} does not fit this model's targets ({len(extra)} only in the file, {len(missing)} only "
            f"in the model; first: {first}). Calibrate this model, or pass its own scale file."
        )
    if int(table.meta.get("format_version", 2)) >= 2:
        for tid, entry in table.targets.items():
            if entry.op != found[tid].op or entry.kind != found[tid].kind:
                raise ScaleFileError(
                    f"{what} does not fit this model's targets: '{tid}' is a {entry.kind} of {entry.op} in "
                    f"the file and a {found[tid].kind} of {found[tid].op} here. Calibrate this model."
                )
