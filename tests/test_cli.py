"""The command line: exit codes, exact error lines, no output file on failure."""

import importlib
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from octavcal import load_scales
from octavcal.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def calibrate_cnn(paths, *options):
    """The sample CNN calibrated on its own data, with further options."""
    return run("calibrate", paths["model"], "--arch", paths["arch"], "--data", paths["data"], *options)


def cnn_args(paths, out):
    return [
        "calibrate",
        paths["model"],
        "--arch",
        paths["arch"],
        "--data",
        paths["data"],
        "--bits",
        "4",
        "--batches",
        "3",
        "--batch-size",
        "16",
        "-o",
        out,
    ]


def test_calibrate_writes_scales_and_prints_a_summary(tmp_path, cnn_paths):
    out = tmp_path / "cnn.scales.safetensors"
    result = run(*cnn_args(cnn_paths, out), "--methods", "octav,max")
    assert result.exit_code == 0, result.output
    assert "Calibrated 8 targets over 3 batches" in result.stdout and f"Wrote {out}" in result.stdout
    table = load_scales(out)
    assert table.methods == ["octav", "max"] and table.targets["fc2:weight"].bits == 4


def test_calibrate_json_and_inspect(tmp_path, transformer_paths):
    out = tmp_path / "t.safetensors"
    result = run(
        "calibrate",
        transformer_paths["model"],
        "--arch",
        transformer_paths["arch"],
        "--data",
        transformer_paths["data"],
        "--methods",
        "octav",
        "--batches",
        "2",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["targets"] == 36 and "embed:input" in summary["masked"]
    shown = run("inspect", out, "--json", "--method", "octav")
    assert shown.exit_code == 0
    scales = json.loads(shown.stdout)["scales"]
    assert scales["embed:input"]["amax"]["octav"] == pytest.approx(
        load_scales(out).amax("embed:input", "octav").item()
    )
    table = run("inspect", out)
    assert table.exit_code == 0 and "layers.1.attention:matmul1.rhs" in table.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--methods", "octav,mse2"],
            "Error: Unknown clipping method 'mse2'. Expected one of: octav, sweep, max, pNN.NNN.",
        ),
        (["--bits", "1"], "Error: bits must be an integer in [2, 16]: got 1."),
        (
            ["--layer-bits", "fc1=three"],
            "Error: Layer bits 'fc1=three': 'three' is neither a bit width in [2, 16] nor 'skip'.",
        ),
    ],
)
def test_bad_options_are_one_error_line(tmp_path, cnn_paths, extra, message):
    out = tmp_path / "o.safetensors"
    result = run(*cnn_args(cnn_paths, out), *extra)
    assert result.exit_code == 1
    assert result.stderr.strip() == message
    assert not out.exists()


def test_missing_and_wrong_files(tmp_path, cnn_paths, transformer_paths):
    out = tmp_path / "o.safetensors"
    result = run("calibrate", tmp_path / "nope.pt", "--data", cnn_paths["data"], "-o", out)
    assert (
        result.exit_code == 1
        and result.stderr.strip() == f"Error: Model file '{tmp_path / 'nope.pt'}' does not exist."
    )
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    result = run("calibrate", tmp_path / "whole.pt", "--data", cnn_paths["data"], "-o", out)
    assert result.exit_code == 1 and "would run code from the file" in result.stderr
    # Data that does not fit the model: transformer inputs into the CNN.
    args = cnn_args(cnn_paths, out)
    args[args.index("--data") + 1] = transformer_paths["data"]
    result = run(*args)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: The model failed in the model's own forward on a batch with inputs attention_mask (16, 8) float32, "
        "x (16, 8, 8) float32: TypeError: DigitsCNN.forward() got an unexpected keyword argument 'attention_mask'"
    )
    assert "Traceback" not in result.output and not out.exists()
    save_file({"x": torch.rand(64, 8, 8)}, tmp_path / "rows.safetensors")
    args[args.index("--data") + 1] = tmp_path / "rows.safetensors"
    result = run(*args)
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.strip() == (
        "Error: Layer 'conv1' (Conv2d) expects inputs of shape (N, 1, ..., ...); got (16, 8, 8)."
    )


def test_data_with_nan_names_the_layer(tmp_path, cnn_paths):
    x = torch.rand(64, 1, 8, 8)
    x[3, 0, 2, 2] = float("nan")
    save_file({"x": x}, tmp_path / "nan.safetensors")
    out = tmp_path / "o.safetensors"
    args = cnn_args(cnn_paths, out)
    args[args.index("--data") + 1] = tmp_path / "nan.safetensors"
    result = run(*args, "--batches", "4")
    assert result.exit_code == 1
    assert "Error: Activations of 'conv1' (input) contain NaN or Inf in batch" in result.stderr
    assert not out.exists()


def test_interrupted_run_leaves_no_file(tmp_path, cnn_paths, monkeypatch):
    out = tmp_path / "o.safetensors"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # the command imports calibrate when it runs (octavcal.calibrate, the attribute, is the function)
    monkeypatch.setattr(importlib.import_module("octavcal.calibrate"), "calibrate", interrupted)
    result = run(*cnn_args(cnn_paths, out))
    assert result.exit_code == 130 and "Interrupted; no output was written." in result.stderr
    assert not out.exists()


def test_usage_errors_exit_2(cnn_paths):
    result = CliRunner().invoke(main, ["calibrate", str(cnn_paths["model"])])
    assert result.exit_code == 2 and "Missing option '--data'" in result.output


def test_every_command_has_help_with_an_example():
    import click

    for name, command in main.commands.items():
        paths = [[name, sub] for sub in command.commands] if isinstance(command, click.Group) else [[name]]
        for path in paths:
            result = run(*path, "--help")
            assert result.exit_code == 0 and "Example:" in result.stdout, path


def test_compare_end_to_end_and_from_a_scale_file(tmp_path, transformer_paths, cnn_paths):
    base = [
        "--arch",
        transformer_paths["arch"],
        "--data",
        transformer_paths["data"],
        "--batches",
        "2",
        "--batch-size",
        "16",
    ]
    result = run(
        "compare",
        transformer_paths["model"],
        *base,
        "--heldout-batches",
        "1",
        "--methods",
        "octav,sweep,p99.99",
        "--bits",
        "4,8",
        "--out",
        tmp_path / "r",
        "--json",
        "--curve-points",
        "30",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert set(summary["appendix_f"]) == {"octav", "sweep", "p99.99"}
    assert {v["bits"] for v in summary["methods"].values()} == {4, 8}
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "targets.csv").exists()
    scales = tmp_path / "t.safetensors"
    assert (
        run(
            "calibrate", transformer_paths["model"], *base, "--methods", "octav", "-o", scales, "--quiet"
        ).exit_code
        == 0
    )
    result = run(
        "compare", transformer_paths["model"], *base, "--scales", scales, "--out", tmp_path / "r2", "--quiet"
    )
    assert result.exit_code == 0, result.output
    other = run(
        "compare",
        cnn_paths["model"],
        "--arch",
        cnn_paths["arch"],
        "--data",
        cnn_paths["data"],
        "--scales",
        scales,
        "--out",
        tmp_path / "r3",
    )
    assert other.exit_code == 1 and "was computed for other model weights" in other.stderr


def test_evaluate_and_export_commands(tmp_path, cnn_paths):
    base = ["--arch", cnn_paths["arch"]]
    scales = tmp_path / "s8.safetensors"
    assert (
        calibrate_cnn(
            cnn_paths,
            "--bits",
            "8",
            "--methods",
            "octav,max",
            "-o",
            scales,
            "--quiet",
        ).exit_code
        == 0
    )
    result = run(
        "evaluate",
        cnn_paths["model"],
        *base,
        "--data",
        cnn_paths["heldout"],
        "--scales",
        scales,
        "--json",
        "--out",
        tmp_path / "ev",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["method"], r["bits"]) for r in rows} == {("octav", 8), ("max", 8)}
    assert all(r["accuracy"] is not None and r["agreement"] > 0.9 for r in rows)
    assert (tmp_path / "ev" / "fidelity.png").exists()
    from safetensors.torch import load_file

    heldout = load_file(str(cnn_paths["heldout"]))
    save_file({"x": heldout["x"]}, tmp_path / "x.safetensors")
    save_file({"y": heldout["labels"]}, tmp_path / "y.safetensors")
    result = run(
        "evaluate",
        cnn_paths["model"],
        *base,
        "--data",
        tmp_path / "x.safetensors",
        "--labels",
        tmp_path / "y.safetensors",
        "--scales",
        scales,
        "--json",
    )
    assert result.exit_code == 0 and all(r["accuracy"] is not None for r in json.loads(result.stdout))
    out = tmp_path / "m.qdq.onnx"
    result = run(
        "export",
        "onnx",
        cnn_paths["model"],
        *base,
        "--scales",
        scales,
        "--data",
        cnn_paths["data"],
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert out.exists() and (tmp_path / "m.qdq.onnx.ort_overrides.json").exists()
    cache = tmp_path / "m.cache"
    result = run(
        "export",
        "trt-cache",
        cnn_paths["model"],
        *base,
        "--scales",
        scales,
        "--data",
        cnn_paths["data"],
        "-o",
        cache,
    )
    assert result.exit_code == 0 and cache.read_text().startswith("TRT-")
    result = run(
        "export",
        "onnx",
        cnn_paths["model"],
        *base,
        "--scales",
        scales,
        "--method",
        "p99",
        "--data",
        cnn_paths["data"],
        "-o",
        tmp_path / "x.onnx",
    )
    assert (
        result.exit_code == 1
        and result.stderr.strip() == "Error: The scale file has no method 'p99'. It has: octav, max."
    )


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "octavcal", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("octavcal, version ")


def test_review_regressions_cli(tmp_path, cnn_paths):
    base = ["--arch", cnn_paths["arch"]]
    # A dotted model name keeps its whole stem: two versions never overwrite each other's scales.
    for version in ("v1", "v2"):
        (tmp_path / f"cnn.{version}.safetensors").write_bytes(cnn_paths["model"].read_bytes())
        assert (
            run(
                "calibrate",
                tmp_path / f"cnn.{version}.safetensors",
                *base,
                "--data",
                cnn_paths["data"],
                "--methods",
                "max",
                "--batches",
                "1",
                "--quiet",
            ).exit_code
            == 0
        )
    assert (tmp_path / "cnn.v1.scales.safetensors").exists() and (
        tmp_path / "cnn.v2.scales.safetensors"
    ).exists()
    # Files are readable by others, as any file the user writes (mkstemp's 0600 must not survive).
    import os

    mode = (tmp_path / "cnn.v1.scales.safetensors").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    # An output that cannot be written is one error line.
    (tmp_path / "adir").mkdir()
    result = calibrate_cnn(
        cnn_paths,
        "--methods",
        "max",
        "--batches",
        "1",
        "-o",
        tmp_path / "adir",
    )
    # ... found before any work, naming the output itself
    assert result.exit_code == 1
    assert result.stderr == f"Error: Output '{tmp_path / 'adir'}' is a directory; give a file name.\n"
    result = calibrate_cnn(cnn_paths, "--device", "tpu")
    assert (
        result.exit_code == 1
        and result.stderr.strip() == "Error: Unknown device 'tpu'. Expected cpu, cuda or cuda:N."
    )
    result = CliRunner().invoke(
        main, ["compare", str(cnn_paths["model"]), "--data", str(cnn_paths["data"]), "--bits", ""]
    )
    assert result.exit_code == 2 and "expected bit widths" in result.output
    scales = tmp_path / "cnn.v1.scales.safetensors"
    result = run("inspect", scales, "--method", "octav")
    assert (
        result.exit_code == 1
        and result.stderr.strip() == "Error: The scale file has no method 'octav'. It has: max."
    )
    # Data that does not fit the model fails export with one line.
    save_file({"x": torch.rand(8, 3, 8, 8)}, tmp_path / "bad.safetensors")
    result = run(
        "export",
        "onnx",
        cnn_paths["model"],
        *base,
        "--scales",
        scales,
        "--data",
        tmp_path / "bad.safetensors",
        "-o",
        tmp_path / "m.onnx",
        "--method",
        "max",
    )
    # the check that the scale file's targets are this model's runs the batch first, and names the layer
    assert result.exit_code == 1
    assert (
        result.stderr
        == "Error: Layer 'conv1' (Conv2d) expects inputs of shape (N, 1, ..., ...); got (2, 3, 8, 8).\n"
    )
    assert not (tmp_path / "m.onnx").exists()


def test_trt_cache_refuses_clashing_paths_and_empty_caches(tmp_path, cnn_paths):
    base = ["--arch", cnn_paths["arch"]]
    s4 = tmp_path / "s4.safetensors"
    assert (
        calibrate_cnn(
            cnn_paths,
            "--bits",
            "4",
            "--methods",
            "max",
            "--batches",
            "1",
            "-o",
            s4,
            "--quiet",
        ).exit_code
        == 0
    )
    export = [
        "export",
        "trt-cache",
        cnn_paths["model"],
        *base,
        "--scales",
        s4,
        "--method",
        "max",
        "--data",
        cnn_paths["data"],
    ]
    result = run(*export, "-o", tmp_path / "c.cache")
    assert result.exit_code == 1 and "belongs in a TensorRT cache" in result.stderr
    assert not (tmp_path / "c.cache").exists()
    result = run(*export, "-o", tmp_path / "same.onnx")
    assert result.exit_code == 2 and "different paths" in result.output


def test_evaluate_keeps_scale_files_apart(tmp_path, cnn_paths):
    base = ["--arch", cnn_paths["arch"]]
    files = []
    for name, extra in (("a", []), ("b", ["--first-last-8bit"])):
        files.append(tmp_path / f"{name}.safetensors")
        assert (
            calibrate_cnn(
                cnn_paths,
                "--bits",
                "4",
                "--methods",
                "octav",
                "-o",
                files[-1],
                "--quiet",
                *extra,
            ).exit_code
            == 0
        )
    result = run(
        "evaluate",
        cnn_paths["model"],
        *base,
        "--data",
        cnn_paths["heldout"],
        "--scales",
        files[0],
        "--scales",
        files[1],
        "--json",
    )
    rows = json.loads(result.stdout)
    assert len(rows) == 2 and {r["scales"] for r in rows} == {str(f) for f in files}
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1 and r["cosine"] <= 1 + 1e-6 for r in rows)
