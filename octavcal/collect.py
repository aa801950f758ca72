"""Find what to calibrate in a model and deliver its tensors, batch by batch, without editing it.

Linear/Conv inputs come from forward pre-hooks; batched matmul operands (``torch.matmul``, ``bmm``,
``@``) and scaled_dot_product_attention's Q, K, V from a TorchFunctionMode, named by the module that
encloses the call. torch.export programs are walked node by node instead, with the same names.
Every hook is removed on exit, also when a forward pass fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import CalibrationError, OctavcalError
from .loading import Batch, LoadedModel

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = (nn.Linear, *CONV_TYPES, *TRANSPOSED_CONV_TYPES)
_SCRIPT_LAYER_NAMES = {t.__name__ for t in LAYER_TYPES}
_MATMULS = {
    torch.matmul,
    torch.bmm,
    torch.Tensor.matmul,
    torch.Tensor.bmm,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
}
_ATEN_LAYERS = {
    torch.ops.aten.linear.default: "Linear",
    torch.ops.aten.conv1d.default: "Conv1d",
    torch.ops.aten.conv2d.default: "Conv2d",
    torch.ops.aten.conv3d.default: "Conv3d",
}
_ATEN_MATMULS = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


@dataclass(frozen=True)
class Target:
    """A calibrated tensor: module path and role ('weight', 'input', 'matmul0.lhs', 'sdpa0.query', ...)."""

    module: str
    role: str
    op: str  # 'Linear', 'Conv2d', 'matmul', 'sdpa', ...

    @property
    def id(self) -> str:
        return f"{self.module or '<root>'}:{self.role}"

    @property
    def kind(self) -> str:
        return "weight" if self.role == "weight" else "activation"


# Called with each tensor as it is seen; a returned tensor replaces it in the forward pass.
Deliver = Callable[[Target, torch.Tensor], "torch.Tensor | None"]


def weight_targets(model: nn.Module) -> list[tuple[Target, torch.Tensor, int]]:
    """(target, weight, output-channel axis) for every Linear/Conv, in definition order.

    TorchScript modules are recognised by their original class name; exported programs by walking
    their graph (weights are the second argument of each linear/conv node).
    """
    found: list[tuple[Target, torch.Tensor, int]] = []
    if isinstance(model, torch.fx.GraphModule) and not any(
        isinstance(m, LAYER_TYPES) for m in model.modules()
    ):
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in _ATEN_LAYERS and node.args[1].op == "get_attr":
                weight = _get_attr(model, node.args[1].target)
                found.append((Target(_node_module(node), "weight", _ATEN_LAYERS[node.target]), weight, 0))
        return found
    for name, module in model.named_modules():
        op = getattr(module, "original_name", type(module).__name__)
        if isinstance(module, LAYER_TYPES) or (
            isinstance(module, torch.jit.ScriptModule) and op in _SCRIPT_LAYER_NAMES
        ):
            axis = 1 if isinstance(module, TRANSPOSED_CONV_TYPES) or op.startswith("ConvTranspose") else 0
            found.append((Target(name, "weight", op), module.weight.detach(), axis))
    return found


def _get_attr(model: nn.Module, dotted: str) -> torch.Tensor:
    obj: Any = model
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj.detach()


def _node_module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


class _Positions:
    """Counts matmul/sdpa calls per enclosing module within one forward pass, for stable names."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def next(self, module: str, op: str) -> int:
        i = self.counts.get((module, op), 0)
        self.counts[(module, op)] = i + 1
        return i


class _OperandMode(TorchFunctionMode):
    """Sees torch.matmul/bmm/@ and scaled_dot_product_attention, which module hooks cannot."""

    def __init__(self, stack: list[str], positions: _Positions, deliver: Deliver) -> None:
        super().__init__()
        self.stack, self.positions, self.deliver = stack, positions, deliver

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func in _MATMULS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            swap = func is torch.Tensor.__rmatmul__
            lhs, rhs = (args[1], args[0]) if swap else (args[0], args[1])
            module = self.stack[-1]
            i = self.positions.next(module, "matmul")
            lhs = _or(self.deliver(Target(module, f"matmul{i}.lhs", "matmul"), lhs), lhs)
            rhs = _or(self.deliver(Target(module, f"matmul{i}.rhs", "matmul"), rhs), rhs)
            args = ((rhs, lhs) if swap else (lhs, rhs)) + tuple(args[2:])
        elif func is F.scaled_dot_product_attention:
            module = self.stack[-1]
            i = self.positions.next(module, "sdpa")
            args = list(args)
            for j, name in enumerate(("query", "key", "value")):
                where, key = (args, j) if j < len(args) else (kwargs, name)
                if isinstance(where, list) or name in kwargs:
                    where[key] = _or(
                        self.deliver(Target(module, f"sdpa{i}.{name}", "sdpa"), where[key]), where[key]
                    )
        return func(*args, **kwargs)


def _or(replacement: torch.Tensor | None, original: torch.Tensor) -> torch.Tensor:
    """A deliver callback may return a replacement (simulated quantization); None keeps the tensor."""
    return original if replacement is None else replacement


@contextmanager
def capture_activations(loaded: LoadedModel, deliver: Deliver) -> Iterator[Callable[..., Any]]:
    """Install capture on ``loaded.module`` and yield ``run(batch)``; everything is removed on exit.

    ``run`` raises CalibrationError naming the innermost module when the forward pass fails.
    """
    model = loaded.module
    if isinstance(model, torch.fx.GraphModule) and not any(
        isinstance(m, LAYER_TYPES) for m in model.modules()
    ):
        yield _ExportRunner(model, deliver).run_batch
        return
    stack: list[str] = [""]
    positions = _Positions()
    failing: list[str] = []
    handles = []

    def push(name: str) -> Callable[..., tuple[Any, ...] | None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            stack.append(name)
            if isinstance(module, LAYER_TYPES) and args and isinstance(args[0], torch.Tensor):
                _check_layer_input(name, module, args[0])
                new = deliver(Target(name, "input", type(module).__name__), args[0])
                if new is not None:
                    return (new, *args[1:])
            return None

        return hook

    def pop(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack.pop()

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(push(name)))
                handles.append(module.register_forward_hook(pop))

        def run(batch: Batch, grad: bool = False) -> Any:
            del stack[1:]
            positions.counts.clear()
            try:
                with (
                    torch.set_grad_enabled(grad and torch.is_grad_enabled()),
                    _OperandMode(stack, positions, deliver),
                ):
                    return model(*batch.args, **batch.kwargs)
            except OctavcalError:
                raise
            except Exception as exc:
                failing[:] = stack[1:]
                where = f"in module '{failing[-1]}'" if failing else "in the model's own forward"
                raise CalibrationError(
                    f"The model failed {where} on a batch with inputs {batch.describe()}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

        yield run
    finally:
        for handle in handles:
            handle.remove()


def _check_layer_input(name: str, module: nn.Module, x: torch.Tensor) -> None:
    """Name the layer, the shape seen and the shape expected, before PyTorch's own error does less."""
    if isinstance(module, nn.Linear) and (x.dim() == 0 or x.shape[-1] != module.in_features):
        raise CalibrationError(
            f"Layer '{name}' (Linear) expects inputs of shape (..., {module.in_features}); "
            f"got {tuple(x.shape)}."
        )
    if isinstance(module, (*CONV_TYPES, *TRANSPOSED_CONV_TYPES)):
        dims = int(type(module).__name__[-2])
        if x.dim() not in (dims + 1, dims + 2) or x.shape[-dims - 1] != module.in_channels:
            raise CalibrationError(
                f"Layer '{name}' ({type(module).__name__}) expects inputs of shape (N, {module.in_channels}, "
                f"{', '.join('...' for _ in range(dims))}); got {tuple(x.shape)}."
            )


class _ExportRunner(torch.fx.Interpreter):
    """Runs an exported program's graph, delivering layer inputs and matmul operands by node."""

    def __init__(self, module: torch.fx.GraphModule, deliver: Deliver) -> None:
        super().__init__(module)
        self.deliver = deliver
        self.positions = _Positions()
        self.current = ""

    def run_batch(self, batch: Batch, grad: bool = False) -> Any:
        self.positions.counts.clear()
        flat, _ = torch.utils._pytree.tree_flatten((batch.args, batch.kwargs))
        try:
            with torch.no_grad():
                out = self.run(*flat)
            spec = getattr(self.module, "_out_spec", None)
            return (
                torch.utils._pytree.tree_unflatten(list(out), spec)
                if isinstance(out, (list, tuple)) and spec
                else out
            )
        except OctavcalError:
            raise
        except Exception as exc:
            if "Guard failed" in str(exc):
                guard = str(exc).split("\n")[0]
                raise CalibrationError(
                    f"The exported program does not accept a batch with inputs {batch.describe()} ({guard}). "
                    "It was exported with fixed shapes: export it with a dynamic batch dimension "
                    "(torch.export.Dim), or use batches of the exported size."
                ) from exc
            where = f"in module '{self.current}'" if self.current else "in its graph"
            raise CalibrationError(
                f"The exported program failed {where} on a batch with inputs "
                f"{batch.describe()}: {type(exc).__name__}: {exc}"
            ) from exc

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = _node_module(n)
        return super().run_node(n)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.current
        args = tuple(args)
        if target in _ATEN_LAYERS:
            first = _or(self.deliver(Target(module, "input", _ATEN_LAYERS[target]), args[0]), args[0])
            args = (first, *args[1:])
        elif target in _ATEN_MATMULS:
            i = self.positions.next(module, "matmul")
            lhs = _or(self.deliver(Target(module, f"matmul{i}.lhs", "matmul"), args[0]), args[0])
            rhs = _or(self.deliver(Target(module, f"matmul{i}.rhs", "matmul"), args[1]), args[1])
            args = (lhs, rhs, *args[2:])
        elif target is torch.ops.aten.scaled_dot_product_attention.default:
            i = self.positions.next(module, "sdpa")
            qkv = [
                _or(self.deliver(Target(module, f"sdpa{i}.{n}", "sdpa"), t), t)
                for n, t in zip(("query", "key", "value"), args[:3], strict=True)
            ]
            args = (*qkv, *args[3:])
        return super().call_function(target, args, kwargs)
