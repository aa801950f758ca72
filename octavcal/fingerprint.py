"""A model's fingerprint: sha256 over its weights, which a scale file records to refuse other weights."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .offload import state_tensors


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter and buffer names, dtypes, shapes and bytes, in name order (weights a
    device map offloaded are read from where they rest)."""
    return _digest(state_tensors(model))


def _digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")  # no copy
    return digest.hexdigest()


def fingerprint_in_background(model: nn.Module) -> Callable[[], str]:
    """``model_fingerprint`` computed on another thread while the caller runs batches, for a model
    whose tensors all rest in CPU memory (hashing releases the GIL and reads memory the forward
    pass only reads); returns a function that waits for it. Other models are hashed when asked."""
    tensors = [(n, t) for n, t in sorted(model.state_dict().items()) if isinstance(t, torch.Tensor)]
    if not all(t.device.type == "cpu" for _, t in tensors):
        return lambda: model_fingerprint(model)
    done: list[str | BaseException] = []

    def work() -> None:
        try:
            done.append(_digest(tensors))
        except BaseException as exc:  # handed to the caller
            done.append(exc)

    thread = threading.Thread(target=work, name="octavcal-fingerprint", daemon=True)
    thread.start()

    def result() -> str:
        thread.join()
        if isinstance(done[0], BaseException):
            raise done[0]
        return done[0]

    return result
