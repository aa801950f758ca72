"""Calibration and held-out batches: tensor files, data callables and plain Python objects, one rule.

Batches are made one at a time (only the current one is alive); the CLI, ``compare``, ``evaluate`` and
Python users take them from here.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .core import Batch, a_type
from .errors import DataError, LoadError, OctavcalWarning
from .loading import _read_safetensors, call_user_code, first_line, resolve_callable

# Keys of a data file that are not model inputs (kept for `evaluate`).
LABEL_KEYS = ("labels", "label", "targets")


@dataclass
class TensorData:
    """Calibration samples held in memory: positional ``args`` or keyword ``kwargs``, first dim = samples."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    source: str

    @property
    def num_samples(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0])

    def batch(self, index: torch.Tensor) -> Batch:
        return Batch(
            tuple(a[index] for a in self.args),
            {k: v[index] for k, v in self.kwargs.items()},
            None if self.labels is None else self.labels[index],
        )


def load_data(path: str | Path, what: str = "Data file") -> TensorData:
    """Read a tensor file (.pt weights-only, .safetensors, .npy, .npz) of samples along the first dim.

    A dict becomes keyword arguments (``labels`` is set aside); a single tensor is positional.
    """
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{what} '{path}' is a directory, not a tensor file.")
    if not path.is_file():
        raise LoadError(f"{what} '{path}' does not exist.")
    if path.stat().st_size == 0:
        raise LoadError(f"{what} '{path}' is empty.")
    try:
        if path.suffix == ".safetensors":
            obj: Any = _read_safetensors(path, what)
        elif path.suffix == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                obj = {k: torch.from_numpy(npz[k]) for k in npz.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except LoadError:
        raise
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise LoadError(
                f"{what} '{path}' holds more than tensors; calibration data loads weights-only."
            ) from exc
        raise LoadError(f"{what} '{path}' could not be read as tensors: {first_line(exc)}.") from exc
    except Exception as exc:
        raise LoadError(
            f"{what} '{path}' could not be read as tensors: {type(exc).__name__}: {first_line(exc)}."
        ) from exc
    if isinstance(obj, torch.Tensor):
        data = TensorData((obj,), {}, None, str(path))
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        data = TensorData(tuple(obj), {}, None, str(path))
    elif isinstance(obj, dict) and obj and all(isinstance(t, torch.Tensor) for t in obj.values()):
        labels = next((obj[k] for k in LABEL_KEYS if k in obj), None)
        data = TensorData((), {k: v for k, v in obj.items() if k not in LABEL_KEYS}, labels, str(path))
    else:
        raise LoadError(f"{what} '{path}' holds {a_type(obj)}; expected a tensor or a dict of tensors.")
    sizes = {f"arg{i}": int(t.shape[0]) if t.dim() else 0 for i, t in enumerate(data.args)}
    sizes |= {k: int(t.shape[0]) if t.dim() else 0 for k, t in data.kwargs.items()}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise LoadError(
            f"{what} '{path}': every tensor needs the same number of samples in its first dimension; "
            f"got {sizes}."
        )
    return data


def plan_batches(
    num_samples: int, batch_size: int, count: int, seed: int, skip: int = 0
) -> list[torch.Tensor]:
    """Sample indices of ``count`` random batches, reproducible from ``seed``.

    Batches are consecutive slices of seeded permutations; ``skip`` batches are passed over first, so
    held-out batches (skip = the calibration count) never reuse a calibration sample while samples last.
    """
    if batch_size < 1 or count < 1:
        raise LoadError(f"Batch size and batch count must be positive: got {batch_size} and {count}.")
    gen = torch.Generator().manual_seed(seed)
    needed = (skip + count) * batch_size
    order = torch.cat([torch.randperm(num_samples, generator=gen) for _ in range(-(-needed // num_samples))])
    if needed > num_samples:
        warnings.warn(
            f"{skip + count} batches of {batch_size} need {needed} samples but the data has {num_samples}; "
            "samples repeat across batches.",
            OctavcalWarning,
            stacklevel=2,
        )
    return [order[(skip + i) * batch_size : (skip + i + 1) * batch_size] for i in range(count)]


def batches_from_callable(spec: str, count: int, seed: int) -> Iterator[Batch]:
    """Batches from ``package.module:callable`` returning an iterable (e.g. a DataLoader).

    Each item: a tensor (positional), a dict (keyword arguments), or a tuple/list whose first element
    is the model input (the rest, e.g. labels, is set aside). The first ``count`` items are used.
    """
    # The callable's own shuffling is reproducible from the seed; the caller's RNG state comes back after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        source = call_user_code(resolve_callable(spec, "data callable"), f"The data callable {spec!r}")
        if not isinstance(source, Iterable):
            raise LoadError(
                f"The data callable {spec!r} returned {a_type(source)}, not an iterable of batches."
            )
        items = iter(source)
        for i in range(count):
            try:
                item = next(items)
            except StopIteration:
                return
            except Exception as exc:
                raise LoadError(
                    f"The data callable {spec!r} raised {type(exc).__name__} while giving batch {i}: "
                    f"{first_line(exc)}"
                ) from exc
            yield as_batch(item, f"batch {i} of {spec!r}")


def batches_of(items: Iterable[Any]) -> Iterator[Batch]:
    """Batches from any iterable (a list, a generator, a DataLoader), one at a time, by ``as_batch``."""
    if isinstance(items, (torch.Tensor, dict, Batch)):
        raise LoadError(
            f"Batches must be an iterable of batches (a list, a generator or a DataLoader); got one "
            f"{type(items).__name__}. Wrap a single batch in a list."
        )
    for i, item in enumerate(items):
        yield as_batch(item, f"Batch {i}")


def check_finite_inputs(batch: Batch, what: str) -> None:
    """NaN in data whose outputs are measured would turn every metric into nan: refuse it, naming it."""
    named = [(f"arg{i}", a) for i, a in enumerate(batch.args)] + list(batch.kwargs.items())
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise DataError(f"{what} has NaN or Inf in its input {name} ({bad} of {t.numel()} values).")


def batch_source(source: Any, what: str = "batches") -> Callable[[], Iterator[Batch]]:
    """A function giving a fresh pass over ``source``: a callable returning batches, or a re-iterable
    collection of them (a list, a DataLoader). A one-shot iterator cannot be passed over twice."""
    if callable(source) and not isinstance(source, (torch.Tensor, nn.Module)):
        return lambda: batches_of(source())
    if isinstance(source, Iterator):
        raise LoadError(
            f"The {what} are a one-shot iterator, but they are passed over more than once; give a list, "
            "a DataLoader or a function returning the batches."
        )
    return lambda: batches_of(source)


def as_batch(item: Any, where: str) -> Batch:
    """The CLI's and the library's one rule: a tensor is the input; a dict holds keyword inputs (and
    labels); a tuple or list holds the input first (a tensor or a dict), then labels."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch((item,))
    if isinstance(item, dict):
        labels = next((item[k] for k in LABEL_KEYS if k in item), None)
        return Batch((), {k: v for k, v in item.items() if k not in LABEL_KEYS}, labels)
    if isinstance(item, (list, tuple)) and item:
        rest = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
        return (
            Batch((item[0],), {}, rest) if not isinstance(item[0], dict) else Batch((), dict(item[0]), rest)
        )
    raise LoadError(f"{where} is {a_type(item)}; expected a tensor, a dict or a tuple of tensors.")


def batch_sources(
    data: str,
    batch_size: int,
    num_batches: int,
    heldout_batches: int,
    seed: int,
    heldout_data: str | None,
    dev: str,
    cast: torch.dtype | None,
) -> tuple[Any, Any]:
    """Functions giving fresh passes over the calibration and held-out batches of ``data`` (a tensor
    file, or ``package.module:callable``), moved to ``dev`` (and ``cast``), one batch alive at a time.

    Held-out batches come from ``heldout_data``, else the next batches of the same seeded permutation
    (other samples while they last); a data callable gives none of its own (a warning says so)."""

    def moved(batches: Any) -> Any:
        return (b.to(dev, cast) for b in batches)

    if ":" in data and not Path(data).exists():

        def calib() -> Any:
            return moved(batches_from_callable(data, num_batches, seed))

        def held_callable() -> Any:
            return moved(batches_from_callable(heldout_data or data, heldout_batches, seed))

        if not heldout_data and heldout_batches:
            warnings.warn(
                "A data callable gives no held-out batches of its own; held-out columns stay empty "
                "unless held-out data is given.",
                OctavcalWarning,
                stacklevel=2,
            )
        return calib, held_callable if heldout_data else None
    tensors = load_data(data)
    plan = plan_batches(tensors.num_samples, batch_size, num_batches, seed)
    held_src = load_data(heldout_data) if heldout_data else tensors
    # Without held-out data: the next batches of the same seeded permutation, other samples while they last.
    skip = 0 if heldout_data else num_batches
    held_plan = (
        plan_batches(held_src.num_samples, batch_size, heldout_batches, seed, skip=skip)
        if heldout_batches
        else []
    )

    def calib_tensors() -> Any:
        return moved(tensors.batch(i) for i in plan)

    def held_tensors() -> Any:
        return moved(held_src.batch(i) for i in held_plan)

    return calib_tensors, held_tensors if heldout_batches else None


def first_batch(data: str, batch_size: int, seed: int, dev: str) -> Batch:
    """The first batch of ``data`` as ``batch_sources`` would draw it (for tracing an export)."""
    if ":" in data and not Path(data).exists():
        return next(iter(batches_from_callable(data, 1, seed))).to(dev)
    tensors = load_data(data)
    return tensors.batch(plan_batches(tensors.num_samples, batch_size, 1, seed)[0]).to(dev)


def load_heldout(path: str | Path, labels_file: str | Path | None = None) -> TensorData:
    """Held-out data, with labels from ``labels_file`` (one per sample) when the data has none."""
    held = load_data(path)
    if labels_file is not None:
        labels = load_data(labels_file, what="Labels file")
        held.labels = labels.args[0] if labels.args else next(iter(labels.kwargs.values()), labels.labels)
        if held.labels is None or held.labels.shape[0] != held.num_samples:
            raise LoadError(f"Labels file '{labels_file}' must hold one label per sample of '{path}'.")
    return held
