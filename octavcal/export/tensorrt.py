"""TensorRT's INT8 calibration cache (TensorRT <= 10, ONNX Runtime's TensorRT execution provider).

Text: a header line, then ``<onnx tensor name>: <8 hex digits>`` per tensor, the hex being the
big-endian bytes of the float32 scale (amax / 127). Only 8-bit, signed-range, per-tensor activations
belong there; TensorRT computes weight scales itself.
"""

from __future__ import annotations

import struct
from typing import Any

from ..scales import ScaleTable

HEADER = "TRT-8601-EntropyCalibration2"


def scale_to_hex(scale: float) -> str:
    """Example: 1.0 -> '3f800000'."""
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return float(struct.unpack(">f", bytes.fromhex(text))[0])


def calibration_cache(table: ScaleTable, method: str, mapping: dict[str, Any]) -> tuple[str, list[str]]:
    """The cache text for ``method`` and the targets left out (with the reason)."""
    table.require_method(method)
    lines, skipped, seen = [HEADER], [], set()
    for tid, entry in table.targets.items():
        if entry.kind != "activation":
            continue
        if entry.bits != 8:
            skipped.append(f"{tid} ({entry.bits} bits; the cache holds 8-bit scales)")
            continue
        where = mapping.get("targets", {}).get(tid)
        if where is None:
            skipped.append(f"{tid} (no ONNX tensor)")
            continue
        tensor = where["onnx_tensor"]
        if tensor in seen:
            continue
        seen.add(tensor)
        # TensorRT quantizes symmetrically to [-127, 127] even for non-negative tensors: scale = amax / 127.
        scale = float(entry.methods[method].amax.reshape(-1)[0]) / 127.0
        lines.append(f"{tensor}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n", skipped


def parse_cache(text: str) -> dict[str, float]:
    """Read a cache back: tensor name -> scale."""
    out = {}
    for line in text.splitlines()[1:]:
        if line.strip():
            name, _, value = line.rpartition(":")
            out[name.strip()] = hex_to_scale(value.strip())
    return out
