"""Distributed calibration: 1 process against 2 (gloo on 127.0.0.1, one thread each), same batches.

The model is bench_calibrate.py's BERT-base-wide encoder (4 layers, hidden 768, FFN 3072, 12 heads, eager
attention, built from a config, random init; batches of 8 x 128 tokens with trailing padding). Each
process builds it, calibrates with the default six methods, and reports its wall time, the time spent
inside the status exchanges and the final gather (``all_gather_object``: waiting for the slowest rank
plus the transfer), and the bytes of the scale file it would write. The speed-up is the one-process
time over the slowest rank's time; the files must be byte-identical.

    python benchmarks/bench_distributed.py [--batches 8] [--rounds 2] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(batches: int, out: str) -> None:
    """One rank (or the single process): calibrate, time it, and write the timings as JSON to ``out``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_calibrate import bert_wide

    import octavcal
    from octavcal.calibrate import CalibrationConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    model, data = bert_wide(batches)
    waits: list[float] = []
    gather = dist.all_gather_object

    def timed_gather(*args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        gather(*args, **kwargs)  # type: ignore[arg-type]
        waits.append(time.perf_counter() - start)

    dist.all_gather_object = timed_gather  # type: ignore[assignment]
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = octavcal.calibrate(model, data, CalibrationConfig(bits=8))
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        octavcal.save_scales(table, Path(tmp) / "s.safetensors")
        digest = hashlib.sha256((Path(tmp) / "s.safetensors").read_bytes()).hexdigest()
    Path(out).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "exchanges": sum(waits[:-1]),
                "final_gather": waits[-1] if waits else 0.0,
                "count": len(waits),
                "sha256": digest,
            }
        )
    )
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, batches: int) -> list[dict[str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = os.environ | {
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
            }
            cmd = [sys.executable, __file__, "--worker", f"{tmp}/{rank}.json", "--batches", str(batches)]
            procs.append(subprocess.Popen(cmd, env=env))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a rank failed with exit code {p.returncode}")
        return [json.loads(Path(f"{tmp}/{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.batches, args.worker)
        return
    rounds = []
    for _ in range(args.rounds):  # 1 and 2 processes take turns
        one = launch(1, args.batches)[0]
        two = launch(2, args.batches)
        if {r["sha256"] for r in two} != {one["sha256"]}:
            raise SystemExit("the two-process scale file differs from the one-process file")
        slowest = max(r["seconds"] for r in two)
        rounds.append(
            {
                "one_s": one["seconds"],
                "two_s": slowest,
                "speedup": one["seconds"] / slowest,
                "exchange_s": [r["exchanges"] for r in two],
                "final_gather_s": [r["final_gather"] for r in two],
                "exchanges": two[0]["count"],
            }
        )
    print(f"BERT-base-wide, {args.batches} batches of 8 x 128, six methods, one thread per process")
    print("round | 1 process s | 2 processes s | speed-up | rank 0/1 in exchanges s | final gather s")
    for i, r in enumerate(rounds):
        ex = "/".join(f"{v:.2f}" for v in r["exchange_s"])
        fg = "/".join(f"{v:.2f}" for v in r["final_gather_s"])
        print(f"{i} | {r['one_s']:.1f} | {r['two_s']:.1f} | {r['speedup']:.2f}x | {ex} | {fg}")
    median = statistics.median(r["speedup"] for r in rounds)
    print(f"median speed-up {median:.2f}x over {len(rounds)} rounds; files byte-identical")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median_speedup": median}, indent=2))


if __name__ == "__main__":
    main()
