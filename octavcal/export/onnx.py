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
import inspect
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import Batch, LoadedModel
from ..errors import LoadError, SpecError
from ..files import atomic_write
from ..scales import ScaleTable, TargetScales, check_fingerprint
from .onnx_locate import OnnxTarget, identity_aliases, locate_targets
from .onnx_lowbit import (
    LOWBIT_OPSET,
    exact_bias,
    int4_activation,
    int4_fits,
    integer_weight,
    needs_integer_weight,
    uses_lowbit,
)

OPSET = 17
_LAYER_OPS = {"Gemm", "MatMul", "Conv", "ConvTranspose"}


class _TensorInputs(torch.nn.Module):
    """Calls the model with the batch's tensors only, so that other forward arguments keep their Python
    defaults in the traced graph instead of becoming graph inputs (a Hugging Face ``logits_to_keep``)."""

    def __init__(self, model: torch.nn.Module, positional: int, keys: list[str], fixed: dict[str, Any]):
        super().__init__()
        self.model, self.positional, self.keys, self.fixed = model, positional, keys, fixed

    def forward(self, *tensors: torch.Tensor) -> Any:
        named = dict(zip(self.keys, tensors[self.positional :], strict=True))
        return self.model(*tensors[: self.positional], **named, **self.fixed)


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


def insert_qdq(model: Any, targets: list[OnnxTarget], table: ScaleTable) -> None:
    """Rewire each target's node input through Clip -> QuantizeLinear -> DequantizeLinear."""
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    new_nodes: dict[str, list[Any]] = {}
    replaced: set[str] = set()
    for k, t in enumerate(targets):
        qmax = _container_qmax(t, table)
        node, prefix = nodes[t.node], f"octavcal_{k}"
        scale = np.asarray(t.scale, dtype=np.float32)
        chain: list[Any] = []
        if needs_integer_weight(t, table):
            replaced.add(node.input[t.input_index])
            replaced.update(node.input[2:3])  # a bias exact_bias reroutes
            chain = integer_weight(graph, node, t, table, prefix) + exact_bias(graph, node, prefix)
        elif t.kind != "weight" and int4_fits(table.targets[t.target], table.convention):
            chain = int4_activation(graph, t, table, prefix)
        elif t.kind == "weight":
            source = _clipped_weight(graph, node, t, prefix, scale * qmax)
            replaced.add(node.input[t.input_index])
            chain = _quantize_dequantize(graph, t, prefix, source, scale)
        else:
            source, chain = _clip(graph, t, prefix, scale * qmax)
            chain += _quantize_dequantize(graph, t, prefix, source, scale)
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


def _container_qmax(t: OnnxTarget, table: ScaleTable) -> int:
    """The target's qmax, refused when an 8-bit container cannot hold its grid."""
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
    return qmax


def _clipped_weight(graph: Any, node: Any, t: OnnxTarget, prefix: str, amax: np.ndarray) -> str:
    """A weight is clipped offline (per channel along ``t.axis``): a new initializer."""
    from onnx import numpy_helper

    name = node.input[t.input_index]
    name = identity_aliases(graph).get(name, name)
    w = numpy_helper.to_array(next(i for i in graph.initializer if i.name == name)).astype(np.float32)
    shape = [1] * w.ndim
    if t.axis is not None:
        shape[t.axis] = -1
    clipped = np.clip(w, -amax.reshape(shape), amax.reshape(shape)).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(clipped, f"{prefix}_w"))
    return f"{prefix}_w"


def _clip(graph: Any, t: OnnxTarget, prefix: str, amax: np.ndarray) -> tuple[str, list[Any]]:
    """An activation is clipped at run time to [-amax, amax] (signed) or [0, amax]: the narrow B-bit
    grid inside the 8-bit container."""
    from onnx import helper, numpy_helper

    lo = np.asarray(-amax[0] if t.signed else 0.0, dtype=np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(lo, f"{prefix}_lo"),
            numpy_helper.from_array(amax[0].astype(np.float32), f"{prefix}_hi"),
        ]
    )
    clip = helper.make_node(
        "Clip", [t.tensor, f"{prefix}_lo", f"{prefix}_hi"], [f"{prefix}_clipped"], name=f"{prefix}_Clip"
    )
    return f"{prefix}_clipped", [clip]


def _quantize_dequantize(graph: Any, t: OnnxTarget, prefix: str, source: str, scale: np.ndarray) -> list[Any]:
    """QuantizeLinear -> DequantizeLinear with zero point 0, per channel when ``t.axis`` is set."""
    from onnx import TensorProto, helper, numpy_helper

    scale_init = scale if t.axis is not None else scale[:1].reshape(())
    zero = np.zeros(scale_init.shape, dtype=np.int8 if t.signed else np.uint8)
    zp_type = TensorProto.INT8 if t.signed else TensorProto.UINT8
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale_init.astype(np.float32), f"{prefix}_scale"),
            helper.make_tensor(f"{prefix}_zp", zp_type, list(zero.shape), zero.reshape(-1).tolist()),
        ]
    )
    axis: dict[str, Any] = {"axis": t.axis} if t.axis is not None else {}
    inputs = [f"{prefix}_scale", f"{prefix}_zp"]
    return [
        helper.make_node(
            "QuantizeLinear", [source, *inputs], [f"{prefix}_q"], name=f"{prefix}_QuantizeLinear", **axis
        ),
        helper.make_node(
            "DequantizeLinear",
            [f"{prefix}_q", *inputs],
            [f"{prefix}_dq"],
            name=f"{prefix}_DequantizeLinear",
            **axis,
        ),
    ]


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
                "group_size": table.targets[t.target].group_size,
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
    import onnx.version_converter

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
    import onnx.version_converter

    onnx_model, inputs = _float_graph(model, table, method, batch)
    targets = locate_targets(onnx_model.graph, table, method, _params(model))
    if uses_lowbit(targets, table):  # INT4 types and blocked DequantizeLinear are opset 21
        onnx_model = onnx.version_converter.convert_version(onnx_model, LOWBIT_OPSET)
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
