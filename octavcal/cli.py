"""The command line: a thin layer that parses options, calls one library function, and renders.

Errors from the library (OctavcalError) become one ``Error: ...`` line and exit code 1; click's usage
errors exit with 2. Results go to stdout, progress and warnings to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _interrupted_at_start_up

try:  # Ctrl-C while the command line is still importing: one line, exit 130
    import click
    import torch

    from ._version import __version__
    from .calibrate import DEFAULT_METHODS, CalibrationConfig, calibrate, parse_layer_bits
    from .compare import compare, summarize
    from .data import batch_sources, first_batch, load_heldout
    from .errors import LoadError, OctavcalError, OctavcalWarning, SpecError
    from .evaluate import evaluate
    from .files import atomic_write, check_output, check_output_folder, output_set
    from .grid import check_bits
    from .loading import load_model
    from .render import (
        console,
        progress_bar,
        render_calibration,
        render_comparison,
        render_evaluation,
        render_scales,
        scales_summary,
    )
    from .report import write_evaluation, write_report
    from .scales import check_fingerprint, load_scales, save_scales
except KeyboardInterrupt:
    _interrupted_at_start_up()
    raise


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
    none of them when it fails."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            click.echo(f"Warning: {message}", err=True)

        try:
            with warnings.catch_warnings(), output_set():  # the caller's warning settings come back after
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
            click.echo("Interrupted; no output was written.", err=True)
            sys.exit(130)

    return wrapper


def _traceback() -> None:
    if show_tracebacks():
        traceback.print_exc()


def resolve_device(device: str | None) -> str:
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
    for b in bits:
        check_bits(b)  # all of them before any calibration work
    return bits


DEVICE_HELP = "cpu or cuda [default: cuda when available]."
PICKLE_HELP = "Load a pickled nn.Module (runs code from the file: trusted files only)."
ARCH_HELP = "package.module:callable (or file.py:callable) that builds the module for a state_dict."
HF_CLASS_HELP = (
    "transformers class for a Hugging Face folder [default: the one config.json names under "
    "'architectures', else AutoModel]."
)

SEED = click.IntRange(0, 2**63 - 1)  # what a torch.Generator takes
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class ModelSource:
    """The MODEL argument and the options that say how to load it (shared by every command)."""

    path: Path
    arch: str | None
    allow_pickle: bool
    hf_class: str | None

    def load(self, device: str = "cpu", dtype: str | None = None) -> Any:
        return load_model(
            self.path,
            arch=self.arch,
            allow_pickle=self.allow_pickle,
            device=device,
            dtype=DTYPES[dtype] if dtype else None,
            hf_class=self.hf_class,
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


model_options = _grouped(
    [
        click.argument("model", type=click.Path(path_type=Path)),
        click.option("--arch", help=ARCH_HELP),
        click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP),
        click.option("--hf-class", help=HF_CLASS_HELP),
    ],
    "source",
    ModelSource,
    ["model", "arch", "allow_pickle", "hf_class"],
)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="octavcal")
@click.option(
    "--traceback", "show_traceback", is_flag=True, help="Show the full trace of an error (for debugging)."
)
def main(show_traceback: bool) -> None:
    """Post-training quantization calibration: OCTAV, MSE sweep, percentiles and max-scaling."""
    if show_traceback:
        os.environ["OCTAVCAL_TRACEBACK"] = "1"


@main.command("calibrate")
@model_options
@click.option(
    "--data", required=True, help="Tensor file (.pt, .safetensors, .npy, .npz) or package.module:callable."
)
@click.option("--bits", default=8, show_default=True, type=int, help="Bit width for every target.")
@click.option(
    "--layer-bits", multiple=True, metavar="PATTERN=BITS|skip", help="Per-layer bits by fnmatch pattern."
)
@click.option(
    "--first-last-8bit", is_flag=True, help="Keep the first and last Linear/Conv at 8 bits (Appendix E.2)."
)
@click.option(
    "--methods", default=",".join(DEFAULT_METHODS), show_default=True, help="Comma-separated methods."
)
@click.option(
    "--batches", "num_batches", default=10, show_default=True, type=int, help="Random batches to use."
)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--per-tensor-weights", is_flag=True, help="One scalar per weight tensor instead of per output channel."
)
@click.option(
    "--keep-padding", is_flag=True, help="Include padded positions (attention_mask == 0) in statistics."
)
@click.option(
    "--grid", "convention", type=click.Choice(["runtime", "paper"]), default="runtime", show_default=True
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Scale file [default: MODEL.scales.safetensors]."
)
@click.option("--device", help=DEVICE_HELP)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="Run the model in this dtype.")
@click.option(
    "--strict", is_flag=True, help="Fail when a weight-bearing op (an LSTM, an einsum) cannot be calibrated."
)
@display_options("a summary")
@friendly_errors
def calibrate_command(
    source: ModelSource,
    data: str,
    num_batches: int,
    batch_size: int,
    seed: int,
    output: Path | None,
    device: str | None,
    dtype: str | None,
    show: Display,
    **options: Any,
) -> None:
    """Calibrate MODEL's clipping scalars on calibration data and write a scale file.

    Every linear, convolution and matrix product with a weight is calibrated (weight and input), and
    every matmul between activations; weights that cannot be are listed with the reason.

    \b
    Example:
      octavcal calibrate sample_models/digits_cnn.safetensors \\
          --arch sample_models.digits_cnn:build \\
          --data sample_models/digits_cnn.calib.safetensors --bits 4
    """
    config = _calibration_config(**options)
    model = source.path
    output = check_output(output or model.with_name(model.stem + ".scales.safetensors"), [model, data])
    dev = resolve_device(device)
    loaded = source.load(dev, dtype)
    calib, _ = batch_sources(
        data, batch_size, num_batches, 0, seed, None, dev, DTYPES[dtype] if dtype else None
    )
    with progress_bar(not show.tables) as progress:
        table = calibrate(loaded, calib(), config, seed=seed, progress=progress, total_batches=num_batches)
    if loaded.note:
        click.echo(f"Warning: {loaded.note}", err=True)
    save_scales(table, output)
    if show.as_json:
        click.echo(json.dumps(scales_summary(table, output), indent=2))
    elif not show.quiet:
        render_calibration(table, output)


def _calibration_config(
    bits: int,
    layer_bits: tuple[str, ...],
    first_last_8bit: bool,
    methods: str,
    per_tensor_weights: bool,
    keep_padding: bool,
    convention: str,
    strict: bool,
) -> CalibrationConfig:
    """calibrate's options as a validated CalibrationConfig (before any file is read)."""
    config = CalibrationConfig(
        bits=bits,
        methods=tuple(methods.split(",")),
        layer_bits=tuple(parse_layer_bits(s) for s in layer_bits),
        first_last_bits=8 if first_last_8bit else None,
        per_channel_weights=not per_tensor_weights,
        mask_padding=not keep_padding,
        convention=convention,
        strict=strict,
    )
    config.validate()
    return config


@main.command("compare")
@model_options
@click.option("--data", required=True, help="Calibration data, as for calibrate.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True)
@click.option(
    "--bits", "bits_list", default="4", show_default=True, help="One or more bit widths: 4 or 4,5,6,7,8."
)
@click.option(
    "--scales", type=click.Path(path_type=Path), help="Measure this scale file instead of calibrating."
)
@click.option("--batches", "num_batches", default=10, show_default=True, type=int)
@click.option(
    "--heldout-batches", default=5, show_default=True, type=int, help="Batches not used for calibration."
)
@click.option("--heldout-data", help="Held-out data file [default: other samples of --data].")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--curve-points", default=100, show_default=True, type=int, help="Samples of each MSE curve.")
@click.option(
    "--grid", "convention", type=click.Choice(["runtime", "paper"]), default="runtime", show_default=True
)
@click.option("--keep-padding", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("octavcal-report"), show_default=True)
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots (and their place in report.html).")
@click.option("--device", help=DEVICE_HELP)
@display_options("the summary")
@friendly_errors
def compare_command(
    source: ModelSource,
    data: str,
    scales: Path | None,
    num_batches: int,
    heldout_batches: int,
    heldout_data: str | None,
    batch_size: int,
    seed: int,
    curve_points: int,
    out: Path,
    no_plots: bool,
    device: str | None,
    show: Display,
    **options: Any,
) -> None:
    """Compare every method's quantization MSE, SQNR and time per target (Appendices F and G).

    \b
    Example:
      octavcal compare sample_models/digits_transformer.safetensors \\
          --arch sample_models.digits_transformer:build \\
          --data sample_models/digits_transformer.calib.safetensors \\
          --methods octav,sweep,p99.99 --bits 4,8 --out report
    """
    config, bits = _comparison_config(curve_points=curve_points, **options)
    check_output_folder(out)
    dev = resolve_device(device)
    loaded = source.load(dev)
    tables = None
    if scales is not None:
        table = load_scales(scales)
        check_fingerprint(table, loaded.module, scales)
        tables = {int(table.meta.get("bits", bits[0])): table}
        bits = list(tables)
    calib, held = batch_sources(data, batch_size, num_batches, heldout_batches, seed, heldout_data, dev, None)
    with progress_bar(not show.tables) as progress:
        report = compare(
            loaded,
            calib,
            held,
            config,
            bits,
            tables=tables,
            seed=seed,
            curve_points=curve_points,
            progress=progress,
        )
    paths = write_report(report, out, plots=not no_plots)
    if show.as_json:
        files = {k: str(v) for k, v in paths.items()}
        click.echo(json.dumps({"summary": summarize(report), "files": files}, indent=2, default=str))
    elif not show.quiet:
        render_comparison(report)
        console.print(f"Wrote {paths['html']}, {paths['json']}, {paths['csv']} and {len(paths) - 3} plots")


def _comparison_config(
    methods: str, bits_list: str, convention: str, keep_padding: bool, curve_points: int
) -> tuple[CalibrationConfig, list[int]]:
    """compare's options as a validated CalibrationConfig and its bit widths (before any file is read)."""
    bits = parse_bits_list(bits_list)
    if curve_points < 2:
        raise click.BadParameter(f"needs at least 2 points: got {curve_points}", param_hint="--curve-points")
    config = CalibrationConfig(
        bits=bits[0], methods=tuple(methods.split(",")), mask_padding=not keep_padding, convention=convention
    )
    config.validate()
    return config, bits


@main.command("evaluate")
@model_options
@click.option("--data", required=True, help="Held-out data (a 'labels' entry enables accuracy).")
@click.option(
    "--scales", "scale_files", multiple=True, type=click.Path(path_type=Path), help="Scale files (repeat)."
)
@click.option("--calib-data", help="Calibrate on this data instead of reading --scales (with --bits).")
@click.option("--bits", "bits_list", default="4,6,8", show_default=True, help="Bit widths with --calib-data.")
@click.option("--methods", help="Methods to evaluate [default: all in each scale file].")
@click.option(
    "--batches", "num_batches", default=10, show_default=True, type=int, help="Calibration batches."
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=int,
    help="Samples per batch (evaluation and calibration).",
)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(path_type=Path),
    help="Labels (a tensor file, one per sample) when --data has no 'labels' entry.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Write evaluation.json and fidelity.png here.")
@click.option("--device", help=DEVICE_HELP)
@display_options("the results")
@friendly_errors
def evaluate_command(
    source: ModelSource,
    data: str,
    scale_files: tuple[Path, ...],
    calib_data: str | None,
    bits_list: str,
    methods: str | None,
    batch_size: int,
    labels_file: Path | None,
    out: Path | None,
    device: str | None,
    show: Display,
    **calibration: Any,
) -> None:
    """Compare each method's simulated quantized model with the float model on held-out data.

    \b
    Example:
      octavcal evaluate sample_models/digits_cnn.safetensors --arch sample_models.digits_cnn:build \\
          --data sample_models/digits_cnn.heldout.safetensors \\
          --calib-data sample_models/digits_cnn.calib.safetensors --bits 4,6,8
    """
    if out is not None:
        check_output_folder(out)
    if batch_size < 1:
        raise LoadError(f"Batch size must be positive: got {batch_size}.")
    if not scale_files and not calib_data:
        raise click.UsageError("Give --scales, or --calib-data with --bits.")
    bits = parse_bits_list(bits_list) if not scale_files else []
    held = load_heldout(data, labels_file)  # every input is read before any calibration work
    dev = resolve_device(device)
    loaded = source.load(dev)
    method_list = methods.split(",") if methods else None
    if scale_files:
        tables = [load_scales(p) for p in scale_files]
        names = [str(p) for p in scale_files]
        for path, table in zip(scale_files, tables, strict=True):
            check_fingerprint(table, loaded.module, path)
    else:
        names = [f"calibrated at {b} bits" for b in bits]
        calib, _ = batch_sources(
            str(calib_data), batch_size, calibration["num_batches"], 0, calibration["seed"], None, dev, None
        )
        configs = [CalibrationConfig(bits=b, methods=tuple(method_list or DEFAULT_METHODS)) for b in bits]
        with progress_bar(not show.tables) as progress:
            tables = [
                calibrate(loaded, calib(), c, seed=calibration["seed"], progress=progress) for c in configs
            ]
    order = torch.arange(held.num_samples).split(batch_size)
    with progress_bar(not show.tables) as progress:
        rows = evaluate(
            loaded, tables, lambda: (held.batch(i).to(dev) for i in order), method_list, progress, names
        )
    if out is not None:
        write_evaluation(rows, out)
    if show.as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2, default=str))
    elif not show.quiet:
        render_evaluation(rows)


@main.group("export")
def export_group() -> None:
    """Write scales for runtimes: ONNX QDQ models, ONNX Runtime overrides, TensorRT caches."""


def _export_common(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            model_options,
            click.option("--scales", required=True, type=click.Path(path_type=Path)),
            click.option("--method", default="octav", show_default=True),
            click.option(
                "--data", required=True, help="Example inputs for tracing (the first batch is used)."
            ),
            click.option("--batch-size", default=2, show_default=True, type=int),
            click.option("-o", "--output", required=True, type=click.Path(path_type=Path)),
        ]
    ):
        fn = option(fn)
    return fn


@export_group.command("onnx")
@_export_common
@friendly_errors
def export_onnx_command(
    source: ModelSource,
    scales: Path,
    method: str,
    data: str,
    batch_size: int,
    output: Path,
) -> None:
    """Write an ONNX model with QuantizeLinear/DequantizeLinear at every calibrated target.

    Also writes OUTPUT.json (targets -> ONNX tensors and scales) and OUTPUT.ort_overrides.json
    (ONNX Runtime's TensorQuantOverrides for quantize_static).

    \b
    Example:
      octavcal export onnx sample_models/digits_cnn.safetensors --arch sample_models.digits_cnn:build \\
          --scales sample_models/digits_cnn.scales.safetensors \\
          --data sample_models/digits_cnn.calib.safetensors -o cnn.qdq.onnx
    """
    from .export.onnx import export_qdq, ort_overrides

    overrides = output.with_suffix(output.suffix + ".ort_overrides.json")
    for path in (output, output.with_suffix(output.suffix + ".json"), overrides):
        check_output(path, [source.path, scales, data])
    loaded = source.load()
    table = load_scales(scales)
    check_fingerprint(table, loaded.module, scales)
    mapping = export_qdq(loaded, table, method, first_batch(data, batch_size, 0, "cpu"), output)
    atomic_write(overrides, json.dumps(ort_overrides(table, method, mapping), indent=1))
    click.echo(f"Wrote {output} ({len(mapping['targets'])} quantized targets), {output}.json and {overrides}")


@export_group.command("trt-cache")
@_export_common
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(path_type=Path),
    help="Also where the float ONNX goes [default: OUTPUT with .onnx].",
)
@friendly_errors
def export_trt_command(
    source: ModelSource,
    scales: Path,
    method: str,
    data: str,
    batch_size: int,
    output: Path,
    onnx_path: Path | None,
) -> None:
    """Write a TensorRT INT8 calibration cache (8-bit per-tensor activations) and the float ONNX it names.

    \b
    Example:
      octavcal export trt-cache sample_models/digits_cnn.safetensors --arch sample_models.digits_cnn:build \\
          --scales cnn8.scales.safetensors --data sample_models/digits_cnn.calib.safetensors -o cnn.cache
    """
    from .export.onnx import export_float
    from .export.tensorrt import calibration_cache

    onnx_path = onnx_path or output.with_suffix(".onnx")
    if onnx_path.resolve() == output.resolve():
        raise click.BadParameter(
            "the cache and the float ONNX model need different paths", param_hint="--onnx"
        )
    for path in (output, onnx_path):
        check_output(path, [source.path, scales, data])
    loaded = source.load()
    table = load_scales(scales)
    check_fingerprint(table, loaded.module, scales)
    mapping = export_float(loaded, table, method, first_batch(data, batch_size, 0, "cpu"), onnx_path)
    text, skipped = calibration_cache(table, method, mapping)
    if len(text.splitlines()) < 2:
        raise OctavcalError(
            f"No target of '{scales}' belongs in a TensorRT cache (8-bit activations): "
            f"{'; '.join(skipped[:3]) or 'no activations'}."
        )
    atomic_write(output, text)
    for reason in skipped:
        click.echo(f"Warning: left out of the cache: {reason}", err=True)
    click.echo(f"Wrote {output} ({len(text.splitlines()) - 1} tensors) for {onnx_path}")


@main.command("inspect")
@click.argument("scales", type=click.Path(path_type=Path))
@click.option("--method", help="Show only this method.")
@click.option("--json", "as_json", is_flag=True, help="Print every target and amax as JSON.")
@friendly_errors
def inspect_command(scales: Path, method: str | None, as_json: bool) -> None:
    """Show a scale file: targets, bits, grid and each method's amax.

    \b
    Example:
      octavcal inspect sample_models/digits_cnn.scales.safetensors --method octav
    """
    table = load_scales(scales)
    if method is not None and method not in table.methods:
        table.require_method(method)
    if as_json:
        click.echo(json.dumps(scales_summary(table, scales, full=True, method=method), indent=2))
    else:
        render_scales(table, method)
