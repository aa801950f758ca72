"""Models larger than one device: Hugging Face folders placed by accelerate (--device-map, --max-memory).

The reference is the plain single-device run: a placed run whose max_memory sends some layers to CPU and the
rest to disk offload (weights on the meta device at rest, loaded for each forward by accelerate's hooks) must
write the same scale file, byte for byte. Each test checks the placement first, so none passes vacuously.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import octavcal  # noqa: E402
from octavcal import CalibrationConfig, LoadError, SpecError  # noqa: E402
from octavcal.cli import main  # noqa: E402
from octavcal.offload import Placement, parse_max_memory  # noqa: E402
from octavcal.scales import model_fingerprint, save_scales  # noqa: E402

CONFIGS = {  # rotary + GQA; tied head + Conv1D (addmm); encoder + padding mask; conv + Parameters added (ViT)
    "llama": ("LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)),
    "gpt2": ("GPT2LMHeadModel", dict(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=64,
             bos_token_id=0, eos_token_id=0)),
    "bert": ("BertForSequenceClassification", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=128, vocab_size=128, max_position_embeddings=64)),
    "vit": ("ViTForImageClassification", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, image_size=16, patch_size=4)),
}  # fmt: skip
CONFIG = CalibrationConfig(methods=("max", "p99"))  # exact functions of the values they see


def build(kind: str, tmp_path_factory) -> Path:
    cls, options = CONFIGS[kind]
    config = transformers.AutoConfig.for_model(kind, **options)
    torch.manual_seed(0)  # from_config draws its initial weights from the global generator
    path = tmp_path_factory.mktemp(kind)
    getattr(transformers, cls)(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, tmp_path_factory) -> Path:
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build("llama", tmp_path_factory)


def batches(folder: Path, n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if folder.name.startswith("vit"):
        return [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g)} for _ in range(n)]
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return [
        {"input_ids": torch.randint(0, 128, (2, 8), generator=g), "attention_mask": mask} for _ in range(n)
    ]


def scale_bytes(loaded, folder: Path, out: Path) -> bytes:
    return save_scales(octavcal.calibrate(loaded, batches(folder), CONFIG, seed=0), out).read_bytes()


def split_memory(path: Path) -> Placement:
    """A CPU budget of about 40% of the weights: the first layers stay on CPU, the rest go to disk."""
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return Placement("sequential", {"cpu": int(size * 0.4)})


def offloaded(module) -> set[str]:
    """Where the device map put layers: must hold both 'cpu' and 'disk' for a test to mean anything."""
    placed = set(module.hf_device_map.values())
    assert placed == {"cpu", "disk"}, module.hf_device_map
    on_disk = [n for n, p in module.named_parameters() if p.is_meta]
    assert on_disk and len(on_disk) < len(list(module.parameters()))
    return set(on_disk)


def test_a_plain_run_repeats_its_bytes(llama, tmp_path):
    """What the placed run is held to: nothing in a plain run's file varies (no timings, no dates)."""
    first = scale_bytes(octavcal.load_model(llama), llama, tmp_path / "a")
    assert scale_bytes(octavcal.load_model(llama), llama, tmp_path / "b") == first


def test_placed_run_writes_the_plain_runs_bytes(folder, tmp_path):
    plain = scale_bytes(octavcal.load_model(folder), folder, tmp_path / "plain")
    placed = octavcal.load_model(folder, placement=split_memory(folder))
    on_disk = offloaded(placed.module)
    assert scale_bytes(placed, folder, tmp_path / "placed") == plain
    # after calibrating, the offloaded weights rest on meta again: no layer was kept in memory
    assert {n for n, p in placed.module.named_parameters() if p.is_meta} == on_disk
    # a second calibration (after forward passes, which untie weights at rest) is the same again
    assert scale_bytes(placed, folder, tmp_path / "again") == plain


def test_placed_model_has_the_plain_fingerprint_and_simulates_identically(folder):
    plain = octavcal.load_model(folder)
    placed = octavcal.load_model(folder, placement=split_memory(folder))
    offloaded(placed.module)
    assert model_fingerprint(placed.module) == model_fingerprint(plain.module)
    table = octavcal.calibrate(plain, batches(folder), CONFIG, seed=0)
    want = octavcal.apply_scales(plain, table, "p99")
    got = octavcal.apply_scales(placed, table, "p99")  # the fingerprint check reads offloaded weights
    for batch in batches(folder, 1):
        with torch.no_grad():
            assert torch.equal(got(**batch).logits, want(**batch).logits)
            assert not torch.equal(want(**batch).logits, plain.module(**batch).logits)  # it does quantize
    assert got._weights == {}  # quantized offloaded weights are not kept either


def test_cli_device_map_run_equals_the_plain_run(llama, tmp_path, caplog):
    from safetensors.torch import save_file

    data = tmp_path / "calib.safetensors"
    samples = batches(llama, 4)
    save_file({k: torch.cat([b[k] for b in samples]) for k in samples[0]}, data)
    common = ["calibrate", str(llama), "--data", str(data), "--batches", "3", "--batch-size", "2", "--quiet"]
    runner = CliRunner()
    plain = runner.invoke(main, [*common, "--device", "cpu", "-o", str(tmp_path / "plain.safetensors")])
    assert plain.exit_code == 0, plain.output
    memory = f"cpu={split_memory(llama).max_memory['cpu']}"  # type: ignore[index]
    offload = tmp_path / "offload"
    args = ["--device-map", "sequential", "--max-memory", memory, "--offload-folder", str(offload)]
    placed = runner.invoke(main, [*common, *args, "-o", str(tmp_path / "placed.safetensors")])
    assert placed.exit_code == 0, placed.output
    assert (tmp_path / "placed.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    # accelerate's own account of the placement: some layers on CPU, some offloaded to disk
    (placement,) = [r.getMessage() for r in caplog.records if "on the meta device" in r.getMessage()]
    assert "cpu" in placement and "disk" in placement
    assert offload.is_dir()  # asked for, so kept (transformers may point it at the checkpoint's own file)


def test_temporary_offload_folder_is_removed_with_the_model(llama, monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    loaded = octavcal.load_model(llama, placement=split_memory(llama))
    offloaded(loaded.module)
    (temporary,) = tmp_path.glob("octavcal-offload-*")
    del loaded
    gc.collect()
    assert not temporary.exists()


def test_max_memory_syntax():
    assert parse_max_memory("0=20GiB, cuda:1=1.5GB,cpu=60GiB,mps=100") == {
        0: 20 * 2**30,
        1: 1_500_000_000,
        "cpu": 60 * 2**30,
        "mps": 100,
    }
    with pytest.raises(SpecError, match=r"^Max memory entry 'gpu0=1GiB' is not DEVICE=SIZE with a device"):
        parse_max_memory("gpu0=1GiB")
    with pytest.raises(SpecError, match=r"^Max memory for 'cpu' is not a size: '60 gigs'\. Expected bytes"):
        parse_max_memory("cpu=60 gigs")
    with pytest.raises(SpecError, match=r"^Max memory names device 'cuda:0' twice in '0=1GB,cuda:0=2GB'\.$"):
        parse_max_memory("0=1GB,cuda:0=2GB")
    with pytest.raises(SpecError, match=r"^Unknown device map 'fast'\. Expected one of: auto, balanced"):
        Placement("fast")


def test_cli_rejects_bad_placements(tmp_path):
    runner = CliRunner()
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    base = ["calibrate", str(model), "--data", "d.pt"]
    bad = runner.invoke(main, [*base, "--device-map", "auto", "--max-memory", "cpu=lots"])
    assert (
        bad.exit_code == 2
        and "Invalid value for '--max-memory': Max memory for 'cpu' is not a size" in bad.output
    )
    alone = runner.invoke(main, [*base, "--max-memory", "cpu=1GB"])
    assert alone.exit_code == 2
    assert "Error: --max-memory places a model with --device-map; give --device-map too." in alone.output
    choice = runner.invoke(main, [*base, "--device-map", "fastest"])
    assert (
        choice.exit_code == 2 and "'fastest' is not one of 'auto', 'balanced', 'sequential'" in choice.output
    )


def test_only_hugging_face_folders_are_placed(tmp_path, cnn_paths):
    with pytest.raises(LoadError, match=r"is not a Hugging Face model folder; only those can be placed"):
        octavcal.load_model(cnn_paths["model"], arch=cnn_paths["arch"], placement=Placement("auto"))
    result = CliRunner().invoke(
        main,
        ["calibrate", str(cnn_paths["model"]), "--arch", cnn_paths["arch"], "--data", str(cnn_paths["data"]),
         "--device-map", "auto", "-o", str(tmp_path / "s.safetensors")],
    )  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(
        f"Error: Model file '{cnn_paths['model']}' is not a Hugging Face model folder"
    )


def test_placing_without_accelerate_says_what_to_install(llama, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "accelerate", None)  # import accelerate fails
    with pytest.raises(
        LoadError, match=r"with a device map needs accelerate: install octavcal\[accelerate\]\.$"
    ):
        octavcal.load_model(llama, placement=Placement("auto"))
