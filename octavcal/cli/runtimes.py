"""export (ONNX QDQ, TensorRT cache) and inspect: parse options, call the library, render."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import OctavcalError
from ..files import atomic_write, check_output
from .base import ModelSource, friendly_errors, main, whole_model_options

# torch and rich are imported inside the commands, when they run: not for --help.


@main.group("export")
def export_group() -> None:
    """Write scales for runtimes: ONNX QDQ models, ONNX Runtime overrides, TensorRT caches."""


def _export_common(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            whole_model_options,
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
@click.option(
    "--weight-only",
    is_flag=True,
    help="Write ONNX Runtime's MatMulNBits (4 bits, per-group scales) per weight; activations stay float.",
)
@friendly_errors
def export_onnx_command(
    source: ModelSource,
    scales: Path,
    method: str,
    data: str,
    batch_size: int,
    output: Path,
    weight_only: bool,
) -> None:
    """Write an ONNX model with QuantizeLinear/DequantizeLinear at every calibrated target.

    Also writes OUTPUT.json (targets -> ONNX tensors and scales) and OUTPUT.ort_overrides.json
    (ONNX Runtime's TensorQuantOverrides for quantize_static). With --weight-only, every calibrated
    MatMul/Gemm weight becomes MatMulNBits (scale file calibrated at 4 bits with --weight-granularity
    group:G, G a power of two) and only OUTPUT.json is written beside it.

    \b
    Example:
      octavcal export onnx sample_models/digits_cnn.safetensors --arch sample_models.digits_cnn:build \\
          --scales sample_models/digits_cnn.scales.safetensors \\
          --data sample_models/digits_cnn.calib.safetensors -o cnn.qdq.onnx
    """
    from ..data import first_batch
    from ..export.onnx import export_qdq, ort_overrides
    from ..scales import check_fingerprint, load_scales

    if weight_only:
        from ..export.matmulnbits import export_matmulnbits

        for path in (output, output.with_suffix(output.suffix + ".json")):
            check_output(path, [source.path, scales, data])
        loaded = source.load()
        table = load_scales(scales)
        check_fingerprint(table, loaded.module, scales)
        mapping = export_matmulnbits(loaded, table, method, first_batch(data, batch_size, 0, "cpu"), output)
        click.echo(f"Wrote {output} ({len(mapping['targets'])} MatMulNBits weights) and {output}.json")
        return
    overrides = output.with_suffix(output.suffix + ".ort_overrides.json")
    for path in (output, output.with_suffix(output.suffix + ".json"), overrides):
        check_output(path, [source.path, scales, data])
    loaded = source.load()
    table = load_scales(scales)
    check_fingerprint(table, loaded.module, scales)
    mapping = export_qdq(loaded, table, method, first_batch(data, batch_size, 0, "cpu"), output)
    atomic_write(overrides, json.dumps(ort_overrides(table, method, mapping), indent=1))
    click.echo(f"Wrote {output} ({len(mapping['targets'])} quantized targets), {output}.json and {overrides}")


@export_group.command("compressed-tensors")
@whole_model_options
@click.option("--scales", required=True, type=click.Path(path_type=Path))
@click.option("--method", default="octav", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="A new or empty folder.")
@friendly_errors
def export_compressed_command(source: ModelSource, scales: Path, method: str, output: Path) -> None:
    """Write a Hugging Face folder in the compressed-tensors format (what vLLM loads).

    W8A8 when every calibrated Linear has 8-bit weights per channel and an 8-bit input (static
    per-tensor input scales); W4A16 when every one has 4-bit weights per group (packed int4). Other
    weights stay float and are listed. Needs the compressed-tensors package.

    \b
    Example:
      octavcal calibrate tiny-llama/ --data tokens.safetensors --bits 4 \\
          --weight-granularity group:32 -o tiny-llama.scales.safetensors
      octavcal export compressed-tensors tiny-llama/ --scales tiny-llama.scales.safetensors \\
          -o tiny-llama-w4a16/
    """
    from ..export.compressed import export_compressed_tensors
    from ..files import check_output_folder
    from ..scales import load_scales

    check_output_folder(output)
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise OctavcalError(
            "compressed-tensors export needs the compressed-tensors package: pip install compressed-tensors."
        ) from exc
    loaded = source.load()
    table = load_scales(scales)
    result = export_compressed_tensors(loaded, table, method, output)
    for tid, why in result.left_float.items():
        click.echo(f"Warning: '{tid}' stays float: {why}.", err=True)
    click.echo(f"Wrote {output} ({result.scheme}, {len(result.layers)} quantized layers)")


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
    from ..data import first_batch
    from ..export.onnx import export_float
    from ..export.tensorrt import calibration_cache
    from ..scales import check_fingerprint, load_scales

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
    from ..render import render_scales, scales_summary
    from ..scales import load_scales

    table = load_scales(scales)
    if method is not None and method not in table.methods:
        table.require_method(method)
    if as_json:
        click.echo(json.dumps(scales_summary(table, scales, full=True, method=method), indent=2))
    else:
        render_scales(table, method)
