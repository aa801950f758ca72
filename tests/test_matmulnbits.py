"""Weight-only export to ONNX Runtime's MatMulNBits: tiny LLaMA and GPT-2 from configs, run in ONNX Runtime
against apply_scales of the weights, the packed codes decoded against fake-quantized weights, refusals."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import octavcal
from octavcal import CalibrationConfig, SpecError
from octavcal.core import Batch, LoadedModel
from octavcal.groups import fake_quantize_groups

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from octavcal.export.matmulnbits import export_matmulnbits, weights_only  # noqa: E402

CONFIGS = {
    "llama": (
        "LlamaForCausalLM",
        dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128),
        15,  # 7 projections per layer and the head
    ),
    "gpt2": ("GPT2LMHeadModel", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32), 9),
}  # fmt: skip


def tiny(kind):
    transformers.logging.set_verbosity_error()
    cls, options, _ = CONFIGS[kind]
    torch.manual_seed(0)  # from_config draws its initial weights from the global generator
    config = transformers.AutoConfig.for_model(kind, **options)
    config._attn_implementation = "eager"
    return LoadedModel(getattr(transformers, cls)(config).eval(), "huggingface", None)


def tokens(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 128, (n, 8), generator=g),
        "attention_mask": torch.ones(n, 8, dtype=torch.long),
    }


def decode(inits, node):
    """(N, K) float32 weight from MatMulNBits' packed codes, zero points and scales, in NumPy."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, g = attrs["K"], attrs["N"], attrs["block_size"]
    b = inits[node.input[1]]
    codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(n, k).astype(np.float32)
    zp = inits[node.input[3]].reshape(n, -1)
    zp = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, : k // g].astype(np.float32)
    scale = inits[node.input[2]].reshape(n, k // g)
    return (codes - np.repeat(zp, g, axis=1)) * np.repeat(scale, g, axis=1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_matmulnbits_export_matches_apply_scales_in_onnxruntime(tmp_path, kind):
    loaded = tiny(kind)
    table = octavcal.calibrate(
        loaded, [tokens(1), tokens(2)], CalibrationConfig(bits=4, methods=("octav",), group_size=16)
    )
    mapping = export_matmulnbits(loaded, table, "octav", Batch((), tokens(1)), tmp_path / "w.onnx")
    assert len(mapping["targets"]) == CONFIGS[kind][2]
    model = onnx.load(str(tmp_path / "w.onnx"))
    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) == CONFIGS[kind][2]
    assert not [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in {i.name for i in model.graph.initializer}
    ]
    # Every packed weight decodes to apply_scales' fake-quantized weight, bit for bit.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    params = dict(loaded.module.named_parameters(remove_duplicate=False))  # GPT-2's head is tied
    for tid, m in mapping["targets"].items():
        entry = table.targets[tid]
        w = params[entry.param].detach()
        simulated = fake_quantize_groups(w, entry.methods["octav"].amax, 4, axis=entry.axis, group_size=16)
        expected = simulated.numpy() if entry.axis == 0 else simulated.numpy().T  # (N, K)
        np.testing.assert_array_equal(decode(inits, nbits[m["onnx_node"]]), expected, err_msg=tid)

    held = tokens(3, n=4)
    with torch.no_grad():
        ref = octavcal.apply_scales(loaded, weights_only(table), "octav")(**held).logits.numpy()
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = 3
        session = ort.InferenceSession(str(tmp_path / "w.onnx"), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {k: v.numpy() for k, v in held.items()})[0]
        close = np.abs(out - ref) <= 1e-4 * np.abs(ref).max()
        assert close.mean() >= 0.99, f"{kind} at {level}: {close.mean():.4f}"
        assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(bits=4),
            r"^Target '[^']+:weight' has per-channel scales; MatMulNBits needs per-group scales\.",
        ),
        (
            dict(bits=8, group_size=16),
            r"^Target '[^']+:weight' has 8 bits \(runtime grid, integers up to 127\); ",
        ),
        (dict(bits=4, group_size=16, convention="paper"), r"has 4 bits \(paper grid, integers up to 8\); "),
    ],
)
def test_matmulnbits_refuses_what_it_cannot_hold(tmp_path, config, message):
    loaded = tiny("gpt2")
    table = octavcal.calibrate(loaded, [tokens(1)], CalibrationConfig(methods=("max",), **config))
    with pytest.raises(SpecError, match=message):
        export_matmulnbits(loaded, table, "max", Batch((), tokens(1)), tmp_path / "w.onnx")
    assert not (tmp_path / "w.onnx").exists()


def test_cli_exports_weight_only(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from octavcal.cli import main

    gen = torch.Generator().manual_seed(3)
    save_file(
        {"0.weight": torch.randn(8, 64, generator=gen), "0.bias": torch.randn(8, generator=gen)},
        tmp_path / "m.safetensors",
    )
    torch.save(torch.randn(64, 64, generator=gen), tmp_path / "d.pt")
    (tmp_path / "arch_nbits.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(64, 8))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = [str(tmp_path / "m.safetensors"), "--arch", "arch_nbits:build"]
    scales = str(tmp_path / "s.safetensors")
    result = CliRunner().invoke(main, ["calibrate", *model, "--data", str(tmp_path / "d.pt"), "--bits", "4",
                                       "--methods", "octav", "--weight-granularity", "group:32", "-o", scales, "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "w.onnx"
    args = ["export", "onnx", *model, "--scales", scales, "--data", str(tmp_path / "d.pt"), "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--weight-only"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Wrote {out} (1 MatMulNBits weights) and {out}.json\n"
    graph = onnx.load(str(out)).graph
    assert [n.op_type for n in graph.node] == ["MatMulNBits", "Add"]  # the Gemm's bias after it
    x = torch.randn(5, 64, generator=gen)
    table = octavcal.load_scales(scales)
    loaded = octavcal.load_model(model[0], arch="arch_nbits:build")
    with torch.no_grad():
        ref = octavcal.apply_scales(loaded, weights_only(table), "octav")(x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input0": x.numpy()})[0], ref, rtol=1e-5, atol=1e-5)
