"""The OctavcalError family: every error a user can cause is one of these."""


class OctavcalError(Exception):
    """Base class of all errors octavcal raises on bad input or bad files."""


class SpecError(OctavcalError, ValueError):
    """A bad argument: unknown method, bits out of range, wrong dtype, bad axis."""


class DataError(OctavcalError, ValueError):
    """Tensor contents that cannot be calibrated: empty, NaN or Inf."""


class CalibrationError(OctavcalError):
    """Calibration could not run: data does not fit the model, nothing was collected."""


class LoadError(OctavcalError):
    """A model, data or architecture file could not be loaded as what it claims to be."""


class ScaleFileError(OctavcalError):
    """A scale file is missing, malformed, from a newer format, or from another model."""


class OutputError(OctavcalError):
    """An output path that cannot or must not be written (a folder, an input, not writable)."""


class DistributedError(CalibrationError):
    """A run over several processes stopped: a rank failed (named, with its error) or stopped answering."""


class OctavcalWarning(UserWarning):
    """Something worth a user's attention that does not stop the run."""
