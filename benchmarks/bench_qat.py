"""Overhead of a dynamic-OCTAV QAT training step over the unquantized step, on the sample models
and on a wider MLP whose tensors are large enough for the warm start to matter.

    python benchmarks/bench_qat.py [--steps 30]

Each figure is the median step time (forward, backward, optimizer) in this process; "warm" reuses the
previous iteration's scalar as OCTAV's initial guess (the default), "cold" solves from scratch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import octavcal.qat as qat_module
from octavcal.qat import prepare_qat
from sample_models.digits_cnn import DigitsCNN
from sample_models.digits_transformer import DigitsTransformer


def wide_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )


CASES = {
    "digits CNN (batch 64)": (DigitsCNN, lambda g: ((torch.rand(64, 1, 8, 8, generator=g),), {})),
    "digits transformer (batch 64)": (
        DigitsTransformer,
        lambda g: ((torch.rand(64, 8, 8, generator=g),), {}),
    ),
    "MLP 1024-2048-2048-10 (batch 256)": (wide_mlp, lambda g: ((torch.randn(256, 1024, generator=g),), {})),
}


def step_time(model: nn.Module, net: nn.Module, inputs, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    labels = torch.randint(0, 10, (inputs[0][0].shape[0],), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        loss = F.cross_entropy(net(*inputs[0], **inputs[1]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(
        f"# {torch.get_num_threads()} torch threads, torch {torch.__version__}, median of {args.steps} steps"
    )
    print(
        f"{'model':36} {'float ms':>9} {'max ms':>8} {'octav warm ms':>14} {'octav cold ms':>14} "
        f"{'overhead':>9}"
    )
    for name, (build, make) in CASES.items():
        inputs = make(torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        base = build()
        t_float = step_time(base, base, inputs, args.steps)
        row = [t_float]
        for scaler, cold in (("max", False), ("octav", False), ("octav", True)):
            torch.manual_seed(0)
            model = build()
            net = prepare_qat(model, bits=4, weights=scaler, activations=scaler, grad="mph")
            saved = qat_module.solves_by_sorting
            if cold:  # solve from scratch every step (init="auto"): no reuse of the previous scalar
                qat_module.solves_by_sorting = lambda data, axis: True
            row.append(step_time(model, net, inputs, args.steps))
            qat_module.solves_by_sorting = saved
        print(
            f"{name:36} {row[0] * 1e3:9.2f} {row[1] * 1e3:8.2f} {row[2] * 1e3:14.2f} {row[3] * 1e3:14.2f} "
            f"{row[2] / row[0]:8.2f}x"
        )


if __name__ == "__main__":
    main()
