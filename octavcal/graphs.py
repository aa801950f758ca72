"""Models whose forward pass octavcal cannot watch with its TorchFunctionMode: torch.export programs
(run node by node, with the same target names) and TorchScript (its Linear/Conv weights only)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from .core import Batch
from .errors import CalibrationError, OctavcalError
from .target import Deliver, Positions, Target
from .target import kept_or_replaced as _or

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d)  # fmt: skip
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# TorchScript keeps a module's original class name; these are PyTorch's own layers, not user classes.
_SCRIPT_LAYER_OPS = {"Linear": "linear", **{f"Conv{d}d": f"conv{d}d" for d in (1, 2, 3)},
                     **{f"ConvTranspose{d}d": f"conv_transpose{d}d" for d in (1, 2, 3)}}  # fmt: skip
_ATEN_LAYERS = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv1d.default: "conv1d",
    torch.ops.aten.conv2d.default: "conv2d",
    torch.ops.aten.conv3d.default: "conv3d",
}
_ATEN_MATMULS = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


def weight_targets(model: nn.Module) -> list[tuple[Target, torch.Tensor, int]]:
    """(target, weight, output-channel axis) of models whose forward cannot be watched, in order.

    For eager modules the forward pass itself finds the weights (``capture_activations``); this is for
    TorchScript (refuses hooks: its Linear/Conv by original class name) and exported programs (their
    graph's linear/conv nodes, weight as second argument).
    """
    found: list[tuple[Target, torch.Tensor, int]] = []
    if _is_exported(model):
        for node in model.graph.nodes:  # type: ignore[union-attr]
            if node.op == "call_function" and node.target in _ATEN_LAYERS and node.args[1].op == "get_attr":
                weight = _get_attr(model, node.args[1].target)
                module, op = _node_module(node), _ATEN_LAYERS[node.target]
                found.append((Target(module, "weight", op, "weight", node.args[1].target, 0), weight, 0))
        return found
    for name, module in model.named_modules():
        script_op = _SCRIPT_LAYER_OPS.get(getattr(module, "original_name", ""))
        if isinstance(module, torch.jit.ScriptModule) and script_op is not None:
            op = script_op
            axis = 1 if op.startswith("conv_transpose") else 0
            target = Target(name, "weight", op, "weight", f"{name}.weight" if name else "weight", axis)
            found.append((target, module.weight.detach(), axis))
    return found


def _is_exported(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and not any(
        isinstance(m, LAYER_TYPES) for m in model.modules()
    )


def _get_attr(model: nn.Module, dotted: str) -> torch.Tensor:
    obj: Any = model
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj.detach()


def _node_module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


class _ExportRunner(torch.fx.Interpreter):
    """Runs an exported program's graph, delivering layer inputs and matmul operands by node."""

    def __init__(self, module: torch.fx.GraphModule, deliver: Deliver) -> None:
        super().__init__(module)
        self.deliver = deliver
        self.positions = Positions()
        self.current = ""
        self.node: torch.fx.Node | None = None

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
        self.current, self.node = _node_module(n), n
        return super().run_node(n)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.current
        args = tuple(args)
        if target in _ATEN_LAYERS:
            weight = self.node.args[1] if self.node is not None else None
            param = (
                str(weight.target) if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else ""
            )
            t = Target(module, "input", _ATEN_LAYERS[target], "activation", param)
            args = (_or(self.deliver(t, args[0]), args[0]), *args[1:])
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
