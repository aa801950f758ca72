"""The scale file: a specified safetensors format (README, "The scale file"), written atomically.

Tensors: ``<target>/<method>`` holds amax (float32, [] or [C]); ``<target>/<method>@batches`` the
per-batch candidates (float32, [N] or [N, C]) that were averaged (Appendix E.3). The header's
``octavcal`` metadata entry is JSON with the grid, bits, targets and provenance. No timestamps: the
same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ._version import __version__
from .errors import ScaleFileError
from .files import atomic_write
from .fingerprint import fingerprint_in_background as fingerprint_in_background  # re-exported
from .fingerprint import model_fingerprint
from .grid import Grid
from .scale_schema import check_schema, parse_metadata, show

FORMAT_NAME = "octavcal.scales"
# 2: targets are ops on Parameters ('param', 'tied', lower-case op names such as 'linear', 'addmm'),
# and meta lists the weights left uncovered. 3: a weight may be per group ('group_size', amax [C, in/G]).
# Versions 1 and 2 are still read.
FORMAT_VERSION = 3


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
    group_size: int | None = None  # per group: amax [C, in/G] along input features (format 3)

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
        granularity = "per-tensor" if self.axis is None else "per-channel"
        group = {} if self.group_size is None else {"group_size": self.group_size}
        return {
            "module": self.module,
            "role": self.role,
            "op": self.op,
            "kind": self.kind,
            "bits": self.bits,
            "signed": self.signed,
            "qmin": grid.qmin,
            "qmax": grid.qmax,
            "granularity": granularity if self.group_size is None else "per-group",
            "axis": self.axis,
            "shape": self.shape,
            "masked": self.masked,
            "shared_with": self.shared_with,
            "param": self.param,
            "tied": self.tied,
            "methods": sorted(self.methods),
        } | group


@dataclass
class ScaleTable:
    """A calibration's result: targets by id, plus provenance (``meta``)."""

    targets: dict[str, TargetScales]
    meta: dict[str, Any]
    path: Path | None = None  # the file it was read from, for messages

    def describe_source(self, path: str | Path | None = None) -> str:
        """'Scale file 'PATH'' when the file is known, else 'The scale table' (for messages)."""
        path = path if path is not None else self.path
        return f"Scale file '{path}'" if path is not None else "The scale table"

    @property
    def convention(self) -> str:
        return str(self.meta.get("grid", {}).get("convention", "runtime"))

    @property
    def methods(self) -> list[str]:
        return list(self.meta.get("methods", []))

    def require_method(self, method: str) -> str:
        """``method`` if the table has it, else ScaleFileError listing the methods it has."""
        if method not in self.methods:
            raise ScaleFileError(
                f"The scale file has no method '{method}'. It has: {', '.join(self.methods)}."
            )
        return method

    def amax(self, target: str, method: str) -> torch.Tensor:
        if target not in self.targets:
            raise ScaleFileError(f"The scale file has no target '{target}'.")
        entry = self.targets[target]
        if method not in entry.methods:
            raise ScaleFileError(
                f"Target '{target}' has no scales for method '{method}'. It has: {', '.join(entry.methods)}."
            )
        return entry.methods[method].amax


def provenance(convention: str, methods: list[str], bits: int, source: str, **fields: Any) -> dict[str, Any]:
    """The metadata every scale file starts with (calibration and QAT alike); ``Grid.describe`` is
    the one source of its grid block."""
    grid = Grid(8, True, convention).describe()  # type: ignore[arg-type]
    return {
        "octavcal_version": __version__,
        "source": source,
        "grid": {k: grid[k] for k in ("convention", "narrow_range", "zero_point", "scale", "rounding")},
        "methods": list(methods),
        "bits": bits,
        **fields,
    }


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
    """Read a scale file into a ScaleTable: per target, per method, amax and (via grid) scale.

    Whatever the file holds, the only error is ScaleFileError, naming the first problem. Only the
    tensors the metadata lists are read."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise ScaleFileError(f"Scale file '{path}' is a directory, not a file.")
    if not path.exists():
        raise ScaleFileError(f"Scale file '{path}' does not exist.")
    if not path.is_file():
        raise ScaleFileError(f"Scale file '{path}' is not a regular file.")
    with _readable(path), safe_open(str(path), framework="pt") as f:
        header, names = f.metadata() or {}, set(f.keys())
    meta = _checked_metadata(header, path)
    wanted = [name for name in _tensor_names(meta) if name in names]
    with _readable(path), safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in wanted}
    return ScaleTable(_targets_from(meta, tensors, path), meta, path)


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Errors of the safetensors layer (header, offsets, dtypes, I/O) become one ScaleFileError."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScaleFileError(f"Scale file '{path}' is not a readable safetensors file: {reason}.") from exc


def _checked_metadata(header: dict[str, str], path: Path) -> dict[str, Any]:
    if "octavcal" not in header:
        raise ScaleFileError(f"Scale file '{path}' has no octavcal metadata; it was not written by octavcal.")
    meta = parse_metadata(header["octavcal"], path)
    version = meta.get("format_version")
    if meta.get("format") != FORMAT_NAME or isinstance(version, bool) or not isinstance(version, int):
        raise ScaleFileError(
            f"Scale file '{path}' is not in the {FORMAT_NAME} format: format {show(meta.get('format'))}, "
            f'format_version {show(version)}. Expected format "{FORMAT_NAME}" and an integer version.'
        )
    if version > FORMAT_VERSION:
        raise ScaleFileError(
            f"Scale file '{path}' has format version {show(version)}; this octavcal reads up to "
            f"{FORMAT_VERSION}. Upgrade octavcal."
        )
    if version < 1:
        raise ScaleFileError(f"Scale file '{path}' has format version {show(version)}; versions start at 1.")
    check_schema(meta, path)
    return meta


def _tensor_names(meta: dict[str, Any]) -> list[str]:
    """The tensors the metadata lists: amax and per-batch candidates of every target's methods."""
    return [
        f"{tid}/{method}{suffix}"
        for tid, d in meta["targets"].items()
        for method in d["methods"]
        for suffix in ("", "@batches")
    ]


def _targets_from(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, TargetScales]:
    convention = meta.get("grid", {}).get("convention", "runtime")
    targets: dict[str, TargetScales] = {}
    for tid, d in meta.pop("targets").items():
        entry = TargetScales(
            module=d["module"],
            role=d["role"],
            op=d["op"],
            kind=d["kind"],
            bits=d["bits"],
            signed=d["signed"],
            axis=d["axis"],
            shape=d["shape"],
            masked=d["masked"],
            shared_with=d["shared_with"],
            param=d.get("param"),
            tied=list(d.get("tied", [])),
            group_size=d.get("group_size"),
        )
        check = _TensorCheck(path, tid, entry, entry.grid(convention).qmax)
        entry.methods = {method: check.method(method, tensors) for method in d["methods"]}
        targets[tid] = entry
    return targets


class _TensorCheck:
    """The tensors of one target: amax float32 of shape [] or [C], finite, positive and large enough that
    amax / qmax is a normal float32; per-batch candidates float32, finite, [N] + amax's shape."""

    def __init__(self, path: Path, tid: str, entry: TargetScales, qmax: int) -> None:
        self.path, self.tid, self.entry, self.qmax = path, tid, entry, qmax

    def fail(self, method: str, problem: str, seen: str, valid: str) -> NoReturn:
        what = f"{problem} for target {self.tid!r}, method {method!r}"
        raise ScaleFileError(f"Scale file '{self.path}' has {what}: {seen}. {valid}.")

    def method(self, method: str, tensors: dict[str, torch.Tensor]) -> MethodScales:
        name = f"{self.tid}/{method}"
        if name not in tensors:
            self.fail(
                method, "no amax tensor", f"{name!r} is missing", "Every listed method needs its tensor"
            )
        amax = tensors[name]
        self.check_dtype(method, amax, "amax")
        self.check_amax_shape(method, amax)
        self.check_amax_values(method, amax)
        per_batch = tensors.get(f"{name}@batches")
        if per_batch is not None:
            self.check_per_batch(method, per_batch, amax)
        return MethodScales(amax, per_batch)

    def check_dtype(self, method: str, t: torch.Tensor, what: str) -> None:
        if t.dtype != torch.float32:
            self.fail(method, f"a wrong {what} dtype", str(t.dtype), "Expected torch.float32")

    def check_amax_shape(self, method: str, amax: torch.Tensor) -> None:
        axis, shape, group = self.entry.axis, self.entry.shape, self.entry.group_size
        if group is not None and axis is not None:  # the schema checked shape and group size
            out, inner = shape[axis], shape[1 - axis]
            expected = (
                f"Expected [{out}, {inner // group}] (per group of {group} along axis {1 - axis} of {shape})"
            )
            fits = list(amax.shape) == [out, inner // group]
        elif axis is None:
            expected = "Expected [] (per tensor: axis null)"
            fits = amax.dim() == 0
        elif shape:
            expected = f"Expected [{shape[axis]}] (per channel along axis {axis} of {shape})"
            fits = list(amax.shape) == [shape[axis]] and shape[axis] > 0
        else:
            expected = f"Expected [C], C >= 1 (per channel along axis {axis})"
            fits = amax.dim() == 1 and amax.numel() > 0
        if not fits:
            self.fail(method, "a wrong amax shape", str(list(amax.shape)), expected)

    def check_amax_values(self, method: str, amax: torch.Tensor) -> None:
        # amax / qmax must be a normal float32: finite, and at least the smallest normal number.
        least = torch.finfo(torch.float32).tiny * self.qmax
        flat = amax.reshape(-1).double()
        bad = ~(torch.isfinite(flat) & (flat >= least))
        if bad.any():
            i = int(bad.nonzero()[0])
            where = f" (channel {i})" if amax.dim() == 1 else ""
            if amax.dim() == 2:
                where = " (channel {}, group {})".format(*divmod(i, amax.shape[1]))
            self.fail(
                method,
                "an invalid amax",
                f"{float(flat[i]):.9g}{where}",
                f"Expected a finite amax >= {least:.9g} (the smallest normal float32 times qmax {self.qmax})",
            )

    def check_per_batch(self, method: str, per_batch: torch.Tensor, amax: torch.Tensor) -> None:
        self.check_dtype(method, per_batch, "per-batch")
        if per_batch.dim() != amax.dim() + 1 or per_batch.shape[1:] != amax.shape:
            expected = ", ".join(["N", *map(str, amax.shape)])
            self.fail(method, "a wrong per-batch shape", str(list(per_batch.shape)), f"Expected [{expected}]")
        flat = per_batch.reshape(-1)
        bad = ~torch.isfinite(flat)
        if bad.any():
            i = int(bad.nonzero()[0])
            seen = f"{float(flat[i]):.9g} (element {i})"
            self.fail(method, "an invalid per-batch amax", seen, "Expected finite values")


def check_fingerprint(table: ScaleTable, model: nn.Module, path: str | Path | None = None) -> None:
    """Refuse a scale file computed on other weights (README, "The scale file")."""
    expected = table.meta.get("model_fingerprint")
    if expected and expected != model_fingerprint(model):
        what = table.describe_source(path)
        raise ScaleFileError(
            f"{what} was computed for other model weights (fingerprint {expected[:12]}..., "
            f"this model {model_fingerprint(model)[:12]}...). Calibrate this model, "
            "or pass its own scale file."
        )
