"""Which ONNX Runtime graph optimization levels run octavcal's QDQ export as ``apply_scales`` simulates it.

Measured with onnxruntime 1.32.0 on CPUExecutionProvider (x86-64, AVX2 without VNNI), held-out samples
0..127, max |ORT - apply_scales| / max |apply_scales|:

    model        bits  DISABLE_ALL  BASIC    EXTENDED  ALL
    cnn          3     1.7e-07      1.7e-07  1.7e-07   1.7e-07   (INT4/UINT4, opset 21)
    cnn          4     2.0e-07      2.0e-07  2.0e-07   2.0e-07   (INT4/UINT4, opset 21)
    cnn          8     2.0e-07      1.5e-03  1.0e-01   1.0e-01
    transformer  4     1.6e-07      1.6e-07  1.6e-07   1.6e-07   (INT4/UINT4, opset 21)
    transformer  4/16  1.6e-07      1.6e-07  1.6e-07   1.6e-07   (INT4 blocked per 16 inputs)
    transformer  8     2.4e-07      2.4e-07  4.5e-01   4.5e-01

At 4 bits and fewer, weights are INT4 initializers read by DequantizeLinear, activations go through
INT4/UINT4 QuantizeLinear/DequantizeLinear (bounded by Max/Min where the type is wider than the grid), and
a layer's float bias reaches it through an exact int32 DequantizeLinear: these match at every level.

At 8 bits (int8 container with Clip), at BASIC every Clip survives; the CNN diverges because ORT's WeightBiasQuantization rounds a Conv/Gemm's
float bias onto the int32 grid (input scale x weight scale), which moves its pre-activations (disabling
that one optimizer restores the match; the transformer's layers are MatMul + Add, with no such bias).
From EXTENDED on, QDQ fusion runs 8-bit layers in fused integer kernels (QLinearConv, QGemm,
MatMulIntegerToFloat); with a uint8 activation on a CPU without VNNI the u8 x s8 products saturate
16-bit intermediates (``session.x64quantprecision=1`` shrinks the transformer's 4.5e-01 to 3.6e-03), so
the size of the 8-bit divergence at EXTENDED and ALL may depend on the CPU. This file fails when ONNX
Runtime's behaviour changes either way.
"""

import numpy as np
import pytest
import torch

import octavcal
from octavcal import CalibrationConfig
from octavcal.data import load_data, plan_batches
from octavcal.export.onnx import export_qdq
from octavcal.loading import load_model
from octavcal.simulate import apply_scales

ort = pytest.importorskip("onnxruntime")

LEVELS = ["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"]
MATCHES = {
    ("cnn", 4, "ORT_DISABLE_ALL"): True,
    ("cnn", 4, "ORT_ENABLE_BASIC"): True,
    ("cnn", 4, "ORT_ENABLE_EXTENDED"): True,
    ("cnn", 4, "ORT_ENABLE_ALL"): True,
    ("cnn", 8, "ORT_DISABLE_ALL"): True,
    ("cnn", 8, "ORT_ENABLE_BASIC"): False,
    ("cnn", 8, "ORT_ENABLE_EXTENDED"): False,
    ("cnn", 8, "ORT_ENABLE_ALL"): False,
    ("transformer", 4, "ORT_DISABLE_ALL"): True,
    ("transformer", 4, "ORT_ENABLE_BASIC"): True,
    ("transformer", 4, "ORT_ENABLE_EXTENDED"): True,
    ("transformer", 4, "ORT_ENABLE_ALL"): True,
    ("transformer", 8, "ORT_DISABLE_ALL"): True,
    ("transformer", 8, "ORT_ENABLE_BASIC"): True,
    ("transformer", 8, "ORT_ENABLE_EXTENDED"): False,
    ("transformer", 8, "ORT_ENABLE_ALL"): False,
}


def setup(paths, bits, group=None):
    loaded = load_model(paths["model"], arch=paths["arch"])
    data = load_data(paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 32, 3, 0)]
    # The embedding's 8 inputs cannot be grouped by 16: it stays float when grouping.
    skip = (("embed", None),) if group else ()
    config = CalibrationConfig(bits=bits, methods=("octav",), group_size=group, layer_bits=skip)
    return loaded, batches, octavcal.calibrate(loaded, batches, config)


@pytest.fixture(scope="module")
def export_once(tmp_path_factory):
    """A function (model, bits, paths) -> (ONNX path, ORT feeds, apply_scales output), exporting each
    (model, bits) once per module."""
    directory = tmp_path_factory.mktemp("ort_levels")
    cache = {}

    def get(model, bits, paths, group=None):
        if (model, bits, group) not in cache:
            torch.manual_seed(0)
            loaded, batches, table = setup(paths, bits, group)
            path = directory / f"{model}{bits}g{group}.onnx"
            export_qdq(loaded, table, "octav", batches[0], path)
            held = load_data(paths["heldout"]).batch(torch.arange(128))
            with torch.no_grad():
                ref = apply_scales(loaded, table, "octav")(*held.args, **held.kwargs).numpy()
            feeds = {f"input{i}": a.numpy() for i, a in enumerate(held.args)}
            feeds |= {k: v.numpy() for k, v in held.kwargs.items()}
            cache[model, bits, group] = (path, feeds, ref)
        return cache[model, bits, group]

    return get


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_qdq_export_matches_the_simulation_only_at_the_measured_levels(
    export_once, model, bits, level, cnn_paths, transformer_paths
):
    path, feeds, ref = export_once(model, bits, cnn_paths if model == "cnn" else transformer_paths)
    out = run(path, feeds, level)
    scale = np.abs(ref).max()
    diff = np.abs(out - ref)
    relative = diff.max() / scale
    within = (diff <= 1e-4 * scale).mean()
    message = f"{model} {bits}-bit at {level}: max rel diff {relative:.3e}, {within:.5f} within 1e-4"
    if MATCHES[model, bits, level]:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * scale, err_msg=message)
    else:
        assert relative > 5e-4, f"now matches: {message}"
        assert not np.allclose(out, ref, rtol=1e-4, atol=1e-4 * scale), message


def run(path, feeds, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("model, bits, group", [("cnn", 3, None), ("transformer", 4, 16)])
def test_low_bit_exports_match_at_every_level(
    export_once, model, bits, group, level, cnn_paths, transformer_paths
):
    """3 bits (narrower than INT4 on both sides) and 4-bit blocked weights, as the issue's bar demands:
    99% of outputs within 1e-4 of the largest, the same top-1."""
    path, feeds, ref = export_once(model, bits, cnn_paths if model == "cnn" else transformer_paths, group)
    out = run(path, feeds, level)
    close = np.abs(out - ref) <= 1e-4 * np.abs(ref).max()
    assert close.mean() >= 0.99, f"{model} {bits}-bit group {group} at {level}: {close.mean():.4f}"
    assert (out.argmax(1) == ref.argmax(1)).all()
