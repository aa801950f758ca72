"""compare and evaluate: each method measured on the model (Appendices F and G; held-out fidelity)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..defaults import DEFAULT_METHODS
from ..errors import LoadError
from ..files import check_output_folder
from .base import (
    DEVICE_HELP,
    SEED,
    Display,
    ModelSource,
    Processes,
    display_options,
    dist_options,
    friendly_errors,
    main,
    model_options,
    parse_bits_list,
    parse_weight_granularity,
    quiet_unless_lead,
    resolve_device,
    weight_granularity_option,
)

if TYPE_CHECKING:
    from ..calibrate import CalibrationConfig

# torch, numpy and rich are imported inside the commands, when they run: not for --help.


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
    "--reduction",
    "reductions",
    default="mean",
    show_default=True,
    help="Reductions to compare, comma-separated: mean, union; methods of the second are named METHOD@union.",
)
@click.option(
    "--grid", "convention", type=click.Choice(["runtime", "paper"]), default="runtime", show_default=True
)
@click.option("--keep-padding", is_flag=True)
@weight_granularity_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("octavcal-report"), show_default=True)
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots (and their place in report.html).")
@click.option("--device", help=DEVICE_HELP)
@dist_options
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
    processes: Processes,
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
    from ..compare import compare, summarize
    from ..data import batch_sources
    from ..distributed import together
    from ..render import console, progress_bar, render_comparison
    from ..report import write_report
    from ..scales import check_fingerprint, load_scales

    config, bits, reduction_list = _comparison_config(curve_points=curve_points, **options)
    with processes.joined() as share:
        show = quiet_unless_lead(share, show)
        lead = share is None or share.lead
        with together(share, "loading the model and data"):
            if lead:
                check_output_folder(out)
            dev = resolve_device(device)
            loaded = source.load(dev)
            tables = None
            if scales is not None:
                table = load_scales(scales)
                check_fingerprint(table, loaded.module, scales)
                tables = {int(table.meta.get("bits", bits[0])): table}
                bits = list(tables)
            calib, held = batch_sources(
                data, batch_size, num_batches, heldout_batches, seed, heldout_data, dev, None
            )
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
                group=share,
                reductions=reduction_list,
            )
    if not lead:
        return  # only rank 0 writes
    paths = write_report(report, out, plots=not no_plots)
    if show.as_json:
        files = {k: str(v) for k, v in paths.items()}
        click.echo(json.dumps({"summary": summarize(report), "files": files}, indent=2, default=str))
    elif not show.quiet:
        render_comparison(report)
        console.print(f"Wrote {paths['html']}, {paths['json']}, {paths['csv']} and {len(paths) - 3} plots")


def _comparison_config(
    methods: str,
    bits_list: str,
    convention: str,
    keep_padding: bool,
    curve_points: int,
    reductions: str,
    weight_granularity: str | None = None,
) -> tuple[CalibrationConfig, list[int], tuple[str, ...]]:
    """compare's options as a validated CalibrationConfig and its bit widths (before any file is read)."""
    from ..calibrate import CalibrationConfig

    bits = parse_bits_list(bits_list)
    if curve_points < 2:
        raise click.BadParameter(f"needs at least 2 points: got {curve_points}", param_hint="--curve-points")
    reduction_list = tuple(dict.fromkeys(r.strip() for r in reductions.split(",") if r.strip()))
    per_channel, group_size = parse_weight_granularity(weight_granularity)
    config = CalibrationConfig(
        bits=bits[0],
        methods=tuple(methods.split(",")),
        mask_padding=not keep_padding,
        convention=convention,
        reduction=reduction_list[0] if reduction_list else "",
        per_channel_weights=per_channel,
        group_size=group_size,
    )
    for reduction in reduction_list:
        dataclasses.replace(config, reduction=reduction).validate()
    config.validate()
    return config, bits, reduction_list


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
@weight_granularity_option
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(path_type=Path),
    help="Labels (a tensor file, one per sample) when --data has no 'labels' entry.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Write evaluation.json and fidelity.png here.")
@click.option("--device", help=DEVICE_HELP)
@dist_options
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
    processes: Processes,
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
    import torch

    from ..calibrate import CalibrationConfig, calibrate_each
    from ..data import batch_sources, load_heldout
    from ..distributed import together
    from ..evaluate import evaluate
    from ..render import progress_bar, render_evaluation
    from ..report import write_evaluation
    from ..scales import check_fingerprint, load_scales

    if batch_size < 1:
        raise LoadError(f"Batch size must be positive: got {batch_size}.")
    if not scale_files and not calib_data:
        raise click.UsageError("Give --scales, or --calib-data with --bits.")
    bits = parse_bits_list(bits_list) if not scale_files else []
    method_list = methods.split(",") if methods else None
    with processes.joined() as share:
        show = quiet_unless_lead(share, show)
        lead = share is None or share.lead
        with together(share, "loading the model and data"):
            if out is not None and lead:
                check_output_folder(out)
            held = load_heldout(data, labels_file)  # every input is read before any calibration work
            dev = resolve_device(device)
            loaded = source.load(dev)
            if scale_files:
                tables = [load_scales(p) for p in scale_files]
                names = [str(p) for p in scale_files]
                for path, table in zip(scale_files, tables, strict=True):
                    check_fingerprint(table, loaded.module, path)
            else:
                names = [f"calibrated at {b} bits" for b in bits]
                calib, _ = batch_sources(
                    str(calib_data),
                    batch_size,
                    calibration["num_batches"],
                    0,
                    calibration["seed"],
                    None,
                    dev,
                    None,
                )
        if not scale_files:
            per_channel, group_size = parse_weight_granularity(calibration["weight_granularity"])
            config = CalibrationConfig(
                methods=tuple(method_list or DEFAULT_METHODS),
                per_channel_weights=per_channel,
                group_size=group_size,
            )
            with progress_bar(not show.tables) as progress:
                each = calibrate_each(
                    loaded, calib, config, bits, seed=calibration["seed"], progress=progress, group=share
                )
            tables = list(each.values())
        order = torch.arange(held.num_samples).split(batch_size)
        with progress_bar(not show.tables) as progress:
            rows = evaluate(
                loaded,
                tables,
                lambda: (held.batch(i).to(dev) for i in order),
                method_list,
                progress,
                names,
                share,
            )
    if not lead:
        return  # only rank 0 writes
    if out is not None:
        write_evaluation(rows, out)
    if show.as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2, default=str))
    elif not show.quiet:
        render_evaluation(rows)
