"""The one-pass route for OCTAV, the percentiles and max (``scan.py``, ``scanned_candidates``): every
piece against a brute-force reference, and every candidate against the public function, bit for bit."""

import numpy as np
import pytest
import torch
from torch import nn

import octavcal
from octavcal import CalibrationConfig, calibrate
from octavcal import candidates as candidates_module
from octavcal.calibrator import without_padding
from octavcal.candidates import scanned_candidates
from octavcal.data import load_data, plan_batches
from octavcal.grid import rows_from
from octavcal.loading import load_model
from octavcal.methods import parse_methods
from octavcal.scan import gather_above, strided_sample, token_runs, valid_segments


def _mask(rng, batch, tokens, kind):
    if kind == "trailing":
        lengths = rng.integers(1, tokens + 1, batch)
        return torch.from_numpy(np.arange(tokens)[None, :] < lengths[:, None])
    if kind == "leading":
        lengths = rng.integers(1, tokens + 1, batch)
        return torch.from_numpy(np.arange(tokens)[None, :] >= tokens - lengths[:, None])
    mask = torch.from_numpy(rng.random((batch, tokens)) < 0.7)  # scattered: several runs a row
    mask[1] = False  # a row with no valid token
    return mask


@pytest.mark.parametrize("kind", ["trailing", "leading", "scattered"])
@pytest.mark.parametrize("shape", [(5, 9, 7), (5, 9)])
def test_valid_segments_read_what_without_padding_copies_in_the_same_order(kind, shape):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    mask = _mask(rng, *shape[:2], kind)
    segments, masked = valid_segments(x, mask)
    assert masked
    reference = x[mask].reshape(-1)  # a boolean index: not the code's index_select
    assert np.array_equal(np.concatenate(segments), reference.numpy())
    # The runs kept for a batch give the same views.
    again, _ = valid_segments(x, mask, token_runs(mask))
    assert all(np.array_equal(a, b) for a, b in zip(segments, again, strict=True))
    # Every strided subsample of the pieces is the one of the copy.
    copy = rows_from(without_padding(x, mask)[0], None)[0].numpy()
    for step in (1, 2, 5, 7):
        assert np.array_equal(strided_sample(segments, step), copy[::step])


def test_valid_segments_of_unmasked_and_other_layouts():
    x = torch.randn(2, 3, 4, 5)
    t = x.transpose(1, 2)  # a permuted dense tensor: read in memory order, no copy
    (segment,), masked = valid_segments(t, None)
    assert not masked and np.shares_memory(segment, x.numpy())
    assert np.array_equal(segment, rows_from(t, None)[0].numpy())
    # A 4-D operand is never masked (its second dimension could be heads).
    (segment,), masked = valid_segments(x, torch.ones(2, 3, dtype=torch.bool))
    assert not masked
    # Not float32, a gradient, a strided slice or a non-contiguous masked tensor: the caller copies.
    assert valid_segments(x.double(), None) is None
    assert valid_segments(x.clone().requires_grad_(), None) is None
    assert valid_segments(x[..., ::2], None) is None
    y = torch.randn(4, 3, 2).transpose(0, 1)
    assert valid_segments(y, torch.ones(3, 4, dtype=torch.bool)) is None


@pytest.mark.parametrize("signed_hint", [False, True])
@pytest.mark.parametrize("data", ["gaussian", "relu", "gelu", "zeros_and_signed_zeros"])
def test_gather_above_equals_a_brute_force_filter(data, signed_hint):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(300_001).astype(np.float32)
    if data == "relu":
        x = np.maximum(x, 0)
    elif data == "gelu":
        x = np.where(x > -0.17, x, -0.17 * rng.random(x.size)).astype(np.float32)
    elif data == "zeros_and_signed_zeros":
        x[::3] = 0.0
        x[1::7] = -0.0
    if signed_hint and not (x < 0).any():
        return  # the hint says a negative value was seen
    floor = np.float32(1.5)
    pieces = [x[:70_000], x[70_000:70_001], x[70_001:]]  # uneven pieces, one of a single value
    got = gather_above(pieces, floor, signed=signed_hint)
    mags = np.abs(x)
    assert got.n == x.size
    assert got.nonnegative == bool((x >= 0).all())
    assert got.finite
    assert got.zeros == int((mags == 0).sum())
    assert np.array_equal(got.top, np.sort(mags[mags > floor])[::-1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_gather_above_reports_non_finite_values(bad):
    x = np.random.default_rng(2).standard_normal(200_000).astype(np.float32)
    x[123_456] = bad
    for signed in (False, True):
        assert not gather_above([x], np.float32(2.0), signed=signed).finite


def _activation(kind, rng, shape):
    z = rng.standard_normal(shape)
    if kind == "laplace":
        z = rng.laplace(size=shape) * 3
    elif kind == "outliers":
        z[..., 7] *= 40  # one channel of large values, as in LLM activations
    elif kind == "relu":
        z = np.maximum(z, 0)
    elif kind == "softmax":  # non-negative, with exact zeros where attention is masked
        e = np.exp(z * 2)
        e[..., -5:] = 0
        z = e / e.sum(-1, keepdims=True)
    return torch.from_numpy(z.astype(np.float32))


PUBLIC = {
    "octav": lambda x, bits, signed: octavcal.octav(x, bits, signed=signed),
    "max": lambda x, bits, signed: octavcal.max_scaling(x, signed=signed),
    **{f"p{q}": lambda x, bits, signed, q=q: octavcal.percentile(x, q) for q in (99.9, 99.99, 99.999)},
}


@pytest.mark.parametrize("spec", ["octav,p99.9,p99.99,p99.999,max", "max", "p99.99"])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("kind", ["gaussian", "laplace", "outliers", "relu", "softmax"])
def test_scanned_candidates_equal_the_public_functions_bit_for_bit(kind, bits, spec):
    rng = np.random.default_rng(bits)
    x = _activation(kind, rng, (8, 100, 300))
    mask = _mask(rng, 8, 100, "trailing")
    segments, _ = valid_segments(x, mask)
    methods = parse_methods(spec)
    found = scanned_candidates(x, segments, methods, bits, "runtime", unsigned=True)
    if found is None:  # at 3 bits OCTAV's root can leave more than a sixteenth above it: octav() iterates
        assert bits == 3 and "octav" in spec
        return
    results, nonnegative = found
    valid = x[mask]
    assert nonnegative == bool((valid >= 0).all())
    assert set(results) == ({"signed", "unsigned"} if nonnegative else {"signed"})
    for grid, candidates in results.items():
        for name, (amax, seconds) in candidates.items():
            ref = PUBLIC[name](valid, bits, grid == "signed").float()
            assert torch.equal(amax, ref), (kind, bits, grid, name, amax, ref)
            assert seconds >= 0


def test_scanned_candidates_leave_other_cases_to_the_general_route():
    rng = np.random.default_rng(3)
    x = _activation("gaussian", rng, (4, 64, 300))
    segments, _ = valid_segments(x, None)
    octav_only = parse_methods("octav")
    assert scanned_candidates(x, segments, octav_only, 8, "runtime", unsigned=True) is not None
    # 2 bits: OCTAV's tail would be too large to gather (octav() iterates there)
    assert scanned_candidates(x, segments, octav_only, 2, "runtime", unsigned=True) is None
    # the sweep reads the whole tensor
    assert scanned_candidates(x, segments, parse_methods("octav,sweep"), 8, "runtime", unsigned=True) is None
    # too small to pay for the pass
    small = x[:1, :8]
    assert (
        scanned_candidates(small, valid_segments(small, None)[0], octav_only, 8, "runtime", unsigned=True)
        is None
    )
    # NaN: the general route names it
    x.view(-1)[5000] = float("nan")
    assert scanned_candidates(x, segments, octav_only, 8, "runtime", unsigned=True) is None


@pytest.mark.parametrize("bits", [4, 8])
def test_calibration_through_the_scan_equals_the_public_functions_on_the_real_tokens(
    transformer_paths, monkeypatch, scan_routes, bits
):
    """The sample transformer's activations are small: with the threshold lowered they take the
    one-pass route, padding left out in place. Each per-batch candidate of every Linear input equals
    the public function on that input's real tokens, taken by an independent hook and a boolean index."""
    monkeypatch.setattr(candidates_module, "SCAN_MIN", 1024)
    loaded = load_model(transformer_paths["model"], arch=transformer_paths["arch"])
    data = load_data(transformer_paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 32, 3, 0)]
    methods = ("octav", "p99.9", "p99.99", "max")
    table = calibrate(loaded, batches, CalibrationConfig(bits=bits, methods=methods))
    assert sum(scan_routes) >= 10

    seen = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
        for name, m in loaded.module.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            for b in batches:
                loaded.module(*b.args, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
    checked, masked_seen = 0, False
    for name, xs in seen.items():
        entry = table.targets[f"{name}:input"]
        masks = [b.kwargs["attention_mask"].bool() for b in batches]
        tokens = [x.dim() == 3 and x.shape[:2] == m.shape for x, m in zip(xs, masks, strict=True)]
        assert entry.masked == all(tokens)  # (B, T, features): padding left out; a pooled (B, F) kept
        reals = [x[m] if entry.masked else x for x, m in zip(xs, masks, strict=True)]
        masked_seen |= entry.masked
        assert entry.signed == any(bool((real < 0).any()) for real in reals)
        for method in methods:
            ref = [PUBLIC[method](real, bits, entry.signed) for real in reals]
            got = entry.methods[method].per_batch
            assert torch.equal(got, torch.stack(ref).float()), (name, method)
            checked += 1
    assert checked >= 12 * len(methods) and masked_seen


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["gaussian", "laplace", "outliers", "relu", "softmax"])
def test_octav_read_from_the_sweeps_sort_equals_octav(kind, bits, monkeypatch):
    """With the sweep, the activation is sorted whole; OCTAV reads its tail from that sort, and
    still equals octav() bit for bit (here counted: it took that route)."""
    from octavcal import _octav_sorted

    rng = np.random.default_rng(10 + bits)
    x = _activation(kind, rng, (4, 64, 300)).reshape(-1, 300)
    taken = []
    original = _octav_sorted.solve_from_ascending

    def spy(*args):
        out = original(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(candidates_module, "solve_from_ascending", spy)
    methods = parse_methods("octav,sweep,p99.99")
    results = candidates_module.activation_candidates(
        x, candidates_module.extremes_of(x), methods, bits, "runtime", unsigned=True
    )
    assert taken and all(taken)
    for grid, candidates in results.items():
        ref = octavcal.octav(x, bits, signed=grid == "signed").float()
        assert torch.equal(candidates["octav"][0], ref), (kind, bits, grid)


def test_nan_on_the_one_pass_route_is_named(transformer_paths, monkeypatch, scan_routes):
    """A NaN in activations that the one-pass route reads: the route declines, and calibration names
    the layer and the batch as it does on the copy route (no crash, no NaN scale)."""
    monkeypatch.setattr(candidates_module, "SCAN_MIN", 1024)
    loaded = load_model(transformer_paths["model"], arch=transformer_paths["arch"])
    data = load_data(transformer_paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 32, 2, 0)]
    clean = calibrate(loaded, batches, CalibrationConfig(bits=8, methods=("octav", "p99.99")))
    assert any(scan_routes)  # these activations do take the route when they are finite
    first = next(m for m in loaded.module.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        first.bias[3] = float("nan")  # every token of its output: the next layers' inputs
    with pytest.raises(octavcal.DataError, match=r"Activations of '.+' \(.+\) contain NaN or Inf in batch 0"):
        calibrate(loaded, batches, CalibrationConfig(bits=8, methods=("octav", "p99.99")))
    assert clean.targets
