"""OCTAV (``octavcal.octav``) against independent references: brute force of eq. (1), a float64 bisection
on h(s), and plain loops of eq. (6)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from octavcal import DataError, Grid, SpecError, mse_sweep, octav
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


# ------------------------------------------------------------------ devices, long rows, point masses, init


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


# ------------------------------------------------------------------ the one-pass tail (CPU)


def _reference_rows(x: torch.Tensor, bits: int, signed: bool) -> list[float]:
    c = Grid(bits, signed).noise_coefficient
    mags = (x.abs() if signed else x.clamp(min=0)).double().numpy().reshape(x.shape[0], -1)
    return [fixed_point_by_bisection(row, c) if row.any() else 1.0 for row in mags]


@pytest.mark.parametrize("blocks", ["one block", "many blocks"])
def test_one_pass_tail_on_mixed_channels_and_long_rows(monkeypatch, blocks):
    """Channels of different shapes (several land below the floor their pooled subsample gives them
    and are finished apart), a long row, zeros and ties, in one block or in many small ones (rows
    split across blocks, as for tensors larger than the scratch memory)."""
    if blocks == "many blocks":
        kernels = sys.modules["octavcal._octav_kernels"]
        monkeypatch.setattr(kernels, "_BLOCK", 1 << 12)
        monkeypatch.setattr(kernels, "_HOST_BLOCK", 1 << 11)
    gen = np.random.default_rng(60)
    w = gen.standard_normal((96, 700)) * gen.uniform(0.1, 3, (96, 1))
    w[::5] = gen.standard_t(2, (20, 700))  # heavy tails: roots far above the pooled guess
    w[1::7] = np.round(w[1::7] * 2) / 2  # point masses
    w[2, :600] = 0.0
    x = torch.from_numpy(w.astype(np.float32))
    for signed in (True, False):
        got = octav(x, 4, signed=signed, axis=0, return_iterations=True)
        assert got.iterations.tolist() == [1] * 96
        ref = _reference_rows(x, 4, signed)
        for r in range(96):
            assert got.amax[r].item() == pytest.approx(ref[r], rel=1e-6), (signed, r)
    wide = torch.from_numpy(gen.standard_normal((96, 900)).astype(np.float32))
    wide[:, :700] = x  # strided rows, read in place
    assert torch.equal(octav(wide[:, :700], 4, axis=0), octav(x, 4, axis=0))
    row = torch.from_numpy(gen.laplace(size=50_000).astype(np.float32))
    row[:5000] = 0.0
    got = octav(row, 5, return_iterations=True)
    assert got.iterations.item() == 1
    assert got.amax.item() == pytest.approx(_reference_rows(row[None], 5, True)[0], rel=1e-6)


def test_one_pass_tail_falls_back_when_the_root_lies_below_the_floor(monkeypatch):
    """A floor above the root (forced here by a negative margin) proves nothing: long rows iterate,
    channels are sorted, or iterated when too many are left. Same answers."""
    octav_module = sys.modules["octavcal._octav_sorted"]
    monkeypatch.setattr(octav_module, "_TAIL_SIGMAS", -30.0)
    monkeypatch.setattr(octav_module, "_TAIL_SLACK", 0)
    monkeypatch.setattr(octav_module, "_CHANNEL_SIGMAS", -30.0)
    gen = np.random.default_rng(61)
    row = torch.from_numpy(gen.standard_normal(60_000).astype(np.float32))
    got = octav(row, 4, return_iterations=True)
    assert got.iterations.item() > 1
    assert got.amax.item() == pytest.approx(_reference_rows(row[None], 4, True)[0], rel=1e-6)
    w = torch.from_numpy(gen.standard_normal((40, 800)).astype(np.float32))
    for left_below in (1 << 18, 0):  # sorted; iterated
        monkeypatch.setattr(octav_module, "_SORT_LEFT_BELOW", left_below)
        got_rows = octav(w, 4, axis=0)
        ref = _reference_rows(w, 4, True)
        for r in range(40):
            assert got_rows[r].item() == pytest.approx(ref[r], rel=1e-6), (left_below, r)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("axis", [None, 0])
def test_one_pass_tail_reports_nan_and_inf_the_subsample_missed(bad, axis):
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(62))
    x[17, 1] = bad  # a position the strided subsample does not visit
    with pytest.raises(DataError, match=r"NaN or Inf \(1 of 64000 values\)"):
        octav(x, 4, signed=True, axis=axis)


def test_one_tail_solved_in_scalar_steps_is_the_exact_fixed_point():
    """``_fixed_point_of_tails`` solves one row with Python floats: it finds the fixed point that
    ``_fixed_point_of_rows`` (every interval of the map tested, an independent search) finds, over
    ties, zeros, heavy tails and every grid's c."""
    from octavcal import _octav_sorted

    rng = np.random.default_rng(0)
    for trial in range(2000):
        n = int(rng.integers(1, 300))
        v = [
            np.abs(rng.standard_normal(n)),
            rng.integers(0, 4, n).astype(float),
            np.abs(rng.standard_cauchy(n)),
            np.zeros(n),
        ][trial % 4]
        v = np.sort(v)[::-1].copy()
        c = float(rng.choice([1 / 12, 1 / 108, 1 / 588, 1 / (12 * 127**2)]))
        one = _octav_sorted._fixed_point_of_tails(v[None], c, np.array([float(np.count_nonzero(v))]))[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            every = _octav_sorted._fixed_point_of_rows(v[None], c)[0]
        assert one == pytest.approx(every, rel=1e-12, abs=0), (trial, one, every)
