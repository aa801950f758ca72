"""octavcal: exact, fast clipping scalars (OCTAV, MSE sweep, percentiles, max) for quantization."""

import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _on_command_line() -> bool:
    return _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("octavcal", "__main__.py", "-m")


def _interrupted_at_start_up() -> None:
    """Ctrl-C while the command line is still importing torch: one line and exit 130, no traceback."""
    if _on_command_line():
        _sys.stderr.write("Interrupted; no output was written.\n")
        raise SystemExit(130)


class _StartUpInterrupts:
    """On the command line, remember a Ctrl-C during the imports: a third-party import it interrupts
    can fail later with another error (a half-initialized module), which is then the interrupt too."""

    def __init__(self) -> None:
        self.seen = False
        self.previous = None
        if _on_command_line() and _threading.current_thread() is _threading.main_thread():
            self.previous = _signal.signal(_signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            _signal.signal(_signal.SIGINT, self.previous)


_start_up = _StartUpInterrupts()
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
except BaseException as _error:
    if isinstance(_error, KeyboardInterrupt) or _start_up.seen:
        _interrupted_at_start_up()
    raise
finally:
    _start_up.restore()

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
