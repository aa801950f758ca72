"""A model's fingerprint: sha256 over its weights, which a scale file records to refuse other weights."""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import spare
from .offload import state_tensors


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter and buffer names, dtypes, shapes and bytes, in name order (weights a
    device map offloaded are read from where they rest)."""
    return _digest(state_tensors(model))


def _digest(tensors: Iterable[tuple[str, torch.Tensor]], wait: Callable[[], object] = lambda: None) -> str:
    """sha256 of ``tensors``; ``wait()`` runs before each chunk of their bytes."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")  # no copy
        for start in range(0, len(data), _CHUNK):
            wait()
            digest.update(data[start : start + _CHUNK])
    return digest.hexdigest()


# Bytes hashed between two looks at the gate (``spare.gate``): 0.17 ms of sha256 here, the longest
# the hash can overlap a forward pass that has taken the core back. Smaller chunks cost more: each
# one takes the GIL from the statistics twice (64 KB chunks cost them about 0.06 s on a 200 MB model).
_CHUNK = 1 << 18
# How often a hash waiting at its gate looks whether its caller has gone.
_DROPPED_POLL_S = 0.1


class _Dropped(Exception):
    """The caller will not ask for the fingerprint."""


def _drop(dropped: list[bool]) -> None:
    dropped[0] = True


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fingerprint_in_background(model: nn.Module) -> Callable[[], str]:
    """``model_fingerprint`` computed on another thread while the caller runs batches, for a model
    whose tensors all rest in CPU memory (hashing releases the GIL and reads memory the forward
    pass only reads); returns a function that waits for it. Other models are hashed when asked.

    When torch uses every core, the thread hashes only while a core is spare (``spare.py``): on 2 cores,
    hashing beside the forward pass slowed it by about 5% (a 200 MB model; measured here).
    """
    tensors = [(n, t) for n, t in sorted(model.state_dict().items()) if isinstance(t, torch.Tensor)]
    if not all(t.device.type == "cpu" for _, t in tensors):
        return lambda: model_fingerprint(model)
    tensors = [(n, t.contiguous()) for n, t in tensors]  # any copy made here, not beside the forward
    done: list[str | BaseException] = []
    dropped = [False]  # a plain flag: the finalizer below must take no lock
    if torch.get_num_threads() >= _cores():
        gate = spare.gate()
    else:  # torch leaves a core to spare all along
        gate = threading.Event()
        gate.set()

    def wait() -> None:
        while not dropped[0] and not gate.wait(_DROPPED_POLL_S):
            pass
        if dropped[0]:
            raise _Dropped

    def work() -> None:
        try:
            done.append(_digest(tensors, wait))
        except _Dropped:
            pass
        except BaseException as exc:  # handed to the caller
            done.append(exc)
        finally:
            spare.drop_gate(gate)

    thread = threading.Thread(target=work, name="octavcal-fingerprint", daemon=True)
    thread.start()

    def result() -> str:
        spare.drop_gate(gate)
        gate.set()  # whatever is left is hashed now
        thread.join()
        if isinstance(done[0], BaseException):
            raise done[0]
        return done[0]

    # A caller that never asks (its calibration failed) does not leave the thread waiting. The
    # finalizer takes no lock, not even an Event's: the garbage collector may run it while
    # ``spare_core`` holds its own lock and that Event's.
    weakref.finalize(result, _drop, dropped)
    return result
