"""The union reduction: every method equals the method run on the concatenated batches, in any batch
order, in memory that does not grow with the number of batches; the CLI and compare end to end."""

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import nn

import octavcal
from octavcal import CalibrationConfig, calibrate
from octavcal._octav_sorted import sorted_fixed_point
from octavcal.cli import main
from octavcal.compare import compare
from octavcal.errors import LoadError, SpecError
from octavcal.grid import Grid
from octavcal.reduce import UnionAccumulator
from octavcal.target import Target
from octavcal.union import BINS, VALUES_PER_BIN

METHODS = ("octav", "sweep", "p99.9", "p99.99", "p99.999", "p50", "max")


def _batches(kind: str, g: torch.Generator) -> list[torch.Tensor]:
    """Batches (rows, 8) of different sizes; the model's first Linear reads them as its input."""
    sizes = [37, 64, 5, 128, 64, 19]
    out = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, 8, generator=g)
        if kind == "relu":  # unsigned, with many exact zeros
            x = x.clamp(min=0)
        elif kind == "ties":  # point masses: a few distinct values, heavily repeated
            x = torch.randint(-3, 4, (n, 8), generator=g).float() * 0.25
        elif kind == "heavy":  # Student-t tail that comes and goes: one batch holds the outliers
            x = torch.distributions.StudentT(2.0).sample((n, 8)) * (30.0 if i == 3 else 1.0)
        elif kind == "zeros":
            x = torch.zeros(n, 8)
        elif kind == "tiny":  # steps below float32's range: the sweep's blocks work in float64
            x = torch.rand(n, 8, generator=g) * 1e-39
        out.append(x)
    return out


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 4)).eval()


def _union(batches, bits):
    config = CalibrationConfig(bits=bits, methods=METHODS, reduction="union")
    return calibrate(_model(), batches, config).targets["0:input"]


@pytest.mark.parametrize("kind", ["gauss", "relu", "ties", "heavy", "zeros", "tiny"])
@pytest.mark.parametrize("bits", [4, 8])
def test_union_equals_the_method_on_the_concatenation(kind, bits):
    torch.manual_seed(0)  # StudentT samples from the global generator
    batches = _batches(kind, torch.Generator().manual_seed(1))
    entry = _union(batches, bits)
    x = torch.cat(batches)
    signed = bool(x.min() < 0)
    assert entry.signed == signed
    # calibrate keeps every amax at least the smallest normal float32 times qmax (its scale is normal)
    floor = torch.finfo(torch.float32).tiny * octavcal.Grid(bits, signed).qmax
    for name in METHODS:
        got = entry.methods[name].amax
        want = octavcal.compute_amax(x, name, bits, signed=signed).clamp_min(floor)
        if name == "octav":
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        else:
            assert got.item() == want.item(), (kind, bits, name, got, want)
        assert entry.methods[name].per_batch is None


def test_union_octav_equals_the_sorted_fixed_point():
    batches = _batches("heavy", torch.Generator().manual_seed(2))
    x = torch.cat(batches).abs().double().reshape(1, -1).numpy()
    for bits in (2, 4, 8):
        c = Grid(bits, True, "runtime").noise_coefficient
        want = sorted_fixed_point(x, c)[0]
        got = _union(batches, bits).methods["octav"].amax.item()
        assert abs(got - want) <= 1e-6 * want


def test_batch_order_does_not_change_a_bit():
    batches = _batches("heavy", torch.Generator().manual_seed(3))
    first = _union(batches, 4)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(4)).tolist()
    again = _union([batches[i] for i in order], 4)
    for name in METHODS:
        assert torch.equal(first.methods[name].amax, again.methods[name].amax), name


def _state_bytes(acc: UnionAccumulator) -> int:
    s, b = acc.summary, acc.bracket
    assert b is not None
    tensors = [s.counts, s.sums, b.values, b.counts, b.keep]
    return sum(t.numel() * t.element_size() for t in tensors) + sum(v.bit_length() // 8 for v in b.sweep_sse)


def _accumulated(num_batches: int, g: torch.Generator) -> UnionAccumulator:
    """Both passes over ``num_batches`` batches of 4096 values on a grid of 1/256 (finitely many)."""
    data = [(torch.randn(4096, generator=g) * 256).round() / 256 for _ in range(num_batches)]
    methods = octavcal.parse_methods(list(METHODS))
    acc = UnionAccumulator(Target("m", "input", "linear", "activation"), 4, [4096], 0)
    for x in data:
        acc.summary.add(x)
    acc.prepare(methods, "runtime")
    for x in data:
        acc.bracket.add(x)  # type: ignore[union-attr]
        acc.second_count += x.numel()
    return acc


def test_memory_is_flat_in_the_number_of_batches():
    small = _accumulated(8, torch.Generator().manual_seed(5))
    large = _accumulated(64, torch.Generator().manual_seed(5))
    # 8x the values, the same state: bins are fixed, brackets hold distinct values with counts.
    assert large.summary.n == 8 * small.summary.n
    assert _state_bytes(large) <= _state_bytes(small) * 1.05
    assert _state_bytes(large) <= BINS * 16 + (1 << 16)  # the bins and a few thousand kept values
    assert large.bracket.entries() <= len(large.bracket.keep) * VALUES_PER_BIN  # type: ignore[union-attr]
    assert large.summary.counts.numel() == BINS


def test_union_refuses_a_one_shot_iterator_and_unknown_reductions():
    batches = _batches("gauss", torch.Generator().manual_seed(6))
    with pytest.raises(LoadError, match="one-shot iterator, but they are passed over more than once"):
        calibrate(_model(), iter(batches), CalibrationConfig(reduction="union"))
    with pytest.raises(SpecError, match="Unknown reduction 'median'. Expected one of: mean, union."):
        calibrate(_model(), batches, CalibrationConfig(reduction="median"))


def test_union_accepts_a_function_returning_batches():
    batches = _batches("relu", torch.Generator().manual_seed(7))
    via_list = _union(batches, 8)
    config = CalibrationConfig(bits=8, methods=METHODS, reduction="union")
    via_callable = calibrate(_model(), lambda: iter(batches), config).targets["0:input"]
    for name in METHODS:
        assert torch.equal(via_list.methods[name].amax, via_callable.methods[name].amax)


def test_cli_union_end_to_end(tmp_path, transformer_paths):
    out = tmp_path / "u.scales.safetensors"
    args = [
        "calibrate",
        transformer_paths["model"],
        "--arch",
        transformer_paths["arch"],
        "--data",
        transformer_paths["data"],
        "--bits",
        "4",
        "--batches",
        "3",
        "--methods",
        "octav,sweep,p99.99,max",
        "--reduction",
        "union",
        "-o",
        out,
        "--quiet",
    ]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = octavcal.load_scales(out)
    assert table.meta["reduction"].startswith("union of all batches")
    with safe_open(str(out), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("@batches")]  # no per-batch candidates
    acts = [e for e in table.targets.values() if e.kind == "activation"]
    assert acts and all(e.methods["octav"].amax.item() > 0 for e in acts)
    mean_args = [*args[:-5], "-o", tmp_path / "m.safetensors", "--quiet"]  # the default: mean
    assert CliRunner().invoke(main, [str(a) for a in mean_args]).exit_code == 0
    assert octavcal.load_scales(tmp_path / "m.safetensors").meta["reduction"].startswith("mean")


def test_compare_reports_both_reductions():
    g = torch.Generator().manual_seed(8)
    calib = [torch.randn(16, 8, generator=g) for _ in range(3)]
    held = [torch.randn(16, 8, generator=g) for _ in range(2)]
    config = CalibrationConfig(bits=4, methods=("octav", "sweep"))
    report = compare(_model(), calib, held, config, [4], reductions=("mean", "union"))
    rows = {r.method: r for r in report.targets["0:input"].rows}
    assert set(rows) == {"octav", "sweep", "octav@union", "sweep@union"}
    x = torch.cat(calib)
    assert rows["sweep@union"].amax[0] == octavcal.mse_sweep(x, 4).item()
    assert rows["octav@union"].heldout_mse > 0
