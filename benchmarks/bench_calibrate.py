"""Whole-model calibration cost: `calibrate` against the same plain forward passes, in one process.

Two models: a BERT-base-wide encoder built from a config (4 layers, hidden 768, FFN 3072, 12 heads,
eager attention, random init, offline; batches of 8 x 128 tokens with trailing padding) and the
shipped digits transformer (its calibration batches). For each, rounds interleave, with the plain
forward passes timed again between any two jobs,

    forward   the N plain forward passes (no grad), the reference
    capture   the same passes with octavcal's capture on and nothing computed
    octav     calibrate(methods=octav)
    octav,p99.99
    all six   calibrate() with the default methods
    all six, union   the same with reduction="union" (two passes over the batches)

and report each as the median over rounds of its ratio to the forward passes timed just before and
just after it (their mean): this shared machine's speed drifts within a round. A last
run of the six methods breaks the time down: forward, capture overhead, each method (the seconds the
scale table records), and the rest (weights' and start-up bookkeeping). Peak memory: the peak
resident set of a fresh process that runs the plain passes, against one that calibrates.

    python benchmarks/bench_calibrate.py [--rounds 3] [--batches 6] [--model bert|digits|both] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import octavcal
from octavcal.calibrate import DEFAULT_METHODS, CalibrationConfig
from octavcal.collect import capture_activations
from octavcal.core import as_loaded
from octavcal.data import batches_of

RUNS = {
    "octav": ("octav",),
    "octav,p99.99": ("octav", "p99.99"),
    "all six": DEFAULT_METHODS,
}
TARGETS = {"octav": 1.25, "octav,p99.99": 1.5, "all six": 4.0}


def bert_wide(batches: int) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=768,
        num_hidden_layers=4,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=30522,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(batches):
        ids = torch.randint(1000, 30000, (8, 128), generator=g)
        lengths = torch.randint(64, 129, (8,), generator=g)
        mask = (torch.arange(128)[None, :] < lengths[:, None]).long()
        data.append({"input_ids": ids, "attention_mask": mask})
    return model, data


def digits(batches: int) -> tuple[torch.nn.Module, list[Any]]:
    from octavcal.data import plan_batches

    loaded = octavcal.load_model(
        "sample_models/digits_transformer.safetensors", arch="sample_models.digits_transformer:build"
    )
    data = octavcal.load_data("sample_models/digits_transformer.calib.safetensors")
    return loaded.module, [data.batch(i) for i in plan_batches(data.num_samples, 32, batches, seed=0)]


MODELS: dict[str, Callable[[int], tuple[torch.nn.Module, list[Any]]]] = {"bert": bert_wide, "digits": digits}


def forward(model: torch.nn.Module, data: list[Any]) -> None:
    with torch.no_grad():
        for batch in batches_of(data):
            model(*batch.args, **batch.kwargs)


def capture_only(model: torch.nn.Module, data: list[Any]) -> None:
    with capture_activations(as_loaded(model), lambda target, tensor: None) as run:
        for batch in batches_of(data):
            run(batch)


def calibrate(
    methods: tuple[str, ...], reduction: str = "mean"
) -> Callable[[torch.nn.Module, list[Any]], Any]:
    def go(model: torch.nn.Module, data: list[Any]) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = CalibrationConfig(bits=8, methods=methods, reduction=reduction)
            return octavcal.calibrate(model, data, config)

    return go


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def peak_rss(model_key: str, job: str, batches: int) -> float:
    """Peak resident memory (MB) of a fresh process that builds the model and runs ``job`` once."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", job, "--model", model_key, "--batches", str(batches)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def run_for_peak(model_key: str, job: str, batches: int) -> None:
    model, data = MODELS[model_key](batches)
    if job == "forward":
        forward(model, data)
    elif job == "none":
        pass
    else:
        calibrate(RUNS[job])(model, data)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def bench(name: str, model_key: str, model: torch.nn.Module, data: list[Any], rounds: int) -> dict[str, Any]:
    jobs: dict[str, Callable[[torch.nn.Module, list[Any]], Any]] = {"capture": capture_only}
    jobs |= {label: calibrate(methods) for label, methods in RUNS.items()}
    jobs["all six, union"] = calibrate(DEFAULT_METHODS, "union")  # two passes over the batches
    forward(model, data[:1])  # first-call costs (allocator, thread pool) are not the model's
    calibrate(("octav",))(model, data[:1])
    seconds: dict[str, list[float]] = {"forward": [], **{k: [] for k in jobs}}
    ratios: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(rounds):
        before, _ = timed(lambda: forward(model, data))
        seconds["forward"].append(before)
        for label, job in jobs.items():
            t, _ = timed(lambda job=job: job(model, data))  # type: ignore[misc]
            after, _ = timed(lambda: forward(model, data))
            seconds["forward"].append(after)
            seconds[label].append(t)
            ratios[label].append(t / ((before + after) / 2))  # the forward passes on either side
            before = after
    t_all, table = timed(lambda: calibrate(DEFAULT_METHODS)(model, data))
    per_method = {m: 0.0 for m in DEFAULT_METHODS}
    for entry in table.targets.values():
        for m, scales in entry.methods.items():
            per_method[m] += scales.seconds
    base = statistics.median(seconds["forward"])
    capture = statistics.median(seconds["capture"]) - base
    breakdown = {"forward": base, "capture": capture, **per_method}
    breakdown["rest"] = t_all - sum(breakdown.values())
    return {
        "model": name,
        "batches": len(data),
        "seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()},
        "breakdown_all_six": breakdown,
        "all_six_seconds": t_all,
        "peak_rss_mb": {job: peak_rss(model_key, job, len(data)) for job in ("forward", "all six")},
        "targets": len(table.targets),
    }


def show(row: dict[str, Any]) -> None:
    print(f"\n{row['model']}: {row['batches']} batches, {row['targets']} targets")
    print(f"forward passes: {row['seconds']['forward']:.3f} s (median)")
    print("| run | s | time / forward passes | range | target |")
    print("| --- | --- | --- | --- | --- |")
    for label, ratio in row["ratio"].items():
        lo, hi = row["ratio_range"][label]
        target = f"<= {TARGETS[label]}x" if label in TARGETS else ""
        print(f"| {label} | {row['seconds'][label]:.3f} | {ratio:.2f}x | {lo:.2f}-{hi:.2f} | {target} |")
    print(f"where the time of one all-six run goes ({row['all_six_seconds']:.3f} s):")
    print("| part | s | share |")
    print("| --- | --- | --- |")
    for part, s in row["breakdown_all_six"].items():
        print(f"| {part} | {s:.3f} | {s / row['all_six_seconds']:.0%} |")
    mem = row["peak_rss_mb"]
    print(
        f"peak RSS of a fresh process: forward passes {mem['forward']:.0f} MB, "
        f"calibrate (all six) {mem['all six']:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--model", choices=["bert", "digits", "both"], default="both")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # internal: one job in a fresh process
    args = parser.parse_args()
    if args.peak:
        run_for_peak(args.model, args.peak, args.batches)
        return
    print(
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"octavcal {octavcal.__version__}"
    )
    rows = []
    for key, title in (
        ("bert", "BERT-base-wide (4 layers, 8 x 128 tokens)"),
        ("digits", "digits transformer (batches of 32)"),
    ):
        if args.model in (key, "both"):
            rows.append(bench(title, key, *MODELS[key](args.batches), args.rounds))
            show(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
