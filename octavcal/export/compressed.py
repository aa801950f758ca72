"""compressed-tensors checkpoints (the format vLLM loads), written with the ``compressed-tensors`` package:
W8A8 (int8 weights per output channel, static int8 per-tensor input scales) or W4A16 (int4 weights per
group, packed). Each weight is stored as the integers of its fake-quantized value, so the checkpoint
decompresses to exactly the weights ``apply_scales`` runs.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import LoadedModel
from ..errors import LoadError, OutputError, SpecError
from ..grid import Grid, fake_quantize
from ..groups import fake_quantize_groups
from ..scales import ScaleTable, TargetScales, check_fingerprint


@dataclass
class CompressedExport:
    """What was written: the scheme, the quantized layers and the weights left in float (with why)."""

    scheme: str  # 'W8A8' or 'W4A16'
    layers: list[str]
    left_float: dict[str, str] = field(default_factory=dict)


def _layers(
    module: nn.Module, table: ScaleTable, method: str
) -> tuple[dict[str, TargetScales], dict[str, str]]:
    """The nn.Linear weights the table calibrated (by module path), and the other weights with the reason
    they stay float (compressed-tensors quantizes Linear layers; a tied weight is another layer's too)."""
    layers, left = {}, {}
    for tid, entry in sorted(table.targets.items()):
        if entry.kind != "weight" or method not in entry.methods:
            continue
        try:
            sub = module.get_submodule(entry.module)
        except AttributeError:
            sub = None
        if not isinstance(sub, nn.Linear) or entry.role != "weight":
            left[tid] = f"not an nn.Linear weight ({entry.op})"
        elif entry.tied:
            left[tid] = f"tied to {', '.join(entry.tied)}"
        else:
            layers[entry.module] = entry
    return layers, left


def _scheme(layers: dict[str, TargetScales], table: ScaleTable) -> str:
    """W8A8 when every layer is 8-bit per channel with an 8-bit input; W4A16 when every layer is 4-bit
    per group; else SpecError naming the first layer that fits neither."""
    if table.convention != "runtime":
        raise SpecError(
            f"{table.describe_source()} uses the {table.convention} grid; compressed-tensors' symmetric int8 "
            "and int4 hold the runtime grid only. Calibrate on the runtime grid."
        )

    def w8a8(name: str, e: TargetScales) -> bool:
        inp = table.targets.get(f"{name}:input")
        return e.bits == 8 and e.axis == 0 and e.group_size is None and inp is not None and inp.bits == 8

    def w4a16(e: TargetScales) -> bool:
        return e.bits == 4 and e.group_size is not None

    if all(w8a8(n, e) for n, e in layers.items()):
        return "W8A8"
    if all(w4a16(e) for e in layers.values()):
        return "W4A16"
    name, e = next((n, e) for n, e in layers.items() if not (w8a8(n, e) or w4a16(e)))
    kind = (
        f"group size {e.group_size}"
        if e.group_size
        else ("per channel" if e.axis is not None else "per tensor")
    )
    raise SpecError(
        f"Layer '{name}' has {e.bits}-bit weights ({kind}), which fit neither scheme this export writes, "
        "the same for every calibrated Linear: W8A8 (8-bit weights per channel, an 8-bit input scale) or "
        "W4A16 (4-bit weights per group)."
    )


def _quantization_config(scheme: str, names: list[str], group_size: int | None) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    if scheme == "W8A8":
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
        group = QuantizationScheme(targets=names, weights=weights, input_activations=inputs)
    else:
        weights = QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size
        )
        group = QuantizationScheme(targets=names, weights=weights)
    return QuantizationConfig(config_groups={"group_0": group})


def export_compressed_tensors(
    model: LoadedModel, table: ScaleTable, method: str, folder: str | Path
) -> CompressedExport:
    """Write a Hugging Face folder (config with ``quantization_config``, compressed safetensors) for
    ``method``'s scales: all files appear, or none. ``model`` is left unchanged."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(f"Output folder '{folder}' exists and is not empty; name a new or empty folder.")
    module = model.module
    if not hasattr(module, "save_pretrained"):
        raise LoadError("compressed-tensors export needs a Hugging Face model (one with save_pretrained).")
    check_fingerprint(table, module)
    table.require_method(method)
    layers, left = _layers(module, table, method)
    if not layers:
        raise SpecError(f"{table.describe_source()} calibrates no nn.Linear weight; nothing to compress.")
    scheme = _scheme(layers, table)
    sizes = {e.group_size for e in layers.values()}
    if len(sizes) > 1:
        raise SpecError(f"The layers use several group sizes ({sorted(map(str, sizes))}); W4A16 takes one.")
    work: Any = copy.deepcopy(module)  # compressed-tensors adds Parameters that mypy cannot see
    with torch.no_grad():
        for name, e in layers.items():  # the integers of the simulated weight: decompression gives it back
            linear: Any = work.get_submodule(name)
            amax = e.methods[method].amax.to(linear.weight.device)
            w = linear.weight.float()
            if e.group_size is not None:
                fq = fake_quantize_groups(w, amax, e.bits, axis=0, group_size=e.group_size)
            else:
                fq = fake_quantize(w, amax, e.bits, signed=True, axis=0)
            linear.weight.copy_(fq.to(linear.weight.dtype))
    apply_quantization_config(
        work, _quantization_config(scheme, sorted(layers), sizes.pop()), show_progress=False
    )
    with torch.no_grad():
        for name, e in layers.items():
            linear = work.get_submodule(name)
            scale = e.scale(method, table.convention)  # [C] or [C, in/G]
            linear.weight_scale.copy_(scale.reshape(linear.weight_scale.shape).to(linear.weight_scale.dtype))
            if scheme == "W8A8":
                inp = table.targets[f"{name}:input"]
                # vLLM's static int8 activations are signed: amax / 127, whichever grid calibration chose.
                step = inp.methods[method].amax / Grid(8, True).qmax
                linear.input_scale.copy_(step.reshape(linear.input_scale.shape).to(linear.input_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(work)
    compressor.compress_model(work)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        work.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
        result = CompressedExport(scheme, sorted(layers), left)
        summary = {"method": method, "scheme": scheme, "layers": result.layers, "left_float": left}
        (tmp / "octavcal_export.json").write_text(json.dumps(summary, indent=1))
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
