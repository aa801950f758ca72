"""Clipping methods against independent references: brute force, float64 bisection, NumPy loops."""

import math
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
from octavcal.octav import sorted_fixed_point

# ------------------------------------------------------------------ references (float64, no octavcal)


def brute_force_mse(x: torch.Tensor, candidates: torch.Tensor, qmax: int, signed: bool) -> torch.Tensor:
    """Empirical MSE of eq. (1) for each candidate amax, in float64 (P,) -> (P,)."""
    v = x.double().reshape(1, -1)
    qmin = -qmax if signed else 0
    out = []
    for chunk in candidates.double().split(64):
        step = (chunk / qmax)[:, None]
        q = torch.clamp(torch.round(v / step), qmin, qmax) * step
        out.append((q - v).square().mean(dim=1))
    return torch.cat(out)


def fixed_point_by_bisection(values: np.ndarray, c: float) -> float:
    """Eq. (6)'s fixed point s = E(s) / (c N0(s)), found as the root of h(s) = c s N0(s) - E(s) by
    bisection in float64: h increases strictly in s, so the answer is the smallest s with h(s) >= 0
    (where h jumps over zero at a point mass, that is the mass itself). No sorting, no iteration of
    eq. (6): independent of both ways octavcal solves it. 0 when every value is 0."""
    a = values[values > 0].astype(np.float64)
    if a.size == 0:
        return 0.0

    def h(s: float) -> float:
        return c * s * np.count_nonzero(a <= s) - (a[a > s] - s).sum()

    lo, hi = 0.0, float(a.max())  # h(0) = -sum(a) < 0 <= h(max) = c max m
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # adjacent floats
            return hi
        lo, hi = (lo, mid) if h(mid) >= 0 else (mid, hi)


def sample(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, generator=gen, dtype=torch.float64)
    u = torch.rand(n, generator=gen, dtype=torch.float64) - 0.5  # Laplace by inverse CDF
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def _distribution(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = np.random.default_rng(seed)
    n = int(np.prod(shape))
    values = {
        "gaussian": lambda: gen.standard_normal(n),
        "student-t3": lambda: gen.standard_t(3, size=n),
        "relu": lambda: np.maximum(gen.standard_normal(n), 0),
        "point-masses": lambda: np.round(gen.standard_normal(n) * 4) / 4,
        "sparse-uniform": lambda: gen.uniform(-1, 1, n) * (gen.random(n) < 0.3),
        "constant": lambda: np.full(n, 0.1),
    }[kind]()
    return torch.from_numpy(values.reshape(shape).astype(np.float32))


# ------------------------------------------------------------------ OCTAV


@pytest.mark.parametrize("convention", ["runtime", "paper"])
@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_octav_lands_on_the_brute_force_minimum(kind, bits, convention):
    x = sample(kind, 40_000, seed=bits)
    grid = Grid(bits, True, convention)
    amax = octav(x, bits, signed=True, convention=convention).item()
    # A fine search around the answer and a coarse one over the whole range, on the same grid.
    cands = torch.cat(
        [
            torch.linspace(0.5 * amax, 1.6 * amax, 441, dtype=torch.float64),
            torch.linspace(0.01, 1.0, 100, dtype=torch.float64) * x.abs().max(),
        ]
    )
    mse = brute_force_mse(x, cands, grid.qmax, signed=True)
    best_s, best_mse = cands[mse.argmin()].item(), mse.min().item()
    our_mse = brute_force_mse(x, torch.tensor([amax]), grid.qmax, signed=True).item()
    if bits == 2:  # eq. (4)'s additive-noise model is coarse at 2 bits
        assert our_mse <= 1.02 * best_mse
    else:
        assert abs(amax / best_s - 1) <= 0.02 or our_mse <= 1.005 * best_mse


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 5000, 200_000])
def test_octav_is_the_exact_fixed_point(n, bits, signed):
    gen = torch.Generator().manual_seed(n + bits)
    x = torch.randn(n, generator=gen)
    if not signed:
        x = torch.relu(x) + (x > 0) * 0.1  # ReLU-like: many exact zeros
        if not bool((x > 0).any()):
            x[0] = 1.0
    grid = Grid(bits, signed)
    mags = (x.abs() if signed else x.clamp(min=0)).double().numpy()
    ref = fixed_point_by_bisection(mags, grid.noise_coefficient)
    got = octav(x, bits, signed=signed).item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_octav_matches_the_papers_literal_ten_iterations():
    """iterations=10 reproduces the paper's recursion (eq. 6, paper grid, s_1 = sum|x|/#nonzero)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50_000, generator=gen, dtype=torch.float64) * 0.3
    x[::7] = 0.0
    a = x.abs().numpy()
    c = 4.0**-4 / 3
    s = a.sum() / (a > 0).sum()
    for _ in range(10):
        above = a > s
        s = (a * above).sum() / (c * ((a > 0) & ~above).sum() + above.sum())
    got = octav(x, 4, signed=True, convention="paper", init="paper", iterations=10, return_iterations=True)
    assert got.amax.item() == pytest.approx(s, rel=1e-12)
    assert got.iterations.item() == 10


def test_octav_reports_iterations_and_respects_tolerance():
    """tol governs long rows (64K+ values), which stop on an error estimate; short rows stop exactly."""
    x = sample("gaussian", 100_000, seed=9)
    loose = octav(x, 4, init="paper", tol=1e-2, return_iterations=True)
    tight = octav(x, 4, init="paper", tol=1e-9, return_iterations=True)
    assert 1 <= loose.iterations.item() < tight.iterations.item() <= 100
    ref = fixed_point_by_bisection(x.abs().numpy(), Grid(4, True).noise_coefficient)
    assert tight.amax.item() == pytest.approx(ref, rel=1e-9)


def test_octav_golden_outlier_example():
    # Four 1s and a 100, 4-bit runtime grid (c = 1/588): with only the outlier above s, eq. (6) is
    # s = 100 / (4c + 1), which lies in [1, 100): the fixed point.
    x = torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0])
    assert octav(x, 4, signed=True).item() == pytest.approx(100 / (1 + 4 / 588))
    assert octav(x, 4).item() == pytest.approx(100 / (1 + 4 / 2700))  # all >= 0: unsigned, qmax 15


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("convention", ["runtime", "paper"])
def test_octav_per_channel_equals_row_loop(signed, convention):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(48, 3, 3, 3, generator=gen) * torch.linspace(0.1, 5, 48)[:, None, None, None]
    if not signed:
        w = w.relu()
    got = octav(w, 4, signed=signed, axis=0, convention=convention)
    assert got.shape == (48,)
    loop = torch.stack([octav(w[k], 4, signed=signed, convention=convention) for k in range(48)])
    torch.testing.assert_close(got, loop, rtol=1e-6, atol=0)
    got1 = octav(w, 4, signed=signed, axis=1, convention=convention)
    loop1 = torch.stack([octav(w[:, k], 4, signed=signed, convention=convention) for k in range(3)])
    torch.testing.assert_close(got1, loop1, rtol=1e-6, atol=0)


def test_octav_unsigned_is_chosen_for_non_negative_data_and_uses_appendix_a():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(30_000, generator=gen, dtype=torch.float64).relu()
    auto = octav(x, 4).item()
    ref = fixed_point_by_bisection(x.numpy(), Grid(4, False).noise_coefficient)  # 1/(12*15^2)
    assert auto == pytest.approx(ref, rel=1e-6)
    assert auto != pytest.approx(octav(x, 4, signed=True).item(), rel=1e-3)


def test_octav_properties_scale_and_sign():
    x = sample("laplace", 40_000, seed=13)
    base = octav(x, 5).item()
    assert octav(4 * x, 5).item() == pytest.approx(4 * base, rel=1e-9)
    assert octav(-x, 5).item() == pytest.approx(base, rel=1e-9)
    assert octav(x.reshape(1, -1), 5, axis=0).item() == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize(
    "kind", ["gaussian", "student-t3", "relu", "point-masses", "sparse-uniform", "constant"]
)
def test_sorted_fixed_point_equals_bisection(kind, bits):
    """octavcal's one sorted fixed point (the small-tensor solver and the warm start), on one row
    (upper tail first) and on rows, against the bisection; the tail shortcut changes nothing."""
    gen = np.random.default_rng(bits)
    c = Grid(bits, True).noise_coefficient
    for n in (1, 2, 9, 300, 5000):
        rows = np.abs(_distribution(kind, (3, n), seed=n + bits).double().numpy())
        got = sorted_fixed_point(rows, c)
        one = sorted_fixed_point(rows[:1], c)[0]
        assert one == got[0]
        for r in range(3):
            assert got[r] == pytest.approx(fixed_point_by_bisection(rows[r], c), rel=1e-12), (n, r)
    with_zeros = np.concatenate([np.zeros((1, 4)), gen.uniform(0, 1, (1, 4))])
    assert sorted_fixed_point(with_zeros, c)[0] == 0.0


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


def test_octav_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    x = sample("gaussian", 1 << 18, seed=7).float()
    assert octav(x.cuda(), 4).item() == pytest.approx(octav(x, 4).item(), rel=1e-5)
    assert math.isfinite(mse_sweep(x.cuda(), 4).item())


@pytest.mark.parametrize("init", ["auto", "paper"])
def test_per_channel_iteration_and_sorting_agree_with_the_reference(init):
    """Large tensors iterate (warm start, dropping finished rows); small ones sort; both are exact."""
    gen = torch.Generator().manual_seed(51)
    for shape in [(40, 4096), (300, 7), (64, 33)]:  # 7 and 33 values per row: point masses are common
        w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)
        w[3] = 0.0
        w[5] = 0.25  # a constant row
        got = octav(w, 3, axis=0, init=init)
        c = Grid(3, True).noise_coefficient
        for r in range(shape[0]):
            mags = w[r].abs().double().numpy()
            ref = fixed_point_by_bisection(mags, c) if mags.any() else 1.0
            assert got[r].item() == pytest.approx(ref, rel=1e-5), (shape, r)


def test_octav_at_a_point_mass_in_a_long_row_returns_the_mass():
    """h jumps over zero at a value held by a third of the data: the answer is that value, exactly."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70_000, generator=gen, dtype=torch.float64)
    x[: 70_000 // 3] = 2.5
    ref = fixed_point_by_bisection(x.abs().numpy(), Grid(4, True).noise_coefficient)
    assert ref == 2.5
    assert octav(x, 4).item() == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("seed", [2, 8, 12])
@pytest.mark.parametrize("bits", [7, 8])
def test_octav_on_long_heavy_tailed_rows_with_few_values_above_the_root(bits, seed):
    """Student-t(3) rows of 100K values at 7-8 bits: only a handful of values lie above s*, so the
    map is a coarse step function there even though the rows are long. The smooth-row stopping
    estimate must not be trusted then (it once read an unchanged count as zero error: up to 30% off)."""
    gen = np.random.default_rng(seed)
    x = torch.from_numpy(gen.standard_t(3, size=(3, 100_000)).astype(np.float32))
    c = Grid(bits, True).noise_coefficient
    got = octav(x, bits, axis=0)
    for r in range(3):
        ref = fixed_point_by_bisection(x[r].abs().double().numpy(), c)
        assert got[r].item() == pytest.approx(ref, rel=1e-5), r


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("layout", ["one long row", "one short row", "long channels", "short channels"])
@pytest.mark.parametrize("kind", ["gaussian", "student-t3", "relu", "point-masses", "sparse-uniform"])
def test_octav_equals_the_fixed_point_across_distributions(kind, layout, bits):
    """Every path (fused first pass, smooth-row stop, exact short-row stop, point-mass finish)
    against the float64 bisection, per row."""
    shape, axis = {
        "one long row": ((120_000,), None),
        "one short row": ((9_000,), None),  # iterated (too long a row to sort), exact stopping rule
        "long channels": ((3, 80_000), 0),
        "short channels": ((96, 700), 0),
    }[layout]
    x = _distribution(kind, shape, seed=bits)
    signed = kind != "relu"
    c = Grid(bits, signed).noise_coefficient
    got = octav(x, bits, signed=signed, axis=axis).reshape(-1)
    rows = [x.reshape(-1)] if axis is None else list(x)
    for r, row in enumerate(rows):
        mags = (row.abs() if signed else row.clamp(min=0)).double().numpy()
        ref = fixed_point_by_bisection(mags, c) if mags.any() else 1.0
        assert got[r].item() == pytest.approx(ref, rel=1e-5), r


def test_octav_does_not_stop_short_of_a_point_mass():
    """Clipped activations: 14379 values at the clip and two above it, at 11 bits. Just below the
    mass the map's step is tiny (the mass weighs in its denominator) although the root lies 0.7%
    higher; a small step alone once stopped there."""
    gen = np.random.default_rng(306)
    n = int(gen.choice([8000, 30000, 100000, 250000]))
    clip = gen.uniform(1, 4)
    x = np.minimum(np.maximum(gen.standard_normal(n) * gen.uniform(0.5, 2), 0), clip)
    k = int(gen.integers(1, 20))
    x[gen.integers(0, n, k)] = clip * (1 + gen.exponential(0.01, k))
    bits = int(gen.integers(6, 17))
    assert (n, k, bits) == (250_000, 2, 11)
    x = torch.from_numpy(x).float()
    ref = fixed_point_by_bisection(x.double().numpy(), Grid(bits, False).noise_coefficient)
    assert octav(x, bits, signed=False).item() == pytest.approx(ref, rel=1e-6)


def test_octav_long_row_with_a_point_mass_at_its_root():
    """30 copies of a long Gaussian row's own root: the contraction estimate must not stop beside
    them (it once did, 1.7e-5 off)."""
    gen = np.random.default_rng(0)
    base = gen.standard_normal(150_000)
    perm = gen.permutation(150_030)
    c = Grid(6, True).noise_coefficient
    x = np.concatenate([base, np.full(30, fixed_point_by_bisection(np.abs(base), c))])[perm]
    ref = fixed_point_by_bisection(np.abs(x), c)
    assert octav(torch.from_numpy(x), 6).item() == pytest.approx(ref, rel=1e-6)


def test_octav_long_row_with_a_cluster_next_to_its_root():
    """100 values within 3e-7 above the root of a long Gaussian row."""
    gen = np.random.default_rng(0)
    base = gen.standard_normal(200_000)
    c = Grid(6, True).noise_coefficient
    root = fixed_point_by_bisection(np.abs(base), c)
    x = np.concatenate([base, root * (1 + 2e-7 + 1e-7 * gen.uniform(-1, 1, 100))])
    gen.shuffle(x)
    ref = fixed_point_by_bisection(np.abs(x), c)
    assert octav(torch.from_numpy(x), 6).item() == pytest.approx(ref, rel=1e-6)


def test_octav_on_values_whose_float32_sums_overflow():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 1e37
    c = Grid(4, True).noise_coefficient
    ref = fixed_point_by_bisection(x.abs().double().numpy(), c)
    assert octav(x, 4).item() == pytest.approx(ref, rel=1e-5)
    rows = (x / 100).reshape(4, -1)
    got = octav(rows, 4, axis=0)
    for r in range(4):
        assert got[r].item() == pytest.approx(
            fixed_point_by_bisection(rows[r].abs().double().numpy(), c), rel=1e-5
        )


@pytest.mark.parametrize("n", [1000, 50_000])
def test_octav_unsigned_refuses_minus_infinity(n):
    x = torch.rand(n)
    x[7] = -math.inf
    with pytest.raises(DataError, match=r"NaN or Inf \(1 of"):
        octav(x, 4, signed=False)


def test_octav_init_above_the_max_keeps_the_bracket():
    x = sample("gaussian", 100_000, seed=3).float()
    ref = fixed_point_by_bisection(x.abs().double().numpy(), Grid(4, True).noise_coefficient)
    result = octav(x, 4, init=1e30, return_iterations=True)
    assert result.amax.item() == pytest.approx(ref, rel=1e-5)
    assert result.iterations.item() <= 20


def test_methods_accept_any_mode_device_default_and_grad():
    """The cached scratch memory is a plain CPU tensor whatever the caller's mode or default device,
    and inputs that require grad are read as data."""
    x = sample("gaussian", 100_000, seed=4).float()
    expected = octav(x, 4).item()
    code = (
        "import torch, octavcal\n"
        "x = torch.randn(100_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()\n"
        "with torch.inference_mode():\n"
        "    a = octavcal.octav(x, 4)\n"
        "b = octavcal.octav(x, 4); small = octavcal.octav(x[:1000], 4)\n"
        "torch.set_default_device('meta')\n"
        "d = octavcal.octav(x.clone(), 4).item()\n"
        "torch.set_default_device('cpu')\n"
        "g = octavcal.octav(x.clone().requires_grad_(), 4).item()\n"
        "octavcal.mse_sweep(x.clone().requires_grad_(), 4)\n"
        "print(a.item(), b.item(), d, g)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for value in out.split():
        assert float(value) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("init", ["paper", "auto"])
def test_octav_relu6_mass_with_values_just_above_the_clip(init):
    """ReLU6 output: 3336 values at 6 and 310 just above. The pair of evaluations before the last
    held the mass too, so its density once 'predicted' it and the estimate stopped below it."""
    gen = np.random.default_rng(37)
    a = np.clip(np.maximum(gen.standard_normal(131_072), 0) * 3.08, 0, 6.0)
    a[gen.choice(131_072, 310, replace=False)] = 6.0 + gen.exponential(0.0075, 310)
    x = torch.from_numpy(a.astype(np.float32))
    ref = fixed_point_by_bisection(x.double().numpy(), Grid(7, False, "paper").noise_coefficient)
    got = octav(x, 7, signed=False, convention="paper", init=init)
    assert got.item() == pytest.approx(ref, rel=1e-6)


def test_octav_channels_with_ties_just_below_their_roots():
    """Four long channels of different shapes, each with 600 copies of a value 0.17% below its root."""
    gen = np.random.default_rng(52)
    n = 65_536
    rows = np.stack(
        [gen.standard_normal(n), gen.standard_t(3, n), gen.laplace(size=n), gen.uniform(-1, 1, n)]
    )
    x = torch.from_numpy(rows.astype(np.float32))
    c = Grid(7, True, "paper").noise_coefficient
    below = 10 ** gen.uniform(-4.5, -2.5)
    for ch in range(4):
        root = fixed_point_by_bisection(x[ch].abs().double().numpy(), c)
        x[ch, torch.from_numpy(gen.choice(n, 600, replace=False))] = float(root * (1 - below))
    got = octav(x, 7, signed=True, axis=0, convention="paper")
    for ch in range(4):
        ref = fixed_point_by_bisection(x[ch].abs().double().numpy(), c)
        assert got[ch].item() == pytest.approx(ref, rel=1e-5), ch


def test_octav_literal_iterations_match_a_float64_loop_at_16_bits():
    """Near the max, thresholds rounded to nearest float32 once stepped over the top values and the
    count fell to 0; thresholds now round down, where float32 data compares exactly."""
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32))
    c = Grid(16, True).noise_coefficient
    got = octav(w, 16, signed=True, axis=0, iterations=10)
    for r in range(64):
        a = w[r].abs().double().numpy()
        s = a.sum() / (a > 0).sum()
        for _ in range(10):
            above = a > s
            s = a[above].sum() / (c * ((a > 0) & ~above).sum() + above.sum())
        assert got[r].item() == pytest.approx(s, rel=1e-6), r


@pytest.mark.parametrize("init", [-0.5, math.inf, math.nan])
def test_octav_refuses_a_bad_numeric_init(init):
    with pytest.raises(SpecError, match="init must be a finite number"):
        octav(torch.randn(100_000), 8, init=init)
