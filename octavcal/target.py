"""What a target is: a calibrated tensor named by module and role, and how capture counts calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """A calibrated tensor: module path and role ('weight', 'input', 'in_proj_weight', 'matmul0.lhs', ...).

    ``param`` is the Parameter's name for a weight and for the input of the op that reads it;
    ``axis`` is a weight's output-channel axis, from how the op uses it.
    """

    module: str
    role: str
    op: str  # 'linear', 'conv2d', 'addmm', 'matmul', 'sdpa', ...
    kind: str = "activation"  # 'weight' | 'activation'
    param: str | None = None
    axis: int | None = None

    @property
    def id(self) -> str:
        return f"{self.module or '<root>'}:{self.role}"

    @property
    def is_layer(self) -> bool:
        """A weight or the input of the op that reads it (the first/last-layer rule applies to these)."""
        return self.param is not None


# Called with each tensor as it is seen; a returned tensor replaces it in the forward pass.
Deliver = Callable[[Target, torch.Tensor], "torch.Tensor | None"]


def weight_role(leaf: str) -> tuple[str, str]:
    """Roles of a Parameter attribute and of its op's input: 'weight' -> ('weight', 'input'),
    'in_proj_weight' -> ('in_proj_weight', 'in_proj_weight.input')."""
    return (leaf, "input") if leaf == "weight" else (leaf, f"{leaf}.input")


class Positions:
    """Counts matmul/sdpa calls per enclosing module, and weight-op calls per Parameter, in one forward."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def next(self, module: str, op: str) -> int:
        i = self.counts.get((module, op), 0)
        self.counts[(module, op)] = i + 1
        return i


def kept_or_replaced(replacement: torch.Tensor | None, original: torch.Tensor) -> torch.Tensor:
    """A deliver callback may return a replacement (simulated quantization); None keeps the tensor."""
    return original if replacement is None else replacement
