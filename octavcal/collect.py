"""Find what to calibrate in a model and deliver its tensors, batch by batch, without editing it.

One TorchFunctionMode decides what a target is, from the ops a forward pass runs: every linear,
convolution, addmm/mm/matmul/bmm whose weight is a Parameter of the model (or a view of one) gives a
weight target named after the Parameter and an input target; batched matmuls between activations and
scaled_dot_product_attention give operand targets named by the enclosing module. Module hooks only
keep that stack of module names. torch.export programs are walked node by node instead; TorchScript
refuses hooks (graphs.py). Everything is removed on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .core import Batch, LoadedModel
from .errors import CalibrationError, OctavcalError
from .graphs import _ExportRunner, _is_exported
from .offload import parameter_names, quiet_hooks
from .target import Deliver, Positions, Target, kept_or_replaced, weight_role

# Ops whose second argument is the weight, and the weight axis that holds output channels.
_WEIGHT_SECOND = {
    F.linear: ("linear", 0),
    F.conv1d: ("conv1d", 0),
    F.conv2d: ("conv2d", 0),
    F.conv3d: ("conv3d", 0),
    F.conv_transpose1d: ("conv_transpose1d", 1),
    F.conv_transpose2d: ("conv_transpose2d", 1),
    F.conv_transpose3d: ("conv_transpose3d", 1),
}
_MATMULS = {  # these count towards the matmul positions of their module (as in the ONNX graph)
    torch.matmul,
    torch.linalg.matmul,
    torch.bmm,
    torch.Tensor.matmul,
    torch.Tensor.bmm,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
}
_PRODUCTS = {**{f: f.__name__ for f in _MATMULS}, torch.mm: "mm", torch.Tensor.mm: "mm"}
_ADDMM = {torch.addmm, torch.Tensor.addmm}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}  # MultiheadAttention's masked q @ k^T


class _Params:
    """The model's Parameters by identity, with every name each one has (tied weights have several).

    A device map's offload hooks put a fresh Parameter on a module for each of its forward passes
    (the one named at rest is on the "meta" device): a Parameter met that is not the model's at start
    is found by name on the running modules instead, and never kept (the hook frees it afterwards)."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.names: dict[int, list[str]] = {}
        self.tensors: dict[int, nn.Parameter] = {}
        self.modules = modules
        self.by_name = parameter_names(model)
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names[id(p)] = self.by_name.get(name, [name])
            self.tensors[id(p)] = p
        self.aliases = {name for name, names in self.by_name.items() if name != names[0]}

    def owner_of(self, t: Any, stack: list[str]) -> tuple[nn.Parameter, list[str]] | None:
        """The Parameter ``t`` is, or is a view of (MultiheadAttention chunks its in_proj_weight),
        with its names."""
        if not isinstance(t, torch.Tensor):
            return None
        for candidate in (t, t._base):
            if candidate is not None and self.tensors.get(id(candidate)) is candidate:
                return self.tensors[id(candidate)], self.names[id(candidate)]
        for candidate in (t, t._base):
            if isinstance(candidate, nn.Parameter):
                names = self._loaded(candidate, stack)
                if names is not None:
                    return candidate, names
        return None

    def _loaded(self, p: nn.Parameter, stack: list[str]) -> list[str] | None:
        """The names of a Parameter an offload hook loaded, from the innermost running module that holds
        it (a layer reads its own weight)."""
        for module in reversed(stack):
            for local, q in self.modules[module].named_parameters(remove_duplicate=False):
                if q is p:
                    return self.by_name.get(f"{module}.{local}" if module else local)
        return None

    def name_in(self, names: list[str], stack: list[str]) -> str:
        """The name under the innermost running module that holds the Parameter (``lm_head.weight``
        for a head tied to the embedding), else its first name."""
        for module in reversed(stack):
            for name in names:
                if name.rpartition(".")[0] == module:
                    return name
        return names[0]


@dataclass
class Capture:
    """``run(batch)`` runs one forward pass with capture on; afterwards ``uses`` holds, per Parameter
    (first name), the ops that read it and ``calibrated`` the Parameters that became weight targets."""

    run: Callable[..., Any]
    uses: dict[str, set[str]] = field(default_factory=dict)
    calibrated: set[str] = field(default_factory=set)
    tied: dict[str, list[str]] = field(default_factory=dict)  # target param name -> its other names
    aliases: set[str] = field(default_factory=set)  # names of a Parameter after its first (tied weights)

    def __call__(self, batch: Batch, grad: bool = False) -> Any:
        return self.run(batch, grad)


def _never(*args: Any) -> bool:
    return False


class _CaptureMode(TorchFunctionMode):
    """Sees every torch function call of a forward pass, which module hooks cannot."""

    def __init__(self, capture: _State) -> None:
        super().__init__()
        self.state = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        state = self.state
        if state.paused:  # an offload hook moving tensors: not the model's computation
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            # A Python function that calls linear, sdpa and bmm: the mode is popped while this handler
            # runs, so push it again, and keep the function's own dispatch check from calling us again.
            with self, mock.patch.object(F, "has_torch_function", _never):
                return func(*args, **kwargs)
        args = tuple(args)
        if func in _WEIGHT_SECOND and ("input" in kwargs or "weight" in kwargs):
            args, kwargs = _leading_positional(args, kwargs, ("input", "weight"))
        if func in _WEIGHT_SECOND and len(args) >= 2:
            op, axis = _WEIGHT_SECOND[func]
            args = state.weight_op(op, args, 0, 1, axis, kwargs)
        elif func in _ADDMM and len(args) >= 3:
            args = state.product("addmm", args, 1, 2, count=False)
        elif func in _BADDBMM and len(args) >= 3:
            args = state.product("matmul", args, 1, 2, count=True)
        elif func in _PRODUCTS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            swap = func is torch.Tensor.__rmatmul__  # a.__rmatmul__(b) is b @ a
            args = state.product(
                "matmul" if func in _MATMULS else _PRODUCTS[func],
                args,
                1 if swap else 0,
                0 if swap else 1,
                count=func in _MATMULS,
            )
        elif func is F.scaled_dot_product_attention:
            args = state.sdpa(list(args), kwargs)
        elif state.record_uses:
            state.record(getattr(func, "__name__", str(func)), args, kwargs)
        return func(*args, **kwargs)


class _State:
    def __init__(self, model: nn.Module, deliver: Deliver, capture: Capture) -> None:
        self.deliver, self.capture = deliver, capture
        self.modules = dict(model.named_modules())
        self.params = _Params(model, self.modules)
        capture.aliases = self.params.aliases
        self.stack: list[str] = [""]
        self.paused = 0
        self.positions = Positions()
        self.record_uses = True  # the first forward pass records what every Parameter is used for

    def pause(self, on: bool) -> None:
        self.paused += 1 if on else -1

    def record(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                owner = self.params.owner_of(t, self.stack)
                if owner is not None:
                    self.capture.uses.setdefault(owner[1][0], set()).add(op)

    def weight_op(
        self, op: str, args: tuple[Any, ...], xi: int, wi: int, axis: int, kwargs: dict[str, Any]
    ) -> tuple[Any, ...]:
        """Deliver the weight (a Parameter) and the input of one op; returns its (maybe replaced) args."""
        x, w = args[xi], args[wi]
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
            return args
        owner = self.params.owner_of(w, self.stack)
        if owner is None:
            if op == "matmul" or op == "mm" or op == "addmm":
                return args
            return self.computed_weight_op(op, args, xi, wi, axis)
        p, names = owner
        axis = _param_axis(w, p, axis)
        name = self.params.name_in(names, self.stack)
        first = names[0]
        module, _, leaf = name.rpartition(".")
        wrole, irole = weight_role(leaf)
        k = self.positions.next(name, "input")
        irole = f"{irole}{k}" if k else irole
        if self.record_uses:
            self.capture.uses.setdefault(first, set()).add(op)
            self.capture.calibrated.add(first)
            if len(names) > 1:
                self.capture.tied[name] = [n for n in names if n != name]
        if op != "matmul" and op != "mm" and op != "addmm":
            _check_input(module or "<root>", self.modules.get(module), op, x, w, args, kwargs)
        weight = self.deliver(Target(module, wrole, op, "weight", name, axis), p.detach())
        if weight is not None:
            args = _replaced(args, wi, weight if w is p else _same_view(weight, w, p))
        new_x = self.deliver(Target(module, irole, op, "activation", name), x)
        return _replaced(args, xi, kept_or_replaced(new_x, x))

    def computed_weight_op(
        self, op: str, args: tuple[Any, ...], xi: int, wi: int, axis: int
    ) -> tuple[Any, ...]:
        """A linear/conv whose weight is computed in the forward pass (weight norm, a parametrization,
        a cast): the weight and input are named after the module that runs it (``param`` '')."""
        module = self.stack[-1]
        k = self.positions.next(module, "input")
        # Each call has its own weight (a module may compute a different one per call).
        role = f"weight{k}" if k else "weight"
        weight = self.deliver(Target(module, role, op, "weight", "", axis), args[wi].detach())
        if weight is not None:
            args = _replaced(args, wi, weight)
        target = Target(module, f"input{k}" if k else "input", op, "activation", "")
        return _replaced(args, xi, kept_or_replaced(self.deliver(target, args[xi]), args[xi]))

    def product(self, op: str, args: tuple[Any, ...], li: int, ri: int, count: bool) -> tuple[Any, ...]:
        """A matrix product: with a Parameter operand it is a layer (transformers' Conv1D is an addmm
        with the weight stored (in, out)); between activations its operands are targets."""
        lhs, rhs = args[li], args[ri]
        module = self.stack[-1]
        i = self.positions.next(module, "matmul") if count else 0
        rp, lp = self.params.owner_of(rhs, self.stack), self.params.owner_of(lhs, self.stack)
        if rp is not None and rhs.dim() >= 2:  # x @ W: output features along W's last axis
            return self.weight_op(op, args, li, ri, rhs.dim() - 1, {})
        if lp is not None and lhs.dim() >= 2:  # W @ x: output features along W's second-to-last axis
            return self.weight_op(op, args, ri, li, lhs.dim() - 2, {})
        if not count:  # mm/addmm between activations were never targets (as in the ONNX graph's Gemm)
            return args
        new_l = kept_or_replaced(self.deliver(Target(module, f"matmul{i}.lhs", "matmul"), lhs), lhs)
        new_r = kept_or_replaced(self.deliver(Target(module, f"matmul{i}.rhs", "matmul"), rhs), rhs)
        return _replaced(_replaced(args, li, new_l), ri, new_r)

    def sdpa(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if self.record_uses:  # a Parameter as query, key or value is a product octavcal does not model
            self.record("scaled_dot_product_attention", tuple(args), kwargs)
        module = self.stack[-1]
        i = self.positions.next(module, "sdpa")
        for j, name in enumerate(("query", "key", "value")):
            where: Any
            where, key = (args, j) if j < len(args) else (kwargs, name)
            if isinstance(where, list) or name in kwargs:
                where[key] = kept_or_replaced(
                    self.deliver(Target(module, f"sdpa{i}.{name}", "sdpa"), where[key]), where[key]
                )
        return tuple(args)


def _leading_positional(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``F.linear(input=x, weight=w)`` as ``F.linear(x, w)``: the leading arguments by position."""
    args, kwargs = tuple(args), dict(kwargs)
    for name in names[len(args) :]:
        if name not in kwargs:
            break
        args += (kwargs.pop(name),)
    return args, kwargs


def _param_axis(view: torch.Tensor, param: torch.Tensor, axis: int) -> int:
    """The Parameter's axis that ``view``'s ``axis`` runs along (``x @ W.T`` reads W's rows as
    columns; a chunk keeps the axes), found by stride and size."""
    if view is param:
        return axis
    stride, size = view.stride(axis), view.size(axis)
    same = [d for d in range(param.dim()) if param.stride(d) == stride]
    return next((d for d in same if param.size(d) == size), same[0] if same else axis)


def _replaced(args: tuple[Any, ...], i: int, value: Any) -> tuple[Any, ...]:
    return args if args[i] is value else (*args[:i], value, *args[i + 1 :])


def _same_view(full: torch.Tensor, view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The slice of a replacement ``full`` that ``view`` is of ``param`` (same layout)."""
    full = full.contiguous() if param.is_contiguous() else full
    if full.stride() != param.stride():
        raise CalibrationError("A view of a non-contiguous Parameter cannot be replaced.")
    offset = full.storage_offset() + view.storage_offset() - param.storage_offset()
    return full.as_strided(view.shape, view.stride(), offset)


def _check_input(
    name: str, module: nn.Module | None, op: str, x: torch.Tensor, w: torch.Tensor,
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> None:  # fmt: skip
    """Name the layer, the shape seen and the shape expected, before PyTorch's own error does less."""
    kind = type(module).__name__ if module is not None else op
    if op == "linear":
        if x.dim() == 0 or x.shape[-1] != w.shape[-1]:
            raise CalibrationError(
                f"Layer '{name}' ({kind}) expects inputs of shape (..., {w.shape[-1]}); got {tuple(x.shape)}."
            )
        return
    dims = w.dim() - 2
    transposed = op.startswith("conv_transpose")
    groups = int(
        kwargs.get("groups", args[6] if len(args) > 6 else 1)
    )  # 7th argument of conv and its transpose
    channels = w.shape[0] if transposed else w.shape[1] * groups
    if x.dim() not in (dims + 1, dims + 2) or x.shape[-dims - 1] != channels:
        raise CalibrationError(
            f"Layer '{name}' ({kind}) expects inputs of shape (N, {channels}, "
            f"{', '.join('...' for _ in range(dims))}); got {tuple(x.shape)}."
        )


@contextmanager
def capture_activations(loaded: LoadedModel, deliver: Deliver) -> Iterator[Capture]:
    """Install capture on ``loaded.module`` and yield a ``Capture``; everything is removed on exit.

    ``deliver`` gets every weight (kind 'weight', the whole Parameter, on each call of its op) and
    every activation target. Running raises CalibrationError naming the innermost module when the
    forward pass fails.
    """
    model = loaded.module
    if _is_exported(model):
        yield Capture(_ExportRunner(model, deliver).run_batch)  # type: ignore[arg-type]
        return
    handles = []
    capture = Capture(lambda batch, grad=False: None)
    state = _State(model, deliver, capture)
    stack = state.stack

    def push(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            stack.append(name)

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
            state.positions.counts.clear()
            state.paused = 0
            try:
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()), _CaptureMode(state):
                    return model(*batch.args, **batch.kwargs)
            except OctavcalError:
                raise
            except Exception as exc:
                where = f"in module '{stack[-1]}'" if len(stack) > 1 else "in the model's own forward"
                raise CalibrationError(
                    f"The model failed {where} on a batch with inputs {batch.describe()}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                state.record_uses = False

        capture.run = run
        with quiet_hooks(model, state.pause):
            yield capture
    finally:
        for handle in handles:
            handle.remove()
