"""Calibration: batches -> per-batch candidates of every method -> the mean over batches (Appendix E.3),
or with ``reduction="union"`` two passes -> every method's exact answer on all values together.

Each activation is turned into candidates (or summaries) the moment it is seen and then dropped, so
memory grows with one batch, not with the number of batches. Weights are calibrated once.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .bitrules import BitRules
from .calibrator import Calibrator, warm_up, weight_scales
from .candidates import statistics_threads
from .collect import capture_activations
from .core import Batch, LoadedModel, Progress, as_loaded
from .coverage import STRICT_CATEGORIES, coverage, targets_fingerprint
from .data import batch_source, batches_of
from .defaults import DEFAULT_METHODS
from .distributed import SharedWork, share_of, together
from .errors import CalibrationError, OctavcalWarning, SpecError
from .graphs import weight_targets
from .grid import CONVENTIONS, check_bits
from .groups import check_weight_granularity, weight_granularity
from .methods import Method, parse_methods
from .scales import ScaleTable, TargetScales, fingerprint_in_background, provenance
from .target import Target

REDUCTIONS = ("mean", "union")
_REDUCTION_NOTES = {
    "mean": "mean of per-batch candidates (Appendix E.3)",
    "union": "union of all batches (exact optimum over every value; two passes)",
}


@dataclass(frozen=True)
class CalibrationConfig:
    """What to compute. ``layer_bits``: (pattern, bits or None to skip), first match wins; patterns
    match a target id ``module:role`` or its module path (fnmatch). ``first_last_bits`` keeps the
    first and last Linear/Conv (in execution order) at that width, as Appendix E.2 does with 8.
    ``strict`` refuses a model with a weight-bearing op octavcal does not model (an LSTM, an einsum
    with a weight); other uncovered Parameters are listed in the scale file either way."""

    bits: int = 8
    methods: tuple[str, ...] = DEFAULT_METHODS
    layer_bits: tuple[tuple[str, int | None], ...] = ()
    first_last_bits: int | None = None
    per_channel_weights: bool = True
    group_size: int | None = None  # per group of input features (needs per_channel_weights)
    mask_padding: bool = True
    convention: str = "runtime"
    strict: bool = False
    reduction: str = "mean"

    def bit_rules(self) -> BitRules:
        return BitRules(self.bits, self.layer_bits, self.first_last_bits)

    def validate(self) -> list[Method]:
        check_bits(self.bits)
        for _, bits in self.layer_bits:
            if bits is not None:
                check_bits(bits)
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits)
        if self.reduction not in REDUCTIONS:
            raise SpecError(
                f"Unknown reduction {self.reduction!r}. Expected one of: {', '.join(REDUCTIONS)}."
            )
        if self.group_size is not None:
            check_weight_granularity(self.per_channel_weights, self.group_size)
        if self.convention not in CONVENTIONS:
            raise SpecError(
                f"Unknown grid convention {self.convention!r}. Expected one of: {', '.join(CONVENTIONS)}."
            )
        return parse_methods(list(self.methods))


def parse_layer_bits(spec: str) -> tuple[str, int | None]:
    """'encoder.*.output=8' or 'classifier=skip' -> (pattern, bits or None)."""
    pattern, sep, value = spec.rpartition("=")
    if not sep or not pattern:
        raise SpecError(f"Layer bits {spec!r} must look like PATTERN=BITS or PATTERN=skip.")
    if value.strip().lower() == "skip":
        return pattern.strip(), None
    try:
        return pattern.strip(), check_bits(int(value))
    except ValueError as exc:
        raise SpecError(
            f"Layer bits {spec!r}: {value!r} is neither a bit width in [2, 16] nor 'skip'."
        ) from exc


def calibrate(
    model: LoadedModel | nn.Module,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    config: CalibrationConfig | None = None,
    *,
    seed: int | None = None,
    progress: Progress | None = None,
    total_batches: int | None = None,
    group: Any = None,
) -> ScaleTable:
    """Calibrate every weight-bearing op of ``model`` (weight and input) and every matmul operand.

    ``batches`` (any iterable, consumed lazily; already on the model's device): tensors, dicts,
    tuples whose first element is the input, ``Batch`` objects, or a DataLoader. They are run in
    order; each method's per-batch candidates are averaged (Appendix E.3). With the ``union``
    reduction they are passed over twice, so ``batches`` must be re-iterable (a list, a DataLoader) or
    a function returning a fresh iterable. ``progress(stage, done, total)`` reports 'batches',
    'second pass' (union) and 'weights'. Returns a ScaleTable for ``save_scales``; its
    ``meta["uncovered"]`` lists every weight that no target calibrates, with the reason.

    Several processes (``group``, else an initialized default process group of more than one): every
    process passes the same ``batches``; process r runs batch i when i % world == r, and every process
    returns the same table, equal to one process's (README, "Distributed calibration").
    """
    config = config or CalibrationConfig()
    methods = config.validate()
    loaded = as_loaded(model)
    share = share_of(group)
    union = config.reduction == "union"
    fresh = batch_source(batches, "calibration batches") if union or callable(batches) else None
    stream = iter((fresh() if fresh else batches_of(batches)) if loaded.hookable else ())  # type: ignore[arg-type]
    first = next(stream, None)
    if loaded.hookable and first is None:
        raise CalibrationError("No calibration batches were given.")
    warm_up(methods, config)
    fingerprint = fingerprint_in_background(loaded.module)  # overlaps the batches
    fixed_weights = weight_targets(loaded.module)  # TorchScript and exported graphs: their weights by layer
    rules = config.bit_rules()
    found: list[Target] = []
    uncovered: list[dict[str, Any]] = []
    tied: dict[str, list[str]] = {}
    discover_first = rules.first_last_bits is not None and first is not None
    if discover_first and first is not None:
        # The first/last-layer rule needs the call order before any batch is calibrated: one extra
        # forward pass (in every process), paid only with that rule.
        with together(share, "finding the targets"):
            found, uncovered, tied = _discover(loaded, first)
            _review(found, uncovered, config)
    rules = rules.with_layer_order(found or [t for t, _, _ in fixed_weights])

    # Batches are pulled one at a time: only the current one (and its activations) is ever alive.
    calibrator = Calibrator(config, methods, rules)
    if first is not None:
        with capture_activations(loaded, calibrator.deliver) as run:

            def step(i: int, batch: Batch) -> None:
                nonlocal found, uncovered, tied
                calibrator.batch_index = i
                calibrator.start_batch(batch)
                run(batch)
                if i == 0 and not discover_first:  # the first pass also finds the targets, in order
                    found, uncovered, tied = calibrator.met, coverage(loaded.module, run), run.tied
                    _review(found, uncovered, config, stacklevel=4)

            everything = itertools.chain([first], stream)
            if share is None:
                for i, batch in enumerate(everything):
                    step(i, batch)
                    calibrator.batches_seen = i + 1
                    if progress:
                        progress("batches", i + 1, total_batches)
            else:
                # Several processes: each runs its share of the global batches; weights are shared out.
                calibrator.work = SharedWork(share.rank, calibrator.compute_weight)
                tick = (lambda done: progress("batches", done, total_batches)) if progress else None
                calibrator.batches_seen = share.each_batch(everything, step, calibrator.work, tick)
            if union and fresh is not None:
                _second_pass(calibrator, run, fresh, share, progress, total_batches)
    fixed: dict[str, TargetScales] = {}

    def fixed_scales() -> None:
        for i, (target, weight, _) in enumerate(fixed_weights):
            bits = rules.for_target(target)
            if bits is None:
                calibrator.skipped.add(target.id)
            elif share is None or i % share.world == share.rank:
                with statistics_threads(weight.device):
                    fixed[target.id] = weight_scales(target, weight, bits, methods, config)
                if progress:
                    progress("weights", i + 1, len(fixed_weights))

    if share is None:
        fixed_scales()
    else:

        def part() -> dict[str, Any]:
            if calibrator.work is not None:
                calibrator.work.run()
            fixed_scales()
            return calibrator.part() | {"fixed": fixed, "coverage": (found, uncovered, tied)}

        # Every process gets every part and merges them in global batch order: the same table everywhere.
        parts = share.gather("gathering the candidates", part)
        calibrator.absorb(parts, calibrator.batches_seen)
        fixed = {tid: entry for p in parts for tid, entry in p["fixed"].items()}
        found, uncovered, tied = parts[0]["coverage"]  # rank 0 ran batch 0, as one process would
    targets = calibrator.activation_scales()
    for tid, entry in calibrator.weights.items():
        entry.tied = tied.get(entry.param or "", [])
        targets[tid] = entry
    targets |= fixed
    for pattern in rules.unmatched_patterns([*calibrator.acc, *calibrator.skipped, *targets]):
        warnings.warn(f"Layer bits pattern {pattern!r} matched no target.", OctavcalWarning, stacklevel=2)
    meta = _metadata(config, methods, loaded, calibrator, seed, fingerprint()) | {
        "targets_fingerprint": targets_fingerprint(found),
        "uncovered": uncovered,
    }
    return ScaleTable(dict(sorted(targets.items())), meta)


def _second_pass(
    calibrator: Calibrator,
    run: Callable[[Batch], Any],
    fresh: Callable[[], Iterable[Batch]],
    share: Any,
    progress: Progress | None,
    total: int | None,
) -> None:
    """The union's pass 2: every process's summaries merged (exact sums), then the batches again."""
    if share is not None:
        parts = share.gather("merging the first pass", lambda: calibrator.union)
        calibrator.union = {}
        for part in parts:  # in rank order; the sums are exact, so any order gives the same bytes
            for tid, acc in part.items():
                had = calibrator.union.get(tid)
                calibrator.union[tid] = acc if had is None else had.merged(acc)
    calibrator.second_pass()

    def step(i: int, batch: Batch) -> None:
        calibrator.batch_index = i
        calibrator.start_batch(batch)
        run(batch)

    if share is None:
        for i, batch in enumerate(fresh()):
            step(i, batch)
            if progress:
                progress("second pass", i + 1, total)
    else:
        tick = (lambda done: progress("second pass", done, total)) if progress else None
        share.each_batch(fresh(), step, None, tick)


def calibrate_each(
    model: LoadedModel | nn.Module,
    batches: Callable[[], Iterable[Any]],
    config: CalibrationConfig,
    bits: Iterable[int],
    *,
    seed: int | None = None,
    progress: Progress | None = None,
    group: Any = None,
) -> dict[int, ScaleTable]:
    """``calibrate`` at each bit width, each over a fresh pass of ``batches()`` (for compare/evaluate)."""
    return {
        b: calibrate(
            model, batches, dataclasses.replace(config, bits=b), seed=seed, progress=progress, group=group
        )
        for b in bits
    }


def _discover(
    loaded: LoadedModel, first: Batch
) -> tuple[list[Target], list[dict[str, Any]], dict[str, list[str]]]:
    """A pass over the first batch: the targets in call order, the weights no target calibrates, the
    tied ones."""
    found: list[Target] = []
    with capture_activations(loaded, lambda t, _: found.append(t)) as capture:
        capture(first)
    return found, coverage(loaded.module, capture), capture.tied


def _review(
    found: list[Target], uncovered: list[dict[str, Any]], config: CalibrationConfig, stacklevel: int = 3
) -> None:
    """After the first batch: refuse a model with nothing to calibrate, and in strict mode one with
    uncovered weight-bearing ops; warn that sdpa hides a product."""
    if not found:
        raise CalibrationError("The model ran, but no linear, convolution or matrix multiplication was seen.")
    refused = [u for u in uncovered if u["category"] in STRICT_CATEGORIES]
    if config.strict and refused:
        raise CalibrationError(
            f"{len(refused)} weights are read by ops octavcal does not calibrate: "
            + "; ".join(f"'{u['parameter']}' ({u['reason']})" for u in refused[:3])
            + ". Calibrate without strict mode to list them as uncovered."
        )
    if any(t.op == "sdpa" for t in found):
        warnings.warn(
            "scaled_dot_product_attention hides its probabilities @ V product: only its query, key and value "
            "are calibrated. Run attention as explicit matmuls (Hugging Face: attn_implementation='eager') "
            "for the full set.",
            OctavcalWarning,
            stacklevel=stacklevel,  # the caller of calibrate
        )


def _metadata(
    config: CalibrationConfig,
    methods: list[Method],
    loaded: LoadedModel,
    calibrator: Calibrator,
    seed: int | None,
    fingerprint: str,
) -> dict[str, Any]:
    return provenance(
        config.convention,
        [m.name for m in methods],
        config.bits,
        "calibrate",
        reduction=_REDUCTION_NOTES[config.reduction],
        batches=calibrator.batches_seen,
        seed=seed,
    ) | {
        "first_last_bits": config.first_last_bits,
        "layer_bits": [[p, b] for p, b in config.layer_bits],
        "per_channel_weights": config.per_channel_weights,
        "weight_granularity": weight_granularity(config.per_channel_weights, config.group_size),
        "mask_padding": config.mask_padding,
        "model_format": loaded.format,
        "model_fingerprint": fingerprint,
        "skipped": sorted(calibrator.skipped),
        "note": loaded.note,
    }
