"""Data callables for tests/test_distributed.py: real batches of the sample CNN's data, one of them bad.

Every rank calls them and reads every batch (the README's rule for --data callables).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "sample_models" / "digits_cnn.calib.safetensors"
BATCH = 16


def _batches(count: int) -> Iterator[torch.Tensor]:
    from safetensors.torch import load_file

    (images,) = load_file(DATA).values()
    for i in range(count):
        yield images[i * BATCH : (i + 1) * BATCH].clone()


def nan_in_batch_5() -> Iterator[torch.Tensor]:
    """Seven batches; batch 5 (rank 1's third of 2, rank 2's second of 3) holds one NaN pixel."""
    for i, batch in enumerate(_batches(7)):
        if i == 5:
            batch[3, 0, 2, 2] = float("nan")
        yield batch


def rank_1_killed_at_batch_3() -> Iterator[torch.Tensor]:
    """Seven batches; the process of rank 1 is killed (SIGKILL) when it reaches batch 3."""
    for i, batch in enumerate(_batches(7)):
        if i == 3 and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch


def counting_cnn() -> torch.nn.Module:
    """The sample CNN, writing how many forward passes its process ran to $OCTAVCAL_TEST_COUNTS/RANK
    when the process exits."""
    import atexit

    from sample_models.digits_cnn import build

    model = build()
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    folder = Path(os.environ["OCTAVCAL_TEST_COUNTS"])
    atexit.register(lambda: (folder / os.environ.get("RANK", "0")).write_text(str(calls[0])))
    return model
