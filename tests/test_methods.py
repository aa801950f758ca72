"""Clipping methods by name, the MSE sweep, percentiles and max, against NumPy loops and float64 sorts."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import octavcal
from octavcal import (
    DataError,
    Grid,
    SpecError,
    analytic_mse,
    fake_quantize,
    max_scaling,
    mse_sweep,
    octav,
    percentile,
)
from octavcal.methods import sweep_mse_curve

# ------------------------------------------------------------------ MSE sweep


def numpy_sweep_reference(x: np.ndarray, qmax: int, points: int, signed: bool) -> tuple[float, np.ndarray]:
    a = x.astype(np.float64)
    smax = np.abs(a).max() if signed else max(a.max(), 0)
    mses = []
    for k in range(1, points + 1):
        s = k / points * smax
        q = np.clip(np.round(a / (s / qmax)), -qmax if signed else 0, qmax) * (s / qmax)
        mses.append(((q - a) ** 2).mean())
    mses = np.array(mses)
    return (int(np.argmin(mses)) + 1) / points * smax, mses


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sweep_equals_a_plain_loop(bits, signed):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(20_000, generator=gen, dtype=torch.float64)
    if not signed:
        x = x.relu()
    ref_s, ref_mse = numpy_sweep_reference(x.numpy(), Grid(bits, signed).qmax, 100, signed)
    amax, _, mse = mse_sweep(x, bits, signed=signed, return_curve=True)
    assert amax.item() == pytest.approx(ref_s, rel=1e-12)
    np.testing.assert_allclose(mse[:, 0].numpy(), ref_mse, rtol=1e-9)


def test_sweep_per_channel_equals_row_loop():
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(16, 40, generator=gen) * torch.linspace(0.2, 3, 16)[:, None]
    got = mse_sweep(w, 4, axis=0)
    loop = torch.stack([mse_sweep(w[k], 4) for k in range(16)])
    torch.testing.assert_close(got, loop, rtol=1e-6, atol=0)


def test_sweep_mse_curve_equals_a_plain_loop():
    gen = torch.Generator().manual_seed(23)
    mags = torch.randn(3, 500, generator=gen).abs()
    cands = torch.rand(7, 3, generator=gen, dtype=torch.float64) * 3 + 0.1
    got = sweep_mse_curve(mags, cands, 7)
    assert got.shape == (7, 3) and got.dtype == torch.float64
    a = mags.double().numpy()
    for k in range(7):
        for r in range(3):
            step = cands[k, r].item() / 7
            ref = ((np.clip(np.round(a[r] / step), 0, 7) * step - a[r]) ** 2).mean()
            assert got[k, r].item() == pytest.approx(ref, rel=1e-6), (k, r)
    assert sweep_mse_curve(
        torch.tensor([[0.3, 1.0]]), torch.tensor([[1.0]], dtype=torch.float64), 1
    ).item() == (pytest.approx(0.045))


def test_sweep_prefers_outliers_where_octav_keeps_the_bulk():
    """Appendix G: a bulk of small values and a few huge outliers make the MSE non-convex."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(100_000, generator=gen)
    x[:3] = 350.0
    # OCTAV: c s N ~ 3 (350 - s) puts s near 3 * 350 * 588 / 1e5 ~ 6, where the bulk is resolved.
    # The sweep: zeroing the bulk (SSE ~ 1e5) beats clipping the outliers (SSE ~ 3.5e5).
    sweep_s, octav_s = mse_sweep(x, 4).item(), octav(x, 4).item()
    assert sweep_s > 300 and 3 < octav_s < 10
    bulk = x[3:]
    assert (fake_quantize(bulk, sweep_s, 4) == 0).float().mean() > 0.99
    assert (fake_quantize(bulk, octav_s, 4) == 0).float().mean() < 0.5


# ------------------------------------------------------------------ percentiles and max


@pytest.mark.parametrize("q", [50.0, 90.0, 99.9, 99.99, 99.999, 100.0])
def test_percentile_equals_float64_sort(q):
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(123_457, generator=gen)
    ref = np.percentile(np.abs(x.double().numpy()), q)
    assert percentile(x, q).item() == pytest.approx(ref, rel=1e-6)


def test_percentile_golden_and_per_channel():
    assert percentile(torch.tensor([1.0, -2.0, 3.0, 4.0, -5.0]), 90).item() == pytest.approx(4.6)
    gen = torch.Generator().manual_seed(32)
    w = torch.randn(8, 1000, generator=gen)
    got = percentile(w, 99.9, axis=0)
    ref = np.percentile(np.abs(w.double().numpy()), 99.9, axis=1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)


@pytest.mark.slow
def test_percentile_above_torch_quantile_limit():
    n = (1 << 24) + 1001  # torch.quantile refuses more than 2^24 elements
    gen = torch.Generator().manual_seed(33)
    x = torch.randn(n, generator=gen)
    with pytest.raises(RuntimeError):
        torch.quantile(x.abs(), 0.9999)
    ref = np.percentile(np.abs(x.double().numpy()), 99.99)
    assert percentile(x, 99.99).item() == pytest.approx(ref, rel=1e-6)


def test_max_scaling_is_eq_2():
    x = torch.tensor([[0.5, -3.0], [2.0, 1.0]])
    assert max_scaling(x).item() == 3.0
    torch.testing.assert_close(max_scaling(x, axis=0), torch.tensor([3.0, 2.0]))
    assert max_scaling(torch.tensor([-4.0, 1.0]), signed=False).item() == 1.0


def test_analytic_mse_matches_eq_12_on_the_data():
    x = torch.tensor([0.0, 0.5, -1.0, 2.0, 4.0], dtype=torch.float64)
    c = Grid(4, True).noise_coefficient
    s = 1.5
    ref = (c * s * s * 2 + (2.0 - s) ** 2 + (4.0 - s) ** 2) / 5  # two non-zeros inside, two clipped
    assert analytic_mse(x, s, 4).item() == pytest.approx(ref, rel=1e-12)


# ------------------------------------------------------------------ edge cases


ALL_METHODS = ["octav", "sweep", "max", "p99.9"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_all_zero_tensor_and_channels_get_amax_one(method):
    assert octavcal.compute_amax(torch.zeros(10, 10), method, 4).item() == 1.0
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    w[1] = 0.0
    amax = octavcal.compute_amax(w, method, 4, axis=0)
    assert amax[1].item() == 1.0 and bool((amax > 0).all())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_constant_and_single_element(method):
    assert octavcal.compute_amax(torch.full((100,), -0.25), method, 4).item() == pytest.approx(0.25)
    assert octavcal.compute_amax(torch.tensor([3.0]), method, 4).item() == pytest.approx(3.0)


def test_percentile_on_mostly_zero_data_falls_back_to_max():
    x = torch.zeros(10_000)
    x[:3] = torch.tensor([1.0, 2.0, 3.0])
    assert percentile(x, 99.9).item() == pytest.approx(3.0)  # the 99.9th percentile is 0: no clipping


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bad_tensors_give_clear_errors(method):
    with pytest.raises(DataError, match=r"shape \(0, 3\) is empty"):
        octavcal.compute_amax(torch.zeros(0, 3), method, 4)
    x = torch.ones(4, 5)
    x[1, 2], x[3, 3] = float("nan"), float("inf")
    with pytest.raises(DataError, match=r"shape \(4, 5\) contains NaN or Inf \(2 of 20 values\)"):
        octavcal.compute_amax(x, method, 4)
    with pytest.raises(SpecError, match=r"dtype torch\.int64"):
        octavcal.compute_amax(torch.ones(3, dtype=torch.int64), method, 4)
    with pytest.raises(SpecError, match=r"bits must be an integer in \[2, 16\]: got 17"):
        octavcal.compute_amax(torch.ones(3), method, 17)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_half_precision_inputs_are_computed_in_float32(dtype, method):
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(5000, generator=gen).to(dtype)
    got = octavcal.compute_amax(x, method, 4)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(octavcal.compute_amax(x.float(), method, 4).item(), rel=1e-6)


# ------------------------------------------------------------------ method names


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("octav", "octav"),
        ("OCTAV", "octav"),
        ("sweep", "sweep"),
        ("mse", "sweep"),
        ("max", "max"),
        ("p99.9", "p99.9"),
        ("p99.99", "p99.99"),
        ("p99.999", "p99.999"),
        ("p100", "p100"),
        ("p50", "p50"),
    ],
)
def test_parse_method(name, canonical):
    assert octavcal.parse_method(name).name == canonical


@pytest.mark.parametrize("name", ["mse2", "p0", "p100.5", "p", "percentile", "", "p-1"])
def test_parse_method_rejects_unknown_names(name):
    with pytest.raises(
        SpecError, match=r"Unknown clipping method .*Expected one of: octav, sweep, max, pNN.NNN\."
    ):
        octavcal.parse_method(name)


def test_parse_methods_keeps_order_and_drops_repeats():
    assert [m.name for m in octavcal.parse_methods("octav, mse,sweep,p99.99")] == ["octav", "sweep", "p99.99"]


def test_public_names_stay_importable_from_methods_and_the_package():
    from octavcal import methods

    names = ["Method", "OctavResult", "analytic_mse", "compute_amax", "max_scaling", "mse_sweep", "octav"]
    names += ["parse_method", "parse_methods", "percentile"]
    for name in names:
        assert getattr(methods, name) is getattr(octavcal, name), name
    for name in [
        "METHOD_NAMES",
        "resolve_signed",
        "solves_by_sorting",
        "sweep_candidates",
        "sweep_mse_curve",
    ]:
        assert callable(getattr(methods, name)) or name == "METHOD_NAMES", name


def test_octav_and_mse_sweep_return_one_type_per_flag_value():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(24))
    assert isinstance(octav(x, 4), torch.Tensor)
    result = octav(x, 4, return_iterations=True)
    assert isinstance(result, octavcal.OctavResult) and result.amax.item() == octav(x, 4).item()
    assert isinstance(mse_sweep(x, 4), torch.Tensor)
    amax, cands, mse = mse_sweep(x, 4, return_curve=True)
    assert amax.item() == mse_sweep(x, 4).item() and cands.shape == mse.shape == (100, 1)


def test_math_modules_import_no_cli_libraries():
    # tqdm is left out: torch itself imports it when it is installed.
    code = "import sys, octavcal.methods; print(sorted(m for m in ('click', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ the sweep from a sort


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
@pytest.mark.parametrize("data", ["normal", "relu", "softmax", "ties"])
def test_sorted_sweep_of_a_long_float32_row_equals_a_float64_loop(bits, data):
    """One long float32 row is swept from its sort (prefix sums in float64): every candidate's MSE
    equals a float64 quantize-and-measure loop, closer than float32 blocks could."""
    from octavcal.sweep import sweeps_by_sorting

    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(420_000 if bits == 12 else 60_000, generator=gen)
    x = {
        "normal": x,
        "relu": x.relu(),
        "softmax": torch.softmax(3 * x.reshape(-1, 100), -1).reshape(-1),
        "ties": (4 * x).round() / 4,  # many values on the grid's midpoints
    }[data]
    signed = data in ("normal", "ties")
    qmax = Grid(bits, signed).qmax
    assert sweeps_by_sorting(x.reshape(1, -1), qmax)
    ref_s, ref_mse = numpy_sweep_reference(x.double().numpy(), qmax, 100, signed)
    amax, _, mse = mse_sweep(x, bits, signed=signed, return_curve=True)
    np.testing.assert_allclose(mse[:, 0].numpy(), ref_mse, rtol=1e-9 if bits <= 8 else 1e-6)
    assert amax.item() == pytest.approx(ref_s, rel=1e-6)


def test_percentiles_from_a_shared_tail_equal_a_float64_sort():
    """top_magnitudes keeps the values above a subsample's threshold: exact even when the tail is
    one repeated value or when the subsample misses a cluster of outliers."""
    from octavcal.methods import percentile_of_rows, top_magnitudes

    gen = torch.Generator().manual_seed(5)
    bulk = torch.randn(400_000, generator=gen)
    clustered = bulk.clone()
    clustered[1::7][:300] = 50.0  # stride 7 is not the subsample's: it may see none of them
    tied = torch.full((300_000,), 2.0)
    tied[::1000] = 3.0
    for x in (bulk, clustered, tied):
        a = x.abs()[None]
        tail = top_magnitudes(a, 500)
        ref = np.sort(np.abs(x.double().numpy()))[::-1][:500]
        np.testing.assert_array_equal(tail[0].double().numpy(), ref)
        for q in (99.9, 99.99, 99.999):
            got = percentile_of_rows(a, q, tail=tail).item()
            assert got == pytest.approx(np.percentile(np.abs(x.double().numpy()), q), rel=1e-12)


def test_sweep_of_values_near_float32s_smallest_equals_a_float64_loop():
    """Data near 1e-39: 1/step overflows float32, so the blocks work in float64 (it used to pick 1% of
    the max, every MSE non-finite)."""
    x = torch.rand(3000, generator=torch.Generator().manual_seed(0)) * 1e-39
    ref_s, _ = numpy_sweep_reference(x.double().numpy(), Grid(8, False).qmax, 100, False)
    amax, _, mse = mse_sweep(x, 8, return_curve=True)
    assert torch.isfinite(mse).all()
    assert amax.item() == pytest.approx(ref_s, rel=1e-6)
