"""The only module that reads user files: model checkpoints, architectures and calibration data.

Loading is a security boundary: pickles run code. Checkpoints load weights-only unless the caller
passes ``allow_pickle=True``; an architecture callable is user code the user named explicitly.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DataError, LoadError, OctavcalWarning

MODEL_FORMATS = ("state_dict", "safetensors", "pickle", "export", "torchscript", "huggingface")
# Keys of a data file that are not model inputs (kept for `evaluate`).
LABEL_KEYS = ("labels", "label", "targets")


@dataclass
class LoadedModel:
    """A model ready to calibrate: ``module`` runs batches; ``hookable`` says if activations can be seen."""

    module: nn.Module
    format: str
    path: Path | None
    hookable: bool = True
    note: str = ""


@dataclass(frozen=True)
class Batch:
    """One forward pass worth of inputs: ``module(*args, **kwargs)``; labels are kept aside."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        def move(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            t = t.to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return Batch(
            tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}, self.labels
        )

    def describe(self) -> str:
        """Shapes and dtypes of the inputs, for error messages."""
        parts = [f"arg{i} {_shape(a)}" for i, a in enumerate(self.args)]
        parts += [f"{k} {_shape(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts) or "no inputs"


def _shape(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    return type(t).__name__


# ---------------------------------------------------------------------------------------------
# Architectures and callables


def resolve_callable(spec: str, what: str = "architecture") -> Callable[..., Any]:
    """Import ``package.module:callable`` or ``path/to/file.py:callable`` (user code, run on request)."""
    if ":" not in spec:
        raise LoadError(
            f"The {what} {spec!r} is not of the form package.module:callable or file.py:callable."
        )
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise LoadError(f"The {what} file '{file}' does not exist.")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            _cwd_importable()
            module = importlib.import_module(target)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(
            f"Could not import the {what} module {target!r}: {type(exc).__name__}: {first_line(exc)}."
        ) from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LoadError(f"The {what} {spec!r}: module {target!r} has no callable named {name!r}.")
    return fn  # type: ignore[no-any-return]


def a_type(obj: Any) -> str:
    """'a str', 'an int': the type of ``obj`` with its article, for messages."""
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def call_user_code(fn: Callable[[], Any], what: str) -> Any:
    """Run a user's callable; what it raises becomes one LoadError naming it and the original error."""
    try:
        return fn()
    except Exception as exc:
        raise LoadError(f"{what} raised {type(exc).__name__}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """An exception's message on one line, without PyTorch's advice to load with weights_only=False,
    which is the wrong advice for a file nobody vouched for."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    unpickler = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    if unpickler:
        return unpickler[0].removeprefix("WeightsUnpickler error:").strip()
    unsafe = ("weights_only", "Weights only load failed", "allow_pickle", "load it unsafely")
    kept = [line for line in lines if not any(u in line for u in unsafe)]
    return (kept or ["(no message)"])[0].rstrip(".")


def _cwd_importable() -> None:
    """Like `python -m`: packages in the working directory can be imported (user code, on request)."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


# ---------------------------------------------------------------------------------------------
# Models


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    hf_class: str | None = None,
) -> LoadedModel:
    """Load a checkpoint as a runnable module, detecting its format (README, "Model formats").

    ``hf_class`` picks the transformers class of a Hugging Face folder (default: the one its
    config.json names under ``architectures``, else AutoModel)."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"Model file '{path}' does not exist.")
    if path.is_dir():
        loaded = _load_huggingface(path, hf_class)
    elif path.suffix == ".pt2":
        loaded = _load_export(path)
    elif path.suffix == ".safetensors":
        loaded = _from_state_dict(_read_safetensors(path, "Model file"), path, arch, "safetensors")
    elif _is_torchscript(path):
        loaded = _load_torchscript(path)
    else:
        loaded = _load_torch_file(path, arch, allow_pickle)
    if loaded.format == "export":  # an exported graph is already in inference form; .to/.eval refuse
        if dtype is not None or str(device) != "cpu":
            loaded.module = _moved_export(loaded.module, device, dtype)
        return loaded
    if dtype is not None:
        loaded.module.to(dtype)
    loaded.module.to(device)
    loaded.module.eval()
    return loaded


def _moved_export(module: nn.Module, device: str | torch.device, dtype: torch.dtype | None) -> nn.Module:
    """Move an exported program's weights in place (its GraphModule refuses ``.to``)."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        moved = tensor.data.to(device, dtype if dtype is not None and tensor.is_floating_point() else None)
        tensor.data = moved
        del parent
    return module


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{what} '{path}' is not a readable safetensors file: {first_line(exc)}.") from exc


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def _load_torch_file(path: Path, arch: str | None, allow_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # junk bytes fail the same unpickler differently
            raise LoadError(f"Model file '{path}' is not a PyTorch checkpoint: {first_line(exc)}.") from exc
        if not allow_pickle:
            raise LoadError(
                f"Model file '{path}' is a pickle that holds more than tensors (probably a whole "
                "nn.Module), and loading it would run code from the file. Load it only if you trust "
                "its source, by allowing pickles (allow_pickle=True); or save a state_dict, a torch.export "
                "program or TorchScript instead."
            ) from exc
        _cwd_importable()  # a pickled module refers to its classes by import path, as `python -m` sees them
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise LoadError(
                f"Model file '{path}' could not be unpickled: {type(exc).__name__}: {first_line(exc)}."
            ) from exc
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(
            f"Model file '{path}' is not a PyTorch checkpoint: {type(exc).__name__}: {first_line(exc)}."
        ) from exc
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, "pickle", path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _from_state_dict(obj, path, arch, "state_dict")
    raise LoadError(
        f"Model file '{path}' holds {a_type(obj)}, not a state_dict or an nn.Module. "
        "Expected a state_dict, a pickled nn.Module, TorchScript, a torch.export .pt2 or a safetensors file."
    )


def _from_state_dict(state: dict[str, torch.Tensor], path: Path, arch: str | None, fmt: str) -> LoadedModel:
    if arch is None:
        raise LoadError(
            f"Model file '{path}' holds only weights (a state_dict); name the architecture that "
            "builds the module, as package.module:callable."
        )
    module = call_user_code(resolve_callable(arch), f"The architecture {arch!r}")
    if not isinstance(module, nn.Module):
        raise LoadError(f"The architecture {arch!r} returned {a_type(module)}, not an nn.Module.")
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LoadError(
            f"The weights in '{path}' do not fit the architecture {arch!r}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}."
        )
    return LoadedModel(module, fmt, path)


def _load_export(path: Path) -> LoadedModel:
    try:
        logging.disable(logging.CRITICAL)  # torch logs its own traceback for a corrupt archive
        program = torch.export.load(str(path))
    except Exception as exc:
        raise LoadError(f"Model file '{path}' is not a torch.export program: {first_line(exc)}.") from exc
    finally:
        logging.disable(logging.NOTSET)
    return LoadedModel(program.module(), "export", path)


def _load_torchscript(path: Path) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise LoadError(
            f"Model file '{path}' looks like TorchScript but does not load: {first_line(exc)}."
        ) from exc
    note = (
        "TorchScript modules refuse forward hooks, so only weights are calibrated; export the model "
        "with torch.export (.pt2) to calibrate activations too."
    )
    return LoadedModel(module, "torchscript", path, hookable=False, note=note)


def _load_huggingface(path: Path, head: str | None = None) -> LoadedModel:
    """Load with the class ``config.json`` names in ``architectures`` (so an LM or classifier head is
    part of the model), ``head`` when given, else AutoModel; eager attention so that sdpa does not
    hide probabilities @ V."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LoadError(f"Model folder '{path}' has no config.json; expected a Hugging Face model folder.")
    try:
        import transformers
    except ImportError as exc:
        raise LoadError(
            f"Model folder '{path}' is a Hugging Face model; install transformers to load it."
        ) from exc
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"Model folder '{path}': config.json is not readable JSON: {exc}.") from exc
    named = [head] if head else list(config.get("architectures") or []) if isinstance(config, dict) else []
    cls = next(
        (getattr(transformers, n) for n in named if isinstance(n, str) and hasattr(transformers, n)), None
    )
    if head and cls is None:
        raise LoadError(f"transformers has no model class {head!r} (asked for with the head option).")
    cls = cls or transformers.AutoModel
    try:
        module = cls.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    except Exception as exc:
        raise LoadError(
            f"Could not load the Hugging Face model in '{path}' offline: {first_line(exc)}."
        ) from exc
    return LoadedModel(
        module,
        "huggingface",
        path,
        note=""
        if cls is not transformers.AutoModel
        else (
            "Loaded with AutoModel (config.json names no known architecture): task heads are not part of it."
        ),
    )


# ---------------------------------------------------------------------------------------------
# Calibration data


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


def as_loaded(model: Any) -> LoadedModel:
    """A LoadedModel as it is, or an nn.Module wrapped as one (what the library functions accept)."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module):
        raise LoadError(f"Expected an nn.Module or a loaded model; got {a_type(model)}.")
    hookable = not isinstance(model, torch.jit.ScriptModule)
    return LoadedModel(model, "module", None, hookable=hookable)


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
