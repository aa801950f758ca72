"""Calibration, compare and evaluate over several processes (gloo on 127.0.0.1) against one process.

The ranks are real processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), one CPU thread each; the reference is the same command in this process on one thread.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from octavcal.cli import main

ROOT = Path(__file__).resolve().parent.parent
SOURCES = Path(__file__).resolve().parent / "distributed_sources.py"
CNN = ["--arch", "sample_models.digits_cnn:build", "--data", "sample_models/digits_cnn.calib.safetensors"]
TRANSFORMER = [
    "--arch",
    "sample_models.digits_transformer:build",
    "--data",
    "sample_models/digits_transformer.calib.safetensors",
]
MODELS = {
    "cnn": ["sample_models/digits_cnn.safetensors", *CNN],
    "transformer": ["sample_models/digits_transformer.safetensors", *TRANSFORMER],
}
TIMINGS = ("seconds", "speedup")


def cnn_with(arch: str = CNN[1], data: str = CNN[3]) -> list[str]:
    return [
        "sample_models/digits_cnn.safetensors",
        "--arch",
        arch,
        "--data",
        data,
    ]  # the only numbers allowed to differ between runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"} | extra


def launch(
    args: list[str], world: int, timeout: float = 120, **env: str
) -> list[subprocess.CompletedProcess]:
    """``octavcal ARGS`` in ``world`` processes, as torchrun would start them; their results by rank."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "octavcal", *args],
            cwd=ROOT,
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                **env,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def one_process(args: list[str]) -> tuple[int, str, str]:
    """The same command in this process, on one thread as the ranks are (exit code, stdout, stderr)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        old = os.getcwd()
        os.chdir(ROOT)
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("model", "world", "batches", "extra"),
    [
        ("cnn", 2, 6, []),
        ("transformer", 3, 7, ["--first-last-8bit", "--methods", "octav,sweep,p99.9,max"]),
        ("transformer", 2, 5, ["--reduction", "union"]),  # summaries added, brackets gathered
    ],
)
def test_ranks_write_the_single_process_bytes(tmp_path, model, world, batches, extra):
    args = [
        "calibrate",
        *MODELS[model],
        "--bits",
        "4",
        "--batches",
        str(batches),
        "--batch-size",
        "16",
        *extra,
    ]
    code, _, err = one_process([*args, "--quiet", "-o", str(tmp_path / "one.safetensors")])
    assert code == 0, err
    ranks = launch([*args, "-o", str(tmp_path / "many.safetensors")], world)
    assert [r.returncode for r in ranks] == [0] * world, [r.stderr for r in ranks]
    assert (tmp_path / "many.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    assert "Wrote" in ranks[0].stdout
    assert all(r.stdout == "" and "Error" not in r.stderr for r in ranks[1:])  # only rank 0 speaks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.safetensors", "one.safetensors"]


def test_torchrun_uneven_split_runs_each_batch_once_and_writes_the_same_bytes(tmp_path):
    """7 batches over 3 ranks (3, 2, 2), launched by torchrun itself; each rank counts its forwards."""
    args = ["calibrate", *cnn_with(arch=f"{SOURCES}:counting_cnn"), "--bits", "4", "--batches", "7"]
    counts = tmp_path / "counts"
    counts.mkdir()
    os.environ["OCTAVCAL_TEST_COUNTS"] = str(counts / "one")
    (counts / "one").mkdir()
    try:
        code, _, err = one_process([*args, "--quiet", "-o", str(tmp_path / "one.safetensors")])
    finally:
        del os.environ["OCTAVCAL_TEST_COUNTS"]
    assert code == 0, err
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    done = subprocess.run(
        [*torchrun, "-m", "octavcal", *args, "--quiet", "-o", str(tmp_path / "three.safetensors")],
        cwd=ROOT,
        env=_env(OCTAVCAL_TEST_COUNTS=str(counts)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "three.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    assert {p.name: int(p.read_text()) for p in counts.iterdir() if p.is_file()} == {"0": 3, "1": 2, "2": 2}


def test_a_rank_failing_late_fails_every_rank_and_nothing_is_written(tmp_path):
    """Batch 5 of 7 holds a NaN: with 3 ranks it is rank 2's second batch."""
    args = ["calibrate", *cnn_with(data=f"{SOURCES}:nan_in_batch_5"), "--bits", "4", "--quiet"]
    args += ["-o", str(tmp_path / "s.safetensors")]
    code, _, alone = one_process(args)
    assert code == 1
    message = alone.strip().removeprefix("Error: ")
    assert message.startswith("Activations of 'conv1' (input) contain NaN or Inf in batch 5")
    ranks = launch(args, 3)
    assert [r.returncode for r in ranks] == [1, 1, 1]
    for r in ranks:
        assert r.stderr.strip() == f"Error: Rank 2 of 3 failed while running batches: {message}"
        assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no scale file, no temporary


def test_a_killed_rank_makes_the_others_stop_with_a_timeout_message(tmp_path):
    args = ["calibrate", *cnn_with(data=f"{SOURCES}:rank_1_killed_at_batch_3"), "--bits", "4"]
    args += ["--dist-timeout", "5", "-o", str(tmp_path / "s.safetensors")]
    start = time.monotonic()
    ranks = launch(args, 2, timeout=60)
    assert time.monotonic() - start < 60
    assert ranks[1].returncode == -9  # SIGKILL
    assert ranks[0].returncode == 1
    assert ranks[0].stderr.startswith(
        "Error: Rank 0 of 2 stopped while running batches: another rank was killed or did not answer within "
        "the 5 s timeout ("
    )
    assert "Traceback" not in ranks[0].stderr
    assert list(tmp_path.iterdir()) == []


def _numbers(a, b, path="") -> int:
    """Assert two JSON reports agree: equal text and integers, floats within 1e-9 relative (timings
    aside); returns how many floats were compared."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return sum(_numbers(a[k], b[k], f"{path}/{k}") for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), path
        return sum(_numbers(x, y, f"{path}/{i}") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, float) and any(t in path for t in TIMINGS):
        return 0
    if isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or (math.isnan(a) and math.isnan(b)), (
            path,
            a,
            b,
        )
        return 1
    assert a == b, (path, a, b)
    return 0


def test_compare_reports_the_same_numbers_on_two_processes(tmp_path):
    args = ["compare", *MODELS["transformer"], "--bits", "4,8", "--methods", "octav,sweep,p99.99,max"]
    args += ["--batches", "5", "--heldout-batches", "3", "--batch-size", "16", "--no-plots", "--quiet"]
    code, _, err = one_process([*args, "--out", str(tmp_path / "one")])
    assert code == 0, err
    ranks = launch([*args, "--out", str(tmp_path / "two")], 2)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one["batches"] == two["batches"] == 5 and two["heldout_batches"] == 3
    assert _numbers(one, two) > 1000  # MSE, SQNR, counts and every batch's curve


def test_evaluate_reports_the_same_metrics_on_two_processes(tmp_path):
    args = ["evaluate", "sample_models/digits_cnn.safetensors", "--arch", "sample_models.digits_cnn:build"]
    args += ["--data", "sample_models/digits_cnn.heldout.safetensors", "--calib-data", CNN[3]]
    args += ["--bits", "4,8", "--methods", "octav,max", "--batches", "3", "--json"]
    code, out, err = one_process(args)
    assert code == 0, err
    ranks = launch(args, 2)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == ""
    one, two = json.loads(out), json.loads(ranks[0].stdout)
    assert len(two) == 4 and two[0]["samples"] == one[0]["samples"] > 300
    assert _numbers(one, two) >= 4 * 5
