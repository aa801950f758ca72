"""calibrate() end to end on the sample models, checked against independent hooks and core calls."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import octavcal
from octavcal import CalibrationConfig, CalibrationError, DataError, calibrate
from octavcal.data import load_data, plan_batches
from octavcal.loading import load_model


def batches_of(paths, count=4, batch_size=32, seed=0):
    data = load_data(paths["data"])
    return [data.batch(i) for i in plan_batches(data.num_samples, batch_size, count, seed)]


def record_layer_inputs(model, batches):
    """Independent reference: plain forward hooks on every Linear/Conv, inputs kept per batch."""
    seen = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            for b in batches:
                model(*b.args, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_cnn_targets_names_shapes_and_signedness(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    batches = batches_of(cnn_paths)
    table = calibrate(loaded, batches, CalibrationConfig(bits=4, methods=("octav", "max")))
    layers = ["conv1", "conv2", "fc1", "fc2"]
    assert sorted(table.targets) == sorted([f"{n}:input" for n in layers] + [f"{n}:weight" for n in layers])
    for name in layers:
        w = table.targets[f"{name}:weight"]
        out_channels = loaded.module.get_submodule(name).weight.shape[0]
        assert w.axis == 0 and w.methods["octav"].amax.shape == (out_channels,)
    inputs = record_layer_inputs(loaded.module, batches)
    for name, xs in inputs.items():
        nonnegative = all(bool((x >= 0).all()) for x in xs)
        assert table.targets[f"{name}:input"].signed == (not nonnegative), name


def test_octav_scalar_is_the_mean_of_core_octav_over_batches(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    batches = batches_of(cnn_paths, count=5)
    table = calibrate(loaded, batches, CalibrationConfig(bits=4, methods=("octav", "p99.99")))
    for name, xs in record_layer_inputs(loaded.module, batches).items():
        entry = table.targets[f"{name}:input"]
        ref = torch.stack([octavcal.octav(x, 4, signed=entry.signed) for x in xs]).mean()
        assert entry.methods["octav"].amax.item() == pytest.approx(ref.item(), rel=1e-6)
        ref_p = torch.stack([octavcal.percentile(x, 99.99) for x in xs]).mean()
        assert entry.methods["p99.99"].amax.item() == pytest.approx(ref_p.item(), rel=1e-6)
        assert entry.methods["octav"].per_batch.shape == (5,)
    w = loaded.module.fc1.weight.detach()
    torch.testing.assert_close(
        table.targets["fc1:weight"].methods["octav"].amax, octavcal.octav(w, 4, axis=0)
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_every_method_per_batch_equals_the_public_function_on_that_input(cnn_paths, bits):
    """calibrate shares work between methods (one sort for the sweep and percentiles, the unsigned
    grid reusing the signed one's): every per-batch candidate still equals the public method called
    on its own on the tensor an independent hook saw."""
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    batches = batches_of(cnn_paths, count=3, batch_size=64)
    table = calibrate(loaded, batches, CalibrationConfig(bits=bits))
    reference = {
        "octav": lambda x, s: octavcal.octav(x, bits, signed=s),
        "sweep": lambda x, s: octavcal.mse_sweep(x, bits, signed=s),
        "max": lambda x, s: octavcal.max_scaling(x, signed=s),
        **{f"p{q}": lambda x, s, q=q: octavcal.percentile(x, q) for q in (99.9, 99.99, 99.999)},
    }
    unsigned_seen = False
    for name, xs in record_layer_inputs(loaded.module, batches).items():
        entry = table.targets[f"{name}:input"]
        unsigned_seen |= not entry.signed
        for method, fn in reference.items():
            ref = torch.stack([fn(x, entry.signed) for x in xs]).float()
            torch.testing.assert_close(
                entry.methods[method].per_batch, ref, rtol=0, atol=0, msg=f"{name} {method}"
            )
    assert unsigned_seen  # the ReLU outputs took the unsigned grid


def test_one_forward_pass_per_batch(cnn_paths):
    """The targets are found during the first batch's own pass: N batches cost N forward passes
    (N + 1 only with the first/last-layer rule, which needs the call order before calibrating)."""
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    calls = []
    handle = loaded.module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        calibrate(loaded, batches_of(cnn_paths, count=3), CalibrationConfig(bits=4, methods=("octav",)))
        assert len(calls) == 3
        calls.clear()
        calibrate(
            loaded,
            batches_of(cnn_paths, count=3),
            CalibrationConfig(bits=4, methods=("octav",), first_last_bits=8),
        )
        assert len(calls) == 4
    finally:
        handle.remove()


def test_transformer_finds_every_matmul_operand_and_masks_padding(transformer_paths):
    loaded = load_model(transformer_paths["model"], arch=transformer_paths["arch"])
    batches = batches_of(transformer_paths, count=3)
    table = calibrate(loaded, batches, CalibrationConfig(bits=4, methods=("octav",)))
    for layer in ("layers.0", "layers.1"):
        for i in (0, 1):
            for side in ("lhs", "rhs"):
                assert f"{layer}.attention:matmul{i}.{side}" in table.targets
        for lin in (
            "attention.query",
            "attention.key",
            "attention.value",
            "attention.output",
            "intermediate",
            "output",
        ):
            assert f"{layer}.{lin}:input" in table.targets and f"{layer}.{lin}:weight" in table.targets
    # Q, K and V read one tensor: computed once, reported as shared.
    q, k = table.targets["layers.0.attention.query:input"], table.targets["layers.0.attention.key:input"]
    assert k.shared_with == "layers.0.attention.query:input" and torch.equal(
        q.methods["octav"].amax, k.methods["octav"].amax
    )
    # Masked: statistics of the embedding input use real rows only, computed independently here.
    assert table.targets["embed:input"].masked
    ref = torch.stack(
        [octavcal.octav(b.kwargs["x"][b.kwargs["attention_mask"].bool()], 4) for b in batches]
    ).mean()
    assert table.targets["embed:input"].methods["octav"].amax.item() == pytest.approx(ref.item(), rel=1e-6)
    kept = calibrate(loaded, batches, CalibrationConfig(bits=4, methods=("octav",), mask_padding=False))
    assert not kept.targets["embed:input"].masked


def test_sdpa_attention_exposes_q_k_v(transformer_paths):
    loaded = load_model(transformer_paths["model"], arch="sample_models.digits_transformer:build_sdpa")
    with pytest.warns(octavcal.OctavcalWarning, match="hides its probabilities @ V product"):
        table = calibrate(loaded, batches_of(transformer_paths, count=2), CalibrationConfig(methods=("max",)))
    for role in ("sdpa0.query", "sdpa0.key", "sdpa0.value"):
        assert f"layers.0.attention:{role}" in table.targets
    assert not any("matmul" in t for t in table.targets)


def test_layer_bits_skip_and_first_last(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    config = CalibrationConfig(
        bits=4, methods=("max",), first_last_bits=8, layer_bits=(("conv2:*", 6), ("fc1", None))
    )
    table = calibrate(loaded, batches_of(cnn_paths, count=2), config)
    bits = {t: e.bits for t, e in table.targets.items()}
    assert bits == {
        "conv1:input": 8,
        "conv1:weight": 8,
        "conv2:input": 6,
        "conv2:weight": 6,
        "fc2:input": 8,
        "fc2:weight": 8,
    }
    assert table.meta["skipped"] == ["fc1:input", "fc1:weight"]


def test_weights_unchanged_and_hooks_removed_even_when_forward_fails(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    calibrate(loaded, batches_of(cnn_paths, count=2), CalibrationConfig(methods=("octav",)))
    bad = octavcal.core.Batch((torch.randn(4, 3, 8, 8),))
    with pytest.raises(
        CalibrationError,
        match=r"Layer 'conv1' \(Conv2d\) expects inputs of shape \(N, 1, \.\.\., "
        r"\.\.\.\); got \(4, 3, 8, 8\)",
    ):
        calibrate(loaded, [bad], CalibrationConfig(methods=("octav",)))
    for module in loaded.module.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    after = loaded.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_in_activations_is_named(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    with torch.no_grad():
        loaded.module.conv2.bias[0] = float("nan")
    with pytest.raises(DataError, match=r"Activations of 'fc1' \(input\) contain NaN or Inf in batch 0"):
        calibrate(loaded, batches_of(cnn_paths, count=1), CalibrationConfig(methods=("octav",)))


MEMORY_SCRIPT = """
import resource, sys, torch
from torch import nn
import octavcal
from octavcal.core import Batch
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64)).eval()
def batches(n):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):  # 2048 x 4096 floats = 32 MiB of hidden activations per batch
        yield Batch((torch.randn(2048, 64, generator=gen),))
octavcal.calibrate(model, batches(int(sys.argv[1])), octavcal.CalibrationConfig(methods=("max",)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_grows_with_one_batch_not_with_n():
    def peak(n):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(n)], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    three, thirty = peak(3), peak(30)
    assert thirty <= 1.10 * three, (three, thirty)  # keeping 27 more batches would add ~860 MiB


class Branchy(nn.Module):
    """Layer b only runs on batches of more than two samples: it is first seen in batch 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if x.shape[0] > 2 else y


def test_bit_rules_apply_to_targets_first_seen_in_later_batches():
    batches = [octavcal.core.Batch((torch.randn(2, 4),)), octavcal.core.Batch((torch.randn(3, 4),))]
    table = calibrate(Branchy(), batches, CalibrationConfig(bits=8, methods=("max",), layer_bits=(("b", 4),)))
    assert table.targets["b:input"].bits == 4 and table.targets["b:weight"].bits == 4
    skipped = calibrate(
        Branchy(), batches, CalibrationConfig(bits=8, methods=("max",), layer_bits=(("b", None),))
    )
    assert "b:input" not in skipped.targets and "b:input" in skipped.meta["skipped"]


class HeadsEqualTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 2).transpose(1, 2)  # (B, H=4, T=4, 2)
        return q @ q.transpose(-1, -2)


def test_padding_mask_is_not_applied_along_heads():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    x[0, 2:] *= 100  # padded tokens with huge values
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    table = calibrate(
        HeadsEqualTokens(),
        [octavcal.core.Batch((), {"x": x, "attention_mask": mask})],
        CalibrationConfig(methods=("max",)),
    )
    assert table.targets["q:input"].masked
    valid = x[mask.bool()]
    assert table.targets["q:input"].methods["max"].amax.item() == pytest.approx(valid.abs().max().item())
    assert not table.targets["<root>:matmul0.lhs"].masked  # (B, H, T, d): left as is, not cut along H


def test_a_layer_bits_pattern_that_matches_nothing_warns(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    config = CalibrationConfig(methods=("max",), layer_bits=(("fc9*", 4), ("fc1", None)))
    with pytest.warns(octavcal.OctavcalWarning, match="pattern 'fc9\\*' matched no target") as record:
        calibrate(loaded, batches_of(cnn_paths, count=1), config)
    assert not any("'fc1'" in str(w.message) for w in record)


def test_a_pruned_channel_and_a_tiny_activation_give_a_loadable_scale_file(tmp_path):
    """Zero rows (pruned channels) and denormal activations meet the scale file's floor on amax
    (smallest normal float32 x qmax), so the file loads and exports; their values quantize to zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].weight[2] = 1e-40
    table = calibrate(model, [torch.randn(8, 4)], CalibrationConfig(bits=8, methods=("octav", "max")))
    floor = torch.finfo(torch.float32).tiny * 127
    amax = table.targets["0:weight"].methods["max"].amax
    # an all-zero row gets the methods' own positive amax; a denormal row is raised to the floor
    assert amax[1] >= floor and amax[2] == floor and amax[0] == model[0].weight[0].abs().max()
    octavcal.save_scales(table, tmp_path / "s.safetensors")
    back = octavcal.load_scales(tmp_path / "s.safetensors")
    torch.testing.assert_close(back.targets["0:weight"].methods["max"].amax, amax, rtol=0, atol=0)
