"""The integer grid: golden values, properties, and the float64 MSE oracle."""

import pytest
import torch

from octavcal import Grid, SpecError, fake_quantize, quant_mse, scale_from_amax


@pytest.mark.parametrize(
    ("bits", "signed", "convention", "qmin", "qmax"),
    [
        (4, True, "runtime", -7, 7),
        (4, False, "runtime", 0, 15),
        (8, True, "runtime", -127, 127),
        (8, False, "runtime", 0, 255),
        (2, True, "runtime", -1, 1),
        (4, True, "paper", -8, 8),
        (4, False, "paper", 0, 16),
    ],
)
def test_grid_ranges(bits, signed, convention, qmin, qmax):
    grid = Grid(bits, signed, convention)
    assert (grid.qmin, grid.qmax) == (qmin, qmax)
    assert grid.noise_coefficient == pytest.approx(1 / (12 * qmax**2))


@pytest.mark.parametrize("bits", range(2, 17))
def test_paper_grid_reproduces_the_papers_noise_coefficients(bits):
    # Eq. (4): 4^-B/3 for signed data; Appendix A: 4^-B/12 for unsigned data.
    assert Grid(bits, True, "paper").noise_coefficient == pytest.approx(4.0**-bits / 3)
    assert Grid(bits, False, "paper").noise_coefficient == pytest.approx(4.0**-bits / 12)


def test_fake_quantize_golden():
    # 4-bit signed, amax 0.7 -> step 0.1: -0.06 is -0.6 steps -> -1; 0.05 is a tie -> 0 (half to even).
    x = torch.tensor([0.33, 0.9, -0.06, -5.0, 0.05, 0.15])
    out = fake_quantize(x, 0.7, 4)
    expected = torch.tensor([0.3, 0.7, -0.1, -0.7, 0.0, 0.2])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert scale_from_amax(torch.tensor(0.7), Grid(4, True)).item() == pytest.approx(0.1)


def test_fake_quantize_unsigned_clips_negatives_to_zero():
    x = torch.tensor([-1.0, 0.2, 1.6, 3.0])
    out = fake_quantize(x, 1.5, 4, signed=False)  # step 0.1, integers 0..15
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 1.5, 1.5]), rtol=0, atol=1e-6)


def test_fake_quantize_is_idempotent_and_on_grid():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 33, generator=gen)
    amax = torch.rand(64, generator=gen) + 0.5
    once = fake_quantize(x, amax, 5, axis=0)
    torch.testing.assert_close(fake_quantize(once, amax, 5, axis=0), once, rtol=0, atol=1e-6)
    steps = once / (amax[:, None] / 15)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().max() <= 15 + 1e-4


def test_per_channel_fake_quantize_equals_row_loop():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=gen)
    amax = torch.tensor([0.5, 1.0, 1.5, 2.0])
    out = fake_quantize(x, amax, 4, axis=0)
    for k in range(4):
        torch.testing.assert_close(out[k], fake_quantize(x[k], amax[k], 4))
    out1 = fake_quantize(x, amax[:3], 4, axis=1)
    for k in range(3):
        torch.testing.assert_close(out1[:, k], fake_quantize(x[:, k], amax[k], 4))


def test_quant_mse_matches_float64_oracle():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 200, generator=gen, dtype=torch.float64)
    amax = torch.linspace(0.5, 3.0, 10, dtype=torch.float64)
    got = quant_mse(x, amax, 3, axis=0)
    for k in range(10):
        step = amax[k].item() / 3  # 3-bit signed runtime grid: integers -3..3
        q = [max(-3, min(3, round(v / step))) * step for v in x[k].tolist()]
        ref = sum((a - b) ** 2 for a, b in zip(q, x[k].tolist(), strict=True)) / 200
        assert got[k].item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("bits", [1, 17, 0, True, 4.0, "4"])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(SpecError, match=r"bits must be an integer in \[2, 16\]"):
        Grid(bits, True)


def test_fake_quantize_rejects_zero_amax_and_bad_shapes():
    x = torch.ones(3, 4)
    with pytest.raises(SpecError, match="positive and finite"):
        fake_quantize(x, 0.0, 4)
    with pytest.raises(SpecError, match=r"must have shape \(3,\): got \(4,\)"):
        fake_quantize(x, torch.ones(4), 4, axis=0)
    with pytest.raises(SpecError, match="Unknown grid convention 'tf'"):
        fake_quantize(x, 1.0, 4, convention="tf")  # type: ignore[arg-type]
