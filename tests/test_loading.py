"""Model formats and data files: each loads as what it claims, or fails with a clear message."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from octavcal import CalibrationConfig, CalibrationError, LoadError, calibrate
from octavcal.data import load_data, plan_batches
from octavcal.loading import load_model
from sample_models.digits_cnn import DigitsCNN


@pytest.fixture
def cnn(cnn_paths):
    return load_model(cnn_paths["model"], arch=cnn_paths["arch"]).module


def calibrated(loaded, cnn_paths, methods=("octav",)):
    data = load_data(cnn_paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 16, 2, 0)]
    return calibrate(loaded, batches, CalibrationConfig(bits=4, methods=methods))


def test_state_dict_pt_and_safetensors_need_an_architecture(tmp_path, cnn, cnn_paths):
    torch.save(cnn.state_dict(), tmp_path / "m.pt")
    for path in (tmp_path / "m.pt", cnn_paths["model"]):
        with pytest.raises(LoadError, match="holds only weights .*name the architecture"):
            load_model(path)
        assert load_model(path, arch=cnn_paths["arch"]).format in ("state_dict", "safetensors")


def test_wrapped_checkpoint_dicts_are_unwrapped(tmp_path, cnn, cnn_paths):
    torch.save({"state_dict": cnn.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert load_model(tmp_path / "ckpt.pt", arch=cnn_paths["arch"]).format == "state_dict"


def test_architecture_mismatch_is_named(tmp_path, cnn_paths):
    with pytest.raises(
        LoadError, match="do not fit the architecture 'sample_models.digits_transformer:build'"
    ):
        load_model(cnn_paths["model"], arch="sample_models.digits_transformer:build")
    with pytest.raises(LoadError, match="no callable named 'nope'"):
        load_model(cnn_paths["model"], arch="sample_models.digits_cnn:nope")
    with pytest.raises(LoadError, match="not of the form package.module:callable"):
        load_model(cnn_paths["model"], arch="sample_models.digits_cnn")


def test_pickled_module_needs_explicit_permission(tmp_path, cnn, cnn_paths):
    torch.save(cnn, tmp_path / "whole.pt")
    with pytest.raises(LoadError, match="would run code from the file"):
        load_model(tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", allow_pickle=True)
    assert loaded.format == "pickle" and isinstance(loaded.module, DigitsCNN)


def test_export_program_calibrates_with_the_eager_names(tmp_path, cnn, cnn_paths):
    fixed = torch.export.export(cnn, (torch.zeros(2, 1, 8, 8),))
    torch.export.save(fixed, tmp_path / "fixed.pt2")
    with pytest.raises(CalibrationError, match="exported with fixed shapes"):
        calibrated(load_model(tmp_path / "fixed.pt2"), cnn_paths)
    program = torch.export.export(
        cnn, (torch.zeros(2, 1, 8, 8),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, tmp_path / "m.pt2")
    from_export = calibrated(load_model(tmp_path / "m.pt2"), cnn_paths)
    eager = calibrated(load_model(cnn_paths["model"], arch=cnn_paths["arch"]), cnn_paths)
    assert sorted(from_export.targets) == sorted(eager.targets)
    for tid, entry in eager.targets.items():
        torch.testing.assert_close(
            from_export.targets[tid].methods["octav"].amax, entry.methods["octav"].amax
        )


def test_torchscript_calibrates_weights_only_and_says_so(tmp_path, cnn, cnn_paths):
    torch.jit.script(cnn).save(str(tmp_path / "m.ts"))
    loaded = load_model(tmp_path / "m.ts")
    assert loaded.format == "torchscript" and not loaded.hookable and "only weights" in loaded.note
    table = calibrated(loaded, cnn_paths)
    assert sorted(table.targets) == ["conv1:weight", "conv2:weight", "fc1:weight", "fc2:weight"]


def test_bad_model_files(tmp_path):
    with pytest.raises(LoadError, match="Model file '.*missing.pt' does not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(LoadError, match="is not a PyTorch checkpoint"):
        load_model(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        load_model(tmp_path / "junk.safetensors", arch="x:y")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(LoadError, match="holds a list, not a state_dict"):
        load_model(tmp_path / "list.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(LoadError, match="has no config.json"):
        load_model(tmp_path / "folder")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npy", ".npz"])
def test_data_formats(tmp_path, suffix):
    x = torch.randn(10, 3)
    path = tmp_path / f"d{suffix}"
    if suffix == ".pt":
        torch.save({"x": x, "labels": torch.arange(10)}, path)
    elif suffix == ".safetensors":
        save_file({"x": x}, path)
    elif suffix == ".npy":
        np.save(path, x.numpy())
    else:
        np.savez(path, x=x.numpy())
    data = load_data(path)
    assert data.num_samples == 10
    batch = data.batch(torch.tensor([1, 2]))
    got = batch.args[0] if batch.args else batch.kwargs["x"]
    torch.testing.assert_close(got, x[[1, 2]])
    if suffix == ".pt":
        assert torch.equal(batch.labels, torch.tensor([1, 2]))


def test_bad_data_files(tmp_path):
    torch.save({"a": torch.zeros(4, 2), "b": torch.zeros(5, 2)}, tmp_path / "uneven.pt")
    with pytest.raises(LoadError, match=r"same number of samples .*\{'a': 4, 'b': 5\}"):
        load_data(tmp_path / "uneven.pt")
    torch.save(DigitsCNN(), tmp_path / "module.pt")
    with pytest.raises(LoadError, match="holds more than tensors; calibration data loads weights-only"):
        load_data(tmp_path / "module.pt")
    with pytest.raises(LoadError, match="does not exist"):
        load_data(tmp_path / "none.pt")


def test_batch_plans_are_reproducible_and_held_out_batches_are_disjoint():
    a = plan_batches(100, 8, 5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, plan_batches(100, 8, 5, seed=3), strict=True))
    held = plan_batches(100, 8, 5, seed=3, skip=5)
    assert not set(torch.cat(a).tolist()) & set(torch.cat(held).tolist())
    with pytest.warns(UserWarning, match="samples repeat"):
        plan_batches(10, 8, 5, seed=0)


def test_hugging_face_folder_loads_offline_with_eager_attention(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.format == "huggingface" and loaded.module.config._attn_implementation == "eager"
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 16)
    mask[:, 12:] = 0
    from octavcal.core import Batch

    table = calibrate(
        loaded, [Batch((), {"input_ids": ids, "attention_mask": mask})], CalibrationConfig(methods=("octav",))
    )
    for side in ("matmul0.lhs", "matmul0.rhs", "matmul1.lhs", "matmul1.rhs"):
        assert f"encoder.layer.1.attention.self:{side}" in table.targets
    assert table.targets["encoder.layer.0.attention.self.query:input"].masked
