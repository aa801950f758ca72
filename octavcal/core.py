"""The types every layer shares: a model ready to run, one batch of inputs, a progress callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LoadError

# progress(stage, done, total): the library reports, the CLI draws.
Progress = Callable[[str, int, "int | None"], None]


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


def as_loaded(model: Any) -> LoadedModel:
    """A LoadedModel as it is, or an nn.Module wrapped as one (what the library functions accept)."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module):
        raise LoadError(f"Expected an nn.Module or a loaded model; got {a_type(model)}.")
    hookable = not isinstance(model, torch.jit.ScriptModule)
    return LoadedModel(model, "module", None, hookable=hookable)


def a_type(obj: Any) -> str:
    """'a str', 'an int': the type of ``obj`` with its article, for messages."""
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
