"""Quantization-aware training: dynamic OCTAV and the gradient estimators of Section 4.

``prepare_qat`` fake-quantizes a model's Linear/Conv weights (per output channel) and inputs (per
tensor), and its matmul operands, in the forward pass. Clipping scalars come from OCTAV recomputed
at every forward (dynamic), from a scale file (static), or from max-scaling; they receive no gradient.
The backward pass uses one of the paper's estimators:

| estimator | dQ(x)/dx (signed; Appendix A for unsigned) |
| --- | --- |
| ``ste`` | 1 everywhere |
| ``pwl`` | 1 inside [-s, s], 0 outside (unsigned: 1 on [0, s]) |
| ``mad`` | 1 inside, s/abs(x) outside, eq. (10) (unsigned: 1 for x <= s, s/x above) |
| ``mph`` | MAD for weights, PWL for activations (the paper's recommendation) |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bitrules import BitRules
from .collect import capture_activations
from .core import Batch, LoadedModel
from .coverage import discover_targets
from .errors import SpecError
from .graphs import LAYER_TYPES, TRANSPOSED_CONV_TYPES
from .grid import Convention, Grid, amax_view, check_bits
from .methods import max_scaling, octav, solves_by_sorting
from .scales import MethodScales, ScaleTable, TargetScales, model_fingerprint, provenance
from .target import Target

ESTIMATORS = ("ste", "pwl", "mad", "mph")
SCALERS = ("octav", "max", "static")


class FakeQuantize(torch.autograd.Function):
    """Q(x) on the grid in the forward pass; the chosen estimator's derivative in the backward pass."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int, estimator: str
    ) -> torch.Tensor:
        scale = amax / qmax
        ctx.save_for_backward(x, amax)
        ctx.estimator, ctx.signed = estimator, qmin < 0
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, amax = ctx.saved_tensors
        return estimator_gradient(x, amax, ctx.estimator, ctx.signed) * grad, None, None, None, None


def estimator_gradient(x: torch.Tensor, amax: torch.Tensor, estimator: str, signed: bool) -> torch.Tensor:
    """dQ(x)/dx as the estimator defines it (Section 4; Appendix A for unsigned data)."""
    if estimator == "ste":
        return torch.ones_like(x)
    magnitude = x.abs() if signed else x
    inside = magnitude <= amax if signed else (x <= amax) & (x >= 0 if estimator == "pwl" else True)
    if estimator == "pwl":
        return inside.to(x.dtype)
    if estimator == "mad":  # eq. (10): clip(x) = alpha x with alpha = s/|x| beyond s, held constant
        ratio = amax / magnitude.clamp(min=torch.finfo(x.dtype).tiny)
        return torch.where(magnitude <= amax, torch.ones_like(x), ratio)
    raise SpecError(f"Unknown gradient estimator {estimator!r}. Expected one of: {', '.join(ESTIMATORS)}.")


def fake_quantize_with_grad(
    x: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    *,
    signed: bool,
    estimator: str,
    axis: int | None = None,
    convention: Convention = "runtime",
) -> torch.Tensor:
    """Differentiable fake-quantization: ``amax`` ([] or [C] along ``axis``) gets no gradient."""
    grid = Grid(bits, signed, convention)
    amax = amax_view(amax.detach().to(x.device, x.dtype), x, axis)
    return FakeQuantize.apply(x, amax, grid.qmin, grid.qmax, estimator)  # type: ignore[no-any-return]


@dataclass
class _Quantizer:
    """State of one quantized tensor: its target, bits, grid and the last clipping scalar."""

    target: Target
    bits: int
    signed: bool | None
    axis: int | None
    scaler: str
    estimator: str
    convention: Convention
    amax: torch.Tensor | None = None
    static: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        signed = self.signed if self.signed is not None else bool(x.detach().min() < 0)
        if self.signed is None:
            self.signed = signed  # decided once, on the first batch, and kept
        data = x.detach()
        if self.scaler == "static":
            assert self.static is not None
            amax = self.static
        elif self.scaler == "max":
            amax = max_scaling(data, signed=signed, axis=self.axis)
        else:  # dynamic OCTAV, warm-started from the previous iteration's scalar (small tensors: one sort)
            init: Any = (
                "auto"
                if self.amax is None or solves_by_sorting(data, self.axis)
                else self.amax.to(data.device)
            )
            amax = octav(
                data, self.bits, signed=signed, axis=self.axis, convention=self.convention, init=init
            )
        self.amax = amax.detach()
        return fake_quantize_with_grad(
            x,
            amax,
            self.bits,
            signed=signed,
            estimator=self.estimator,
            axis=self.axis,
            convention=self.convention,
        )


class _WeightQuantization(nn.Module):
    def __init__(self, quantizer: _Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantizer(weight)


@dataclass
class QATConfig:
    bits: int = 4
    weights: str = "octav"  # octav | max | static
    activations: str = "octav"
    grad: str = "mph"  # ste | pwl | mad | mph
    first_last_bits: int | None = None
    matmuls: bool = True
    convention: Convention = "runtime"
    scales: ScaleTable | None = None
    skip: tuple[str, ...] = field(default_factory=tuple)


class QATModel(nn.Module):
    """The user's model, fake-quantized in the forward pass; its parameters are the same objects."""

    def __init__(self, model: nn.Module, config: QATConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.activation_quantizers: dict[str, _Quantizer] = {}
        self.rules = BitRules(
            config.bits, tuple((name, None) for name in config.skip), config.first_last_bits
        )
        self.weight_quantizers: dict[str, _Quantizer] = {}

    def _activation(self, target: Target, x: torch.Tensor) -> torch.Tensor | None:
        if target.kind == "weight":  # weights are quantized by their parametrization, not here
            return None
        if not x.is_floating_point() or (not target.is_layer and not self.config.matmuls):
            return None
        q = self.activation_quantizers.get(target.id)
        if q is None:
            cfg = self.config
            bits = self._bits(target)
            if bits is None:
                return None
            static = None
            if cfg.activations == "static":
                static = _static_amax(cfg.scales, target.id)
            signed = None if static is None else cfg.scales.targets[target.id].signed  # type: ignore[union-attr]
            estimator = "pwl" if cfg.grad == "mph" else cfg.grad
            q = _Quantizer(
                target, bits, signed, None, cfg.activations, estimator, cfg.convention, static=static
            )
            self.activation_quantizers[target.id] = q
        return q(x)

    def _bits(self, target: Target) -> int | None:
        return self.rules.for_target(target)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with capture_activations(LoadedModel(self.model, "module", None), self._activation) as run:  # type: ignore[arg-type]
            return run(Batch(args, kwargs), grad=True)

    @property
    def method_name(self) -> str:
        """The scalers used, as the scale file's method: 'octav', 'max', 'static', or
        'WEIGHTS+ACTIVATIONS' when they differ (e.g. 'octav+max')."""
        weights, activations = self.config.weights, self.config.activations
        return weights if weights == activations else f"{weights}+{activations}"

    def scale_table(self) -> ScaleTable:
        """The last clipping scalars as a ScaleTable (for save_scales and apply_scales)."""
        targets = {}
        for q in [*self.weight_quantizers.values(), *self.activation_quantizers.values()]:
            if q.amax is None:
                continue
            kind = "weight" if q.target.role == "weight" else "activation"
            targets[q.target.id] = TargetScales(
                q.target.module,
                q.target.role,
                q.target.op,
                kind,
                q.bits,
                bool(q.signed),
                q.axis if q.amax.dim() else None,  # a static per-tensor scalar has no channel axis
                [],
                {self.method_name: MethodScales(q.amax.cpu())},
            )
        meta = provenance(
            self.config.convention,
            [self.method_name],
            self.config.bits,
            "qat",
            reduction="the scalars of the last forward pass",
            model_fingerprint=model_fingerprint(self.model),
        )
        return ScaleTable(dict(sorted(targets.items())), meta)


def _static_amax(scales: ScaleTable | None, tid: str) -> torch.Tensor:
    if scales is None:
        raise SpecError("Static QAT needs a scale file (scales=...).")
    return scales.amax(tid, scales.methods[0])


def prepare_qat(
    model: nn.Module,
    bits: int = 4,
    weights: str = "octav",
    activations: str = "octav",
    grad: str = "mph",
    *,
    first_last_bits: int | None = None,
    matmuls: bool = True,
    scales: ScaleTable | None = None,
    convention: Convention = "runtime",
    example: Batch | None = None,
) -> QATModel:
    """Fake-quantize ``model`` for training (in place; parameters stay the same objects).

    ``weights``/``activations``: 'octav' (dynamic, every forward), 'max', or 'static' (``scales``).
    ``grad``: 'ste', 'pwl', 'mad' or 'mph'. ``first_last_bits`` (e.g. 8, Appendix E.2) needs an
    ``example`` batch to find the first and last layer in execution order.
    """
    check_bits(bits)
    for name, value, allowed in (
        ("weights", weights, SCALERS),
        ("activations", activations, SCALERS),
        ("grad", grad, ESTIMATORS),
    ):
        if value not in allowed:
            raise SpecError(f"Unknown {name} option {value!r}. Expected one of: {', '.join(allowed)}.")
    config = QATConfig(bits, weights, activations, grad, first_last_bits, matmuls, convention, scales)
    wrapper = QATModel(model, config)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    wrapper.rules = BitRules(bits, tuple((name, None) for name in config.skip), first_last_bits)
    if first_last_bits:
        if example is None:
            raise SpecError("first_last_bits needs an example batch to find the first and last layer.")
        wrapper.rules = wrapper.rules.with_layer_order(discover_targets(model, example))
    for name, module in layers:
        target = Target(name, "weight", type(module).__name__, "weight", f"{name}.weight")
        bits_w = wrapper._bits(target)
        if bits_w is None:
            continue
        static = _static_amax(scales, target.id) if weights == "static" else None
        axis = 1 if isinstance(module, TRANSPOSED_CONV_TYPES) else 0
        quantizer = _Quantizer(
            target, bits_w, True, axis, weights, "mad" if grad == "mph" else grad, convention, static=static
        )
        wrapper.weight_quantizers[target.id] = quantizer
        parametrize.register_parametrization(module, "weight", _WeightQuantization(quantizer))
    return wrapper


def strip(qat_model: QATModel) -> tuple[nn.Module, ScaleTable]:
    """Remove the fake quantization: the plain model (float weights, original parameter names) and the
    final clipping scalars as a ScaleTable."""
    table = qat_model.scale_table()
    for module in qat_model.model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    table.meta["model_fingerprint"] = model_fingerprint(qat_model.model)
    return qat_model.model, table


convert = strip
