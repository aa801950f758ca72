"""Reading model files and importing user code (architectures, data callables).

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
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import LoadedModel, a_type
from .errors import LoadError
from .offload import Placement, placed

MODEL_FORMATS = ("state_dict", "safetensors", "pickle", "export", "torchscript", "huggingface")


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
    placement: Placement | None = None,
) -> LoadedModel:
    """Load a checkpoint as a runnable module, detecting its format (README, "Model formats").

    ``hf_class`` picks the transformers class of a Hugging Face folder (default: the one its
    config.json names under ``architectures``, else AutoModel). ``placement`` spreads a Hugging Face
    model over devices, CPU and disk with accelerate (``device`` is then unused: inputs are moved to
    each layer by accelerate's hooks)."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"Model file '{path}' does not exist.")
    if placement is not None and not path.is_dir():
        raise LoadError(
            f"Model file '{path}' is not a Hugging Face model folder; only those can be placed with a "
            "device map."
        )
    if path.is_dir():
        loaded = _load_huggingface(path, hf_class, placement, dtype)
        if placement is not None:
            return loaded
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


def _load_huggingface(
    path: Path, head: str | None = None, placement: Placement | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load with the class ``config.json`` names in ``architectures`` (so an LM or classifier head is
    part of the model), ``head`` when given, else AutoModel; eager attention so that sdpa does not
    hide probabilities @ V. With ``placement``, accelerate places it in ``dtype``, in eval mode."""
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
    with placed(path, placement, dtype) as placing:
        try:
            module = cls.from_pretrained(
                path, local_files_only=True, attn_implementation="eager", **placing.options
            )
        except Exception as exc:
            raise LoadError(
                f"Could not load the Hugging Face model in '{path}' offline: {first_line(exc)}."
            ) from exc
        placing.done(module)
        if placement is not None:
            module.eval()
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
