"""calibrate: parse options, call the library, write the scale file, render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..defaults import DEFAULT_METHODS
from ..files import check_output
from .base import (
    DEVICE_HELP,
    DTYPES,
    SEED,
    Display,
    ModelSource,
    Processes,
    display_options,
    dist_options,
    friendly_errors,
    main,
    model_options,
    parse_weight_granularity,
    quiet_unless_lead,
    resolve_device,
    torch_dtype,
    weight_granularity_option,
)

if TYPE_CHECKING:
    from ..calibrate import CalibrationConfig

# torch, numpy and rich are imported inside the commands, when they run: not for --help.


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
@weight_granularity_option
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
@click.option("--dtype", type=click.Choice(DTYPES), help="Run the model in this dtype.")
@click.option(
    "--strict", is_flag=True, help="Fail when a weight-bearing op (an LSTM, an einsum) cannot be calibrated."
)
@click.option(
    "--reduction",
    type=click.Choice(["mean", "union"]),
    default="mean",
    show_default=True,
    help="mean: average the per-batch candidates (Appendix E.3); union: the exact answer on all batches "
    "together (one more pass over them).",
)
@dist_options
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
    processes: Processes,
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
    from ..calibrate import calibrate
    from ..data import batch_sources
    from ..distributed import together
    from ..render import progress_bar, render_calibration, scales_summary
    from ..scales import save_scales

    config = _calibration_config(**options)
    model = source.path
    with processes.joined() as share:
        show = quiet_unless_lead(share, show)
        lead = share is None or share.lead
        with together(share, "loading the model and data"):
            default = model.with_name(model.stem + ".scales.safetensors")
            output = check_output(output or default, [model, data]) if lead else None
            dev = resolve_device(device)
            loaded = source.load(dev, dtype)
            calib, _ = batch_sources(data, batch_size, num_batches, 0, seed, None, dev, torch_dtype(dtype))
        with progress_bar(not show.tables) as progress:
            table = calibrate(
                loaded, calib, config, seed=seed, progress=progress, total_batches=num_batches, group=share
            )
    if output is None:
        return  # not rank 0: only rank 0 writes
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
    weight_granularity: str | None,
    keep_padding: bool,
    convention: str,
    strict: bool,
    reduction: str,
) -> CalibrationConfig:
    """calibrate's options as a validated CalibrationConfig (before any file is read)."""
    from ..calibrate import CalibrationConfig, parse_layer_bits

    per_channel, group_size = parse_weight_granularity(weight_granularity, per_tensor_weights)
    config = CalibrationConfig(
        bits=bits,
        methods=tuple(methods.split(",")),
        layer_bits=tuple(parse_layer_bits(s) for s in layer_bits),
        first_last_bits=8 if first_last_8bit else None,
        per_channel_weights=per_channel,
        group_size=group_size,
        mask_padding=not keep_padding,
        convention=convention,
        strict=strict,
        reduction=reduction,
    )
    config.validate()
    return config
