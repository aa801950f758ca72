"""Where each target of a scale file is in an exported ONNX graph: weights by the value of their
Parameter among the initializers, matmul operands by module scope and call order."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ScaleFileError
from ..scales import ScaleTable, TargetScales

_LAYER_OPS = {"Gemm", "MatMul", "Conv", "ConvTranspose"}
_WRAPPER_SCOPE = "model"  # the model's scope inside _TensorInputs, dropped from ONNX node names


@dataclass
class OnnxTarget:
    target: str
    node: str
    input_index: int
    tensor: str  # the float tensor name in the exported (unquantized) graph
    kind: str
    bits: int
    signed: bool
    axis: int | None
    scale: list[float]


def _scope(node_name: str) -> str:
    """'/layers.0/attention/query/MatMul' -> 'layers.0.attention.query' (the module path)."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == _WRAPPER_SCOPE:
        parts = parts[1:]
    return ".".join(parts[:-1])


def _edge(
    tid: str, entry: TargetScales, node: Any, index: int, axis: int | None, scale: list[float]
) -> OnnxTarget:
    return OnnxTarget(
        tid, node.name, index, node.input[index], entry.kind, entry.bits, entry.signed, axis, scale
    )


def _onnx_scope(module: str, by_scope: dict[str, list[Any]]) -> str:
    """The exporter names scopes by the modules actually called: a head that calls
    ``self.model.decoder(...)`` directly gives 'decoder.layers.0', not 'model.decoder.layers.0'."""
    if module in by_scope:
        return module
    parts = module.split(".")
    return next(
        (".".join(parts[i:]) for i in range(1, len(parts)) if ".".join(parts[i:]) in by_scope), module
    )


def _repeated_calls(module: str, by_scope: dict[str, list[Any]], table: ScaleTable) -> list[Any]:
    """The nodes of every call of ``module``, in order: the exporter names the second call of a shared
    module (ALBERT's layers) 'attention_1', the third 'attention_2' (unless that is a real module)."""
    scope = _onnx_scope(module, by_scope)
    real = {e.module for e in table.targets.values()}
    nodes, k = list(by_scope.get(scope, [])), 1
    while f"{scope}_{k}" in by_scope and f"{module}_{k}" not in real:
        nodes += by_scope[f"{scope}_{k}"]
        k += 1
    return nodes


def _initializers_by_value(graph: Any) -> dict[tuple[tuple[int, ...], bytes], str]:
    """Float initializers with 2+ dimensions by (shape, digest of their float32 bytes)."""
    from onnx import numpy_helper

    out: dict[tuple[tuple[int, ...], bytes], str] = {}
    for init in graph.initializer:
        if len(init.dims) >= 2:
            a = numpy_helper.to_array(init)
            if a.dtype.kind == "f":
                out.setdefault(_digest(a), init.name)
    return out


def _digest(a: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return tuple(a.shape), hashlib.sha1(a.tobytes()).digest()


def identity_aliases(graph: Any) -> dict[str, str]:
    """Identity outputs -> the tensor they pass on: the exporter shares one initializer between the
    calls of a reused layer (ALBERT) through Identity nodes."""
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity":
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    return alias


def _param_edges(
    graph: Any, params: dict[str, torch.Tensor], by_value: dict[tuple[tuple[int, ...], bytes], str]
) -> dict[str, tuple[list[tuple[Any, int]], bool]]:
    """Per Parameter name: the layer nodes reading its initializer, with the weight's input index, in
    graph (= call) order, and whether the initializer holds it transposed (a MatMul's W^T)."""
    alias = identity_aliases(graph)
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        if node.op_type in _LAYER_OPS:
            for index, name in enumerate(node.input[:2]):
                consumers.setdefault(alias.get(name, name), []).append((node, index))
    out = {}
    for pname, p in params.items():
        w = p.detach().to("cpu", torch.float32).numpy()
        for transposed, value in ((False, w), (True, w.T if w.ndim == 2 else None)):
            init = by_value.get(_digest(value)) if value is not None else None
            if init is not None and init in consumers:
                out[pname] = (consumers[init], transposed)
                break
    return out


def locate_targets(
    graph: Any, table: ScaleTable, method: str, params: dict[str, torch.Tensor] | None = None
) -> list[OnnxTarget]:
    """Match every target of ``table`` to node inputs of ``graph``.

    A weight (and its op's input) is found by the value of its Parameter among the initializers, so
    names and scopes do not matter: the k-th layer node reading it is the op's k-th call. Matmul
    operands between activations are found by module scope and call order.
    """
    by_scope: dict[str, list[Any]] = {}
    for node in graph.node:
        by_scope.setdefault(_scope(node.name), []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    wanted = {e.param for e in table.targets.values() if e.param}
    edges = _param_edges(
        graph, {k: v for k, v in (params or {}).items() if k in wanted}, _initializers_by_value(graph)
    )
    found, missing = [], []
    for tid, entry in table.targets.items():
        if method not in entry.methods:
            continue
        amax = entry.methods[method].amax.reshape(-1)
        scale = (amax / entry.grid(table.convention).qmax).tolist()
        if entry.param:
            edges_found = _param_target(tid, entry, edges.get(entry.param), scale)
        else:
            edges_found = _scoped_target(tid, entry, by_scope, initializers, table, scale)
        found += edges_found
        if not edges_found:
            missing.append(tid)
    if missing:
        raise ScaleFileError(
            f"{len(missing)} targets have no counterpart in the exported ONNX graph: "
            f"{', '.join(missing[:5])}. A weight must reach a Gemm, MatMul or Conv unchanged as an "
            "initializer; it does not when it is sliced (cross-attention's in-projection), computed in the "
            "forward pass (weight norm), or folded by the exporter (a Conv followed by BatchNorm). sdpa "
            "operands export as one fused op: use explicit-matmul (eager) attention."
        )
    return found


def _param_target(
    tid: str, entry: TargetScales, readers: tuple[list[tuple[Any, int]], bool] | None, scale: list[float]
) -> list[OnnxTarget]:
    """A weight: every layer node reading its initializer; its op's k-th input: the k-th reader's other
    operand. None found: []."""
    if readers is None:
        return []
    nodes, transposed = readers
    if entry.kind == "weight":
        axis = None if entry.axis is None else (1 - entry.axis if transposed else entry.axis)
        return [_edge(tid, entry, node, index, axis, scale) for node, index in nodes]
    call = int(entry.role.rpartition("input")[2] or 0)
    if call >= len(nodes):
        return []
    node, index = nodes[call]
    return [_edge(tid, entry, node, 1 - index if node.op_type in ("Gemm", "MatMul") else 0, None, scale)]


def _scoped_target(
    tid: str,
    entry: TargetScales,
    by_scope: dict[str, list[Any]],
    initializers: dict[str, Any],
    table: ScaleTable,
    scale: list[float],
) -> list[OnnxTarget]:
    """A matmul operand by its module's scope and call order; version 1 files and exported programs'
    layers by the first layer node in the module's scope. None found: []."""
    nodes = by_scope.get(_onnx_scope(entry.module, by_scope), [])
    layer = [n for n in nodes if n.op_type in _LAYER_OPS and n.input[1] in initializers]
    if entry.role in ("input", "weight") and layer:
        node, axis = layer[0], None
        if entry.role == "weight" and entry.axis is not None:
            # Gemm(transB=1) and Conv keep PyTorch's (out, in, ...) layout; MatMul holds W^T: (in, out).
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            axis = 0 if node.op_type == "Conv" or trans_b else 1
        return [_edge(tid, entry, node, 0 if entry.role == "input" else 1, axis, scale)]
    if not entry.role.startswith("matmul"):
        return []
    position, side = entry.role[len("matmul") :].split(".")
    # Every MatMul in the module's own scope counts, parameter operands included, as in calibration; a
    # child Linear's MatMul lives in the child's scope.
    matmuls = [n for n in _repeated_calls(entry.module, by_scope, table) if n.op_type == "MatMul"]
    if int(position) >= len(matmuls):
        return []
    return [_edge(tid, entry, matmuls[int(position)], 0 if side == "lhs" else 1, None, scale)]
