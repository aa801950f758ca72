"""Simulated quantized inference: a copy of the model that fake-quantizes every calibrated target."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
from torch import nn

from .collect import Target, capture_activations, weight_targets
from .errors import ScaleFileError, SpecError
from .grid import Convention, fake_quantize
from .loading import Batch, LoadedModel
from .scales import ScaleTable, check_fingerprint


class SimulatedModel(nn.Module):
    """``model`` with weights fake-quantized in place (in a copy) and activations at run time.

    Calling it runs the copy with the targets' Linear/Conv inputs and matmul operands quantized to
    the grid of the scale file (``method``'s amax); targets without a scale stay in float.
    """

    def __init__(self, model: nn.Module, table: ScaleTable, method: str) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.table, self.method = table, method
        self.convention: Convention = table.convention  # type: ignore[assignment]
        self.activation_targets = {t: e for t, e in table.targets.items() if e.kind == "activation"}
        for target, weight, _ in weight_targets(self.model):
            entry = table.targets.get(target.id)
            if entry is None or method not in entry.methods:
                continue
            quantized = fake_quantize(
                weight,
                entry.methods[method].amax.to(weight.device),
                entry.bits,
                signed=True,
                axis=entry.axis,
                convention=self.convention,
            )  # type: ignore[arg-type]
            with torch.no_grad():
                weight.copy_(quantized)  # ``weight`` is a detached view of the copy's parameter

    def _quantize(self, target: Target, x: torch.Tensor) -> torch.Tensor | None:
        entry = self.activation_targets.get(target.id)
        if entry is None or not x.is_floating_point() or self.method not in entry.methods:
            return None
        amax = entry.methods[self.method].amax.to(x.device)
        return fake_quantize(x, amax, entry.bits, signed=entry.signed, convention=self.convention)  # type: ignore[arg-type]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with capture_activations(LoadedModel(self.model, "module", None), self._quantize) as run:  # type: ignore[arg-type]
            return run(Batch(args, kwargs))


def apply_scales(model: nn.Module | LoadedModel, scales: ScaleTable, method: str = "octav") -> SimulatedModel:
    """Return a copy of ``model`` whose calibrated weights and activations are fake-quantized.

    The original model is untouched. Raises ScaleFileError when the scale file belongs to other
    weights or lacks ``method``.
    """
    module = model.module if isinstance(model, LoadedModel) else model
    if isinstance(module, torch.jit.ScriptModule):
        raise SpecError("TorchScript modules cannot be simulated (they refuse hooks); use torch.export.")
    check_fingerprint(scales, module)
    if method not in scales.methods:
        raise ScaleFileError(f"The scale file has no method '{method}'. It has: {', '.join(scales.methods)}.")
    return SimulatedModel(module, scales, method).eval()
