"""Models placed by a device map (Hugging Face ``accelerate``): the placement options, and reading the
weights that its hooks keep off the model (CPU or disk offload) while they rest on the "meta" device.

Nothing here imports torch or accelerate at import time: the command line parses placements at start.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LoadError, SpecError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEVICE_MAPS = ("auto", "balanced", "sequential")
# accelerate's own units: decimal (GB) and binary (GiB); bytes when no unit is given.
_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(?P<number>\d+(\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*$")
_DEVICE = re.compile(r"^(cpu|mps|\d+|cuda:\d+)$")


@dataclass(frozen=True)
class Placement:
    """Where a Hugging Face model's layers go: ``device_map`` (auto, balanced or sequential) within
    ``max_memory`` per device, the rest offloaded to ``offload_folder`` (a temporary folder when None,
    removed with the model)."""

    device_map: str
    max_memory: dict[int | str, int] | None = None
    offload_folder: Path | None = None

    def __post_init__(self) -> None:
        if self.device_map not in DEVICE_MAPS:
            raise SpecError(
                f"Unknown device map {self.device_map!r}. Expected one of: {', '.join(DEVICE_MAPS)}."
            )
        if self.offload_folder is not None:  # a str from a library caller
            object.__setattr__(self, "offload_folder", Path(self.offload_folder))


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'0=20GiB,cpu=60GiB' -> {0: 21474836480, 'cpu': 64424509440}: memory per device, in bytes.

    A device is a GPU index (0), ``cuda:0`` (the same GPU), ``cpu`` or ``mps``; a size is a number of
    bytes or a number with a unit: KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (of 1024).
    """
    out: dict[int | str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        device, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not _DEVICE.match(device.lower()):
            raise SpecError(
                f"Max memory entry {item!r} is not DEVICE=SIZE with a device 0, 1, ..., cuda:N, cpu or mps "
                "(e.g. 0=20GiB,cpu=60GiB)."
            )
        key: int | str = device.lower()
        if str(key).isdigit() or str(key).startswith("cuda:"):
            key = int(str(key).rpartition(":")[2])
        match = _SIZE.match(size)
        unit = match["unit"].upper() if match else ""
        if match is None or unit not in _UNITS:
            raise SpecError(
                f"Max memory for {device!r} is not a size: {size!r}. Expected bytes or a number with "
                "KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 20GiB)."
            )
        if key in out:
            raise SpecError(f"Max memory names device {device!r} twice in {text!r}.")
        out[key] = int(float(match["number"]) * _UNITS[unit])
    return out


class _Placing:
    """``options`` for from_pretrained; ``done(module)`` ties a temporary offload folder to the model."""

    def __init__(self, options: dict[str, Any], temporary: Path | None) -> None:
        self.options, self.temporary = options, temporary

    def done(self, module: Any) -> None:
        parameter_names(module)  # before any forward pass unties weights at rest
        if self.temporary is not None:
            weakref.finalize(module, shutil.rmtree, self.temporary, True)
            self.temporary = None


@contextmanager
def placed(path: Path, placement: Placement | None, dtype: Any = None) -> Iterator[_Placing]:
    """from_pretrained's options for ``placement`` (none without one); a temporary offload folder is
    removed when loading fails, else when the model is freed (or at exit)."""
    if placement is None:
        yield _Placing({}, None)
        return
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise LoadError(
            f"Placing the model in '{path}' with a device map needs accelerate: install octavcal[accelerate]."
        ) from exc
    folder = placement.offload_folder
    if folder is not None and folder.exists() and not folder.is_dir():
        raise LoadError(f"Offload folder '{folder}' is a file, not a folder.")
    temporary = Path(tempfile.mkdtemp(prefix="octavcal-offload-")) if folder is None else None
    options = {
        "device_map": placement.device_map,
        "max_memory": placement.max_memory,
        "offload_folder": str(folder or temporary),
    } | ({"dtype": dtype} if dtype is not None else {})
    placing = _Placing(options, temporary)
    try:
        yield placing
    finally:
        if placing.temporary is not None:  # loading failed before done()
            shutil.rmtree(placing.temporary, ignore_errors=True)


def hf_hooks(model: nn.Module) -> dict[str, Any]:
    """accelerate's hooks by module name (empty for a model no device map placed)."""
    return {name: m._hf_hook for name, m in model.named_modules() if getattr(m, "_hf_hook", None) is not None}


def offloads(model: nn.Module) -> bool:
    """Whether a device map keeps some of ``model``'s weights off it (CPU or disk offload)."""
    return any(any(True for _ in _weight_maps(hook)) for hook in hf_hooks(model).values())


_names_at_load: weakref.WeakKeyDictionary[Any, dict[str, list[str]]] = weakref.WeakKeyDictionary()


def parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """Every Parameter name with all the names of its Parameter (tied weights have several), as the
    model had them when first seen: offload hooks put a new Parameter on each module they load, which
    unties weights at rest after the first forward pass. Taken at load time for placed models."""
    known = _names_at_load.get(model)
    if known is None:
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        known = {name: group for group in groups.values() for name in group}
        if hf_hooks(model):
            _names_at_load[model] = known
    return known


def _weight_maps(hook: Any) -> Iterator[Any]:
    for h in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            yield h.weights_map


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The state_dict's tensors in name order, each offloaded one read from where its hook keeps it
    (one at a time: memory holds one tensor more than the resident layers)."""
    import torch

    hooks: dict[str, Any] | None = None
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_meta:
            hooks = hf_hooks(model) if hooks is None else hooks
            tensor = _offloaded(name, hooks)
        yield name, tensor


def _offloaded(name: str, hooks: dict[str, Any]) -> torch.Tensor:
    """The value of the offloaded tensor ``name``, from the hook of the innermost module that holds it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        for weights in _weight_maps(hooks.get(module)):
            try:
                return weights[rest]  # type: ignore[no-any-return]
            except KeyError:
                continue
    raise LoadError(
        f"Tensor '{name}' is on the meta device and no offload hook holds its values: the model was not "
        "placed by accelerate, or it was loaded without its weights."
    )


@contextmanager
def quiet_hooks(model: nn.Module, pause: Callable[[bool], None]) -> Iterator[None]:
    """Run every accelerate hook's pre- and post-forward with ``pause(True)`` around it: moving
    inputs and loading offloaded weights are not part of the model's computation."""
    patched: list[tuple[Any, dict[str, Any]]] = []

    def quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            pause(True)
            try:
                return fn(*args, **kwargs)
            finally:
                pause(False)

        return run

    try:
        for hook in hf_hooks(model).values():
            patched.append(
                (hook, {k: vars(hook)[k] for k in ("pre_forward", "post_forward") if k in vars(hook)})
            )
            hook.pre_forward, hook.post_forward = quiet(hook.pre_forward), quiet(hook.post_forward)
        yield
    finally:
        for hook, before in patched:  # the class's own methods again (or an outer capture's)
            for key in ("pre_forward", "post_forward"):
                vars(hook).pop(key, None)
                if key in before:
                    setattr(hook, key, before[key])
