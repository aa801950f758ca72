"""Using the scales: simulation, ONNX QDQ run in ONNX Runtime, ORT overrides, TensorRT cache."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import octavcal
from octavcal import CalibrationConfig, ScaleFileError, SpecError
from octavcal.data import load_data, plan_batches
from octavcal.export.onnx import export_float, export_qdq, ort_overrides
from octavcal.export.tensorrt import HEADER, calibration_cache, parse_cache, scale_to_hex
from octavcal.loading import load_model
from octavcal.simulate import apply_scales

ort = pytest.importorskip("onnxruntime")


def setup(paths, bits, methods=("octav",)):
    loaded = load_model(paths["model"], arch=paths["arch"])
    data = load_data(paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 32, 3, 0)]
    return loaded, batches, octavcal.calibrate(loaded, batches, CalibrationConfig(bits=bits, methods=methods))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_qdq_model_runs_in_onnxruntime_and_matches_the_simulation(
    tmp_path, model, bits, cnn_paths, transformer_paths
):
    paths = cnn_paths if model == "cnn" else transformer_paths
    loaded, batches, table = setup(paths, bits)
    mapping = export_qdq(loaded, table, "octav", batches[0], tmp_path / "m.onnx")
    assert len(mapping["targets"]) == len(table.targets)
    held = load_data(paths["heldout"]).batch(torch.arange(128))
    with torch.no_grad():
        ref = apply_scales(loaded, table, "octav")(*held.args, **held.kwargs).numpy()
    options = ort.SessionOptions()
    # Graph optimizations off: above that level ORT rounds biases to int32 and runs integer kernels
    # (tests/test_ort_levels.py). What remains is float arithmetic in another order, so an activation lying
    # on a rounding boundary can land one step away; the tolerance allows for those rare elements only.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {k: v.numpy() for k, v in held.kwargs.items()})[0]
    close = np.abs(out - ref) <= 1e-4 * np.abs(ref).max()
    assert close.mean() >= 0.99
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_every_qdq_scale_equals_the_scale_file(tmp_path, transformer_paths):
    loaded, batches, table = setup(transformer_paths, 8)
    mapping = export_qdq(loaded, table, "octav", batches[0], tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}
    for tid, m in mapping["targets"].items():
        dq = producers[nodes[m["onnx_node"]].input[m["input_index"]]]
        assert dq.op_type == "DequantizeLinear"
        entry = table.targets[tid]
        expected = (entry.methods["octav"].amax / entry.grid(table.convention).qmax).numpy()
        np.testing.assert_array_equal(inits[dq.input[1]].reshape(-1), expected.reshape(-1).astype(np.float32))
        zero = inits[dq.input[2]]
        assert zero.dtype == (np.int8 if entry.signed else np.uint8) and not zero.any()
    assert json.loads((tmp_path / "m.onnx.json").read_text())["targets"].keys() == mapping["targets"].keys()
    overrides = ort_overrides(table, "octav", mapping)
    first = mapping["targets"]["embed:input"]
    assert overrides[first["onnx_tensor"]][0]["scale"] == pytest.approx(first["scale"][0])


def test_trt_cache_round_trips(tmp_path, cnn_paths):
    loaded, batches, table = setup(cnn_paths, 8, methods=("octav", "max"))
    mapping = export_float(loaded, table, "max", batches[0], tmp_path / "m.onnx")
    text, skipped = calibration_cache(table, "max", mapping)
    assert text.splitlines()[0] == HEADER and not skipped
    back = parse_cache(text)
    for tid, m in mapping["targets"].items():
        if table.targets[tid].kind == "activation":
            assert back[m["onnx_tensor"]] == pytest.approx(table.amax(tid, "max").item() / 127, rel=1e-7)
    assert scale_to_hex(1.0) == "3f800000"
    names = {i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input} | {
        o for n in onnx.load(str(tmp_path / "m.onnx")).graph.node for o in n.output
    }
    assert set(back) <= names


def test_trt_cache_skips_other_bit_widths(cnn_paths, tmp_path):
    loaded, batches, table = setup(cnn_paths, 4)
    mapping = export_float(loaded, table, "octav", batches[0], tmp_path / "m.onnx")
    text, skipped = calibration_cache(table, "octav", mapping)
    assert text == HEADER + "\n" and len(skipped) == 4 and "4 bits" in skipped[0]


def test_apply_scales_leaves_the_model_bit_identical(cnn_paths):
    loaded, _, table = setup(cnn_paths, 4)
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    sim = apply_scales(loaded, table, "octav")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(sim(x), loaded.module(x))
    assert all(torch.equal(before[k], v) for k, v in loaded.module.state_dict().items())
    assert not any(m._forward_pre_hooks for m in loaded.module.modules())


def test_simulation_equals_a_hand_written_quantized_forward(cnn_paths):
    import torch.nn.functional as F

    loaded, _, table = setup(cnn_paths, 4)
    m = loaded.module

    def qa(name, x):
        e = table.targets[f"{name}:input"]
        return octavcal.fake_quantize(x, e.methods["octav"].amax, 4, signed=e.signed)

    def qw(name):
        e = table.targets[f"{name}:weight"]
        return octavcal.fake_quantize(getattr(m, name).weight, e.methods["octav"].amax, 4, axis=0)

    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        h = F.relu(F.conv2d(qa("conv1", x), qw("conv1"), m.conv1.bias, padding=1))
        h = F.avg_pool2d(F.relu(F.conv2d(qa("conv2", h), qw("conv2"), m.conv2.bias, padding=1)), 2)
        h = F.relu(F.linear(qa("fc1", h.flatten(1)), qw("fc1"), m.fc1.bias))
        ref = F.linear(qa("fc2", h), qw("fc2"), m.fc2.bias)
        torch.testing.assert_close(apply_scales(loaded, table, "octav")(x), ref)


def test_bad_scale_inputs(tmp_path, cnn_paths, transformer_paths):
    loaded, batches, table = setup(cnn_paths, 4)
    other, _, _ = setup(transformer_paths, 4)
    with pytest.raises(ScaleFileError, match="computed for other model weights"):
        apply_scales(other, table, "octav")
    with pytest.raises(ScaleFileError, match="has no method 'sweep'. It has: octav"):
        apply_scales(loaded, table, "sweep")
    table.targets["ghost:input"] = table.targets["fc1:input"]
    table.targets["ghost:input"] = type(table.targets["fc1:input"])(
        "ghost", "input", "Linear", "activation", 4, True, None, [1], table.targets["fc1:input"].methods
    )
    with pytest.raises(
        ScaleFileError,
        match=r"^The scale table does not fit this model's targets \(1 only in the file, 0 only in the model; "
        r"first: the file has 'ghost:input', which this model does not compute\)",
    ):
        export_qdq(loaded, table, "octav", batches[0], tmp_path / "m.onnx")
    del table.targets["ghost:input"]
    table.targets["fc1:input"].bits = 12
    with pytest.raises(SpecError, match="has 12 bits; the ONNX export holds at most 8"):
        export_qdq(loaded, table, "octav", batches[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_paper_grid_at_8_bits_does_not_fit_an_int8_container(tmp_path, cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    data = load_data(cnn_paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 16, 2, 0)]
    table = octavcal.calibrate(
        loaded, batches, CalibrationConfig(bits=8, methods=("max",), convention="paper")
    )
    with pytest.raises(SpecError, match="uses integers up to 256 .*more than an 8-bit container holds"):
        export_qdq(loaded, table, "max", batches[0], tmp_path / "m.onnx")


class ParamMatmul(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 6))
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = x @ self.w
        a = torch.relu(self.lin(x))
        return (a @ h.transpose(-1, -2)).sum(-1)


def test_matmul_with_a_parameter_operand_is_a_layer_and_keeps_positions(tmp_path):
    torch.manual_seed(0)
    model = ParamMatmul().eval()
    x = torch.randn(5, 4, 6)
    from octavcal.core import Batch, LoadedModel

    loaded = LoadedModel(model, "module", None)
    table = octavcal.calibrate(loaded, [Batch((x,))], CalibrationConfig(bits=8, methods=("octav",)))
    mapping = export_qdq(loaded, table, "octav", Batch((x,)), tmp_path / "m.onnx")
    # x @ self.w is a layer: a weight target named after the Parameter, and its input
    assert {"<root>:w", "<root>:w.input", "<root>:matmul1.lhs"} <= set(mapping["targets"])
    assert "<root>:matmul0.rhs" not in table.targets
    assert table.targets["<root>:w"].kind == "weight" and table.targets["<root>:w"].axis == 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), options).run(None, {"input0": x.numpy()})[0]
    with torch.no_grad():
        ref = apply_scales(loaded, table, "octav")(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def dequantized(inits, dq):
    """What a weight DequantizeLinear gives, recomputed in NumPy from its integers and scale."""
    q, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
    attrs = {a.name: a.i for a in dq.attribute}
    if "block_size" in attrs:
        scale = np.repeat(scale, attrs["block_size"], axis=attrs["axis"])
    elif scale.ndim == 1:
        shape = [1] * q.ndim
        shape[attrs.get("axis", 1)] = -1
        scale = scale.reshape(shape)
    return q * scale


@pytest.mark.parametrize("group", [None, 16])
def test_four_bit_export_stores_int4_and_dequantizes_to_the_simulated_weights(
    tmp_path, transformer_paths, group
):
    from octavcal.groups import fake_quantize_groups

    loaded = load_model(transformer_paths["model"], arch=transformer_paths["arch"])
    data = load_data(transformer_paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 32, 2, 0)]
    skip = (("embed", None),) if group else ()
    config = CalibrationConfig(bits=4, methods=("octav",), group_size=group, layer_bits=skip)
    table = octavcal.calibrate(loaded, batches, config)
    mapping = export_qdq(loaded, table, "octav", batches[0], tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    graph = model.graph
    assert not [n for n in graph.node if n.name.startswith("octavcal_") and n.op_type == "Clip"]  # Max/Min
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    types = {i.name: i.data_type for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}
    params = dict(loaded.module.named_parameters())
    checked = 0
    for tid, m in mapping["targets"].items():
        entry = table.targets[tid]
        dq = producers[nodes[m["onnx_node"]].input[m["input_index"]]]
        assert dq.op_type == "DequantizeLinear"
        int4 = onnx.TensorProto.INT4 if entry.signed else onnx.TensorProto.UINT4
        assert types[dq.input[2]] == int4 and not inits[dq.input[2]].any()
        if entry.kind != "weight":
            assert producers[dq.input[0]].op_type == "QuantizeLinear"
            continue
        assert types[dq.input[0]] == int4 and np.abs(inits[dq.input[0]]).max() <= 7
        assert ("block_size" in {a.name for a in dq.attribute}) == (group is not None)
        w = params[entry.param].detach()
        amax = entry.methods["octav"].amax
        if group:
            simulated = fake_quantize_groups(w, amax, 4, axis=entry.axis, group_size=group)
        else:
            simulated = octavcal.fake_quantize(w, amax, 4, axis=entry.axis)
        got = dequantized(inits, dq)
        got = got.T if m["axis"] != entry.axis else got  # MatMul holds W^T: the output axis moved
        np.testing.assert_array_equal(got, simulated.numpy())  # bit for bit
        checked += 1
    assert checked >= 8


def test_per_group_onnx_export_above_4_bits_is_refused(tmp_path, transformer_paths):
    loaded = load_model(transformer_paths["model"], arch=transformer_paths["arch"])
    data = load_data(transformer_paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 32, 1, 0)]
    config = CalibrationConfig(bits=8, methods=("max",), group_size=16, layer_bits=(("embed", None),))
    table = octavcal.calibrate(loaded, batches, config)
    with pytest.raises(
        SpecError, match=r"^Target '[^']+:weight' has per-group scales at 8 bits \(runtime grid\); "
    ):
        export_qdq(loaded, table, "max", batches[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
