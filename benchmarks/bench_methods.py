"""Time octav, mse_sweep and percentile on BERT-Base-shaped tensors against plain NumPy (Appendix F).

The NumPy reference is what the paper timed: 10 iterations of eq. (6) from s_1 = sum|x|/#nonzero,
and a 100-point sweep evaluating eq. (1) in a loop, both on the same runtime grid. Each figure is the
median of --repeat runs measured in this process, so ratios compare like with like on one machine;
OCTAV and its NumPy reference take turns in rounds, and their ratio is the median of per-round ratios.

    python benchmarks/bench_methods.py [--bits 4] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import octavcal
from octavcal.octav import sorted_fixed_point

SHAPES = [  # (name, shape, axis kept: 0 = per output feature, None = per tensor)
    ("weight 768x768", (768, 768), 0),
    ("weight 3072x768", (3072, 768), 0),
    ("weight 768x3072", (768, 3072), 0),
    ("activation (4*384)x768", (4 * 384, 768), None),
    ("activation (4*384)x3072", (4 * 384, 3072), None),
    ("attention probs 4x12x384x384", (4, 12, 384, 384), None),
]


def numpy_octav(x: np.ndarray, c: float, per_row: bool, iterations: int = 10) -> np.ndarray:
    """Appendix F's baseline: a plain NumPy transcription of eq. (6), 10 iterations."""
    a = np.abs(x.reshape(x.shape[0], -1) if per_row else x.reshape(1, -1))
    s = a.sum(axis=1) / (a > 0).sum(axis=1)
    for _ in range(iterations):
        above = a > s[:, None]
        inside = (a > 0) & ~above
        s = (a * above).sum(axis=1) / (c * inside.sum(axis=1) + above.sum(axis=1))
    return s


def numpy_sweep(x: np.ndarray, qmax: int, per_row: bool, points: int = 100) -> np.ndarray:
    """Appendix E.3's 100-point sweep as a plain loop: quantize, measure MSE, keep the best."""
    a = x.reshape(x.shape[0], -1) if per_row else x.reshape(1, -1)
    smax = np.abs(a).max(axis=1)
    best, best_mse = smax.copy(), np.full(a.shape[0], np.inf)
    for k in range(1, points + 1):
        s = (k / points * smax)[:, None]
        q = np.clip(np.round(a / s * qmax), -qmax, qmax) * s / qmax
        mse = ((q - a) ** 2).mean(axis=1)
        better = mse < best_mse
        best[better], best_mse[better] = s[better, 0], mse[better]
    return best


def float64_octav(x: torch.Tensor, c: float, axis: int | None) -> np.ndarray:
    """The exact fixed point of eq. (6) in float64, by octavcal's sort (``sorted_fixed_point``),
    which shares no code with the iteration timed here (every tensor here is too large to be sorted
    by ``octav`` itself)."""
    a = np.abs((x.reshape(1, -1) if axis is None else x.reshape(x.shape[0], -1)).double().numpy())
    return sorted_fixed_point(a, c)


def median_time(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(3):  # warm-up (allocator, caches, CPU clock), as Appendix F times steady state
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_times(
    ours: Callable[[], object],
    reference: Callable[[], object],
    repeat: int,
    rounds: int = 5,
    before: Callable[[], object] = lambda: None,
) -> tuple[float, float, float]:
    """Median steady-state times of ``ours`` and ``reference``, and the median of their per-round
    ratios. The two take turns in ``rounds`` rounds, each side warmed up and then called repeatedly:
    on a shared machine a slow spell then slows both sides of a round alike. ``before`` runs,
    untimed, before every timed call."""
    per_round = max(1, -(-repeat // rounds))
    ours_times: list[float] = []
    reference_times: list[float] = []
    ratios = []
    for _ in range(rounds):
        round_times = []
        for fn, times in ((ours, ours_times), (reference, reference_times)):
            fn()  # warm-up: caches and allocator in their steady state, as Appendix F times it
            mine = []
            for _ in range(per_round):
                before()
                start = time.perf_counter()
                fn()
                mine.append(time.perf_counter() - start)
            times.extend(mine)
            round_times.append(statistics.median(mine))
        ratios.append(round_times[1] / round_times[0])
    return statistics.median(ours_times), statistics.median(reference_times), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--sweep-repeat", type=int, default=3, help="rounds for the sweeps (the NumPy one takes seconds)"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="evict the CPU caches before every timed OCTAV call (both sides): tensor and scratch "
        "memory then come from RAM, as for a tensor that was produced long before",
    )
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    evict = np.ones(64 << 17)  # 64 MB, twice the last-level cache

    def evict_caches() -> None:
        evict.sum()  # reads only: the caches then hold clean lines, with nothing to write back

    grid = octavcal.Grid(args.bits, signed=True)
    gen = torch.Generator().manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, numpy {np.__version__}, bits {args.bits}, median of {args.repeat}"
        + (", caches evicted before each OCTAV call" if args.cold else "")
    )
    header = (
        f"{'tensor':30} {'octav ms':>9} {'numpy':>9} {'ratio':>6} {'iters':>5} {'rel.err':>8} "
        f"{'sweep ms':>9} {'numpy':>9} {'ratio':>6} {'p99.99 ms':>9}"
    )
    print(header)
    rows = []
    for name, shape, axis in SHAPES:
        x = torch.randn(shape, generator=gen)
        if axis is None and "probs" in name:
            x = torch.softmax(x * 3, dim=-1)
        xn = x.numpy()
        per_row = axis is not None
        t_octav, t_np_octav, octav_speedup = paired_times(
            lambda: octavcal.octav(x, args.bits, signed=True, axis=axis),
            lambda: numpy_octav(xn, grid.noise_coefficient, per_row),
            args.repeat,
            before=evict_caches if args.cold else lambda: None,
        )
        result = octavcal.octav(x, args.bits, signed=True, axis=axis, return_iterations=True)
        ref = float64_octav(x, grid.noise_coefficient, axis)
        rel_err = float(np.abs(result.amax.double().reshape(-1).numpy() / ref - 1).max())
        t_sweep, t_np_sweep, sweep_speedup = paired_times(
            lambda: octavcal.mse_sweep(x, args.bits, signed=True, axis=axis),
            lambda: numpy_sweep(xn, grid.qmax, per_row),
            args.sweep_repeat,
            rounds=args.sweep_repeat,
        )
        t_pct = median_time(lambda: octavcal.percentile(x, 99.99, axis=axis), args.repeat)
        row = {
            "tensor": name,
            "granularity": "per-channel" if per_row else "per-tensor",
            "octav_ms": t_octav * 1e3,
            "numpy_octav_ms": t_np_octav * 1e3,
            "octav_speedup": octav_speedup,
            "octav_iterations_max": int(result.iterations.max()),
            "octav_rel_err_vs_float64": rel_err,
            "sweep_ms": t_sweep * 1e3,
            "numpy_sweep_ms": t_np_sweep * 1e3,
            "sweep_speedup": sweep_speedup,
            "percentile_ms": t_pct * 1e3,
        }
        rows.append(row)
        print(
            f"{name:30} {row['octav_ms']:9.1f} {row['numpy_octav_ms']:9.1f} {row['octav_speedup']:5.1f}x "
            f"{row['octav_iterations_max']:5d} {rel_err:8.1e} {row['sweep_ms']:9.1f} "
            f"{row['numpy_sweep_ms']:9.1f} {row['sweep_speedup']:5.1f}x {row['percentile_ms']:9.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bits": args.bits, "cold": args.cold, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
