"""Start-up of the command line against a bare Python start and torch's import, in the same run.

    python benchmarks/bench_startup.py [--runs 7]

Each figure is the median wall time of a fresh process (one unmeasured run of each first, so that
every one finds the files in the page cache). ``--help`` imports click and octavcal's command line,
never torch: its ratio to a bare ``python -c pass`` is what this measures.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def console_script() -> list[str]:
    """The installed ``octavcal`` beside this Python, else the same entry point through -c."""
    found = shutil.which("octavcal", path=str(Path(sys.executable).parent))
    if found:
        return [found]
    return [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'octavcal'; from octavcal.cli import main; main()",
    ]


CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import octavcal'": [sys.executable, "-c", "import octavcal"],
    "python -m octavcal --help": [sys.executable, "-m", "octavcal", "--help"],
    "octavcal calibrate --help": [*console_script(), "calibrate", "--help"],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    for command in CASES.values():
        wall_time(command)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.runs):  # interleaved, so that a busy moment of the machine hits every case
        for name, command in CASES.items():
            times[name].append(wall_time(command))
    median = {name: statistics.median(t) for name, t in times.items()}

    bare = median["python -c pass"]
    print(f"median of {args.runs} runs, Python {sys.version.split()[0]}")
    print(f"{'command':<30} {'seconds':>8} {'x bare python':>14}")
    for name, seconds in median.items():
        print(f"{name:<30} {seconds:>8.3f} {seconds / bare:>14.1f}")
    help_, torch = median["python -m octavcal --help"], median["python -c 'import torch'"]
    print(f"\n--help: {help_ / bare:.1f}x a bare Python start ({help_ / torch:.2f}x importing torch)")


if __name__ == "__main__":
    main()
