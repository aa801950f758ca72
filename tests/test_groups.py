"""Per-group weight scales: every method against a per-group loop of the public method, apply_scales
against a float64 recomputation, the scale file, the CLI and its errors."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import octavcal
from octavcal import CalibrationConfig
from octavcal.cli import main
from octavcal.errors import ScaleFileError, SpecError
from octavcal.groups import fake_quantize_groups, parse_granularity
from octavcal.methods import max_scaling, mse_sweep, octav, percentile

METHODS = ("octav", "sweep", "max", "p99.9")
PUBLIC = {
    "octav": lambda g: octav(g, 4, signed=True),
    "sweep": lambda g: mse_sweep(g, 4, signed=True),
    "max": lambda g: max_scaling(g, signed=True),
    "p99.9": lambda g: percentile(g, 99.9),
}


class TwoLayouts(nn.Module):
    """A Linear (weight (out, in)) and transformers' Conv1D (weight (in, out)), 64 inputs each."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = nn.Linear(64, 64)
        self.proj = Conv1D(8, 64)  # nf=8 outputs, nx=64 inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)))


def two_layouts(seed: int = 0) -> nn.Module:
    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(seed)
    model = TwoLayouts()
    with torch.no_grad():
        for p in model.parameters():  # heavy tails, so that the methods disagree
            p.copy_(torch.randn(p.shape, generator=gen) ** 3 / 4)
    return model.eval()


def batches(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 64, generator=gen) for _ in range(2)]


def per_group_loop(w: torch.Tensor, out_axis: int, group: int, fn) -> torch.Tensor:
    """[C, in/G]: the public method on each group of input features of each output channel, one by one."""
    rows = w if out_axis == 0 else w.T  # (C, in)
    return torch.stack(
        [
            torch.stack([fn(rows[c, g : g + group]).reshape(()) for g in range(0, rows.shape[1], group)])
            for c in range(rows.shape[0])
        ]
    ).float()


@pytest.mark.parametrize("group", [16, 32, 64])
def test_every_method_per_group_equals_a_loop_of_the_public_method(group):
    model = two_layouts()
    table = octavcal.calibrate(model, batches(), CalibrationConfig(bits=4, methods=METHODS, group_size=group))
    for tid, weight, out_axis in (("fc:weight", model.fc.weight, 0), ("proj:weight", model.proj.weight, 1)):
        entry = table.targets[tid]
        assert entry.group_size == group and entry.axis == out_axis
        for method in METHODS:
            loop = per_group_loop(weight.detach(), out_axis, group, PUBLIC[method])
            got = entry.methods[method].amax
            assert got.shape == loop.shape == (weight.shape[out_axis], 64 // group)
            torch.testing.assert_close(got, loop, rtol=1e-6, atol=0, msg=f"{tid} {method}")
    # Groups are real: OCTAV at group 16 differs from per channel on some row.
    channel = octavcal.calibrate(model, batches(), CalibrationConfig(bits=4, methods=("octav",)))
    if group == 16:
        per_channel = channel.targets["fc:weight"].methods["octav"].amax
        grouped = table.targets["fc:weight"].methods["octav"].amax
        assert not torch.allclose(grouped.amax(dim=1), per_channel)


def float64_group_quantize(w: torch.Tensor, amax: torch.Tensor, out_axis: int, group: int) -> torch.Tensor:
    """The 4-bit runtime grid (-7..7) per group, in float64, element by element of each group."""
    rows = (w if out_axis == 0 else w.T).double()
    out = torch.empty_like(rows)
    for c in range(rows.shape[0]):
        for g in range(rows.shape[1] // group):
            step = amax[c, g].double() / 7
            block = rows[c, g * group : (g + 1) * group]
            out[c, g * group : (g + 1) * group] = torch.clamp(torch.round(block / step), -7, 7) * step
    return out if out_axis == 0 else out.T


@pytest.mark.parametrize("method", METHODS)
def test_apply_scales_quantizes_each_group_as_a_float64_reference(method):
    model = two_layouts()
    table = octavcal.calibrate(model, batches(), CalibrationConfig(bits=4, methods=METHODS, group_size=32))
    table.targets = {tid: e for tid, e in table.targets.items() if e.kind == "weight"}  # inputs stay float
    sim = octavcal.apply_scales(model, table, method)
    eye = torch.eye(64)
    with torch.no_grad():
        got = sim(eye).double()  # the identity through both layers: their quantized weights, exactly
    amax_fc = table.targets["fc:weight"].methods[method].amax
    amax_proj = table.targets["proj:weight"].methods[method].amax
    wq_fc = float64_group_quantize(model.fc.weight.detach(), amax_fc, 0, 32)
    wq_proj = float64_group_quantize(model.proj.weight.detach(), amax_proj, 1, 32)
    h = torch.relu(eye.double() @ wq_fc.T + model.fc.bias.double())
    torch.testing.assert_close(got, h @ wq_proj + model.proj.bias.double(), rtol=1e-5, atol=1e-5)
    float_out = model.proj(torch.relu(model.fc(eye)))  # the model itself is untouched
    assert not torch.allclose(float_out.double(), got, rtol=1e-5, atol=1e-5)
    # The elementwise check: the library's group quantizer against the float64 loop.
    got = fake_quantize_groups(
        model.fc.weight.detach(), table.targets["fc:weight"].methods[method].amax, 4, axis=0, group_size=32
    )
    torch.testing.assert_close(got.double(), wq_fc, rtol=1e-6, atol=0)


def test_scale_file_round_trips_groups_and_checks_their_shape(tmp_path):
    model = two_layouts()
    table = octavcal.calibrate(model, batches(), CalibrationConfig(bits=4, methods=("octav",), group_size=16))
    path = octavcal.save_scales(table, tmp_path / "g.safetensors")
    back = octavcal.load_scales(path)
    assert back.meta["format_version"] == 3 and back.meta["weight_granularity"] == "group:16"
    entry = back.targets["fc:weight"]
    assert entry.group_size == 16 and entry.describe("runtime")["granularity"] == "per-group"
    assert torch.equal(entry.methods["octav"].amax, table.targets["fc:weight"].methods["octav"].amax)
    assert back.targets["fc:input"].group_size is None

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["octavcal"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["targets"]["fc:weight"]["group_size"] = 48  # does not divide 64
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={"octavcal": json.dumps(meta)})
    with pytest.raises(
        ScaleFileError, match=r"targets\['fc:weight'\]\.group_size is invalid: 48\. Expected a group"
    ):
        octavcal.load_scales(bad)
    meta["targets"]["fc:weight"]["group_size"] = 32  # valid, but the tensor holds [64, 4]
    save_file(tensors, bad, metadata={"octavcal": json.dumps(meta)})
    with pytest.raises(ScaleFileError, match=r"a wrong amax shape .*: \[64, 4\]\. Expected \[64, 2\]"):
        octavcal.load_scales(bad)


def test_a_group_size_that_does_not_divide_the_inputs_names_the_layer():
    model = nn.Sequential(nn.Linear(48, 4))
    with pytest.raises(
        SpecError, match=r"Weight '0:weight' \(Parameter '0.weight'\) has 48 input features, "
    ):
        octavcal.calibrate(model, [torch.randn(4, 48)], CalibrationConfig(bits=4, group_size=32))


def test_convolutions_are_refused_by_name():
    model = nn.Sequential(nn.Conv2d(16, 4, 3), nn.Flatten())
    with pytest.raises(
        SpecError, match=r"Weight '0:weight' .* has shape \[4, 16, 3, 3\]: per-group scales need"
    ):
        octavcal.calibrate(model, [torch.randn(2, 16, 5, 5)], CalibrationConfig(bits=4, group_size=16))


@pytest.mark.parametrize(
    "spec, expected",
    [("tensor", "tensor"), ("channel", "channel"), ("group:128", "group:128"), ("GROUP:16", "group:16")],
)
def test_parse_granularity(spec, expected):
    assert str(parse_granularity(spec)) == expected


@pytest.mark.parametrize("spec", ["group:", "group:x", "block:32", "row"])
def test_bad_granularities_are_refused(spec):
    with pytest.raises(
        SpecError, match=r"Unknown weight granularity .*Expected one of: tensor, channel, group:G"
    ):
        parse_granularity(spec)


@pytest.mark.parametrize("size", [8, 15, 1025, 2048])
def test_group_sizes_out_of_range_are_refused(size):
    with pytest.raises(SpecError, match=rf"^Group size must be an integer in 16\.\.1024: got {size}\.$"):
        parse_granularity(f"group:{size}")


def write_model(tmp_path, in_features=64):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    weights = {"0.weight": torch.randn(8, in_features, generator=gen), "0.bias": torch.zeros(8)}
    save_file(weights, tmp_path / "m.safetensors")
    torch.save(torch.randn(64, in_features, generator=gen), tmp_path / "d.pt")
    (tmp_path / "arch_groups.py").write_text(
        f"from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear({in_features}, 8))\n"
    )
    return tmp_path


def test_cli_calibrates_per_group(tmp_path, monkeypatch):
    write_model(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["calibrate", str(tmp_path / "m.safetensors"), "--arch", "arch_groups:build"]
    args += ["--data", str(tmp_path / "d.pt"), "--bits", "4", "--methods", "octav,max"]
    args += ["--batches", "2", "--batch-size", "16", "-o", str(tmp_path / "s.safetensors"), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--weight-granularity", "group:32"])
    assert result.exit_code == 0, result.output
    table = octavcal.load_scales(tmp_path / "s.safetensors")
    assert table.targets["0:weight"].methods["octav"].amax.shape == (8, 2)

    result = CliRunner().invoke(main, [*args, "--weight-granularity", "group:48"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        "Error: Weight '0:weight' (Parameter '0.weight') has 64 input features, which group size 48 "
        "does not divide. Expected a group size that divides 64."
    )
    result = CliRunner().invoke(main, [*args, "--weight-granularity", "group:8"])
    assert result.exit_code == 2 and "Group size must be an integer in 16..1024: got 8." in result.stderr
    result = CliRunner().invoke(main, [*args, "--weight-granularity", "group:32", "--per-tensor-weights"])
    assert result.exit_code == 2 and "--per-tensor-weights contradicts" in result.stderr


def test_compare_measures_each_weight_per_group():
    from octavcal.compare import compare

    model = two_layouts()
    config = CalibrationConfig(bits=4, methods=METHODS, group_size=16)
    report = compare(model, batches(), batches(seed=2), config, [4])
    table = octavcal.calibrate(model, batches(), config)
    for tid, weight, out_axis in (("fc:weight", model.fc.weight, 0), ("proj:weight", model.proj.weight, 1)):
        for row in report.targets[tid].rows:
            amax = table.targets[tid].methods[row.method].amax
            wq = float64_group_quantize(weight.detach(), amax, out_axis, 16)
            expected = float((wq - weight.detach().double()).square().mean())
            assert row.mse == pytest.approx(expected, rel=1e-9), (tid, row.method)
            assert row.amax == amax.reshape(-1).tolist()
