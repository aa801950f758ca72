"""octavcal: exact, fast clipping scalars (OCTAV, MSE sweep, percentiles, max) for quantization.

The public names are imported when first used (PEP 562), so that ``import octavcal`` and the command
line's ``--help`` do not pay for torch.
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:  # what the lazy names are, for type checkers and readers
    from .calibrate import CalibrationConfig, calibrate
    from .compare import compare
    from .core import Batch
    from .data import load_data
    from .errors import (
        CalibrationError,
        DataError,
        LoadError,
        OctavcalError,
        OctavcalWarning,
        ScaleFileError,
        SpecError,
    )
    from .evaluate import evaluate
    from .grid import Grid, fake_quantize, quant_mse, scale_from_amax
    from .loading import load_model
    from .methods import (
        Method,
        OctavResult,
        analytic_mse,
        compute_amax,
        max_scaling,
        mse_sweep,
        octav,
        parse_method,
        parse_methods,
        percentile,
    )
    from .scales import ScaleTable, load_scales, save_scales
    from .simulate import apply_scales

# module -> the public names it gives (the same as the imports above; a test checks that they agree)
_EXPORTS = {
    ".calibrate": ("CalibrationConfig", "calibrate"),
    ".compare": ("compare",),
    ".core": ("Batch",),
    ".data": ("load_data",),
    ".errors": (
        "CalibrationError",
        "DataError",
        "LoadError",
        "OctavcalError",
        "OctavcalWarning",
        "ScaleFileError",
        "SpecError",
    ),
    ".evaluate": ("evaluate",),
    ".grid": ("Grid", "fake_quantize", "quant_mse", "scale_from_amax"),
    ".loading": ("load_model",),
    ".methods": (
        "Method",
        "OctavResult",
        "analytic_mse",
        "compute_amax",
        "max_scaling",
        "mse_sweep",
        "octav",
        "parse_method",
        "parse_methods",
        "percentile",
    ),
    ".scales": ("ScaleTable", "load_scales", "save_scales"),
    ".simulate": ("apply_scales",),
}
_SOURCES = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(source, __name__), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """Importing a submodule binds it on its package: ``octavcal.calibrate`` would become the module
    once anything imported ``octavcal.calibrate``. The public name is the function (as it was when
    this file imported everything), so a submodule never replaces a public name here."""

    def __setattr__(self, name: str, value: object) -> None:
        submodule = isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.{name}"
        if not (submodule and name in _SOURCES):
            super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = [
    "Batch",
    "CalibrationConfig",
    "CalibrationError",
    "DataError",
    "Grid",
    "LoadError",
    "Method",
    "OctavResult",
    "OctavcalError",
    "OctavcalWarning",
    "ScaleFileError",
    "ScaleTable",
    "SpecError",
    "__version__",
    "analytic_mse",
    "apply_scales",
    "calibrate",
    "compare",
    "compute_amax",
    "evaluate",
    "fake_quantize",
    "load_data",
    "load_model",
    "load_scales",
    "max_scaling",
    "mse_sweep",
    "octav",
    "parse_method",
    "parse_methods",
    "percentile",
    "quant_mse",
    "save_scales",
    "scale_from_amax",
]
