"""octavcal: exact, fast clipping scalars (OCTAV, MSE sweep, percentiles, max) for quantization."""

import os as _os
import sys as _sys


def _interrupted_at_start_up() -> None:
    """Ctrl-C while the command line is still importing torch: one line and exit 130, no traceback."""
    if _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("octavcal", "__main__.py", "-m"):
        _sys.stderr.write("Interrupted; no output was written.\n")
        raise SystemExit(130)


try:
    from ._version import __version__
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
except KeyboardInterrupt:
    _interrupted_at_start_up()
    raise

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
