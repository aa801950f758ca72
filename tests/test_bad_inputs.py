"""The published list of bad inputs (docs/bad-inputs.md): every row is a case here.

Each case prepares its files in tmp_path and runs one command. It must exit with the stated code, print
exactly the stated ``Error: ...`` line on stderr (nothing on stdout, no traceback), and write nothing:
tmp_path holds the same files with the same bytes afterwards (no output, no hidden temporary) and
sample_models/ is untouched. Cases that need a monkeypatch or a subprocess are separate tests below,
listed in ``SPECIAL``. ``test_the_doc_lists_every_case`` keeps the doc and the cases in step.

Expected messages use placeholders: ``{tmp}`` (tmp_path; ``W`` in the doc), ``{samples}``
(sample_models/; ``S``), ``{hash}`` (12 hex digits of a fingerprint) and ``{any}`` (third-party wording
that may vary, e.g. PyTorch's or numpy's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from octavcal.cli import main
from octavcal.errors import OctavcalError

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DOC = ROOT / "docs" / "bad-inputs.md"

CNN = SAMPLES / "digits_cnn.safetensors"
CNN_ARCH = "sample_models.digits_cnn:build"
CNN_DATA = SAMPLES / "digits_cnn.calib.safetensors"
CNN_HELDOUT = SAMPLES / "digits_cnn.heldout.safetensors"
TRANSFORMER = SAMPLES / "digits_transformer.safetensors"
TRANSFORMER_SDPA = "sample_models.digits_transformer:build_sdpa"
TRANSFORMER_HELDOUT = SAMPLES / "digits_transformer.heldout.safetensors"
FAST = ["--batches", "1", "--batch-size", "16", "--methods", "max"]
JUNK = b"\x00not a checkpoint\n" * 20

PICKLE_REFUSED = (
    "is a pickle that holds more than tensors (probably a whole nn.Module), and loading it would run code "
    "from the file. Load it only if you trust its source, by allowing pickles (--allow-pickle); or save a "
    "state_dict, a torch.export program or TorchScript instead."
)
NOT_A_MODEL = (
    "Expected a state_dict, a pickled nn.Module, TorchScript, a torch.export .pt2 or a safetensors file."
)
OTHER_WEIGHTS = (
    "was computed for other model weights (fingerprint {hash}..., this model {hash}...). "
    "Calibrate this model, or pass its own scale file."
)

LSTM_ARCH = """
from torch import nn


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(self.proj(x))
        return self.out(h[:, -1])


def build():
    return WithLSTM()
"""

DATA_CALLABLES = """
import torch


def broken():
    raise RuntimeError("database offline")


def number():
    return 3.5


def flaky():
    yield torch.rand(16, 1, 8, 8)
    raise OSError("connection reset")


def words():
    return ["one", "two"]


def nothing():
    return []
"""

BAD_ARCHITECTURES = """
def build():
    raise ValueError("unknown depth 7")


def config():
    return "resnet18"
"""


# ---------------------------------------------------------------------------------------------
# Preparing a case's files


class Ctx:
    """A case's working folder (tmp_path) and the calibrated scale files shared by the module."""

    def __init__(self, tmp: Path, scales: dict[str, Path]) -> None:
        self.tmp, self._scales = tmp, scales

    def __truediv__(self, name: str) -> Path:
        return self.tmp / name

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tensors(self, name: str, **tensors: torch.Tensor) -> Path:
        save_file(tensors, self.tmp / name)
        return self.tmp / name

    def torch_save(self, name: str, obj: Any) -> Path:
        torch.save(obj, self.tmp / name)
        return self.tmp / name

    def copy(self, source: Path, name: str) -> Path:
        shutil.copyfile(source, self.tmp / name)
        return self.tmp / name

    def scales(self, which: str, name: str | None = None) -> Path:
        """A copy of a module-calibrated scale file: 'cnn8', 'cnn4' or 'transformer8' (max only)."""
        return self.copy(self._scales[which], name or f"{which}.safetensors")

    def edited_scales(
        self,
        name: str,
        tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
        meta: Callable[[str], str] | None = None,
    ) -> Path:
        """The 8-bit CNN scale file with its tensors or its metadata text edited."""
        with safe_open(str(self._scales["cnn8"]), framework="pt") as f:
            header = f.metadata()
            found = {k: f.get_tensor(k) for k in f.keys()}
        if tensors is not None:
            tensors(found)
        if meta is not None:
            header = {"octavcal": meta(header["octavcal"])}
        save_file(found, self.tmp / name, metadata=header)
        return self.tmp / name

    def link(self, name: str, target: Path) -> Path:
        os.symlink(target, self.tmp / name)
        return self.tmp / name

    def under_a_file(self, rest: str) -> Path:
        """A path below W/file, which is a file."""
        return self.write("file", "x") / rest

    def beside_a_folder(self, name: str, suffix: str) -> Path:
        """W/name, where W/name + suffix (a file the command would also write) is a folder."""
        self.folder(name + suffix)
        return self.tmp / name

    def cnn_data(self, name: str, edit: Callable[[torch.Tensor], None]) -> Path:
        x = load_file(str(CNN_DATA))["x"].clone()
        edit(x)
        return self.tensors(name, x=x)


def calibrate(
    c: Ctx, *extra: Any, model: Any = CNN, arch: str | None = CNN_ARCH, data: Any = CNN_DATA
) -> list:
    out = [] if "-o" in extra else ["-o", c / "o.safetensors"]
    return ["calibrate", model, *(["--arch", arch] if arch else []), "--data", data, *FAST, *out, *extra]


def compare(c: Ctx, *extra: Any, model: Any = CNN, data: Any = CNN_DATA) -> list:
    out = [] if "--out" in extra else ["--out", c / "report"]
    return ["compare", model, "--arch", CNN_ARCH, "--data", data, *FAST, "--heldout-batches", "1",
            "--no-plots", *out, *extra]  # fmt: skip


def evaluate(c: Ctx, *extra: Any, model: Any = CNN, data: Any = CNN_HELDOUT, scales: Any = None) -> list:
    scales = ["--scales", scales or c.scales("cnn8")] if "--calib-data" not in extra else []
    return ["evaluate", model, "--arch", CNN_ARCH, "--data", data, *scales, *extra]


def export(
    c: Ctx, kind: str, *extra: Any, model: Any = CNN, data: Any = CNN_DATA, scales: Any = None
) -> list:
    out = [] if "-o" in extra else ["-o", c / ("m.qdq.onnx" if kind == "onnx" else "m.cache")]
    scales = scales or c.scales("cnn8")
    return ["export", kind, model, "--arch", CNN_ARCH, "--scales", scales, "--method", "max", "--data", data,
            *out, *extra]  # fmt: skip


def arch_file(c: Ctx) -> Path:
    return c.write("arch.py", BAD_ARCHITECTURES)


def data_callable(c: Ctx, name: str) -> str:
    return f"{c.write('batches.py', DATA_CALLABLES)}:{name}"


def lstm_model(c: Ctx) -> list:
    arch = c.write("lstm_arch.py", LSTM_ARCH)
    torch.manual_seed(0)
    save_file(runpy.run_path(str(arch))["build"]().state_dict(), c / "lstm.safetensors")
    data = c.tensors("x.safetensors", x=torch.randn(32, 4, 6))
    return calibrate(c, "--strict", model=c / "lstm.safetensors", arch=f"{arch}:build", data=data)


def pickled_module_of_a_gone_class(c: Ctx) -> Path:
    """A pickled nn.Module whose class lives in a module that no longer exists."""
    module = types.ModuleType("octavcal_gone_module")
    net = type("Net", (torch.nn.Linear,), {"__module__": module.__name__})
    module.Net = net  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        return c.torch_save("module.pt", net(2, 2))
    finally:
        del sys.modules[module.__name__]


def _object_npy() -> bytes:
    """An .npy file of Python objects: numpy refuses it without allow_pickle (and advises it)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def heldout_with_nan(c: Ctx) -> Path:
    """The CNN's held-out data (with labels) with one NaN pixel in its first sample."""
    heldout = load_file(str(CNN_HELDOUT))
    heldout["x"][0, 0, 1, 1] = float("nan")
    return c.tensors("heldout.safetensors", **heldout)


def nan_weight_model(c: Ctx) -> Path:
    state = load_file(str(CNN))
    state["fc1.weight"][0, 0] = float("nan")
    return c.tensors("nan_weight.safetensors", **state)


def set_amax(target: str, value: float, channel: int | None = None) -> Callable[[dict], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        if channel is None:
            tensors[f"{target}/max"] = torch.tensor(value)
        else:
            tensors[f"{target}/max"][channel] = value

    return edit


def edit_meta(**fields: Any) -> Callable[[str], str]:
    """Set top-level fields of the metadata JSON."""

    def edit(text: str) -> str:
        return json.dumps(json.loads(text) | fields)

    return edit


def target_bits(target: str, bits: int) -> Callable[[str], str]:
    """Give one target of the metadata another bit width."""

    def edit(text: str) -> str:
        meta = json.loads(text)
        meta["targets"][target]["bits"] = bits
        return json.dumps(meta)

    return edit


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # the doc's "class" column
    prepare: Callable[[Ctx], list]  # writes the case's files, returns the command line after `octavcal`
    message: str  # the expected stderr line (Error: ...), with placeholders
    exit: int = 1
    written: str = "nothing"  # the doc's "nothing written" column


CASES = [
    # --- model files
    Case("model-missing-calibrate", "model file",
         lambda c: calibrate(c, model=c / "missing.safetensors"),
         "Error: Model file '{tmp}/missing.safetensors' does not exist."),
    Case("model-missing-compare", "model file",
         lambda c: compare(c, model=c / "missing.safetensors"),
         "Error: Model file '{tmp}/missing.safetensors' does not exist."),
    Case("model-missing-evaluate", "model file",
         lambda c: evaluate(c, model=c / "missing.safetensors"),
         "Error: Model file '{tmp}/missing.safetensors' does not exist."),
    Case("model-missing-export-onnx", "model file",
         lambda c: export(c, "onnx", model=c / "missing.safetensors"),
         "Error: Model file '{tmp}/missing.safetensors' does not exist."),
    Case("model-missing-export-trt", "model file",
         lambda c: export(c, "trt-cache", model=c / "missing.safetensors"),
         "Error: Model file '{tmp}/missing.safetensors' does not exist."),
    Case("model-folder-without-config", "model file",
         lambda c: calibrate(c, model=c.folder("model")),
         "Error: Model folder '{tmp}/model' has no config.json; expected a Hugging Face model folder."),
    Case("model-junk-pt", "model file",
         lambda c: calibrate(c, model=c.write("junk.pt", JUNK)),
         "Error: Model file '{tmp}/junk.pt' is not a PyTorch checkpoint: {any}."),
    Case("model-junk-safetensors", "model file",
         lambda c: calibrate(c, model=c.write("junk.safetensors", JUNK)),
         "Error: Model file '{tmp}/junk.safetensors' is not a readable safetensors file: {any}."),
    Case("model-holds-a-list", "model file",
         lambda c: calibrate(c, model=c.torch_save("list.pt", [torch.zeros(2)])),
         f"Error: Model file '{{tmp}}/list.pt' holds a list, not a state_dict or an nn.Module. {NOT_A_MODEL}"),
    Case("state-dict-without-arch", "model file",
         lambda c: calibrate(c, arch=None),
         "Error: Model file '{samples}/digits_cnn.safetensors' holds only weights (a state_dict); name the "
         "architecture that builds the module, as package.module:callable."),
    Case("state-dict-pt-without-arch", "model file",
         lambda c: calibrate(c, model=c.torch_save("sd.pt", load_file(str(CNN))), arch=None),
         "Error: Model file '{tmp}/sd.pt' holds only weights (a state_dict); name the architecture that "
         "builds the module, as package.module:callable."),
    Case("pickled-module-calibrate", "model file",
         lambda c: calibrate(c, model=c.torch_save("module.pt", torch.nn.Linear(2, 2)), arch=None),
         f"Error: Model file '{{tmp}}/module.pt' {PICKLE_REFUSED}"),
    Case("pickled-module-export-trt", "model file",
         lambda c: export(c, "trt-cache", model=c.torch_save("module.pt", torch.nn.Linear(2, 2))),
         f"Error: Model file '{{tmp}}/module.pt' {PICKLE_REFUSED}"),
    Case("pickled-module-class-gone", "model file",
         lambda c: calibrate(c, "--allow-pickle", model=pickled_module_of_a_gone_class(c), arch=None),
         "Error: Model file '{tmp}/module.pt' could not be unpickled: ModuleNotFoundError: No module named "
         "'octavcal_gone_module'."),
    Case("weights-do-not-fit-arch", "model file",
         lambda c: calibrate(c, arch="sample_models.digits_transformer:build"),
         "Error: The weights in '{samples}/digits_cnn.safetensors' do not fit the architecture "
         "'sample_models.digits_transformer:build': missing ['position', 'embed.weight', 'embed.bias', "
         "'layers.0.attention.query.weight', 'layers.0.attention.query.bias'], unexpected ['conv1.bias', "
         "'conv1.weight', 'conv2.bias', 'conv2.weight', 'fc1.bias']."),
    # --- architectures (user code)
    Case("arch-not-a-spec", "architecture",
         lambda c: calibrate(c, arch="build_cnn"),
         "Error: The architecture 'build_cnn' is not of the form package.module:callable or file.py:callable."),
    Case("arch-module-not-found", "architecture",
         lambda c: calibrate(c, arch="no_such_package_octavcal:build"),
         "Error: Could not import the architecture module 'no_such_package_octavcal': ModuleNotFoundError: "
         "No module named 'no_such_package_octavcal'."),
    Case("arch-no-such-callable", "architecture",
         lambda c: calibrate(c, arch="sample_models.digits_cnn:no_such_builder"),
         "Error: The architecture 'sample_models.digits_cnn:no_such_builder': module 'sample_models.digits_cnn' "
         "has no callable named 'no_such_builder'."),
    Case("arch-file-missing", "architecture",
         lambda c: calibrate(c, arch=f"{c / 'missing_arch.py'}:build"),
         "Error: The architecture file '{tmp}/missing_arch.py' does not exist."),
    Case("arch-file-fails-to-import", "architecture",
         lambda c: calibrate(c, arch=f"{c.write('arch.py', 'import no_such_dependency_octavcal')}:build"),
         "Error: Could not import the architecture module '{tmp}/arch.py': ModuleNotFoundError: No module "
         "named 'no_such_dependency_octavcal'."),
    Case("arch-raises", "architecture",
         lambda c: calibrate(c, arch=f"{arch_file(c)}:build"),
         "Error: The architecture '{tmp}/arch.py:build' raised ValueError: unknown depth 7"),
    Case("arch-returns-no-module", "architecture",
         lambda c: calibrate(c, arch=f"{arch_file(c)}:config"),
         "Error: The architecture '{tmp}/arch.py:config' returned a str, not an nn.Module."),
    # --- data files
    Case("data-missing-calibrate", "data file",
         lambda c: calibrate(c, data=c / "missing.safetensors"),
         "Error: Data file '{tmp}/missing.safetensors' does not exist."),
    Case("heldout-data-missing-compare", "data file",
         lambda c: compare(c, "--heldout-data", c / "missing.safetensors"),
         "Error: Data file '{tmp}/missing.safetensors' does not exist."),
    Case("data-missing-evaluate", "data file",
         lambda c: evaluate(c, data=c / "missing.safetensors"),
         "Error: Data file '{tmp}/missing.safetensors' does not exist."),
    Case("data-missing-export-onnx", "data file",
         lambda c: export(c, "onnx", data=c / "missing.safetensors"),
         "Error: Data file '{tmp}/missing.safetensors' does not exist."),
    Case("data-is-a-directory", "data file",
         lambda c: calibrate(c, data=c.folder("data")),
         "Error: Data file '{tmp}/data' is a directory, not a tensor file."),
    Case("data-dict-of-non-tensors", "data file",
         lambda c: calibrate(c, data=c.torch_save("lists.pt", {"x": [1, 2, 3]})),
         "Error: Data file '{tmp}/lists.pt' holds a dict; expected a tensor or a dict of tensors."),
    Case("data-pickled-object", "data file",
         lambda c: calibrate(c, data=c.torch_save("module.pt", torch.nn.Linear(2, 2))),
         "Error: Data file '{tmp}/module.pt' holds more than tensors; calibration data loads weights-only."),
    Case("data-junk-pt", "data file",
         lambda c: calibrate(c, data=c.write("junk.pt", JUNK)),
         "Error: Data file '{tmp}/junk.pt' could not be read as tensors: {any}."),
    Case("data-junk-safetensors", "data file",
         lambda c: calibrate(c, data=c.write("junk.safetensors", JUNK)),
         "Error: Data file '{tmp}/junk.safetensors' is not a readable safetensors file: {any}."),
    Case("data-sample-counts-differ", "data file",
         lambda c: calibrate(c, data=c.tensors("counts.safetensors", x=torch.rand(64, 1, 8, 8),
                                                 mask=torch.ones(32, 4))),
         "Error: Data file '{tmp}/counts.safetensors': every tensor needs the same number of samples in its "
         "first dimension; got {'mask': 32, 'x': 64}."),
    Case("labels-count-differs", "data file",
         lambda c: evaluate(c, "--labels", c.tensors("labels.safetensors", y=torch.zeros(3))),
         "Error: Labels file '{tmp}/labels.safetensors' must hold one label per sample of "
         "'{samples}/digits_cnn.heldout.safetensors'."),
    # --- data that does not fit the model
    Case("data-without-channel-dim", "data fit",
         lambda c: calibrate(c, data=c.tensors("rows.safetensors", x=torch.rand(64, 8, 8))),
         "Error: Layer 'conv1' (Conv2d) expects inputs of shape (N, 1, ..., ...); got (16, 8, 8)."),
    Case("data-wrong-channels", "data fit",
         lambda c: calibrate(c, data=c.tensors("rgb.safetensors", x=torch.rand(64, 3, 8, 8))),
         "Error: Layer 'conv1' (Conv2d) expects inputs of shape (N, 1, ..., ...); got (16, 3, 8, 8)."),
    Case("data-wrong-image-size", "data fit",
         lambda c: calibrate(c, data=c.tensors("small.safetensors", x=torch.rand(64, 1, 6, 6))),
         "Error: Layer 'fc1' (Linear) expects inputs of shape (..., 512); got (16, 288)."),
    Case("data-wrong-channels-evaluate", "data fit",
         lambda c: evaluate(c, data=c.tensors("rgb.safetensors", x=torch.rand(40, 3, 8, 8))),
         "Error: Layer 'conv1' (Conv2d) expects inputs of shape (N, 1, ..., ...); got (40, 3, 8, 8)."),
    Case("data-wrong-channels-export-onnx", "data fit",
         lambda c: export(c, "onnx", data=c.tensors("rgb.safetensors", x=torch.rand(8, 3, 8, 8))),
         "Error: Layer 'conv1' (Conv2d) expects inputs of shape (N, 1, ..., ...); got (2, 3, 8, 8)."),
    # --- data callables (user code)
    Case("data-callable-raises", "data callable",
         lambda c: calibrate(c, data=data_callable(c, "broken")),
         "Error: The data callable '{tmp}/batches.py:broken' raised RuntimeError: database offline"),
    Case("data-callable-not-iterable", "data callable",
         lambda c: calibrate(c, data=data_callable(c, "number")),
         "Error: The data callable '{tmp}/batches.py:number' returned a float, not an iterable of batches."),
    Case("data-callable-fails-midway", "data callable",
         lambda c: calibrate(c, "--batches", "2", data=data_callable(c, "flaky")),
         "Error: The data callable '{tmp}/batches.py:flaky' raised OSError while giving batch 1: "
         "connection reset"),
    Case("data-callable-bad-item", "data callable",
         lambda c: calibrate(c, data=data_callable(c, "words")),
         "Error: batch 0 of '{tmp}/batches.py:words' is a str; expected a tensor, a dict or a tuple of tensors."),
    Case("data-callable-empty", "data callable",
         lambda c: calibrate(c, data=data_callable(c, "nothing")),
         "Error: No calibration batches were given."),
    Case("data-callable-missing", "data callable",
         lambda c: calibrate(c, data=data_callable(c, "no_such_loader")),
         "Error: The data callable '{tmp}/batches.py:no_such_loader': module '{tmp}/batches.py' has no "
         "callable named 'no_such_loader'."),
    # --- outputs: refused before any work (the data file given does not even exist)
    Case("out-is-the-model", "output",
         lambda c: calibrate(c, "-o", c / "m.safetensors", model=c.copy(CNN, "m.safetensors"),
                             data=c / "missing.safetensors"),
         "Error: Output '{tmp}/m.safetensors' is the input file '{tmp}/m.safetensors'; writing it would "
         "destroy the input.", written="nothing; the checkpoint's bytes are unchanged"),
    Case("out-is-the-model-via-symlink", "output",
         lambda c: calibrate(c, "-o", c.link("link.safetensors", c.copy(CNN, "m.safetensors")),
                             model=c / "m.safetensors", data=c / "missing.safetensors"),
         "Error: Output '{tmp}/link.safetensors' is the input file '{tmp}/m.safetensors'; writing it would "
         "destroy the input.", written="nothing; the checkpoint's bytes are unchanged"),
    Case("out-is-the-data", "output",
         lambda c: calibrate(c, "-o", c / "d.safetensors", data=c.copy(CNN_DATA, "d.safetensors")),
         "Error: Output '{tmp}/d.safetensors' is the input file '{tmp}/d.safetensors'; writing it would "
         "destroy the input.", written="nothing; the data file's bytes are unchanged"),
    Case("out-is-a-directory", "output",
         lambda c: calibrate(c, "-o", c.folder("out"), data=c / "missing.safetensors"),
         "Error: Output '{tmp}/out' is a directory; give a file name."),
    Case("out-under-a-file", "output",
         lambda c: calibrate(c, "-o", c.under_a_file("sub/o.safetensors"),
                             data=c / "missing.safetensors"),
         "Error: Output '{tmp}/file/sub/o.safetensors' cannot be written: '{tmp}/file' is a file, not a "
         "folder."),
    Case("out-is-the-model-export-onnx", "output",
         lambda c: export(c, "onnx", "-o", c / "m.safetensors", model=c.copy(CNN, "m.safetensors"),
                          data=c / "missing.safetensors"),
         "Error: Output '{tmp}/m.safetensors' is the input file '{tmp}/m.safetensors'; writing it would "
         "destroy the input.", written="nothing; the checkpoint's bytes are unchanged"),
    Case("out-is-the-scales-export-trt", "output",
         lambda c: export(c, "trt-cache", "-o", c / "s.safetensors", scales=c.scales("cnn8", "s.safetensors"),
                          data=c / "missing.safetensors"),
         "Error: Output '{tmp}/s.safetensors' is the input file '{tmp}/s.safetensors'; writing it would "
         "destroy the input.", written="nothing; the scale file's bytes are unchanged"),
    Case("onnx-is-the-model-export-trt", "output",
         lambda c: export(c, "trt-cache", "--onnx", c / "m.safetensors", model=c.copy(CNN, "m.safetensors"),
                          data=c / "missing.safetensors"),
         "Error: Output '{tmp}/m.safetensors' is the input file '{tmp}/m.safetensors'; writing it would "
         "destroy the input.", written="nothing; the checkpoint's bytes are unchanged"),
    Case("out-is-a-directory-export-trt", "output",
         lambda c: export(c, "trt-cache", "-o", c.folder("cache"), data=c / "missing.safetensors"),
         "Error: Output '{tmp}/cache' is a directory; give a file name."),
    Case("out-mapping-is-a-directory-export-onnx", "output",
         lambda c: export(c, "onnx", "-o", c.beside_a_folder("m.qdq.onnx", ".json"),
                          data=c / "missing.safetensors"),
         "Error: Output '{tmp}/m.qdq.onnx.json' is a directory; give a file name."),
    Case("same-paths-export-trt", "output",
         lambda c: export(c, "trt-cache", "-o", c / "m.onnx"),
         "Error: Invalid value for --onnx: the cache and the float ONNX model need different paths", exit=2),
    Case("out-is-a-file-compare", "output",
         lambda c: compare(c, "--out", c.write("report", "x"), data=c / "missing.safetensors"),
         "Error: Output folder '{tmp}/report' is a file, not a folder."),
    Case("out-under-a-file-compare", "output",
         lambda c: compare(c, "--out", c.under_a_file("report"),
                           data=c / "missing.safetensors"),
         "Error: Output folder '{tmp}/file/report' cannot be created: '{tmp}/file' is a file, not a folder."),
    Case("out-is-a-file-evaluate", "output",
         lambda c: evaluate(c, "--out", c.write("ev", "x"), data=c / "missing.safetensors"),
         "Error: Output folder '{tmp}/ev' is a file, not a folder."),
    Case("out-under-a-file-evaluate", "output",
         lambda c: evaluate(c, "--out", c.under_a_file("ev"),
                            data=c / "missing.safetensors"),
         "Error: Output folder '{tmp}/file/ev' cannot be created: '{tmp}/file' is a file, not a folder."),
    # --- scale files
    Case("scales-missing-inspect", "scale file",
         lambda c: ["inspect", c / "missing.safetensors"],
         "Error: Scale file '{tmp}/missing.safetensors' does not exist."),
    Case("scales-missing-evaluate", "scale file",
         lambda c: evaluate(c, scales=c / "missing.safetensors"),
         "Error: Scale file '{tmp}/missing.safetensors' does not exist."),
    Case("scales-missing-compare", "scale file",
         lambda c: compare(c, "--scales", c / "missing.safetensors"),
         "Error: Scale file '{tmp}/missing.safetensors' does not exist."),
    Case("scales-missing-export-onnx", "scale file",
         lambda c: export(c, "onnx", scales=c / "missing.safetensors"),
         "Error: Scale file '{tmp}/missing.safetensors' does not exist."),
    Case("scales-directory-inspect", "scale file",
         lambda c: ["inspect", c.folder("scales")],
         "Error: Scale file '{tmp}/scales' is a directory, not a file."),
    Case("scales-directory-export-trt", "scale file",
         lambda c: export(c, "trt-cache", scales=c.folder("scales")),
         "Error: Scale file '{tmp}/scales' is a directory, not a file."),
    Case("scales-not-octavcal", "scale file",
         lambda c: ["inspect", CNN],
         "Error: Scale file '{samples}/digits_cnn.safetensors' has no octavcal metadata; it was not written "
         "by octavcal."),
    Case("scales-junk", "scale file",
         lambda c: ["inspect", c.write("junk.safetensors", JUNK)],
         "Error: Scale file '{tmp}/junk.safetensors' is not a readable safetensors file: {any}."),
    Case("scales-other-model-export-onnx", "scale file",
         lambda c: export(c, "onnx", scales=c.scales("transformer8")),
         f"Error: Scale file '{{tmp}}/transformer8.safetensors' {OTHER_WEIGHTS}"),
    Case("scales-other-model-export-trt", "scale file",
         lambda c: export(c, "trt-cache", scales=c.scales("transformer8")),
         f"Error: Scale file '{{tmp}}/transformer8.safetensors' {OTHER_WEIGHTS}"),
    Case("scales-other-model-evaluate", "scale file",
         lambda c: evaluate(c, scales=c.scales("transformer8")),
         f"Error: Scale file '{{tmp}}/transformer8.safetensors' {OTHER_WEIGHTS}"),
    Case("scales-other-model-compare", "scale file",
         lambda c: compare(c, "--scales", c.scales("transformer8")),
         f"Error: Scale file '{{tmp}}/transformer8.safetensors' {OTHER_WEIGHTS}"),
    Case("scales-other-attention-evaluate", "scale file",
         lambda c: ["evaluate", TRANSFORMER, "--arch", TRANSFORMER_SDPA, "--data", TRANSFORMER_HELDOUT,
                    "--scales", c.scales("transformer8")],
         "Error: Scale file '{tmp}/transformer8.safetensors' does not fit this model's targets (8 only in the "
         "file, 6 only in the model; first: the file has 'layers.0.attention:matmul0.lhs', which this model "
         "does not compute). Calibrate this model, or pass its own scale file."),
    Case("scales-method-missing-inspect", "scale file",
         lambda c: ["inspect", c.scales("cnn8"), "--method", "sweep"],
         "Error: The scale file has no method 'sweep'. It has: max."),
    Case("scales-method-missing-export-onnx", "scale file",
         lambda c: export(c, "onnx", "--method", "sweep"),
         "Error: The scale file has no method 'sweep'. It has: max."),
    Case("scales-method-missing-export-trt", "scale file",
         lambda c: export(c, "trt-cache", "--method", "sweep"),
         "Error: The scale file has no method 'sweep'. It has: max."),
    Case("scales-method-missing-evaluate", "scale file",
         lambda c: evaluate(c, "--methods", "sweep"),
         "Error: The scale file has no method 'sweep'. It has: max."),
    Case("scales-nan-amax", "scale file",
         lambda c: ["inspect", c.edited_scales("nan.safetensors", tensors=set_amax("fc1:input", float("nan")))],
         "Error: Scale file '{tmp}/nan.safetensors' has an invalid amax for target 'fc1:input', method 'max': "
         "nan. Expected a finite amax >= 2.99751059e-36 (the smallest normal float32 times qmax 255)."),
    Case("scales-nan-channel-export-onnx", "scale file",
         lambda c: export(c, "onnx", scales=c.edited_scales(
             "nan.safetensors", tensors=set_amax("fc1:weight", float("nan"), channel=3))),
         "Error: Scale file '{tmp}/nan.safetensors' has an invalid amax for target 'fc1:weight', method 'max': "
         "nan (channel 3). Expected a finite amax >= 1.49287783e-36 (the smallest normal float32 times qmax "
         "127)."),
    Case("scales-denormal-amax", "scale file",
         lambda c: ["inspect", c.edited_scales("tiny.safetensors", tensors=set_amax("fc1:input", 1e-45))],
         "Error: Scale file '{tmp}/tiny.safetensors' has an invalid amax for target 'fc1:input', method "
         "'max': 1.40129846e-45. Expected a finite amax >= 2.99751059e-36 (the smallest normal float32 times "
         "qmax 255)."),
    Case("scales-corrupt-metadata", "scale file",
         lambda c: ["inspect", c.edited_scales("corrupt.safetensors", meta=lambda text: text[:-5])],
         "Error: Scale file '{tmp}/corrupt.safetensors' has corrupt octavcal metadata (not valid JSON: {any})."),
    Case("scales-metadata-is-a-list", "scale file",
         lambda c: ["inspect", c.edited_scales("list.safetensors", meta=lambda text: "[1, 2]")],
         "Error: Scale file '{tmp}/list.safetensors' has invalid metadata: the top level is invalid: a list of "
         "2 items. Expected an object."),
    Case("scales-newer-version-inspect", "scale file",
         lambda c: ["inspect", c.edited_scales("v4.safetensors", meta=edit_meta(format_version=4))],
         "Error: Scale file '{tmp}/v4.safetensors' has format version 4; this octavcal reads up to 3. "
         "Upgrade octavcal."),
    Case("scales-newer-version-evaluate", "scale file",
         lambda c: evaluate(c, scales=c.edited_scales("v4.safetensors", meta=edit_meta(format_version=4))),
         "Error: Scale file '{tmp}/v4.safetensors' has format version 4; this octavcal reads up to 3. "
         "Upgrade octavcal."),
    Case("scales-12-bit-export-onnx", "scale file",
         lambda c: export(c, "onnx", scales=c.edited_scales("b12.safetensors", meta=target_bits("fc1:input", 12))),
         "Error: Target 'fc1:input' has 12 bits; the ONNX export holds at most 8 (int8 container)."),
    Case("scales-no-8-bit-export-trt", "scale file",
         lambda c: export(c, "trt-cache", scales=c.scales("cnn4")),
         "Error: No target of '{tmp}/cnn4.safetensors' belongs in a TensorRT cache (8-bit activations): "
         "conv1:input (4 bits; the cache holds 8-bit scales); conv2:input (4 bits; the cache holds 8-bit "
         "scales); fc1:input (4 bits; the cache holds 8-bit scales).",
         written="nothing: the float ONNX it had written is discarded"),
    # --- data values
    Case("nan-in-calibration-data", "data values",
         lambda c: calibrate(c, data=c.cnn_data("nan.safetensors", lambda x: x[:, 0, 2, 2].fill_(float("nan")))),
         "Error: Activations of 'conv1' (input) contain NaN or Inf in batch 0 (16 of 1024 values)."),
    Case("nan-in-calibration-data-compare", "data values",
         lambda c: compare(c, data=c.cnn_data("nan.safetensors", lambda x: x[:, 0, 2, 2].fill_(float("nan")))),
         "Error: Activations of 'conv1' (input) contain NaN or Inf in batch 0 (16 of 1024 values)."),
    Case("nan-in-heldout-data-evaluate", "data values",
         lambda c: evaluate(c, data=heldout_with_nan(c)),
         "Error: Evaluation batch 0 has NaN or Inf in its input x (1 of 4096 values)."),
    Case("nan-in-a-weight", "data values",
         lambda c: calibrate(c, model=nan_weight_model(c)),
         "Error: Weight 'fc1:weight' (Parameter 'fc1.weight') contains NaN or Inf (1 of 32768 values)."),
    # --- options
    Case("bits-too-high", "options",
         lambda c: calibrate(c, "--bits", "17"),
         "Error: bits must be an integer in [2, 16]: got 17."),
    Case("bits-too-low-evaluate", "options",
         lambda c: evaluate(c, "--calib-data", CNN_DATA, "--bits", "1", "--methods", "max"),
         "Error: bits must be an integer in [2, 16]: got 1."),
    Case("bits-not-a-number-compare", "options",
         lambda c: compare(c, "--bits", "four"),
         "Error: Invalid value for --bits: expected bit widths like 4 or 4,5,6: got 'four'", exit=2),
    Case("unknown-method", "options",
         lambda c: calibrate(c, "--methods", "octav,mse2"),
         "Error: Unknown clipping method 'mse2'. Expected one of: octav, sweep, max, pNN.NNN."),
    Case("no-method", "options",
         lambda c: calibrate(c, "--methods", ""),
         "Error: No clipping method given. Expected one of: octav, sweep, max, pNN.NNN."),
    Case("unknown-device", "options",
         lambda c: calibrate(c, "--device", "tpu"),
         "Error: Unknown device 'tpu'. Expected cpu, cuda or cuda:N."),
    Case("layer-bits-without-equals", "options",
         lambda c: calibrate(c, "--layer-bits", "fc1"),
         "Error: Layer bits 'fc1' must look like PATTERN=BITS or PATTERN=skip."),
    Case("layer-bits-out-of-range", "options",
         lambda c: calibrate(c, "--layer-bits", "fc1=99"),
         "Error: Layer bits 'fc1=99': '99' is neither a bit width in [2, 16] nor 'skip'."),
    Case("batches-zero", "options",
         lambda c: calibrate(c, "--batches", "0"),
         "Error: Batch size and batch count must be positive: got 16 and 0."),
    Case("batch-size-zero-export-onnx", "options",
         lambda c: export(c, "onnx", "--batch-size", "0"),
         "Error: Batch size and batch count must be positive: got 0 and 1."),
    Case("heldout-batches-negative-compare", "options",
         lambda c: compare(c, "--heldout-batches", "-1"),
         "Error: Batch size and batch count must be positive: got 16 and -1."),
    Case("curve-points-one-compare", "options",
         lambda c: compare(c, "--curve-points", "1"),
         "Error: Invalid value for --curve-points: needs at least 2 points: got 1", exit=2),
    Case("evaluate-without-scales", "options",
         lambda c: ["evaluate", CNN, "--arch", CNN_ARCH, "--data", CNN_HELDOUT],
         "Error: Give --scales, or --calib-data with --bits.", exit=2),
    Case("batch-size-zero-evaluate", "options",
         lambda c: evaluate(c, "--batch-size", "0"),
         "Error: Batch size must be positive: got 0."),
    Case("seed-too-large", "options",
         lambda c: calibrate(c, "--seed", "99999999999999999999"),
         "Error: Invalid value for '--seed': 99999999999999999999 is not in the range 0<=x<=9223372036854775807.",
         exit=2),
    Case("bits-list-out-of-range-compare", "options",
         lambda c: compare(c, "--bits", "4,20"),
         "Error: bits must be an integer in [2, 16]: got 20."),
    Case("bits-list-out-of-range-evaluate", "options",
         lambda c: evaluate(c, "--calib-data", CNN_DATA, "--bits", "4,20"),
         "Error: bits must be an integer in [2, 16]: got 20."),
    Case("heldout-nan-compare", "data values",
         lambda c: compare(c, "--heldout-data", heldout_with_nan(c), "--batch-size", "397"),
         "Error: Held-out batch 0 has NaN or Inf in its input x (1 of 25408 values)."),
    Case("evaluate-data-missing-before-calibrating", "data file",
         lambda c: evaluate(c, "--calib-data", CNN_DATA, "--bits", "4", data=c / "missing.safetensors"),
         "Error: Data file '{tmp}/missing.safetensors' does not exist."),
    Case("labels-file-missing", "data file",
         lambda c: evaluate(c, "--labels", c / "missing.safetensors"),
         "Error: Labels file '{tmp}/missing.safetensors' does not exist."),
    Case("data-empty-file", "data file",
         lambda c: calibrate(c, data=c.write("empty.pt", b"")),
         "Error: Data file '{tmp}/empty.pt' is empty."),
    Case("data-npy-with-objects", "data file",
         lambda c: calibrate(c, data=c.write("junk.npy", _object_npy())),
         "Error: Data file '{tmp}/junk.npy' could not be read as tensors: ValueError: {any}."),
    Case("scales-other-attention-export-onnx", "scale file",
         lambda c: ["export", "onnx", TRANSFORMER, "--arch", TRANSFORMER_SDPA, "--scales", c.scales("transformer8"),
                    "--method", "max", "--data", TRANSFORMER_HELDOUT, "-o", c / "q.onnx"],
         "Error: Scale file '{tmp}/transformer8.safetensors' does not fit this model's targets (8 only in the "
         "file, 6 only in the model; first: the file has 'layers.0.attention:matmul0.lhs', which this model "
         "does not compute). Calibrate this model, or pass its own scale file."),
    Case("strict-with-an-lstm", "options",
         lstm_model,
         "Error: 2 weights are read by ops octavcal does not calibrate: 'lstm.weight_ih_l0' (recurrent weights "
         "(lstm), which octavcal does not model); 'lstm.weight_hh_l0' (recurrent weights (lstm), which "
         "octavcal does not model). Calibrate without strict mode to list them as uncovered."),
]  # fmt: skip


# SIGINT this long after `octavcal` starts: inside its imports (earlier, Python's own start-up is hit;
# later, on a slow machine, the command may have finished).
CTRL_C_DELAYS = (0.05, 0.25)

# Cases that need a monkeypatch or a subprocess: id -> (class, command and fault as the doc shows them,
# the stderr line, exit code, what is left).
SPECIAL = {
    "all-or-nothing-export-onnx-error": (
        "all-or-nothing",
        "`octavcal export onnx ... -o W/out/m.qdq.onnx`, failing (a planted OctavcalError) while the ORT "
        "overrides are made, after m.qdq.onnx and m.qdq.onnx.json were written",
        "Error: planted failure",
        1,
        "W/out stays empty: no .onnx, no .json, no .tmp",
    ),
    "all-or-nothing-export-onnx-interrupt": (
        "all-or-nothing",
        "`octavcal export onnx ... -o W/new/sub/m.qdq.onnx`, Ctrl-C after m.qdq.onnx and m.qdq.onnx.json "
        "were written",
        "Interrupted; no output was written.",
        130,
        "no file, no .tmp; the folders it made (W/new/sub) are removed",
    ),
    "all-or-nothing-compare": (
        "all-or-nothing",
        "`octavcal compare ... --no-plots --out W/report`, Ctrl-C while report.html is made, after "
        "report.json and targets.csv were written",
        "Interrupted; no output was written.",
        130,
        "W/report stays empty: no .json, no .csv, no .tmp",
    ),
    "all-or-nothing-evaluate": (
        "all-or-nothing",
        "`octavcal evaluate ... --out W/ev`, the disk full (ENOSPC) at fidelity.png, after evaluation.json "
        "was written",
        "Error: Cannot use '{tmp}/ev/fidelity.png': No space left on device.",
        1,
        "W/ev stays empty: no .json, no .png, no .tmp",
    ),
    "stale-temporary-removed": (
        "all-or-nothing",
        "`octavcal calibrate ... -o W/o.safetensors` beside `W/.o.safetensors.<dead pid>.k3x9q.tmp` (and one "
        "of a live pid)",
        "",
        0,
        "the dead run's temporary is removed, the live one's kept; only o.safetensors is new",
    ),
    "ctrl-c-at-start-up": (
        "interrupt",
        "`octavcal inspect W/missing.safetensors`, SIGINT "
        + " and ".join(f"{d} s" for d in CTRL_C_DELAYS)
        + " after the interpreter is up (while octavcal and torch are imported)",
        "Interrupted; no output was written.",
        130,
        "nothing (or it finished first: exit 1 and its Error line); never a traceback",
    ),
    "traceback-option": (
        "debugging",
        "`octavcal --traceback inspect W/missing.safetensors`: the trace (`Traceback (most recent call "
        "last): ...`), then the Error line; without the option, no trace",
        "Error: Scale file '{tmp}/missing.safetensors' does not exist.",
        1,
        "nothing",
    ),
    "traceback-environment": (
        "debugging",
        "`OCTAVCAL_TRACEBACK=1 octavcal inspect W/missing.safetensors`: the trace, then the Error line; "
        "with `OCTAVCAL_TRACEBACK=0`, no trace",
        "Error: Scale file '{tmp}/missing.safetensors' does not exist.",
        1,
        "nothing",
    ),
}


# ---------------------------------------------------------------------------------------------
# Running and checking


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def pattern(message: str, tmp: Path) -> re.Pattern[str]:
    """The expected line as a regex: placeholders filled in, everything else literal."""
    text = re.escape(message.replace("{tmp}", str(tmp)).replace("{samples}", str(SAMPLES)))
    for name, regex in (("{any}", ".+"), ("{hash}", "[0-9a-f]{12}")):
        text = text.replace(re.escape(name), regex)
    return re.compile(text)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones too) with its bytes' digest: any write shows up."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = f"link {os.readlink(path)}"
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[str(path.relative_to(root))] = "folder"
    return out


def sample_files() -> dict[str, tuple[int, int]]:
    """sample_models/ by name, size and modification time (its __pycache__ aside)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in SAMPLES.iterdir() if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    """stderr's lines without click's usage preamble (exit 2)."""
    return [
        line for line in stderr.splitlines() if line.strip() and not line.startswith(("Usage: ", "Try '"))
    ]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Scale files calibrated once for the module (max only, one batch of 16)."""
    folder = tmp_path_factory.mktemp("scales")
    files = {
        "cnn8": (CNN, CNN_ARCH, CNN_DATA, "8"),
        "cnn4": (CNN, CNN_ARCH, CNN_DATA, "4"),
        "transformer8": (
            TRANSFORMER,
            "sample_models.digits_transformer:build",
            SAMPLES / "digits_transformer.calib.safetensors",
            "8",
        ),
    }
    out = {}
    for name, (model, arch, data, bits) in files.items():
        out[name] = folder / f"{name}.safetensors"
        result = invoke("calibrate", model, "--arch", arch, "--data", data, *FAST, "--bits", bits, "-o",
                        out[name], "--quiet")  # fmt: skip
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path (default outputs land there), with tracebacks off and sys.path restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OCTAVCAL_TRACEBACK", "0")
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, isolated: Path, calibrated: dict[str, Path]) -> None:
    tmp = isolated
    args = case.prepare(Ctx(tmp, calibrated))
    before, samples_before = snapshot(tmp), sample_files()
    result = invoke(*args)
    assert "Traceback" not in result.output
    assert result.exit_code == case.exit, result.output
    assert result.stdout == ""
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and pattern(case.message, tmp).fullmatch(lines[0]), lines
    if case.exit == 1:  # a clear error is that line and nothing else (no warning, no usage text)
        assert result.stderr == lines[0] + "\n"
    assert snapshot(tmp) == before  # no output, no temporary, inputs byte for byte the same
    assert sample_files() == samples_before


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES] + list(SPECIAL)
    assert len(ids) == len(set(ids)) and len(ids) >= 60


# --- all or nothing: a command that fails after writing some of its files leaves none of them


def _writes(monkeypatch: pytest.MonkeyPatch, module: Any, fail_at: str | None = None) -> list[str]:
    """Record the file names ``module`` writes; raise ENOSPC instead of writing ``fail_at``."""
    written: list[str] = []
    original = module.atomic_write

    def recording(path: Any, data: Any) -> Any:
        if Path(path).name == fail_at:
            raise OSError(28, "No space left on device", str(path))
        written.append(Path(path).name)
        return original(path, data)

    monkeypatch.setattr(module, "atomic_write", recording)
    return written


def _raise(exc: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


def _check_special(case_id: str, result: Any, tmp: Path) -> None:
    _, _, message, code, _ = SPECIAL[case_id]
    assert "Traceback" not in result.output
    assert result.exit_code == code and result.stdout == ""
    assert result.stderr == message.replace("{tmp}", str(tmp)) + "\n"


@pytest.mark.parametrize(
    ("case_id", "exc", "out"),
    [
        ("all-or-nothing-export-onnx-error", OctavcalError("planted failure"), "out/m.qdq.onnx"),
        ("all-or-nothing-export-onnx-interrupt", KeyboardInterrupt(), "new/sub/m.qdq.onnx"),
    ],
)
def test_export_onnx_writes_all_or_nothing(case_id, exc, out, isolated, calibrated, monkeypatch):
    import octavcal.export.onnx as onnx_export

    tmp = isolated
    (tmp / "out").mkdir()
    scales = Ctx(tmp, calibrated).scales("cnn8")
    before = snapshot(tmp)
    written = _writes(monkeypatch, onnx_export)
    monkeypatch.setattr(onnx_export, "ort_overrides", _raise(exc))
    result = invoke(*export(Ctx(tmp, calibrated), "onnx", "-o", tmp / out, scales=scales))
    assert written == ["m.qdq.onnx", "m.qdq.onnx.json"]  # the failure came after both were written
    _check_special(case_id, result, tmp)
    assert snapshot(tmp) == before  # no .onnx, no .json, no hidden .tmp; W/new is gone again


def test_compare_writes_all_or_nothing(isolated, calibrated, monkeypatch):
    import octavcal.report as report

    tmp = isolated
    (tmp / "report").mkdir()
    before = snapshot(tmp)
    written = _writes(monkeypatch, report)
    monkeypatch.setattr(report, "_html", _raise(KeyboardInterrupt()))
    result = invoke(*compare(Ctx(tmp, calibrated)))
    assert written == ["report.json", "targets.csv"]
    _check_special("all-or-nothing-compare", result, tmp)
    assert snapshot(tmp) == before and not any((tmp / "report").iterdir())


def test_evaluate_writes_all_or_nothing(isolated, calibrated, monkeypatch):
    import octavcal.report as report

    tmp = isolated
    (tmp / "ev").mkdir()
    ctx = Ctx(tmp, calibrated)
    args = evaluate(ctx, "--out", tmp / "ev")
    before = snapshot(tmp)
    written = _writes(monkeypatch, report, fail_at="fidelity.png")
    result = invoke(*args)
    assert written == ["evaluation.json"]
    _check_special("all-or-nothing-evaluate", result, tmp)
    assert snapshot(tmp) == before and not any((tmp / "ev").iterdir())


def test_a_stale_temporary_of_a_dead_run_is_removed(isolated):
    tmp = isolated
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid is now free: a run with that pid was killed long ago
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert live.pid != finished.pid
        stale = tmp / f".o.safetensors.{finished.pid}.k3x9q.tmp"
        running = tmp / f".o.safetensors.{live.pid}.a7b2c.tmp"
        stale.write_bytes(b"half a scale file")
        running.write_bytes(b"another run still writing")
        before = set(snapshot(tmp))
        result = invoke(*calibrate(Ctx(tmp, {}), "--quiet"))
        assert result.exit_code == SPECIAL["stale-temporary-removed"][3] and result.stderr == "", (
            result.output
        )
        assert not stale.exists() and running.exists()
        assert set(snapshot(tmp)) == before - {stale.name} | {"o.safetensors"}
    finally:
        live.kill()
        live.wait()


# The console script's own start, with a line on stdout once Python's start-up is over: a SIGINT
# before that lands in the interpreter's site import (not ours), which a loaded machine makes slow.
CONSOLE_SCRIPT = (
    "import sys; print('started', flush=True); sys.argv = ['octavcal', *sys.argv[1:]]; "
    "from octavcal.cli import main; main()"
)


@pytest.mark.parametrize("delay", CTRL_C_DELAYS)
def test_ctrl_c_at_start_up_is_one_line(delay, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OCTAVCAL_TRACEBACK"}
    missing = tmp_path / "missing.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-c", CONSOLE_SCRIPT, "inspect", str(missing)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "started\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    _, _, message, code, _ = SPECIAL["ctrl-c-at-start-up"]
    error = f"Error: Scale file '{missing}' does not exist.\n"
    # Interrupted while importing; or it had finished (exit 1), the signal at most ending its exit.
    outcomes = [(code, message + "\n"), (1, error), (-signal.SIGINT, error)]
    assert (process.returncode, stderr) in outcomes, (process.returncode, stderr)
    assert "Traceback" not in stderr and stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case_id", ["traceback-option", "traceback-environment"])
def test_traceback_on_request_only(case_id, isolated, monkeypatch):
    tmp = isolated
    missing = tmp / "missing.safetensors"
    if case_id == "traceback-option":
        result = invoke("--traceback", "inspect", missing)  # sets OCTAVCAL_TRACEBACK; monkeypatch restores it
    else:
        monkeypatch.setenv("OCTAVCAL_TRACEBACK", "1")
        result = invoke("inspect", missing)
    _, _, message, code, _ = SPECIAL[case_id]
    error = message.replace("{tmp}", str(tmp))
    assert result.exit_code == code and result.stdout == ""
    assert result.stderr.startswith("Traceback (most recent call last):\n")
    assert "octavcal.errors.ScaleFileError" in result.stderr and result.stderr.endswith("\n" + error + "\n")
    monkeypatch.setenv("OCTAVCAL_TRACEBACK", "0")
    quiet = invoke("inspect", missing)
    assert "Traceback" not in quiet.output and quiet.stderr == error + "\n"
    assert list(tmp.iterdir()) == []


# --- the doc and the cases agree


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def doc_message(message: str) -> str:
    return (
        message.replace("{tmp}", "W")
        .replace("{samples}", "S")
        .replace("{any}", "…")
        .replace("{hash}", "<hash>")
    )


def doc_command(args: list, tmp: Path) -> str:
    words = [str(a).replace(str(tmp), "W").replace(str(SAMPLES), "S") for a in args]
    return "octavcal " + " ".join(words)


def doc_row(case_id: str, kind: str, command: str, message: str, code: int, written: str) -> str:
    """One table row; ``command`` is markdown already."""
    cells = [case_id, kind, command, f"`{message}`" if message else "none", str(code), written]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def expected_doc_rows(tmp: Path, calibrated: dict[str, Path]) -> dict[str, str]:
    rows = {}
    for case in CASES:
        folder = tmp / case.id
        folder.mkdir()
        args = case.prepare(Ctx(folder, calibrated))
        command = f"`{doc_command(args, folder)}`"
        rows[case.id] = doc_row(
            case.id, case.kind, command, doc_message(case.message), case.exit, case.written
        )
    for case_id, (kind, command, message, code, written) in SPECIAL.items():
        rows[case_id] = doc_row(case_id, kind, command, doc_message(message), code, written)
    return rows


def doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith(("| # ", "| ---")):
            rows[line.split(" | ")[0].removeprefix("| ")] = line
    return rows


def test_the_doc_lists_every_case(isolated, calibrated):
    expected, found = expected_doc_rows(isolated, calibrated), doc_rows()
    assert sorted(found) == sorted(expected), (
        f"only in the doc: {sorted(set(found) - set(expected))}; "
        f"only in the tests: {sorted(set(expected) - set(found))}"
    )
    for case_id, row in expected.items():
        assert found[case_id] == row, case_id
