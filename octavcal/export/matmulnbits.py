"""Weight-only 4-bit ONNX: every calibrated MatMul/Gemm weight becomes ONNX Runtime's ``MatMulNBits``
(com.microsoft) with octavcal's per-group scales; activations stay float.

MatMulNBits computes ``A @ dequant(B)^T`` with B stored (N, K/G, G/2): 4-bit codes packed two per byte,
the lower K index in the low nibble, dequantized as ``(code - zero_point) * scale`` per block of G along K.
octavcal's signed grid -qmax..qmax (qmax <= 7) becomes codes ``q + 8`` with zero point 8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core import Batch, LoadedModel
from ..errors import SpecError
from ..files import atomic_write
from ..scales import ScaleTable
from .onnx_locate import OnnxTarget, identity_aliases, locate_targets

MS_DOMAIN = "com.microsoft"
ZERO_POINT = 8


def weights_only(table: ScaleTable) -> ScaleTable:
    """The table with its weight targets only: what a weight-only model quantizes (``apply_scales`` of
    it is the reference of a MatMulNBits export)."""
    weights = {tid: e for tid, e in table.targets.items() if e.kind == "weight"}
    return ScaleTable(weights, dict(table.meta), table.path)


def _check_target(t: OnnxTarget, node: Any, table: ScaleTable) -> int:
    """The group size of a weight MatMulNBits can hold, else SpecError naming the target."""
    entry = table.targets[t.target]
    qmax = entry.grid(table.convention).qmax
    if entry.group_size is None:
        raise SpecError(
            f"Target '{t.target}' has per-{'tensor' if entry.axis is None else 'channel'} scales; "
            "MatMulNBits needs per-group scales. Calibrate with a group size (16, 32, 64, 128, ...)."
        )
    g = entry.group_size
    if g & (g - 1):
        raise SpecError(
            f"Target '{t.target}' has group size {g}; MatMulNBits needs a power of two (16, 32, 64, ...)."
        )
    if entry.bits > 4 or qmax > 7:
        raise SpecError(
            f"Target '{t.target}' has {entry.bits} bits ({table.convention} grid, integers up to {qmax}); "
            "MatMulNBits holds 4-bit codes: calibrate at 4 bits or fewer on the runtime grid."
        )
    gemm = node.op_type == "Gemm"
    attrs = {a.name: (a.f if a.type == 1 else a.i) for a in node.attribute}
    plain = not gemm or (
        attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA")
    )
    if node.op_type not in ("MatMul", "Gemm") or t.input_index != 1 or not plain:
        raise SpecError(
            f"Target '{t.target}' is read by ONNX node '{node.name}' ({node.op_type}, input "
            f"{t.input_index}); MatMulNBits replaces x @ W: a MatMul or a plain Gemm with the weight as its "
            "second input."
        )
    return g


def pack_4bit(w_nk: np.ndarray, scale: np.ndarray, qmax: int, group: int) -> np.ndarray:
    """(N, K) float32 weight and (N, K/G) scales -> (N, K/G, G/2) uint8 codes ``q + 8``, two per byte,
    low nibble first. q = clamp(round(w / scale)) in float32, as ``fake_quantize`` computes it."""
    n, k = w_nk.shape
    q = np.clip(np.round(w_nk / np.repeat(scale, group, axis=1)), -qmax, qmax).astype(np.int16) + ZERO_POINT
    blocks = q.astype(np.uint8).reshape(n, k // group, group)
    return (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)


def _replace(graph: Any, node: Any, t: OnnxTarget, table: ScaleTable, prefix: str) -> list[Any]:
    """MatMulNBits (+ Add of a Gemm's bias) producing ``node``'s output."""
    from onnx import helper, numpy_helper

    group = _check_target(t, node, table)
    entry = table.targets[t.target]
    name = identity_aliases(graph).get(node.input[1], node.input[1])
    w = numpy_helper.to_array(next(i for i in graph.initializer if i.name == name)).astype(np.float32)
    w_nk = w.T if t.axis == 1 else w  # MatMul and Gemm(transB=0) hold (K, N)
    n, k = w_nk.shape
    scale = np.asarray(t.scale, dtype=np.float32).reshape(n, k // group)  # [C, in/G], C = N
    blocks = k // group
    zp = np.full((n, (blocks + 1) // 2), ZERO_POINT | (ZERO_POINT << 4), dtype=np.uint8)
    if blocks % 2:
        zp[:, -1] = ZERO_POINT  # the unused high nibble of an odd count
    graph.initializer.extend(
        [
            numpy_helper.from_array(
                pack_4bit(w_nk, scale, entry.grid(table.convention).qmax, group), f"{prefix}_B"
            ),
            numpy_helper.from_array(scale.reshape(-1), f"{prefix}_scales"),
            numpy_helper.from_array(zp.reshape(-1), f"{prefix}_zp"),
        ]
    )
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    out = f"{prefix}_y" if has_bias else node.output[0]
    made = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], f"{prefix}_B", f"{prefix}_scales", f"{prefix}_zp"],
            [out],
            name=f"{prefix}_MatMulNBits",
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=group,
        )
    ]
    if has_bias:
        made.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{prefix}_Bias"))
    return made


def export_matmulnbits(
    model: LoadedModel, table: ScaleTable, method: str, batch: Batch, path: str | Path
) -> dict[str, Any]:
    """Write a weight-only ONNX model (MatMulNBits per calibrated weight, float activations) and
    ``<path>.json`` mapping each weight to its node; returns the mapping."""
    from onnx import helper

    from .onnx import _check_runs, _float_graph, _params

    onnx_model, inputs = _float_graph(model, table, method, batch)
    weights = weights_only(table)
    graph = onnx_model.graph
    targets = locate_targets(graph, weights, method, _params(model))
    nodes = {n.name: n for n in graph.node}
    replaced: dict[str, list[Any]] = {}
    for k, t in enumerate(targets):
        if t.node in replaced:
            raise SpecError(f"ONNX node '{t.node}' reads two calibrated weights; MatMulNBits holds one.")
        replaced[t.node] = _replace(graph, nodes[t.node], t, weights, f"octavcal_{k}")
    ordered = [m for n in graph.node for m in replaced.get(n.name, [n])]
    del graph.node[:]
    graph.node.extend(ordered)
    used = {name for n in graph.node for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx_model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _check_runs(onnx_model)
    mapping = {
        "method": method,
        "inputs": inputs,
        "weight_only": True,
        "targets": {
            t.target: {"onnx_node": f"octavcal_{k}_MatMulNBits", "replaces": t.node, "bits": 4}
            | {"block_size": weights.targets[t.target].group_size}
            for k, t in enumerate(targets)
        },
    }
    path = Path(path)
    atomic_write(path, onnx_model.SerializeToString())
    atomic_write(path.with_suffix(path.suffix + ".json"), json.dumps(mapping, indent=1).encode())
    return mapping
