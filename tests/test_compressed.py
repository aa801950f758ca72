"""compressed-tensors export: a tiny LLaMA from a config, written with the compressed-tensors package and
read back with it; decompressed weights against apply_scales' fake-quantized weights, input scales against
the scale file, refusals and the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

import octavcal
from octavcal import CalibrationConfig, SpecError
from octavcal.core import LoadedModel
from octavcal.export.matmulnbits import weights_only
from octavcal.groups import fake_quantize_groups

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from octavcal.export.compressed import export_compressed_tensors  # noqa: E402

LAYERS = 7 * 2  # q, k, v, o, gate, up, down per layer; the head is calibrated too (one more)


def tiny_llama():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)  # from_config draws its initial weights from the global generator
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def tokens(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 128, (n, 8), generator=g),
        "attention_mask": torch.ones(n, 8, dtype=torch.long),
    }


def decompressed(folder):
    """The folder read back with compressed-tensors only: a model from its config, the compressed state
    loaded into the layout the package makes, then decompressed by the package."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    meta = json.loads((folder / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(meta["quantization_config"])
    config = transformers.AutoConfig.from_pretrained(folder)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    compressor = ModelCompressor(quantization_config=qconfig)
    apply_quantization_config(model, qconfig)
    compressor.compress_model(model)
    result = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not result.unexpected_keys and all("rotary" in k or "zero_point" in k for k in result.missing_keys)
    compressor.decompress_model(model)
    return model, meta["quantization_config"]


@pytest.mark.parametrize("scheme", ["W8A8", "W4A16"])
def test_checkpoint_decompresses_to_the_simulated_weights(tmp_path, scheme):
    model = tiny_llama()
    config = CalibrationConfig(bits=8, methods=("octav",)) if scheme == "W8A8" else (
        CalibrationConfig(bits=4, methods=("octav",), group_size=32)
    )  # fmt: skip
    table = octavcal.calibrate(model, [tokens(1), tokens(2)], config)
    result = export_compressed_tensors(
        LoadedModel(model, "huggingface", None), table, "octav", tmp_path / "out"
    )
    assert result.scheme == scheme and len(result.layers) == LAYERS + 1 and not result.left_float
    back, qconfig = decompressed(tmp_path / "out")
    assert qconfig["quant_method"] == "compressed-tensors"
    assert qconfig["format"] == ("int-quantized" if scheme == "W8A8" else "pack-quantized")
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"]) == (
        (8, "channel") if scheme == "W8A8" else (4, "group")
    )
    for name in result.layers:
        entry = table.targets[f"{name}:weight"]
        w = model.get_submodule(name).weight.detach()
        amax = entry.methods["octav"].amax
        if scheme == "W8A8":
            simulated = octavcal.fake_quantize(w, amax, 8, axis=0)
        else:
            simulated = fake_quantize_groups(w, amax, 4, axis=0, group_size=32)
        assert torch.equal(back.get_submodule(name).weight, simulated), name
        if scheme == "W8A8":  # the static input scale is the scale file's (signed grid)
            inp = table.targets[f"{name}:input"]
            recorded = back.get_submodule(name).input_scale
            assert recorded.shape == (1,) and torch.equal(recorded[0], inp.methods["octav"].amax / 127)
            if inp.signed:
                assert torch.equal(recorded[0], inp.scale("octav"))
    if scheme == "W4A16":  # activations stay float: the whole model is apply_scales of the weights
        held = tokens(3, 4)
        with torch.no_grad():
            ref = octavcal.apply_scales(model, weights_only(table), "octav")(**held).logits
            assert torch.equal(back(**held).logits, ref)
    assert json.loads((tmp_path / "out" / "octavcal_export.json").read_text())["scheme"] == scheme
    # The model passed in is untouched.
    assert torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)


def test_mixed_or_unsupported_layouts_are_refused_and_nothing_is_written(tmp_path):
    model = tiny_llama()
    table = octavcal.calibrate(model, [tokens(1)], CalibrationConfig(bits=4, methods=("max",)))
    with pytest.raises(
        SpecError, match=r"^Layer '[^']+' has 4-bit weights \(per channel\), which fit neither scheme"
    ):
        export_compressed_tensors(LoadedModel(model, "huggingface", None), table, "max", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_cli_writes_a_w4a16_folder(tmp_path):
    from safetensors.torch import save_file

    from octavcal.cli import main

    tiny_llama().save_pretrained(tmp_path / "llama")
    save_file(
        {k: torch.cat([tokens(s)[k] for s in range(4)]) for k in ("input_ids", "attention_mask")},
        tmp_path / "t.safetensors",
    )
    scales = tmp_path / "s.safetensors"
    calibrate = ["calibrate", str(tmp_path / "llama"), "--data", str(tmp_path / "t.safetensors"), "--bits", "4",
                 "--methods", "octav", "--weight-granularity", "group:32", "--batch-size", "4", "--batches", "2",
                 "-o", str(scales), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(main, calibrate)
    assert result.exit_code == 0, result.output
    out = tmp_path / "w4a16"
    result = CliRunner().invoke(
        main,
        ["export", "compressed-tensors", str(tmp_path / "llama"), "--scales", str(scales), "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"Wrote {out} (W4A16, {LAYERS + 1} quantized layers)"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    result = CliRunner().invoke(
        main,
        ["export", "compressed-tensors", str(tmp_path / "llama"), "--scales", str(scales), "-o", str(out)],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.stderr.splitlines()[-1]
        == f"Error: Output folder '{out}' exists and is not empty; name a new or empty folder."
    )
