"""Simulated quantized inference: the model run with every calibrated target fake-quantized."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .collect import capture_activations
from .core import Batch, LoadedModel, as_loaded
from .errors import SpecError
from .graphs import weight_targets
from .grid import Convention, fake_quantize
from .groups import fake_quantize_groups
from .offload import offloads
from .scales import ScaleTable, check_fingerprint
from .target import Target


class SimulatedModel(nn.Module):
    """Runs ``model`` with the scale file's weights and activations quantized to their grids.

    The weights are not edited: each calibrated op gets a fake-quantized copy of its Parameter
    (made once) in place of the Parameter, and its input fake-quantized at run time, exactly where
    calibration saw them. Targets without a scale stay in float. Weights a device map offloads are
    quantized again at each use, not kept: memory stays at the resident layers.
    """

    def __init__(self, model: nn.Module, table: ScaleTable, method: str) -> None:
        super().__init__()
        self.model = model
        self.table, self.method = table, method
        self.convention: Convention = table.convention  # type: ignore[assignment]
        self._weights: dict[str, torch.Tensor] = {}
        self._keep = not offloads(model)

    def _quantize(self, target: Target, x: torch.Tensor) -> torch.Tensor | None:
        entry = self.table.targets.get(target.id)
        if entry is None or not x.is_floating_point() or self.method not in entry.methods:
            return None
        if target.kind == "weight":
            cached = self._weights.get(target.id) if target.param else None  # computed weights change
            if cached is None or cached.device != x.device:
                amax = entry.methods[self.method].amax.to(x.device)
                if entry.group_size is not None and entry.axis is not None:
                    cached = fake_quantize_groups(
                        x,
                        amax,
                        entry.bits,
                        axis=entry.axis,
                        group_size=entry.group_size,
                        convention=self.convention,
                    ).contiguous()
                else:
                    cached = fake_quantize(
                        x, amax, entry.bits, signed=True, axis=entry.axis, convention=self.convention
                    ).contiguous()  # type: ignore[arg-type]
                if self._keep:
                    self._weights[target.id] = cached
            return cached
        amax = entry.methods[self.method].amax.to(x.device)
        return fake_quantize(x, amax, entry.bits, signed=entry.signed, convention=self.convention)  # type: ignore[arg-type]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with capture_activations(LoadedModel(self.model, "module", None), self._quantize) as run:
            return run(Batch(args, kwargs))


def apply_scales(model: nn.Module | LoadedModel, scales: ScaleTable, method: str = "octav") -> SimulatedModel:
    """Return a model that runs ``model`` with its calibrated weights and activations fake-quantized.

    The original model is untouched. Raises ScaleFileError when the scale file belongs to other
    weights or lacks ``method``.
    """
    module = as_loaded(model).module
    if isinstance(module, torch.jit.ScriptModule):
        raise SpecError("TorchScript modules cannot be simulated (they refuse hooks); use torch.export.")
    check_fingerprint(scales, module)
    scales.require_method(method)
    sim = SimulatedModel(module, scales, method)
    fixed = weight_targets(module)  # an exported graph: its weights are quantized in a copy
    if fixed:
        sim.model = copy.deepcopy(module)
        for target, weight, _ in weight_targets(sim.model):
            quantized = sim._quantize(target, weight)
            if quantized is not None:
                with torch.no_grad():
                    weight.copy_(quantized)  # ``weight`` is a detached view of the copy's parameter
    return sim.eval()
