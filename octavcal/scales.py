"""The scale file: a specified safetensors format (README, "The scale file"), written atomically.

Tensors: ``<target>/<method>`` holds amax (float32, [] or [C]); ``<target>/<method>@batches`` the
per-batch candidates (float32, [N] or [N, C]) that were averaged (Appendix E.3). The header's
``octavcal`` metadata entry is JSON with the grid, bits, targets and provenance. No timestamps: the
same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ScaleFileError
from .files import atomic_write
from .grid import Grid

FORMAT_NAME = "octavcal.scales"
# 2: targets are ops on Parameters ('param', 'tied', lower-case op names such as 'linear', 'addmm'),
# and meta lists the weights left uncovered; version 1 files are still read.
FORMAT_VERSION = 2


@dataclass
class MethodScales:
    """One method's result for one target: ``amax`` and the per-batch candidates it averages."""

    amax: torch.Tensor
    per_batch: torch.Tensor | None = None
    seconds: float = 0.0

    def scale(self, grid: Grid) -> torch.Tensor:
        return self.amax / grid.qmax


@dataclass
class TargetScales:
    """Everything calibrated for one target (module path + role)."""

    module: str
    role: str
    op: str
    kind: str  # 'weight' | 'activation'
    bits: int
    signed: bool
    axis: int | None  # the axis kept (per channel), None per tensor
    shape: list[int]
    methods: dict[str, MethodScales] = field(default_factory=dict)
    masked: bool = False  # padded positions left out (activations with an attention mask)
    shared_with: str | None = None  # the target whose identical input was computed once
    param: str | None = None  # the Parameter a weight is, or whose op reads this input (format 2)
    tied: list[str] = field(default_factory=list)  # other names of a tied weight (format 2)

    @property
    def id(self) -> str:
        return f"{self.module or '<root>'}:{self.role}"

    def grid(self, convention: str = "runtime") -> Grid:
        return Grid(self.bits, self.signed, convention)  # type: ignore[arg-type]

    def scale(self, method: str, convention: str = "runtime") -> torch.Tensor:
        """The quantization step of ``method``'s amax on this target's grid: amax / qmax."""
        return self.methods[method].scale(self.grid(convention))

    def describe(self, convention: str) -> dict[str, Any]:
        grid = self.grid(convention)
        return {
            "module": self.module,
            "role": self.role,
            "op": self.op,
            "kind": self.kind,
            "bits": self.bits,
            "signed": self.signed,
            "qmin": grid.qmin,
            "qmax": grid.qmax,
            "granularity": "per-tensor" if self.axis is None else "per-channel",
            "axis": self.axis,
            "shape": self.shape,
            "masked": self.masked,
            "shared_with": self.shared_with,
            "param": self.param,
            "tied": self.tied,
            "methods": sorted(self.methods),
        }


@dataclass
class ScaleTable:
    """A calibration's result: targets by id, plus provenance (``meta``)."""

    targets: dict[str, TargetScales]
    meta: dict[str, Any]

    @property
    def convention(self) -> str:
        return str(self.meta.get("grid", {}).get("convention", "runtime"))

    @property
    def methods(self) -> list[str]:
        return list(self.meta.get("methods", []))

    def amax(self, target: str, method: str) -> torch.Tensor:
        if target not in self.targets:
            raise ScaleFileError(f"The scale file has no target '{target}'.")
        entry = self.targets[target]
        if method not in entry.methods:
            raise ScaleFileError(
                f"Target '{target}' has no scales for method '{method}'. It has: {', '.join(entry.methods)}."
            )
        return entry.methods[method].amax


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter and buffer names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_scales(table: ScaleTable, path: str | Path) -> Path:
    """Write ``table`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    from safetensors.torch import save

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for tid, entry in sorted(table.targets.items()):
        for method, result in sorted(entry.methods.items()):
            tensors[f"{tid}/{method}"] = result.amax.detach().to("cpu", torch.float32).contiguous()
            if result.per_batch is not None:
                tensors[f"{tid}/{method}@batches"] = (
                    result.per_batch.detach().to("cpu", torch.float32).contiguous()
                )
    meta = dict(table.meta)
    meta["format"], meta["format_version"] = FORMAT_NAME, FORMAT_VERSION
    meta["targets"] = {tid: e.describe(table.convention) for tid, e in sorted(table.targets.items())}
    payload = save(tensors, metadata={"octavcal": json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    atomic_write(path, payload)
    return path


def load_scales(path: str | Path) -> ScaleTable:
    """Read a scale file into a ScaleTable: per target, per method, amax and (via grid) scale."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ScaleFileError(f"Scale file '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ScaleFileError(f"Scale file '{path}' is not a readable safetensors file: {exc}.") from exc
    try:
        meta = json.loads(header["octavcal"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ScaleFileError(
            f"Scale file '{path}' has no octavcal metadata; it was not written by octavcal."
        ) from exc
    version = meta.get("format_version")
    if meta.get("format") != FORMAT_NAME or not isinstance(version, int):
        raise ScaleFileError(f"Scale file '{path}' is not in the {FORMAT_NAME} format.")
    if version > FORMAT_VERSION:
        raise ScaleFileError(
            f"Scale file '{path}' has format version {version}; this octavcal reads up to {FORMAT_VERSION}. "
            "Upgrade octavcal."
        )
    try:
        targets = _targets_from(meta, tensors, path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ScaleFileError(
            f"Scale file '{path}' has malformed target metadata: missing or wrong {exc}."
        ) from exc
    return ScaleTable(targets, meta)


def _targets_from(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, TargetScales]:
    targets: dict[str, TargetScales] = {}
    for tid, d in meta.pop("targets", {}).items():
        methods = {}
        for method in d["methods"]:
            if f"{tid}/{method}" not in tensors:
                raise ScaleFileError(
                    f"Scale file '{path}' lists method '{method}' for '{tid}' but has no tensor for it."
                )
            methods[method] = MethodScales(tensors[f"{tid}/{method}"], tensors.get(f"{tid}/{method}@batches"))
        targets[tid] = TargetScales(
            module=d["module"],
            role=d["role"],
            op=d["op"],
            kind=d["kind"],
            bits=d["bits"],
            signed=d["signed"],
            axis=d["axis"],
            shape=d["shape"],
            methods=methods,
            masked=d["masked"],
            shared_with=d["shared_with"],
            param=d.get("param"),
            tied=list(d.get("tied") or []),
        )
    return targets


def check_fingerprint(table: ScaleTable, model: nn.Module, path: str | Path | None = None) -> None:
    """Refuse a scale file computed on other weights (README, "The scale file")."""
    expected = table.meta.get("model_fingerprint")
    if expected and expected != model_fingerprint(model):
        what = f"Scale file '{path}'" if path is not None else "The scale table"
        raise ScaleFileError(
            f"{what} was computed for other model weights (fingerprint {expected[:12]}..., "
            f"this model {model_fingerprint(model)[:12]}...). Calibrate this model, "
            "or pass its own scale file."
        )
