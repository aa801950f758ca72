"""Per-group weight scales on the sample transformer: OCTAV vs the sweep vs max per group size, with the
weights' quantization MSE (mean over weight targets) and the seconds each method took on the weights.

    python benchmarks/bench_groups.py

The embedding (8 inputs) cannot be grouped by 16 or 32 and is skipped at every granularity, so the
rows compare the same 13 weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from octavcal import CalibrationConfig  # noqa: E402
from octavcal.compare import compare  # noqa: E402
from octavcal.data import load_data, plan_batches  # noqa: E402
from octavcal.loading import load_model  # noqa: E402

METHODS = ("octav", "sweep", "max")


def main() -> None:
    model = load_model(
        ROOT / "sample_models/digits_transformer.safetensors", arch="sample_models.digits_transformer:build"
    )
    data = load_data(ROOT / "sample_models/digits_transformer.calib.safetensors")
    calib = [data.batch(i) for i in plan_batches(data.num_samples, 32, 4, 0)]
    held = [data.batch(i) for i in plan_batches(data.num_samples, 32, 2, 0, skip=4)]
    print("granularity  method  weight MSE (mean)  vs channel OCTAV  seconds on weights")
    base = None
    for group in (None, 32, 16):
        config = CalibrationConfig(bits=4, methods=METHODS, group_size=group, layer_bits=(("embed", None),))
        report = compare(model, calib, held, config, [4])
        for method in METHODS:
            rows = [
                r for t in report.targets.values() if t.kind == "weight" for r in t.rows if r.method == method
            ]
            mse = sum(r.mse for r in rows) / len(rows)
            seconds = sum(r.seconds * r.calls for r in rows)
            base = mse if base is None else base
            name = "channel" if group is None else f"group:{group}"
            print(f"{name:<12} {method:<7} {mse:.4e}         {mse / base:6.3f}            {seconds:.4f}")


if __name__ == "__main__":
    main()
