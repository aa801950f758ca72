"""ONNX QDQ export: QuantizeLinear/DequantizeLinear at every calibrated target of a float ONNX graph.

The float model is exported with PyTorch's TorchScript-based exporter, whose node names carry the
module scope (``/layers.0/attention/query/MatMul``); targets are matched to graph edges by that
scope. Each activation edge gets Clip(-amax or 0, amax) -> QuantizeLinear -> DequantizeLinear with an
int8 (signed) or uint8 (unsigned) container, zero point 0: the Clip realises the narrow B-bit grid
exactly for any B <= 8, since |x / scale| <= qmax then rounds within [-qmax, qmax]. Weights are clipped
offline and quantized per output channel (``axis`` of QuantizeLinear).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import Batch, LoadedModel
from ..errors import LoadError, ScaleFileError, SpecError
from ..files import atomic_write
from ..scales import ScaleTable, TargetScales, check_fingerprint

OPSET = 17
_LAYER_OPS = {"Gemm", "MatMul", "Conv", "ConvTranspose"}


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


class _TensorInputs(torch.nn.Module):
    """Calls the model with the batch's tensors only, so that other forward arguments keep their Python
    defaults in the traced graph instead of becoming graph inputs (a Hugging Face ``logits_to_keep``)."""

    def __init__(self, model: torch.nn.Module, positional: int, keys: list[str], fixed: dict[str, Any]):
        super().__init__()
        self.model, self.positional, self.keys, self.fixed = model, positional, keys, fixed

    def forward(self, *tensors: torch.Tensor) -> Any:
        named = dict(zip(self.keys, tensors[self.positional :], strict=True))
        return self.model(*tensors[: self.positional], **named, **self.fixed)


_WRAPPER_SCOPE = "model"  # the model's scope inside _TensorInputs, dropped from ONNX node names


def export_float_onnx(model: LoadedModel, batch: Batch, path: Path) -> list[str]:
    """Export ``model`` to ONNX with a dynamic first (batch) dimension; returns the input names."""
    module = model.module
    if model.format in ("export", "torchscript") or not isinstance(module, torch.nn.Module):
        raise SpecError(
            f"ONNX export needs an eager nn.Module (state_dict + architecture, pickle or Hugging Face); "
            f"got a {model.format} model."
        )
    signature = inspect.signature(module.forward).parameters
    kwargs = {k: v for k, v in batch.kwargs.items() if isinstance(v, torch.Tensor)}
    # A Hugging Face model returns its key/value cache, which the exporter cannot trace.
    fixed = {"use_cache": False} if "use_cache" in signature and "use_cache" not in batch.kwargs else {}
    fixed |= {k: v for k, v in batch.kwargs.items() if k not in kwargs}
    names = [f"input{i}" for i in range(len(batch.args))] + list(kwargs)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()):
        # QDQ carries float32 scales and activations: export a float32 copy (the same values for
        # bfloat16/float16 weights, so they still match their scales).
        module = copy.deepcopy(module).float()
        batch = batch.to("cpu", torch.float32)
        kwargs = {k: v for k, v in batch.kwargs.items() if isinstance(v, torch.Tensor)}
    wrapper = _TensorInputs(module, len(batch.args), list(kwargs), fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export_checked(wrapper, (*batch.args, *kwargs.values()), path, names)
    return names


def _export_checked(module: torch.nn.Module, example: tuple[Any, ...], path: Path, names: list[str]) -> None:
    try:
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=["output"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "output"]},
        )
    except Exception as exc:
        raise LoadError(
            f"Exporting the model to ONNX failed on the example batch: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc}."
        ) from exc


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


def _identity_aliases(graph: Any) -> dict[str, str]:
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
    alias = _identity_aliases(graph)
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
            if entry.param not in edges:
                missing.append(tid)
                continue
            readers, transposed = edges[entry.param]
            if entry.kind == "weight":
                axis = None if entry.axis is None else (1 - entry.axis if transposed else entry.axis)
                found += [_edge(tid, entry, node, index, axis, scale) for node, index in readers]
                continue
            call = int(entry.role.rpartition("input")[2] or 0)
            if call >= len(readers):
                missing.append(tid)
                continue
            node, index = readers[call]
            found.append(
                _edge(tid, entry, node, 1 - index if node.op_type in ("Gemm", "MatMul") else 0, None, scale)
            )
            continue
        nodes = by_scope.get(_onnx_scope(entry.module, by_scope), [])
        layer = [n for n in nodes if n.op_type in _LAYER_OPS and n.input[1] in initializers]
        if entry.role in ("input", "weight") and layer:  # version 1 files and exported programs
            node = layer[0]
            index = 0 if entry.role == "input" else 1
            axis = None
            if entry.role == "weight":
                # Gemm(transB=1) and Conv keep PyTorch's (out, in, ...) layout; MatMul holds W^T: (in, out).
                trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
                axis = 0 if node.op_type in ("Conv", "ConvTranspose") or trans_b else 1
                if node.op_type == "ConvTranspose":
                    axis = 1
                if entry.axis is None:
                    axis = None
            found.append(_edge(tid, entry, node, index, axis, scale))
        elif entry.role.startswith("matmul"):
            position, side = entry.role[len("matmul") :].split(".")
            # Every MatMul in the module's own scope counts, parameter operands included, as in
            # calibration; a child Linear's MatMul lives in the child's scope.
            matmuls = [n for n in _repeated_calls(entry.module, by_scope, table) if n.op_type == "MatMul"]
            if int(position) < len(matmuls):
                node = matmuls[int(position)]
                index = 0 if side == "lhs" else 1
                found.append(_edge(tid, entry, node, index, None, scale))
            else:
                missing.append(tid)
        else:
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


def insert_qdq(model: Any, targets: list[OnnxTarget], table: ScaleTable) -> None:
    """Rewire each target's node input through Clip -> QuantizeLinear -> DequantizeLinear."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    aliases = _identity_aliases(graph)
    new_nodes: dict[str, list[Any]] = {}
    replaced: set[str] = set()
    for k, t in enumerate(targets):
        if t.bits > 8:
            raise SpecError(
                f"Target '{t.target}' has {t.bits} bits; the ONNX export holds at most 8 (int8 container)."
            )
        qmax = table.targets[t.target].grid(table.convention).qmax
        if qmax > (127 if t.signed else 255):
            raise SpecError(
                f"Target '{t.target}' uses integers up to {qmax} ({t.bits} bits, {table.convention} grid), "
                "more than an 8-bit container holds; export 8 bits on the runtime grid, or fewer bits."
            )
        node = nodes[t.node]
        zp_type = TensorProto.INT8 if t.signed else TensorProto.UINT8
        prefix = f"octavcal_{k}"
        scale = np.asarray(t.scale, dtype=np.float32)
        amax = scale * qmax
        if t.kind == "weight":
            source_name = node.input[t.input_index]
            w = numpy_helper.to_array(inits[aliases.get(source_name, source_name)]).astype(np.float32)
            shape = [1] * w.ndim
            if t.axis is not None:
                shape[t.axis] = -1
            clipped = np.clip(w, -amax.reshape(shape), amax.reshape(shape)).astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(clipped, f"{prefix}_w"))
            replaced.add(node.input[t.input_index])
            source = f"{prefix}_w"
            chain = []
        else:
            lo = np.asarray(-amax[0] if t.signed else 0.0, dtype=np.float32)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(lo, f"{prefix}_lo"),
                    numpy_helper.from_array(amax[0].astype(np.float32), f"{prefix}_hi"),
                ]
            )
            chain = [
                helper.make_node(
                    "Clip",
                    [t.tensor, f"{prefix}_lo", f"{prefix}_hi"],
                    [f"{prefix}_clipped"],
                    name=f"{prefix}_Clip",
                )
            ]
            source = f"{prefix}_clipped"
        scale_init = scale if t.axis is not None else scale[:1].reshape(())
        zero = np.zeros(scale_init.shape, dtype=np.int8 if t.signed else np.uint8)
        graph.initializer.extend(
            [
                numpy_helper.from_array(scale_init.astype(np.float32), f"{prefix}_scale"),
                helper.make_tensor(f"{prefix}_zp", zp_type, list(zero.shape), zero.reshape(-1).tolist()),
            ]
        )
        axis: dict[str, Any] = {"axis": t.axis} if t.axis is not None else {}
        chain += [
            helper.make_node(
                "QuantizeLinear",
                [source, f"{prefix}_scale", f"{prefix}_zp"],
                [f"{prefix}_q"],
                name=f"{prefix}_QuantizeLinear",
                **axis,
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zp"],
                [f"{prefix}_dq"],
                name=f"{prefix}_DequantizeLinear",
                **axis,
            ),
        ]
        node.input[t.input_index] = f"{prefix}_dq"
        new_nodes.setdefault(t.node, []).extend(chain)
    ordered = []
    for node in graph.node:  # keep a topological order: each chain right before its consumer
        ordered.extend(new_nodes.get(node.name, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _checked(model: LoadedModel, table: ScaleTable, method: str, batch: Batch) -> None:
    from ..coverage import check_targets

    check_fingerprint(table, model.module)
    table.require_method(method)
    check_targets(table, model, batch)


def _mapping(targets: list[OnnxTarget], table: ScaleTable, method: str, inputs: list[str]) -> dict[str, Any]:
    """Targets -> ONNX edges; a weight read by several nodes (tied, or shared layers) lists them all."""
    out: dict[str, Any] = {}
    for t in targets:
        row = out.setdefault(
            t.target,
            {
                "onnx_node": t.node,
                "input_index": t.input_index,
                "onnx_tensor": t.tensor,
                "bits": t.bits,
                "signed": t.signed,
                "axis": t.axis,
                "scale": t.scale,
                "onnx_nodes": [],
            },
        )
        row["onnx_nodes"].append(t.node)
    return {"method": method, "inputs": inputs, "grid": table.meta.get("grid"), "targets": out}


def _params(model: LoadedModel) -> dict[str, torch.Tensor]:
    return dict(model.module.named_parameters(remove_duplicate=False))


def _float_graph(model: LoadedModel, table: ScaleTable, method: str, batch: Batch) -> tuple[Any, list[str]]:
    """Check the scales fit the model, export it to float ONNX; returns (onnx model, input names)."""
    import onnx

    _checked(model, table, method, batch)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        inputs = export_float_onnx(model, batch, float_path)
        return onnx.load(str(float_path)), inputs


def export_float(
    model: LoadedModel, table: ScaleTable, method: str, batch: Batch, path: str | Path
) -> dict[str, Any]:
    """Write the float ONNX model (for TensorRT with a calibration cache); returns the target mapping."""
    onnx_model, inputs = _float_graph(model, table, method, batch)
    targets = locate_targets(onnx_model.graph, table, method, _params(model))
    mapping = _mapping(targets, table, method, inputs)
    atomic_write(Path(path), onnx_model.SerializeToString())
    return mapping


def export_qdq(
    model: LoadedModel, table: ScaleTable, method: str, batch: Batch, path: str | Path
) -> dict[str, Any]:
    """Write a QDQ ONNX model and ``<path>.json`` mapping targets to ONNX tensors; returns the mapping."""
    import onnx

    onnx_model, inputs = _float_graph(model, table, method, batch)
    targets = locate_targets(onnx_model.graph, table, method, _params(model))
    insert_qdq(onnx_model, targets, table)
    onnx.checker.check_model(onnx_model)
    _check_runs(onnx_model)
    mapping = _mapping(targets, table, method, inputs)
    path = Path(path)
    atomic_write(path, onnx_model.SerializeToString())
    atomic_write(path.with_suffix(path.suffix + ".json"), json.dumps(mapping, indent=1).encode())
    return mapping


def _check_runs(onnx_model: Any) -> None:
    """Refuse a graph ONNX Runtime cannot load (PyTorch's exporter can emit types ORT lacks), when
    ONNX Runtime is installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"ONNX Runtime cannot load the exported model: {message}") from exc


def ort_overrides(table: ScaleTable, method: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's TensorQuantOverrides for ``quantize_static(extra_options=...)``: per-tensor
    activations get our scale and zero point 0; per-channel weights name the axis (ORT computes their
    scales itself: its overrides take one scale per tensor)."""
    out: dict[str, Any] = {}
    for tid, m in mapping["targets"].items():
        entry: TargetScales = table.targets[tid]
        qtype = "QInt8" if entry.signed else "QUInt8"
        if entry.bits <= 4:
            qtype = "QInt4" if entry.signed else "QUInt4"
        if m["axis"] is None:
            out.setdefault(m["onnx_tensor"], [{"scale": m["scale"][0], "zero_point": 0, "quant_type": qtype}])
        else:
            out.setdefault(m["onnx_tensor"], [{"axis": m["axis"], "quant_type": qtype, "symmetric": True}])
    return out
