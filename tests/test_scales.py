"""The scale file format: round trips, determinism, atomic writes, versioning, plain safetensors access."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from octavcal import CalibrationConfig, ScaleFileError, calibrate, load_scales, save_scales
from octavcal.data import load_data, plan_batches
from octavcal.loading import load_model
from octavcal.scales import FORMAT_VERSION, MethodScales, ScaleTable, TargetScales


def table_for(paths, seed=0):
    loaded = load_model(paths["model"], arch=paths["arch"])
    data = load_data(paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 16, 3, seed)]
    return calibrate(loaded, batches, CalibrationConfig(bits=4, methods=("octav", "p99.9")), seed=seed)


def test_round_trip_is_exact_and_plain_safetensors_reads_it(tmp_path, transformer_paths):
    table = table_for(transformer_paths)
    path = save_scales(table, tmp_path / "s.safetensors")
    back = load_scales(path)
    assert sorted(back.targets) == sorted(table.targets)
    for tid, entry in table.targets.items():
        got = back.targets[tid]
        assert (got.bits, got.signed, got.axis, got.role, got.module) == (
            entry.bits,
            entry.signed,
            entry.axis,
            entry.role,
            entry.module,
        )
        for m, r in entry.methods.items():
            assert torch.equal(got.methods[m].amax, r.amax)
            if r.per_batch is not None:
                assert torch.equal(got.methods[m].per_batch, r.per_batch)
    plain = load_file(str(path))
    assert torch.equal(
        plain["layers.0.attention.query:weight/octav"], table.amax("layers.0.attention.query:weight", "octav")
    )
    # The scale follows from the grid written in the metadata: amax / qmax.
    entry = back.targets["embed:input"]
    grid = entry.grid(back.convention)
    assert grid.qmax == (15 if not entry.signed else 7)
    torch.testing.assert_close(entry.methods["octav"].scale(grid), entry.methods["octav"].amax / grid.qmax)


def test_same_inputs_and_seed_give_identical_bytes(tmp_path, cnn_paths):
    a = save_scales(table_for(cnn_paths, seed=5), tmp_path / "a.safetensors").read_bytes()
    b = save_scales(table_for(cnn_paths, seed=5), tmp_path / "b.safetensors").read_bytes()
    c = save_scales(table_for(cnn_paths, seed=6), tmp_path / "c.safetensors").read_bytes()
    assert a == b and a != c


def test_metadata_records_the_contract(tmp_path, cnn_paths):
    path = save_scales(table_for(cnn_paths), tmp_path / "s.safetensors")
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header["__metadata__"]["octavcal"])
    assert meta["format"] == "octavcal.scales" and meta["format_version"] == FORMAT_VERSION
    assert meta["grid"] == {
        "convention": "runtime",
        "narrow_range": True,
        "rounding": "half to even",
        "scale": "amax / qmax",
        "zero_point": 0,
    }
    assert meta["targets"]["fc1:weight"]["granularity"] == "per-channel"
    assert meta["targets"]["fc1:weight"]["qmin"] == -7 and meta["targets"]["conv1:input"]["qmax"] == 15
    assert len(meta["model_fingerprint"]) == 64 and meta["batches"] == 3 and meta["seed"] == 0


def test_newer_format_and_foreign_files_are_refused(tmp_path):
    table = ScaleTable(
        {
            "a:input": TargetScales(
                "a",
                "input",
                "Linear",
                "activation",
                8,
                True,
                None,
                [2],
                {"max": MethodScales(torch.tensor(1.0))},
            )
        },
        {},
    )
    path = save_scales(table, tmp_path / "s.safetensors")
    tensors = load_file(str(path))
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header["__metadata__"]["octavcal"])
    meta["format_version"] = FORMAT_VERSION + 1
    save_file(tensors, tmp_path / "new.safetensors", metadata={"octavcal": json.dumps(meta)})
    with pytest.raises(
        ScaleFileError,
        match=f"format version {FORMAT_VERSION + 1}; this octavcal reads up to "
        f"{FORMAT_VERSION}. Upgrade octavcal.",
    ):
        load_scales(tmp_path / "new.safetensors")
    save_file(tensors, tmp_path / "foreign.safetensors")
    with pytest.raises(ScaleFileError, match="no octavcal metadata"):
        load_scales(tmp_path / "foreign.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(ScaleFileError, match="not a readable safetensors file"):
        load_scales(tmp_path / "trunc.safetensors")
    with pytest.raises(ScaleFileError, match="has no target 'b:input'"):
        table.amax("b:input", "max")
    with pytest.raises(ScaleFileError, match="no scales for method 'octav'. It has: max"):
        table.amax("a:input", "octav")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    table = ScaleTable({}, {})
    import os

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        save_scales(table, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


V1_OPS = {"linear": "Linear", "conv2d": "Conv2d", "matmul": "matmul", "sdpa": "sdpa"}


def as_version_1(path):
    """Rewrite a scale file's header as octavcal 0.1 wrote it (format 1: no param/tied/uncovered, ops by
    module class), keeping the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["octavcal"])
    tensors = load_file(path)
    meta["format_version"] = 1
    meta.pop("uncovered")
    for d in meta["targets"].values():
        d.pop("param"), d.pop("tied")
        d["op"] = V1_OPS[d["op"]]
    save_file(tensors, path, metadata={"octavcal": json.dumps(meta)})


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_version_1_files_are_still_read_and_used(tmp_path, model, cnn_paths, transformer_paths):
    import numpy as np

    from octavcal import apply_scales
    from octavcal.export.onnx import export_qdq

    ort = pytest.importorskip("onnxruntime")
    paths = cnn_paths if model == "cnn" else transformer_paths
    table = table_for(paths)
    path = save_scales(table, tmp_path / "s.safetensors")
    as_version_1(path)
    old = load_scales(path)
    assert (
        old.meta["format_version"] == 1
        and old.targets["fc1:weight" if model == "cnn" else "classifier:weight"].param is None
    )
    loaded = load_model(paths["model"], arch=paths["arch"])
    held = load_data(paths["heldout"]).batch(torch.arange(16))
    with torch.no_grad():
        new_out = apply_scales(loaded, table, "octav")(*held.args, **held.kwargs)
        old_out = apply_scales(loaded, old, "octav")(*held.args, **held.kwargs)
    torch.testing.assert_close(old_out, new_out, rtol=0, atol=0)
    mapping = export_qdq(loaded, old, "octav", held, tmp_path / "m.onnx")
    assert set(mapping["targets"]) == set(old.targets)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options)
    feeds = {f"input{i}": a.numpy() for i, a in enumerate(held.args)} | {
        k: v.numpy() for k, v in held.kwargs.items()
    }
    out = session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[
        0
    ]
    np.testing.assert_allclose(out, new_out.numpy(), rtol=1e-4, atol=1e-4 * float(new_out.abs().max()))


# A robust reader: every bad file is a ScaleFileError with a one-line message naming the first problem.


def small_file(tmp_path):
    """A scale file of two targets: a per-tensor unsigned 8-bit input (qmax 255, per-batch candidates)
    and a per-channel 4-bit weight (qmax 7)."""
    table = ScaleTable(
        {
            "fc:input": TargetScales(
                "fc", "input", "linear", "activation", 8, False, None, [4, 3],
                {"max": MethodScales(torch.tensor(2.0), torch.tensor([1.5, 2.5]))},
            ),
            "fc:weight": TargetScales(
                "fc", "weight", "linear", "weight", 4, True, 0, [2, 3],
                {"max": MethodScales(torch.tensor([0.5, 1.0]))}, param="fc.weight",
            ),
        },
        {"grid": {"convention": "runtime"}, "methods": ["max"], "bits": 4},
    )  # fmt: skip
    return save_scales(table, tmp_path / "s.safetensors")


def rewrite(path, tensors=None, meta=None, text=None):
    """The file at ``path`` again, with some tensors replaced (None: removed) or other metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        old_text = f.metadata()["octavcal"]
    all_tensors = load_file(str(path)) | (tensors or {})
    all_tensors = {k: v for k, v in all_tensors.items() if v is not None}
    text = text if text is not None else json.dumps(meta) if meta is not None else old_text
    save_file(all_tensors, str(path), metadata={"octavcal": text})
    return path


def refusal(path):
    with pytest.raises(ScaleFileError) as info:
        load_scales(path)
    return str(info.value)


def test_the_small_file_loads_and_its_scales_are_usable(tmp_path):
    table = load_scales(small_file(tmp_path))
    assert table.targets["fc:input"].scale("max").item() == pytest.approx(2.0 / 255)
    assert table.targets["fc:weight"].scale("max").tolist() == pytest.approx([0.5 / 7, 1.0 / 7])
    assert table.targets["fc:input"].methods["max"].per_batch.tolist() == [1.5, 2.5]


@pytest.mark.parametrize(
    ("value", "seen"),
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (0.0, "0"),
        (-1.0, "-1"),
        (1e-45, "1.40129846e-45"),
    ],
)
def test_amax_values_that_give_no_normal_scale_are_refused(tmp_path, value, seen):
    path = small_file(tmp_path)
    rewrite(path, {"fc:input/max": torch.tensor(value)})
    assert refusal(path) == (
        f"Scale file '{path}' has an invalid amax for target 'fc:input', method 'max': {seen}. "
        "Expected a finite amax >= 2.99751059e-36 (the smallest normal float32 times qmax 255)."
    )


def test_the_smallest_amax_with_a_normal_scale_is_read(tmp_path):
    path = small_file(tmp_path)
    least = torch.finfo(torch.float32).tiny * 7
    rewrite(path, {"fc:weight/max": torch.tensor([least, 1.0])})
    scale = load_scales(path).targets["fc:weight"].scale("max")
    assert scale[0].item() >= torch.finfo(torch.float32).tiny
    rewrite(
        path, {"fc:weight/max": torch.tensor([1.0, torch.nextafter(torch.tensor(least), torch.tensor(0.0))])}
    )
    assert refusal(path) == (
        f"Scale file '{path}' has an invalid amax for target 'fc:weight', method 'max': 8.2284599e-38 "
        "(channel 1). Expected a finite amax >= 8.22846046e-38 (the smallest normal float32 times qmax 7)."
    )


def test_amax_tensors_of_the_wrong_dtype_or_shape_or_missing_are_refused(tmp_path):
    path = small_file(tmp_path)
    rewrite(path, {"fc:weight/max": torch.tensor([0.5, 1.0], dtype=torch.float64)})
    assert refusal(path) == (
        f"Scale file '{path}' has a wrong amax dtype for target 'fc:weight', method 'max': torch.float64. "
        "Expected torch.float32."
    )
    rewrite(path, {"fc:weight/max": torch.tensor([0.5, 1.0, 1.0])})
    assert refusal(path) == (
        f"Scale file '{path}' has a wrong amax shape for target 'fc:weight', method 'max': [3]. "
        "Expected [2] (per channel along axis 0 of [2, 3])."
    )
    rewrite(path, {"fc:weight/max": None})
    assert refusal(path) == (
        f"Scale file '{path}' has no amax tensor for target 'fc:weight', method 'max': 'fc:weight/max' is "
        "missing. Every listed method needs its tensor."
    )
    path = small_file(tmp_path)
    rewrite(path, {"fc:input/max@batches": torch.tensor([1.5, float("nan")])})
    assert refusal(path) == (
        f"Scale file '{path}' has an invalid per-batch amax for target 'fc:input', method 'max': nan "
        "(element 1). Expected finite values."
    )


def test_files_that_are_not_scale_files_are_told_apart(tmp_path):
    assert refusal(tmp_path) == f"Scale file '{tmp_path}' is a directory, not a file."
    missing = tmp_path / "missing.safetensors"
    assert refusal(missing) == f"Scale file '{missing}' does not exist."
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a safetensors file\n")
    message = refusal(text)  # the reason is safetensors' own words
    assert (
        message.startswith(f"Scale file '{text}' is not a readable safetensors file: ")
        and "\n" not in message
    )
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    assert refusal(foreign) == (
        f"Scale file '{foreign}' has no octavcal metadata; it was not written by octavcal."
    )
    path = rewrite(small_file(tmp_path), text="{not json")
    assert refusal(path) == (
        f"Scale file '{path}' has corrupt octavcal metadata (not valid JSON: Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1))."
    )


def written_meta(path):
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return json.loads(header["__metadata__"]["octavcal"])


def test_metadata_fields_are_checked_and_named_by_path(tmp_path):
    path = small_file(tmp_path)
    meta = written_meta(path)
    meta["targets"]["fc:input"]["axis"] = "0"
    rewrite(path, meta=meta)
    assert refusal(path) == (
        f"Scale file '{path}' has invalid metadata: targets['fc:input'].axis is invalid: \"0\". "
        "Expected null or an integer >= 0."
    )
    meta["targets"]["fc:input"]["axis"] = None
    meta["grid"]["convention"] = "exotic"
    rewrite(path, meta=meta)
    assert refusal(path) == (
        f"Scale file '{path}' has invalid metadata: grid.convention is invalid: \"exotic\". "
        'Expected "runtime" or "paper".'
    )
    meta["grid"]["convention"] = "paper"
    meta["targets"]["fc:input"] = {"module": "fc"}
    rewrite(path, meta=meta)
    assert refusal(path) == (
        f"Scale file '{path}' has invalid metadata: targets['fc:input'].role is missing. Expected a string."
    )


def test_version_1_metadata_without_param_and_tied_is_read(tmp_path):
    path = small_file(tmp_path)
    meta = written_meta(path)
    meta["format_version"] = 1
    for d in meta["targets"].values():
        del d["param"], d["tied"]
    table = load_scales(rewrite(path, meta=meta))
    assert table.targets["fc:weight"].param is None and table.targets["fc:weight"].tied == []


def test_deep_or_huge_metadata_is_refused_without_recursion(tmp_path):
    path = small_file(tmp_path)
    rewrite(path, text='{"x": ' + "[" * 10_000 + "]" * 10_000 + "}")
    assert refusal(path) == (
        f"Scale file '{path}' has octavcal metadata nested too deeply: over 32 levels. The limit is 32."
    )
    rewrite(path, text=json.dumps({"pad": "x" * 5_000_000}))
    assert refusal(path) == (
        f"Scale file '{path}' has octavcal metadata too large to read: 5000011 characters. "
        "The limit is 4194304."
    )


def test_the_recorded_fingerprint_is_an_independent_sha256_of_the_weights(cnn_paths):
    import hashlib

    table = table_for(cnn_paths)
    model = load_model(cnn_paths["model"], arch=cnn_paths["arch"]).module
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.contiguous().numpy().tobytes())
    assert table.meta["model_fingerprint"] == digest.hexdigest()


def test_background_fingerprint_waits_for_a_spare_core_then_hashes_all(monkeypatch):
    """With torch on every core, the hash runs only while statistics leave one idle; asked for,
    it finishes at once either way, with the same digest as the plain function."""
    from octavcal import fingerprint, spare

    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 256))
    monkeypatch.setattr(fingerprint, "_cores", lambda: torch.get_num_threads())
    before = set(threading.enumerate())
    result = fingerprint.fingerprint_in_background(model)
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name == "octavcal-fingerprint"]
    thread.join(0.3)
    assert thread.is_alive()  # the gate is closed: not one chunk hashed
    spare.spare_core(True)
    try:
        thread.join(10)
        assert not thread.is_alive()
    finally:
        spare.spare_core(False)
    assert result() == fingerprint.model_fingerprint(model)
    # Closed again, a new hash still completes when asked for.
    assert fingerprint.fingerprint_in_background(model)() == fingerprint.model_fingerprint(model)
    # One nobody asks for (the calibration failed) ends when its caller lets go of it.
    before = set(threading.enumerate())
    forgotten = fingerprint.fingerprint_in_background(model)
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name == "octavcal-fingerprint"]
    del forgotten
    thread.join(10)
    assert not thread.is_alive()


def test_a_forgotten_fingerprint_collected_inside_spare_core_does_not_deadlock(monkeypatch):
    """A failed calibration whose exception is kept makes a cycle: the garbage collector frees its
    fingerprint whenever it runs, even inside ``spare_core``, which holds locks then. (Here a gate
    whose set() collects stands for any allocation there.)"""
    import gc

    from octavcal import fingerprint, spare

    monkeypatch.setattr(fingerprint, "_cores", lambda: torch.get_num_threads())
    model = torch.nn.Linear(256, 256)

    def failed_calibration():
        before = set(threading.enumerate())
        fingerprint.fingerprint_in_background(model)
        try:
            raise RuntimeError("calibration failed")
        except RuntimeError as error:
            kept = error  # noqa: F841 - frame -> error -> traceback -> frame: a cycle
        return [t for t in set(threading.enumerate()) - before if t.name == "octavcal-fingerprint"]

    (thread,) = failed_calibration()

    class CollectingGate(threading.Event):
        def set(self):
            gc.collect()
            super().set()

    gate = CollectingGate()
    monkeypatch.setattr(spare, "_gates", spare._gates | {gate})
    done = threading.Event()

    def toggle():
        spare.spare_core(True)
        spare.spare_core(False)
        done.set()

    threading.Thread(target=toggle, daemon=True).start()
    assert done.wait(10), "spare_core deadlocked"
    thread.join(10)
    assert not thread.is_alive()
