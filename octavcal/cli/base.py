"""The command group, error handling and the options every command shares.

Errors from the library (OctavcalError) become one ``Error: ...`` line and exit code 1; click's usage
errors exit with 2. Results go to stdout, progress and warnings to stderr.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from ..errors import OctavcalError, OctavcalWarning, SpecError
from ..files import output_set
from ..offload import DEVICE_MAPS
from .interrupts import MESSAGE, command_running

# Library messages name library arguments; the command line names its options instead.
_OPTION_NAMES = {
    "allow_pickle=True": "--allow-pickle",
    "strict=True": "--strict",
    "hf_class=": "--hf-class ",
}
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+\.[^.]+\.tmp$")


def show_tracebacks() -> bool:
    return os.environ.get("OCTAVCAL_TRACEBACK", "") not in ("", "0")


def _with_options(message: str) -> str:
    for library, option in _OPTION_NAMES.items():
        message = message.replace(library, option)
    return message


def _intended(filename: str) -> str:
    """An OSError on a temporary output names the file that was being written instead."""
    path = Path(filename)
    match = _TEMPORARY.match(path.name)
    return str(path.with_name(match["name"])) if match else filename


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into 'Error: ...' (exit 1) and Ctrl-C into exit 130, never a traceback
    (unless --traceback or OCTAVCAL_TRACEBACK=1). A command's output files appear all together, and
    none of them when it fails. Commands import torch inside, so its import is covered too."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            click.echo(f"Warning: {message}", err=True)

        try:
            # Ctrl-C in torch's import is an interrupt too; the caller's warning settings come back after
            with command_running(), warnings.catch_warnings(), output_set():
                warnings.showwarning = show_warning
                warnings.simplefilter("always", OctavcalWarning)
                return fn(*args, **kwargs)
        except OctavcalError as exc:
            _traceback()
            click.echo(f"Error: {_with_options(str(exc))}", err=True)
            sys.exit(1)
        except OSError as exc:  # an output that cannot be written, a file that cannot be read
            _traceback()
            where = f" '{_intended(str(exc.filename))}'" if getattr(exc, "filename", None) else ""
            click.echo(f"Error: Cannot use{where}: {exc.strerror or exc}.", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(MESSAGE, err=True)
            sys.exit(130)

    return wrapper


def _traceback() -> None:
    if show_tracebacks():
        traceback.print_exc()


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise SpecError(f"Unknown device '{device}'. Expected cpu, cuda or cuda:N.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"Device '{device}' was asked for, but CUDA is not available here.")
    return device


def parse_bits_list(text: str) -> list[int]:
    """'4' or '4,5,6' -> [4, 5, 6]; anything else is a usage error."""
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        bits = []
    if not bits:
        raise click.BadParameter(f"expected bit widths like 4 or 4,5,6: got {text!r}", param_hint="--bits")
    from ..grid import check_bits

    for b in bits:
        check_bits(b)  # all of them before any calibration work
    return bits


def weight_granularity_option(fn: Any) -> Any:
    return click.option(
        "--weight-granularity",
        metavar="tensor|channel|group:G",
        help="Weight scales: one per tensor, per output channel, or per group of G input features of each "
        "output channel (G in 16..1024; convolutions cannot be grouped) [default: channel].",
    )(fn)


def parse_weight_granularity(spec: str | None, per_tensor_weights: bool = False) -> tuple[bool, int | None]:
    """--weight-granularity (and --per-tensor-weights) as (per_channel_weights, group_size)."""
    from ..groups import parse_granularity

    if spec is None:
        return not per_tensor_weights, None
    try:
        granularity = parse_granularity(spec)
    except SpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--weight-granularity") from exc
    if per_tensor_weights and granularity.kind != "tensor":
        raise click.UsageError(f"--per-tensor-weights contradicts --weight-granularity {spec}.")
    return granularity.kind != "tensor", granularity.group_size


DEVICE_HELP = "cpu or cuda [default: cuda when available]."
PICKLE_HELP = "Load a pickled nn.Module (runs code from the file: trusted files only)."
ARCH_HELP = "package.module:callable (or file.py:callable) that builds the module for a state_dict."
HF_CLASS_HELP = (
    "transformers class for a Hugging Face folder [default: the one config.json names under "
    "'architectures', else AutoModel]."
)

SEED = click.IntRange(0, 2**63 - 1)  # what a torch.Generator takes
DTYPES = ("bfloat16", "float16", "float32", "float64")  # names of torch dtypes: --help needs no torch


def torch_dtype(name: str | None) -> Any:
    """'float16' -> torch.float16; None stays None."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


DEVICE_MAP_HELP = (
    "Spread a Hugging Face model over GPUs, CPU and disk with accelerate (pip install "
    "octavcal[accelerate]): auto, balanced or sequential."
)
MAX_MEMORY_HELP = (
    "Memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB (units KB..TB, KiB..TiB)."
)
OFFLOAD_HELP = "Folder for weights offloaded to disk (kept) [default: a temporary folder, removed]."


def _max_memory(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from ..offload import parse_max_memory

    try:
        return parse_max_memory(value)
    except SpecError as exc:
        raise click.BadParameter(str(exc)) from exc


@dataclass(frozen=True)
class ModelSource:
    """The MODEL argument and the options that say how to load it (shared by every command)."""

    path: Path
    arch: str | None
    allow_pickle: bool
    hf_class: str | None
    device_map: str | None = None
    max_memory: dict[int | str, int] | None = None
    offload_folder: Path | None = None

    def __post_init__(self) -> None:
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            given = "--max-memory" if self.max_memory is not None else "--offload-folder"
            raise click.UsageError(f"{given} places a model with --device-map; give --device-map too.")

    def load(self, device: str = "cpu", dtype: str | None = None) -> Any:
        from ..loading import load_model
        from ..offload import Placement

        placement = (
            Placement(self.device_map, self.max_memory, self.offload_folder) if self.device_map else None
        )
        return load_model(
            self.path,
            arch=self.arch,
            allow_pickle=self.allow_pickle,
            device=device,
            dtype=torch_dtype(dtype),
            hf_class=self.hf_class,
            placement=placement,
        )


@dataclass(frozen=True)
class Display:
    """--quiet and --json: what a command prints besides errors."""

    quiet: bool
    as_json: bool

    @property
    def tables(self) -> bool:
        return not (self.quiet or self.as_json)


def _grouped(options: list[Callable[..., Any]], name: str, build: Callable[..., Any], keys: list[str]) -> Any:
    """A decorator adding ``options`` to a command and passing them on as one object ``name``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = build(*(kwargs.pop(k) for k in keys))
            return fn(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


_MODEL = [
    click.argument("model", type=click.Path(path_type=Path)),
    click.option("--arch", help=ARCH_HELP),
    click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP),
    click.option("--hf-class", help=HF_CLASS_HELP),
]
_PLACEMENT = [
    click.option("--device-map", type=click.Choice(DEVICE_MAPS), help=DEVICE_MAP_HELP),
    click.option("--max-memory", metavar="DEVICE=SIZE,...", callback=_max_memory, help=MAX_MEMORY_HELP),
    click.option("--offload-folder", type=click.Path(path_type=Path, file_okay=False), help=OFFLOAD_HELP),
]
_KEYS = ["model", "arch", "allow_pickle", "hf_class"]
# calibrate, compare and evaluate run the model and can place it; export traces it whole, on one device.
model_options = _grouped(
    _MODEL + _PLACEMENT, "source", ModelSource, [*_KEYS, "device_map", "max_memory", "offload_folder"]
)
whole_model_options = _grouped(_MODEL, "source", ModelSource, _KEYS)


def display_options(what: str) -> Any:
    return _grouped(
        [
            click.option("--quiet", is_flag=True, help="No progress bars or tables."),
            click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON instead of tables."),
        ],
        "show",
        Display,
        ["quiet", "as_json"],
    )


@dataclass(frozen=True)
class Processes:
    """--dist-backend and --dist-timeout: how to join the other processes under torchrun."""

    backend: str | None
    timeout_s: float

    def joined(self) -> Any:
        """A context giving this process's Share (None when run as one process), left at the end."""
        from ..distributed import joined

        return joined(self.backend, self.timeout_s)


dist_options = _grouped(
    [
        click.option(
            "--dist-backend",
            type=click.Choice(["gloo", "nccl"]),
            help="Under torchrun (WORLD_SIZE > 1): the process group's backend "
            "[default: nccl with CUDA, else gloo].",
        ),
        click.option(
            "--dist-timeout",
            default=1800.0,
            show_default=True,
            type=click.FloatRange(min=0, min_open=True),
            help="Under torchrun: seconds to wait for the other processes before failing.",
        ),
    ],
    "processes",
    Processes,
    ["dist_backend", "dist_timeout"],
)


def quiet_unless_lead(share: Any, show: Display) -> Display:
    """Only rank 0 prints results, progress and warnings; the other processes print only errors."""
    if share is None or share.lead:
        return show
    warnings.simplefilter("ignore")
    return Display(quiet=True, as_json=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="octavcal")
@click.option(
    "--traceback", "show_traceback", is_flag=True, help="Show the full trace of an error (for debugging)."
)
def main(show_traceback: bool) -> None:
    """Post-training quantization calibration: OCTAV, MSE sweep, percentiles and max-scaling."""
    if show_traceback:
        os.environ["OCTAVCAL_TRACEBACK"] = "1"
