"""The scale file's bytes, pinned: calibrating a tiny fixed model on fixed batches rewrites tests/golden.

Regenerate (after an intended format, metadata or version change) with
``.venv/bin/python tests/test_scales_golden.py`` and say why in the commit.
"""

from pathlib import Path

import torch
from torch import nn

import octavcal
from octavcal import CalibrationConfig

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_mlp.scales.safetensors"
GOLDEN_V2 = GOLDEN.with_name("tiny_mlp.v2.scales.safetensors")  # as octavcal wrote it in format 2; kept
METHODS = ("octav", "sweep", "max", "p99.9")


def tiny_mlp() -> nn.Module:
    """Linear(4, 6) -> ReLU -> Linear(6, 3) with weights and biases in multiples of 1/8 in [-1, 1]."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            ramp = torch.arange(p.numel(), dtype=torch.float32)
            p.copy_((((ramp * (5 + 2 * i) + 3) % 17 - 8) / 8).reshape(p.shape))
    return model.eval()


def tiny_batches() -> list[torch.Tensor]:
    """Three (8, 4) batches in multiples of 1/4: with the weights above every product and every sum
    is exact in float32, so the activations do not depend on the BLAS or the summation order."""
    ramp = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    return [(ramp * (3 + b) % 13 - 6) / 4 for b in range(3)]


def write_tiny_mlp_scales(path: Path) -> Path:
    table = octavcal.calibrate(tiny_mlp(), tiny_batches(), CalibrationConfig(bits=4, methods=METHODS))
    return octavcal.save_scales(table, path)


def test_calibrating_the_tiny_mlp_again_gives_the_golden_bytes(tmp_path):
    again = write_tiny_mlp_scales(tmp_path / "again.scales.safetensors")
    ours, golden = octavcal.load_scales(again), octavcal.load_scales(GOLDEN)
    # Name what changed before comparing bytes: metadata, then each tensor.
    assert ours.meta == golden.meta
    assert sorted(ours.targets) == sorted(golden.targets)
    for tid, entry in golden.targets.items():
        for method, scales in entry.methods.items():
            assert torch.equal(ours.targets[tid].methods[method].amax, scales.amax), (tid, method)
    assert again.read_bytes() == GOLDEN.read_bytes()


def test_the_golden_file_is_small_and_complete():
    assert GOLDEN.stat().st_size < 8192
    table = octavcal.load_scales(GOLDEN)
    assert sorted(table.targets) == ["0:input", "0:weight", "2:input", "2:weight"]
    assert all(sorted(e.methods) == sorted(METHODS) for e in table.targets.values())
    assert table.meta["format_version"] == 3 and table.meta["uncovered"] == []
    assert table.meta["weight_granularity"] == "channel"


def test_the_format_2_golden_file_still_reads_with_the_same_scales():
    old, new = octavcal.load_scales(GOLDEN_V2), octavcal.load_scales(GOLDEN)
    assert old.meta["format_version"] == 2 and "weight_granularity" not in old.meta
    assert sorted(old.targets) == sorted(new.targets)
    for tid, entry in new.targets.items():
        assert old.targets[tid].group_size is None and entry.group_size is None
        for method, scales in entry.methods.items():
            assert torch.equal(old.targets[tid].methods[method].amax, scales.amax), (tid, method)


if __name__ == "__main__":
    print(f"Wrote {write_tiny_mlp_scales(GOLDEN)}")
