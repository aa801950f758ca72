"""What calibration does with each captured tensor: the activation's per-batch candidates of every
method (kept with their global batch index, reduced in ``reduce.py``) or, for the union, its summary
(pass 1) and bracketed values (pass 2); each weight's candidates once.

``calibrate.py`` runs the batches; this module is the ``deliver`` callback and its bookkeeping.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .bitrules import BitRules
from .candidates import (
    Candidates,
    Extremes,
    activation_candidates,
    candidates_for,
    extremes_of,
    scanned_candidates,
    statistics_threads,
)
from .core import Batch
from .distributed import SharedWork
from .errors import CalibrationError, DataError
from .groups import group_rows, group_shape
from .methods import Method
from .reduce import Accumulator, Seen, UnionAccumulator
from .scales import MethodScales, TargetScales
from .scan import token_runs, valid_segments
from .target import Target

if TYPE_CHECKING:
    from .calibrate import CalibrationConfig


_warmed_up: set[tuple[str, ...]] = set()


def warm_up(methods: list[Method], config: CalibrationConfig) -> None:
    """Run every method once per process on a small tensor, so that per-tensor times exclude
    first-call costs (loading kernels, allocating scratch buffers)."""
    key = tuple(m.name for m in methods)
    if key in _warmed_up:
        return
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    activation_candidates(x, extremes_of(x), methods, config.bits, config.convention, unsigned=True)
    scanned_candidates(x, [x.numpy()], methods, config.bits, config.convention, unsigned=True)
    candidates_for(
        x.reshape(256, -1), methods, config.bits, signed=True, axis=0, convention=config.convention
    )
    _warmed_up.add(key)


class Calibrator:
    def __init__(self, config: CalibrationConfig, methods: list[Method], rules: BitRules):
        self.config, self.methods, self.rules = config, methods, rules
        self.acc: dict[str, Accumulator] = {}
        self.union: dict[str, UnionAccumulator] = {}
        self.union_pass = 1 if config.reduction == "union" else 0  # 0: the mean; 1, 2: the union's passes
        self.weights: dict[str, TargetScales] = {}
        self.skipped: set[str] = set()
        self.batch_index = 0
        self.batches_seen = 0
        self.mask: torch.Tensor | None = None
        self.runs: np.ndarray | None = None  # the mask's runs of valid tokens (``token_runs``)
        self.met: list[Target] = []  # every target the first batch met, in call order
        self.work: SharedWork | None = None  # weights shared out among processes
        # Within one batch, a tensor several layers read (Q, K and V projections) is done once.
        self.seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], str, dict[str, Any]]] = {}

    def bits_for(self, target: Target) -> int | None:
        return self.rules.for_target(target)

    def start_batch(self, batch: Batch) -> None:
        self.seen.clear()
        mask = batch.kwargs.get("attention_mask") if self.config.mask_padding else None
        self.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.runs = token_runs(self.mask) if self.mask is not None else None

    def deliver(self, target: Target, tensor: torch.Tensor) -> None:
        if self.batch_index == 0 and self.union_pass < 2:
            self.met.append(target)
        with statistics_threads(tensor.device):
            self._take(target, tensor)

    def _take(self, target: Target, tensor: torch.Tensor) -> None:
        bits = self.bits_for(target)
        if bits is None:
            self.skipped.add(target.id)
            return
        if target.kind == "weight":
            if self.union_pass == 2:
                return  # met in pass 1
            if self.work is not None:  # several processes: one of those that met it computes it
                self.work.offer(target.id, (target, tensor, bits), first=not target.param)
            elif target.id not in self.weights:
                self.weights[target.id] = weight_scales(target, tensor, bits, self.methods, self.config)
            return
        if not tensor.is_floating_point():
            return  # integer operands (e.g. index arithmetic) are not quantized activations
        if self.union_pass:
            self._take_union(target, tensor, bits)
            return
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor._version, bits)
        acc = self.acc.get(target.id)
        if acc is None:
            acc = self.acc[target.id] = Accumulator(target, bits, list(tensor.shape), self.batch_index)
        cached = self.seen.get(key)
        hit = cached if cached is not None and cached[0]() is tensor else None
        if hit is not None:
            results, masked, nonnegative = hit[2]["results"], hit[2]["masked"], hit[2]["nonnegative"]
        else:
            # Unsigned stays possible while every batch was non-negative: keep its candidates too.
            found = self._candidates(target, tensor.detach(), bits, unsigned=acc.nonnegative)
            if found is None:
                return
            results, nonnegative, masked = found
            self.seen[key] = (
                weakref.ref(tensor),
                target.id,
                {"results": results, "masked": masked, "nonnegative": nonnegative},
            )
        acc.nonnegative &= nonnegative
        unsigned = results.get("unsigned") if acc.nonnegative else None
        for name, (_, seconds) in [*results["signed"].items(), *(unsigned or {}).items()]:
            acc.seconds[name] = acc.seconds.get(name, 0.0) + (0.0 if hit else seconds)
        acc.seen.append(
            Seen(
                self.batch_index,
                nonnegative,
                masked,
                hit[1] if hit is not None else None,
                {name: amax for name, (amax, _) in results["signed"].items()},
                {name: amax for name, (amax, _) in unsigned.items()} if unsigned is not None else None,
            )
        )

    def _candidates(
        self, target: Target, tensor: torch.Tensor, bits: int, *, unsigned: bool
    ) -> tuple[dict[str, Candidates], bool, bool] | None:
        """Every method's candidates for one activation, whether it was non-negative, and whether
        padding was left out; None when nothing is left once it is. One pass over the valid tokens
        in place where the methods allow (``scanned_candidates``), else over a padding-free copy."""
        segments = valid_segments(tensor, self.mask, self.runs)
        if segments is not None:
            config = self.config
            scanned = scanned_candidates(
                tensor, segments[0], self.methods, bits, config.convention, unsigned=unsigned
            )
            if scanned is not None:
                return scanned[0], scanned[1], segments[1]
        x, masked = without_padding(tensor, self.mask)
        if x.numel() == 0:
            return None
        extremes = self._checked(target, x)
        results = activation_candidates(
            x, extremes, self.methods, bits, self.config.convention, unsigned=unsigned
        )
        return results, extremes.nonnegative, masked

    def _checked(self, target: Target, x: torch.Tensor) -> Extremes:
        extremes = extremes_of(x)
        if not extremes.finite:
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(
                f"Activations of '{target.module}' ({target.role}) contain NaN or Inf in batch "
                f"{self.batch_index} ({bad} of {x.numel()} values)."
            )
        return extremes

    def _take_union(self, target: Target, tensor: torch.Tensor, bits: int) -> None:
        """Pass 1 adds the activation to its summary; pass 2 to its bracket (and the sweep's errors)."""
        if tensor.dtype == torch.float64:
            raise CalibrationError(
                f"Activations of '{target.module}' ({target.role}) are float64; the union reduction reads "
                "float32, float16 and bfloat16. Use the mean reduction or run the model in float32."
            )
        x, masked = without_padding(tensor.detach(), self.mask)
        if x.numel() == 0:
            return
        x = x.float()
        acc = self.union.get(target.id)
        start = time.perf_counter()
        if self.union_pass == 1:
            self._checked(target, x)
            if acc is None:
                acc = self.union[target.id] = UnionAccumulator(
                    target, bits, list(tensor.shape), self.batch_index
                )
            acc.masked |= masked
            acc.summary.add(x)
            names = [m.name for m in self.methods]
        else:
            if acc is None or acc.bracket is None:
                raise CalibrationError(
                    f"Activations of '{target.module}' ({target.role}) appeared only on the second pass "
                    "over the batches. The union needs batches that give the same values on every pass."
                )
            acc.bracket.add(x)
            acc.second_count += x.numel()
            names = [m.name for m in self.methods if m.kind != "max"]
        for name in names:  # the pass's time, shared by the methods that need it
            acc.seconds[name] = acc.seconds.get(name, 0.0) + (time.perf_counter() - start) / len(names)

    def second_pass(self) -> None:
        """After pass 1 (every process's summaries merged): the bins each method's answer lies in."""
        self.union_pass = 2
        for acc in self.union.values():
            acc.prepare(self.methods, self.config.convention)

    def activation_scales(self) -> dict[str, TargetScales]:
        if self.union_pass:
            return {tid: acc.scales(self.methods, self.config.convention) for tid, acc in self.union.items()}
        return {tid: acc.scales() for tid, acc in self.acc.items()}

    def compute_weight(self, work: tuple[Target, torch.Tensor, int]) -> None:
        target, tensor, bits = work
        with statistics_threads(tensor.device):
            self.weights[target.id] = weight_scales(target, tensor, bits, self.methods, self.config)

    def part(self) -> dict[str, Any]:
        """What this process collected, for the merge: picklable, without the batch's cache."""
        return {"acc": self.acc, "union": self.union, "weights": self.weights, "skipped": self.skipped}

    def absorb(self, parts: list[dict[str, Any]], batches: int) -> None:
        """Every process's part (in rank order), as one process would have collected it all."""
        self.acc, self.union, self.weights, self.skipped, self.batches_seen = {}, {}, {}, set(), batches
        for part in parts:
            for tid, acc in part["acc"].items():
                mine = self.acc.get(tid)
                self.acc[tid] = acc if mine is None else mine.merged(acc)
            for tid, union in part["union"].items():
                had = self.union.get(tid)
                self.union[tid] = union if had is None else had.merged(union)
            self.weights |= part["weights"]
            self.skipped |= part["skipped"]


def without_padding(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """Drop padded positions of a (B, T) or (B, T, features) activation: (valid tokens, ...).

    Only 2-D and 3-D tensors are masked: a 4-D (B, H, T, ...) attention operand could have H == T
    and would be masked along heads.
    """
    if mask is None or x.dim() not in (2, 3) or tuple(x.shape[:2]) != tuple(mask.shape):
        return x, False
    # x[mask], in the same order: a boolean index costs 20x an index_select on CPU (measured here)
    valid = mask.to(x.device).reshape(-1).nonzero().squeeze(1)
    return x.reshape(-1, *x.shape[2:]).index_select(0, valid), True


def weight_scales(
    target: Target, weight: torch.Tensor, bits: int, methods: list[Method], config: CalibrationConfig
) -> TargetScales:
    """Every method's amax of one weight, per output channel (``target.axis``) unless per tensor."""
    if not extremes_of(weight).finite:
        bad = int((~torch.isfinite(weight)).sum())
        raise DataError(
            f"Weight '{target.id}' (Parameter '{target.param}') contains NaN or Inf ({bad} of "
            f"{weight.numel()} values)."
        )
    kept = target.axis if config.per_channel_weights else None
    group = config.group_size if kept is not None else None
    if group is not None and kept is not None:  # one row per group: (C * in/G, G), amax back to [C, in/G]
        rows = group_rows(weight, kept, group, f"Weight '{target.id}' (Parameter '{target.param}')")
        results = candidates_for(rows, methods, bits, signed=True, axis=0, convention=config.convention)
        amax_shape = group_shape(list(weight.shape), kept, group)
        results = {name: (amax.reshape(amax_shape), sec) for name, (amax, sec) in results.items()}
    else:
        results = candidates_for(weight, methods, bits, signed=True, axis=kept, convention=config.convention)
    return TargetScales(
        target.module,
        target.role,
        target.op,
        "weight",
        bits,
        True,
        kept,
        list(weight.shape),
        {name: MethodScales(amax, None, sec) for name, (amax, sec) in results.items()},
        param=target.param,
        group_size=group,
    )
