"""True low-bit ONNX (opset 21): weights as INT4 (or blocked INT8) integer initializers read by
DequantizeLinear (``axis`` per channel, ``block_size`` per group), activations through INT4/UINT4
QuantizeLinear/DequantizeLinear. ``onnx.py`` decides which targets take this route.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SpecError
from ..scales import ScaleTable, TargetScales
from .onnx_locate import OnnxTarget, identity_aliases

LOWBIT_OPSET = 21


def int4_fits(entry: TargetScales, convention: str) -> bool:
    """The target's grid fits a 4-bit integer type: signed -qmax..qmax within -8..7 (the runtime grid's
    -7..7; the paper's -8..8 does not), unsigned 0..qmax within 0..15."""
    qmax = entry.grid(convention).qmax
    return entry.bits <= 4 and qmax <= (7 if entry.signed else 15)


def needs_integer_weight(t: OnnxTarget, table: ScaleTable) -> bool:
    """A weight stored as integers: 4-bit grids that fit INT4, and every per-group weight."""
    entry = table.targets[t.target]
    return t.kind == "weight" and (int4_fits(entry, table.convention) or entry.group_size is not None)


def _int_type(entry: TargetScales, convention: str) -> int:
    """The ONNX integer type of a target: INT4/UINT4 where the grid fits, else INT8/UINT8."""
    from onnx import TensorProto

    if int4_fits(entry, convention):
        return TensorProto.INT4 if entry.signed else TensorProto.UINT4
    return TensorProto.INT8 if entry.signed else TensorProto.UINT8


def _initializer(graph: Any, name: str) -> np.ndarray:
    from onnx import numpy_helper

    name = identity_aliases(graph).get(name, name)
    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == name)).astype(np.float32)


def integer_weight(graph: Any, node: Any, t: OnnxTarget, table: ScaleTable, prefix: str) -> list[Any]:
    """Replace a weight by its integers and a DequantizeLinear: q = clamp(round(w / scale)) in float32,
    as ``fake_quantize`` computes it, so DequantizeLinear gives the simulated weight bit for bit.

    Per group, ``t.axis`` is the ONNX weight's output axis and blocks run along the other one:
    Gemm(transB) reads (out, in) -> axis 1, scale [out, in/G]; MatMul reads (in, out) -> axis 0, scale
    [in/G, out]."""
    from onnx import helper, numpy_helper

    entry = table.targets[t.target]
    grid = entry.grid(table.convention)
    if entry.group_size is not None and not int4_fits(entry, table.convention):
        raise SpecError(
            f"Target '{t.target}' has per-group scales at {entry.bits} bits ({table.convention} grid); the "
            "ONNX export writes per-group weights as INT4 only (ONNX Runtime 1.32 fails on blocked INT8 "
            "weights from ORT_ENABLE_EXTENDED on). Calibrate groups at 4 bits or fewer on the runtime grid, "
            "or this layer per channel."
        )
    w = _initializer(graph, node.input[t.input_index])
    scale = np.asarray(t.scale, dtype=np.float32)
    attrs: dict[str, Any] = {}
    if entry.group_size is not None and t.axis is not None:
        block_axis, g = 1 - t.axis, entry.group_size
        scale = scale.reshape(w.shape[t.axis], w.shape[block_axis] // g)  # [C, in/G]
        if block_axis == 0:
            scale = scale.T  # [in/G, C]
        full = np.repeat(scale, g, axis=block_axis)
        attrs = {"axis": block_axis, "block_size": g}
    elif t.axis is not None:
        shape = [1] * w.ndim
        shape[t.axis] = -1
        full = scale.reshape(shape)
        attrs = {"axis": t.axis}
    else:
        scale = scale[:1].reshape(())
        full = scale
    q = np.clip(np.round(w / full), grid.qmin, grid.qmax).astype(np.int8)
    onnx_type = _int_type(entry, table.convention)
    graph.initializer.extend(
        [
            helper.make_tensor(f"{prefix}_wq", onnx_type, list(q.shape), q.reshape(-1).tolist()),
            numpy_helper.from_array(scale.astype(np.float32), f"{prefix}_scale"),
            helper.make_tensor(f"{prefix}_zp", onnx_type, list(scale.shape), [0] * int(scale.size)),
        ]
    )
    inputs = [f"{prefix}_wq", f"{prefix}_scale", f"{prefix}_zp"]
    return [
        helper.make_node("DequantizeLinear", inputs, [f"{prefix}_dq"], name=f"{prefix}_Dequantize", **attrs)
    ]


def int4_activation(graph: Any, t: OnnxTarget, table: ScaleTable, prefix: str) -> list[Any]:
    """Max/Min to the grid's range where the 4-bit type is wider -> QuantizeLinear -> DequantizeLinear,
    zero point 0 of type INT4/UINT4.

    INT4 holds -8 and the runtime grid stops at -7, so signed data is bounded below; below 4 bits the grid
    is narrower than the type on both sides. Max and Min, not Clip: ONNX Runtime's Clip-into-QuantizeLinear
    fusion (from ORT_ENABLE_EXTENDED on) fails to load a graph whose zero point is INT4 (onnxruntime 1.32).
    """
    from onnx import helper, numpy_helper

    entry = table.targets[t.target]
    qmax = entry.grid(table.convention).qmax
    scale = np.asarray(t.scale[0], dtype=np.float32)
    onnx_type = _int_type(entry, table.convention)
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale, f"{prefix}_scale"),
            helper.make_tensor(f"{prefix}_zp", onnx_type, [], [0]),
        ]
    )
    chain, source = [], t.tensor
    amax = np.asarray(scale * qmax, dtype=np.float32)
    bounds = [("Max", -amax)] if entry.signed else []
    if qmax < (7 if entry.signed else 15):
        bounds.append(("Min", amax))
    for op, value in bounds:
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), f"{prefix}_{op.lower()}"))
        out = f"{prefix}_{op.lower()}ed"
        chain.append(helper.make_node(op, [source, f"{prefix}_{op.lower()}"], [out], name=f"{prefix}_{op}"))
        source = out
    inputs = [f"{prefix}_scale", f"{prefix}_zp"]
    return [
        *chain,
        helper.make_node(
            "QuantizeLinear", [source, *inputs], [f"{prefix}_q"], name=f"{prefix}_QuantizeLinear"
        ),
        helper.make_node(
            "DequantizeLinear", [f"{prefix}_q", *inputs], [f"{prefix}_dq"], name=f"{prefix}_DequantizeLinear"
        ),
    ]


def exact_bias(graph: Any, node: Any, prefix: str) -> list[Any]:
    """Feed a Conv/Gemm's float bias through DequantizeLinear of int32 with power-of-two scales, which
    gives back every float32 exactly (24-bit mantissa x 2^e). ONNX Runtime's WeightBiasQuantization
    (ORT_ENABLE_BASIC and up) rounds a constant bias onto the int32 grid of input scale x weight scale,
    moving the layer's output away from the simulation; a bias that is not an initializer is left alone.
    """
    from onnx import TensorProto, helper, numpy_helper

    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return []
    name = identity_aliases(graph).get(node.input[2], node.input[2])
    if not any(i.name == name for i in graph.initializer):
        return []
    bias = _initializer(graph, name)
    if bias.ndim != 1:
        return []
    _, exponent = np.frexp(bias.astype(np.float64))  # |b| = m * 2^exponent, 0.5 <= m < 1
    scale = np.ldexp(1.0, exponent - 24).astype(np.float32)  # b / scale: an integer below 2^24
    scale = np.where(bias == 0, np.float32(1.0), scale).astype(np.float32)
    q = np.round(bias.astype(np.float64) / scale.astype(np.float64)).astype(np.int32)
    graph.initializer.extend(
        [
            helper.make_tensor(f"{prefix}_bq", TensorProto.INT32, list(q.shape), q.tolist()),
            numpy_helper.from_array(scale, f"{prefix}_bscale"),
        ]
    )
    node.input[2] = f"{prefix}_bias"
    return [
        helper.make_node(
            "DequantizeLinear",
            [f"{prefix}_bq", f"{prefix}_bscale"],
            [f"{prefix}_bias"],
            name=f"{prefix}_Bias",
            axis=0,
        )
    ]


def uses_lowbit(targets: list[OnnxTarget], table: ScaleTable) -> bool:
    """Whether the QDQ graph needs opset 21 (INT4 types or blocked DequantizeLinear)."""
    return any(
        int4_fits(table.targets[t.target], table.convention) or table.targets[t.target].group_size is not None
        for t in targets
    )
