"""The architecture matrix: real layer types and Hugging Face families built offline from configs.

For every model, an independent reference (a TorchDispatchMode written here, watching the aten
products that read a Parameter's storage) counts the weight-bearing op calls of one forward pass.
calibrate must cover each of them (a weight target and one input target per call) or list its
Parameter as uncovered; evaluate at 8 bits must keep the output close to the float model; the ONNX
QDQ export must run in ONNX Runtime and match the simulation, or refuse with a one-line error.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import octavcal
from octavcal import CalibrationConfig, CalibrationError, OctavcalError
from octavcal.core import Batch, LoadedModel
from octavcal.evaluate import evaluate

# aten products (after PyTorch's own decompositions) whose operands can be weights
_PRODUCTS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten.mkldnn_rnn_layer.default,
}


class ProductReference(TorchDispatchMode):
    """Counts, per Parameter, the aten products that read its storage (whatever view they read)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.storages = {}
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.is_floating_point():
                self.storages[p.untyped_storage().data_ptr()] = name
        self.calls: dict[str, int] = {}
        self.other: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else (x,))]
        names = {
            self.storages.get(a.untyped_storage().data_ptr())
            for a in flat
            if isinstance(a, torch.Tensor) and a.device.type != "meta"
        } - {None}
        for name in names:
            if func in _PRODUCTS or any(
                w in str(func) for w in ("lstm", "rnn", "gru", "attention", "transformer")
            ):
                self.calls[name] = self.calls.get(name, 0) + 1
            else:
                self.other.add(name)
        return func(*args, **(kwargs or {}))


def reference_products(model: nn.Module, batch: Batch) -> dict[str, int]:
    """With gradients on, as in training, so PyTorch's fused inference fast paths stay out of the way."""
    ref = ProductReference(model)
    with torch.enable_grad(), ref:
        model(*batch.args, **batch.kwargs)
    return ref.calls


# ---------------------------------------------------------------------------------------------
# PyTorch's own layers and user layers


class SamePadConv2d(nn.Conv2d):
    """A 'same padding' Conv2d subclass, as in EfficientNet ports: pads in forward, then convolves."""

    def forward(self, x):
        pad = (self.kernel_size[0] - 1) // 2
        return F.conv2d(
            F.pad(x, (pad, pad, pad, pad)), self.weight, self.bias, self.stride, 0, 1, self.groups
        )


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv2d(3, 8, 3)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.grouped(torch.relu(self.depthwise(x))))
        x = self.up(x)
        return self.head(x.mean((2, 3)))


class Conv1d3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c3 = nn.Conv3d(6, 4, 3, padding=1)

    def forward(self, x):  # (N, 3, L) -> (N, 4)
        h = torch.relu(self.c1(x))
        return self.c3(h[:, :, None, None, :].expand(-1, -1, 3, 3, -1)).mean((2, 3, 4))


class GatedLinear(nn.Module):
    """A user layer calling F.linear on its own Parameters (LoRA-style low-rank update, a gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 12) * 0.2)
        self.lora_a = nn.Parameter(torch.randn(4, 12) * 0.2)
        self.lora_b = nn.Parameter(torch.randn(16, 4) * 0.2)
        self.gate = nn.Parameter(torch.randn(16, 12) * 0.2)

    def forward(self, x):
        y = F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b)
        return y * torch.sigmoid(F.linear(x, self.gate))


class ConvBatchNorm(nn.Module):
    """Conv -> BatchNorm -> ReLU, as in every ResNet: BatchNorm's 0-dim counter is a buffer too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(self.proj(x))
        return self.out(h[:, -1])


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with distinct query and memory: its in-projection is used in slices."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x.flip(1), x.flip(1), need_weights=False)[0]


def _torch_models() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)

    def encoder():
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    return {
        "nn.TransformerEncoder": (encoder, lambda: torch.randn(8, 16, 16, generator=g)),
        "conv subclass, depthwise, grouped, transposed": (
            Convs,
            lambda: torch.randn(2, 3, 8, 8, generator=g),
        ),
        "Conv1d and Conv3d": (Conv1d3d, lambda: torch.randn(2, 3, 7, generator=g)),
        "F.linear on own Parameters": (GatedLinear, lambda: torch.randn(2, 5, 12, generator=g)),
        "LSTM": (WithLSTM, lambda: torch.randn(2, 4, 6, generator=g)),
        "Conv2d + BatchNorm2d": (ConvBatchNorm, lambda: torch.randn(4, 3, 8, 8, generator=g)),
        "MultiheadAttention (cross)": (CrossAttention, lambda: torch.randn(8, 16, 16, generator=g)),
    }


# ---------------------------------------------------------------------------------------------
# Hugging Face families, random weights from tiny configs (no hub)


def _hf_models() -> dict[str, tuple]:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    g = torch.Generator().manual_seed(0)

    def ids(vocab, t=8):
        return torch.randint(3, vocab, (2, t), generator=g)

    def hf(kind, cls, **kw):
        def build():
            torch.manual_seed(0)
            config = transformers.AutoConfig.for_model(kind, **kw)
            config._attn_implementation = "eager"
            return getattr(transformers, cls)(config)

        return build

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "BERT": (
            hf("bert", "BertForSequenceClassification", vocab_size=100, **small),
            lambda: {"input_ids": ids(100), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
        ),
        "GPT-2": (
            hf("gpt2", "GPT2LMHeadModel", vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32),
            lambda: {"input_ids": ids(100), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
        ),
        "LLaMA": (
            hf("llama", "LlamaForCausalLM", vocab_size=100, num_key_value_heads=2, **small),
            lambda: {"input_ids": ids(100), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
        ),
        "T5": (
            hf("t5", "T5ForConditionalGeneration", vocab_size=100, d_model=32, d_kv=8, d_ff=64,
               num_layers=2, num_heads=4),
            lambda: {"input_ids": ids(100), "decoder_input_ids": ids(100, 4)},
        ),
        "ViT": (
            hf("vit", "ViTForImageClassification", image_size=16, patch_size=4, num_channels=3, **small),
            lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)},
        ),
        "ALBERT": (
            hf("albert", "AlbertForSequenceClassification", vocab_size=100, embedding_size=16, **small),
            lambda: {"input_ids": ids(100), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
        ),
        "Falcon": (
            hf("falcon", "FalconForCausalLM", vocab_size=100, hidden_size=32, num_hidden_layers=1,
               num_attention_heads=4, alibi=False, new_decoder_architecture=False, multi_query=True),
            lambda: {"input_ids": ids(100), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
        ),
        "Whisper": (
            hf("whisper", "WhisperForConditionalGeneration", vocab_size=100, d_model=32, encoder_layers=1,
               decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
               pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2),
            lambda: {
                "input_features": torch.randn(2, 8, 32, generator=g),
                "decoder_input_ids": ids(100, 4),
                "decoder_attention_mask": torch.ones(2, 4, dtype=torch.long),
            },
        ),
    }  # fmt: skip


TORCH_MODELS = list(_torch_models())
HF_MODELS = ["BERT", "GPT-2", "LLaMA", "T5", "ViT", "Whisper", "ALBERT", "Falcon"]
# What each model leaves uncovered (by category), and why that is right.
EXPECTED_UNCOVERED = {
    "LSTM": {"recurrent"},  # lstm.weight_ih_l0 / weight_hh_l0
    "BERT": {"embedding"},
    "GPT-2": {"embedding"},  # wpe; wte is the LM head's tied weight, calibrated there
    "LLaMA": {"embedding"},
    "T5": {"embedding"},  # shared (tied to the encoder/decoder lookups) and relative_attention_bias
    "ViT": {"other-op"},  # cls_token (cat) and position_embeddings (add)
    "Whisper": {"embedding", "other-op"},
    "ALBERT": {"embedding"},  # the decoder's positions are indexed, not looked up
}


def _build(name: str):
    table = {**_torch_models(), **(_hf_models() if name in HF_MODELS else {})}
    build, data = table[name]
    torch.manual_seed(0)
    model = build().eval()
    batches = [octavcal.data.as_batch(data(), "batch") for _ in range(3)]
    return model, batches


@pytest.fixture(scope="module")
def calibrated():
    cache = {}

    def get(name):
        if name not in cache:
            model, batches = _build(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = octavcal.calibrate(
                    model, batches, CalibrationConfig(bits=8, methods=("octav", "max"))
                )
            cache[name] = (model, batches, table)
        return cache[name]

    return get


@pytest.mark.parametrize("name", TORCH_MODELS + HF_MODELS)
def test_every_weight_bearing_op_is_calibrated_or_listed(name, calibrated):
    model, batches, table = calibrated(name)
    reference = reference_products(model, batches[0])
    assert reference, "the reference saw no product with a weight"
    names = {}  # every name of every Parameter -> its first name (tied weights have several)
    firsts = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters(remove_duplicate=False):
        names[n] = firsts[id(p)]
    weights = {names[e.param]: tid for tid, e in table.targets.items() if e.kind == "weight"}
    inputs: dict[str, int] = {}
    for e in table.targets.values():
        if e.kind == "activation" and e.param:
            inputs[names[e.param]] = inputs.get(names[e.param], 0) + 1
    uncovered = {u["parameter"]: u for u in table.meta["uncovered"]}
    for param, calls in reference.items():
        if param in weights and param not in uncovered:
            # one input target per call of the op in a forward pass
            assert inputs.get(param) == calls, (param, inputs.get(param), calls)
        else:
            assert param in uncovered, f"{param} is read by a product but neither calibrated nor listed"
    assert set(weights) <= set(reference), "a weight target the reference never saw multiplied"
    # every floating-point Parameter with 2+ dims is calibrated or listed; both only when some of its
    # products are calibrated and another is not (listed as unmodelled)
    for n, p in model.named_parameters():
        if p.dim() >= 2 and p.is_floating_point():
            assert n in weights or n in uncovered, n
            assert n not in weights or n not in uncovered or uncovered[n]["category"] == "unmodelled", n
    assert {u["category"] for u in uncovered.values()} == EXPECTED_UNCOVERED.get(name, set())


@pytest.mark.parametrize("name", TORCH_MODELS + HF_MODELS)
def test_simulation_at_8_bits_stays_close_to_the_float_model(name, calibrated):
    model, batches, table = calibrated(name)
    (row,) = evaluate(model, [table], batches, ["octav"])
    assert math.isfinite(row.sqnr_db) and row.sqnr_db > 20, row
    # the simulation quantizes every weight target: the outputs differ from float
    assert row.mse > 0


@pytest.mark.parametrize("name", TORCH_MODELS + HF_MODELS)
def test_onnx_export_runs_in_onnxruntime_or_refuses_clearly(name, calibrated, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from octavcal.export.onnx import export_qdq

    model, batches, table = calibrated(name)
    loaded = LoadedModel(model, "module", None)
    try:
        mapping = export_qdq(loaded, table, "octav", batches[0], tmp_path / "m.onnx")
    except OctavcalError as exc:
        message = str(exc)
        assert "\n" not in message and "Traceback" not in message
        assert name in REFUSED, f"{name} refused: {message}"
        assert REFUSED[name] in message, message
        assert not (tmp_path / "m.onnx").exists()
        return
    assert name not in REFUSED
    assert set(mapping["targets"]) == set(table.targets)
    batch = batches[1]
    feeds = {f"input{i}": a.numpy() for i, a in enumerate(batch.args)}
    feeds |= {k: v.numpy() for k, v in batch.kwargs.items()}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    out = session.run(None, feeds)[0]
    with torch.no_grad():
        ref = octavcal.apply_scales(model, table, "octav")(*batch.args, **batch.kwargs)
    ref = ref if isinstance(ref, torch.Tensor) else (ref.logits if hasattr(ref, "logits") else ref[0])
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


# Models whose export is refused, and the words of the refusal.
REFUSED = {
    # sdpa's query/key/value export as a decomposed attention with scaling in between
    "nn.TransformerEncoder": "sdpa operands export as one fused op",
    # q, k and v projections read slices of in_proj_weight: no initializer is the weight
    # the exporter folds BatchNorm into the convolution's weight
    "Conv2d + BatchNorm2d": "folded by the exporter",
    "MultiheadAttention (cross)": "it is sliced (cross-attention's in-projection)",
}


def test_strict_refuses_a_weight_bearing_op_octavcal_does_not_model():
    model, batches = _build("LSTM")
    with pytest.raises(CalibrationError, match=r"'lstm\.weight_ih_l0' \(recurrent weights \(lstm\)"):
        octavcal.calibrate(model, batches, CalibrationConfig(bits=8, methods=("max",), strict=True))
    # an embedding table is a lookup, not an op strict refuses
    if "BERT" in HF_MODELS and _has_transformers():
        model, batches = _build("BERT")
        octavcal.calibrate(model, batches[:1], CalibrationConfig(bits=8, methods=("max",), strict=True))


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_tied_lm_head_is_one_weight_target_noted_as_tied(calibrated):
    pytest.importorskip("transformers")
    model, _, table = calibrated("GPT-2")
    head = table.targets["lm_head:weight"]
    assert head.tied == ["transformer.wte.weight"]
    assert not any(e.param == "transformer.wte.weight" for e in table.targets.values())
    # GPT-2's Conv1D stores (in, out) and runs addmm: output features are along dim 1
    c_attn = table.targets["transformer.h.0.attn.c_attn:weight"]
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    assert c_attn.op == "addmm" and c_attn.axis == 1
    torch.testing.assert_close(c_attn.methods["max"].amax, w.abs().amax(0))


def test_multihead_attention_in_projection_and_its_calls():
    model, batches = _build("nn.TransformerEncoder")
    table = octavcal.calibrate(model, batches, CalibrationConfig(bits=8, methods=("max",)))
    attn = "layers.0.self_attn"
    assert table.targets[f"{attn}:in_proj_weight"].shape == [48, 16]
    x = batches[0].args[0]
    # the in-projection reads the layer's input (norm_first=False: the encoder input itself)
    assert table.targets[f"{attn}:in_proj_weight.input"].methods["max"].per_batch[0] == x.abs().max()
    assert f"{attn}.out_proj:input" in table.targets
    assert {f"{attn}:sdpa0.query", f"{attn}:sdpa0.key", f"{attn}:sdpa0.value"} <= set(table.targets)
    cross = octavcal.calibrate(
        *_build("MultiheadAttention (cross)"), CalibrationConfig(bits=8, methods=("max",))
    )
    assert {"attn:in_proj_weight.input", "attn:in_proj_weight.input1", "attn:in_proj_weight.input2"} <= set(
        cross.targets
    )


def test_library_takes_plain_tensors_tuples_dicts_and_dataloaders():
    model, _ = _build("conv subclass, depthwise, grouped, transposed")
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    config = CalibrationConfig(bits=8, methods=("max",))
    plain = octavcal.calibrate(model, xs, config)
    tuples = octavcal.calibrate(model, [(x, torch.zeros(4)) for x in xs], config)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs)), batch_size=4)
    from_loader = octavcal.calibrate(model, loader, config)
    for tid, entry in plain.targets.items():
        for other in (tuples, from_loader):
            torch.testing.assert_close(other.targets[tid].methods["max"].amax, entry.methods["max"].amax)
    with pytest.raises(octavcal.LoadError, match="Batch 0 is a str"):
        octavcal.calibrate(model, ["not a tensor"], config)
    rows = octavcal.evaluate(model, [plain], xs, ["max"])
    assert rows[0].samples == 8


# ---------------------------------------------------------------------------------------------
# The command line on real architectures


def _cli(*args):
    from click.testing import CliRunner

    from octavcal.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


ARCH_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_architectures import Convs, WithLSTM

def convs():
    return Convs()

def lstm():
    return WithLSTM()
"""


@pytest.fixture
def arch_file(tmp_path):
    from pathlib import Path

    path = tmp_path / "archs.py"
    path.write_text(ARCH_FILE.format(tests=str(Path(__file__).parent)))
    return path


def test_cli_calibrates_compares_and_exports_a_conv2d_subclass(tmp_path, arch_file):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(Convs().state_dict(), tmp_path / "m.safetensors")
    save_file({"x": torch.randn(64, 3, 8, 8)}, tmp_path / "x.safetensors")
    common = ["--arch", f"{arch_file}:convs", "--data", tmp_path / "x.safetensors", "--batch-size", "16"]
    result = _cli("calibrate", tmp_path / "m.safetensors", *common, "--batches", "2", "--methods", "octav,max",
                  "-o", tmp_path / "s.safetensors", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["uncovered"] == [] and summary["weights"] == 5
    table = octavcal.load_scales(tmp_path / "s.safetensors")
    assert table.targets["stem:weight"].op == "conv2d" and table.targets["up:weight"].axis == 1
    result = _cli("compare", tmp_path / "m.safetensors", *common, "--batches", "2", "--heldout-batches", "1",
                  "--methods", "octav,max", "--bits", "8", "--no-plots", "--out", tmp_path / "r", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "stem:weight" in json.dumps(report) and "grouped:input" in json.dumps(report)
    result = _cli("export", "onnx", tmp_path / "m.safetensors", "--arch", f"{arch_file}:convs",
                  "--scales", tmp_path / "s.safetensors", "--data", tmp_path / "x.safetensors",
                  "-o", tmp_path / "m.onnx")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(10 quantized targets)" in result.stdout


def test_cli_lists_uncovered_weights_and_strict_refuses_them(tmp_path, arch_file):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(WithLSTM().state_dict(), tmp_path / "m.safetensors")
    save_file({"x": torch.randn(64, 4, 6)}, tmp_path / "x.safetensors")
    args = ["calibrate", tmp_path / "m.safetensors", "--arch", f"{arch_file}:lstm", "--data",
            tmp_path / "x.safetensors", "--batches", "2", "--methods", "max", "-o", tmp_path / "s.safetensors"]  # fmt: skip
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert "Not calibrated: 2 weights" in result.stdout and "lstm.weight_hh_l0" in result.stdout
    meta = octavcal.load_scales(tmp_path / "s.safetensors").meta
    assert [u["parameter"] for u in meta["uncovered"]] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    (tmp_path / "s.safetensors").unlink()
    result = _cli(*args, "--strict")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: 2 weights are read by ops octavcal does not calibrate: 'lstm.weight_ih_l0' (recurrent "
        "weights (lstm), which octavcal does not model); 'lstm.weight_hh_l0' (recurrent weights (lstm), which "
        "octavcal does not model). Calibrate without strict mode to list them as uncovered.\n"
    )
    assert not (tmp_path / "s.safetensors").exists()


def test_cli_loads_a_hugging_face_folder_with_its_head(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build, _ = _hf_models()["GPT-2"]
    build().save_pretrained(tmp_path / "gpt2")
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, 100, (16, 8), generator=g)}, tmp_path / "ids.safetensors")
    args = ["calibrate", tmp_path / "gpt2", "--data", tmp_path / "ids.safetensors", "--batches", "2",
            "--batch-size", "4", "--methods", "max", "--json"]  # fmt: skip
    with_head = json.loads(_cli(*args, "-o", tmp_path / "a.safetensors").stdout)
    assert with_head["tied"] == {"lm_head:weight": ["transformer.wte.weight"]}
    assert [u["parameter"] for u in with_head["uncovered"]] == ["transformer.wpe.weight"]
    table = octavcal.load_scales(tmp_path / "a.safetensors")
    assert (
        "lm_head:input" in table.targets and table.targets["transformer.h.1.mlp.c_proj:weight"].op == "addmm"
    )
    bare = json.loads(_cli(*args, "--hf-class", "GPT2Model", "-o", tmp_path / "b.safetensors").stdout)
    assert bare["weights"] == with_head["weights"] - 1 and not bare["tied"]
    assert transformers.GPT2Model.__name__ == "GPT2Model"


README_ROWS = {
    "`nn.TransformerEncoder` (2 layers)": "nn.TransformerEncoder",
    "Conv2d subclass, depthwise, grouped, ConvTranspose2d": "conv subclass, depthwise, grouped, transposed",
    "Conv1d and Conv3d": "Conv1d and Conv3d",
    "user layer: `F.linear` on its own Parameters": "F.linear on own Parameters",
    "LSTM between two Linear": "LSTM",
    "Conv2d + BatchNorm2d (as in ResNets)": "Conv2d + BatchNorm2d",
    "ALBERT (`AlbertForSequenceClassification`: one layer run twice)": "ALBERT",
    "Falcon (`FalconForCausalLM`: `x @ W.T`, multi-query)": "Falcon",
    "`nn.MultiheadAttention`, cross-attention": "MultiheadAttention (cross)",
    "BERT (`BertForSequenceClassification`)": "BERT",
    "GPT-2 (`GPT2LMHeadModel`, tied head)": "GPT-2",
    "LLaMA (`LlamaForCausalLM`: GQA, rotary, RMSNorm)": "LLaMA",
    "T5 (`T5ForConditionalGeneration`)": "T5",
    "ViT (`ViTForImageClassification`, patch conv)": "ViT",
    "Whisper (`WhisperForConditionalGeneration`, Conv1d front end)": "Whisper",
}


@pytest.mark.parametrize("label", list(README_ROWS))
def test_the_readme_architecture_table_is_what_calibration_gives(label, calibrated):
    from pathlib import Path

    name = README_ROWS[label]
    if name in HF_MODELS:
        pytest.importorskip("transformers")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith(f"| {label} |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    _, _, table = calibrated(name)
    weights = [e for e in table.targets.values() if e.kind == "weight"]
    inputs = [e for e in table.targets.values() if e.kind == "activation" and e.param]
    operands = [e for e in table.targets.values() if e.kind == "activation" and not e.param]
    assert [int(c) for c in cells[1:4]] == [len(weights), len(inputs), len(operands)]
    assert cells[4] == ", ".join(sorted({e.op for e in weights}))
    assert (cells[5] == "-") == (not table.meta["uncovered"])
    for u in table.meta["uncovered"]:
        assert u["category"] in cells[5]
    assert cells[6].startswith("refused") == (name in REFUSED)


def test_multihead_attention_with_weights_and_a_mask_exposes_both_products():
    mha = nn.MultiheadAttention(16, 2).eval()
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(5, 5)
    mask[:, -1] = float("-inf")

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, attn_mask=mask, need_weights=True)[0]

    table = octavcal.calibrate(Wrapped(), [x], CalibrationConfig(bits=8, methods=("max",)))
    # q @ k^T runs as baddbmm (with the mask), probabilities @ v as bmm
    assert {f"mha:matmul{i}.{s}" for i in (0, 1) for s in ("lhs", "rhs")} <= set(table.targets)
    (row,) = evaluate(Wrapped(), [table], [x], ["max"])
    assert row.sqnr_db > 25


class EinsumLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(6, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.einsum("bi,io->bo", x, self.proj))


class LinearAndEinsum(nn.Module):
    """One weight, read by a Linear and by an einsum: the einsum's product is not calibrated."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        return self.proj(x) + torch.einsum("bi,oi->bo", x, self.proj.weight)


class TransposedUses(nn.Module):
    """Weights stored (out, in) but used transposed, keyword arguments and torch.linalg.matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.k = nn.Parameter(torch.randn(5, 4))
        self.m = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        h = F.linear(input=x @ self.w.T, weight=self.k)
        return torch.linalg.matmul(h, self.m)


def test_a_weight_read_by_a_second_unmodelled_product_is_listed_too():
    x = [torch.randn(8, 6, generator=torch.Generator().manual_seed(0))]
    table = octavcal.calibrate(LinearAndEinsum(), x, CalibrationConfig(bits=8, methods=("max",)))
    assert "proj:weight" in table.targets
    assert table.meta["uncovered"] == [
        {
            "parameter": "proj.weight",
            "shape": [4, 6],
            "category": "unmodelled",
            "reason": "also read by einsum, which octavcal does not model (that use is float)",
        }
    ]
    with pytest.raises(CalibrationError, match="'proj.weight' \\(also read by einsum"):
        octavcal.calibrate(LinearAndEinsum(), x, CalibrationConfig(bits=8, methods=("max",), strict=True))


def test_the_output_channel_axis_follows_how_the_op_reads_the_weight():
    model = TransposedUses()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    table = octavcal.calibrate(model, [x], CalibrationConfig(bits=8, methods=("max",)))
    # x @ w.T: w's rows are the output features; F.linear(weight=k): k's rows; linalg.matmul(h, m): columns
    assert [table.targets[t].axis for t in ("<root>:w", "<root>:k", "<root>:m")] == [0, 0, 1]
    torch.testing.assert_close(table.targets["<root>:w"].methods["max"].amax, model.w.detach().abs().amax(1))
    torch.testing.assert_close(table.targets["<root>:m"].methods["max"].amax, model.m.detach().abs().amax(0))
    assert table.meta["uncovered"] == []
    (row,) = evaluate(model, [table], [x], ["max"])
    assert row.sqnr_db > 35


def test_an_einsum_weight_is_listed_as_unmodelled_and_strict_refuses_it():
    x = [torch.randn(8, 6, generator=torch.Generator().manual_seed(0))]
    table = octavcal.calibrate(EinsumLayer(), x, CalibrationConfig(bits=8, methods=("max",)))
    assert table.meta["uncovered"] == [
        {
            "parameter": "proj",
            "shape": [6, 4],
            "category": "unmodelled",
            "reason": "read by einsum, a product octavcal does not model",
        }
    ]
    with pytest.raises(
        CalibrationError, match=r"^1 weights are read by ops octavcal does not calibrate: 'proj'"
    ):
        octavcal.calibrate(EinsumLayer(), x, CalibrationConfig(bits=8, methods=("max",), strict=True))


def test_compare_measures_every_target_of_a_gpt2(calibrated):
    pytest.importorskip("transformers")
    model, batches, table = calibrated("GPT-2")
    report = octavcal.compare(model, batches, None, CalibrationConfig(bits=8, methods=("octav", "max")))
    assert set(report.targets) == set(table.targets)
    c_fc = report.targets["transformer.h.0.mlp.c_fc:weight"]
    w = model.transformer.h[0].mlp.c_fc.weight.detach()
    row = next(r for r in c_fc.rows if r.method == "max")
    # the error of max-scaling per output feature (dim 1 of Conv1D's weight), recomputed in float64
    step = w.abs().amax(0, keepdim=True).double() / 127
    ref = ((w.double() / step).round().clamp(-127, 127) * step - w.double()).square().mean()
    assert row.mse == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.gpu
def test_calibration_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    model, batches = _build("F.linear on own Parameters")
    config = CalibrationConfig(bits=8, methods=("octav", "max", "p99.99"))
    cpu = octavcal.calibrate(model, batches, config)
    on_gpu = [octavcal.data.as_batch(b.args[0].cuda(), "b") for b in batches]
    gpu = octavcal.calibrate(model.cuda(), on_gpu, config)
    assert set(gpu.targets) == set(cpu.targets)
    for tid, entry in cpu.targets.items():
        for method, result in entry.methods.items():
            torch.testing.assert_close(gpu.targets[tid].methods[method].amax, result.amax, rtol=1e-5, atol=0)


class TwoComputedWeights(nn.Module):
    """One module computing a different weight for each of its two linear calls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return F.linear(F.linear(x, self.w * 2.0), self.w.t() * 0.5)


def test_each_call_with_a_computed_weight_has_its_own_weight_target():
    model = TwoComputedWeights()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    table = octavcal.calibrate(model, [x], CalibrationConfig(bits=8, methods=("max",)))
    w = model.w.detach()
    torch.testing.assert_close(table.targets["<root>:weight"].methods["max"].amax, (w * 2).abs().amax(1))
    torch.testing.assert_close(
        table.targets["<root>:weight1"].methods["max"].amax, (w.t() * 0.5).abs().amax(1)
    )
    (row,) = evaluate(model, [table], [x], ["max"])
    assert row.sqnr_db > 35


@pytest.mark.parametrize("family", ["BERT", "GPT-2", "LLaMA"])
def test_the_one_pass_route_equals_the_copy_route_on_hugging_face_families(family, monkeypatch, scan_routes):
    """OCTAV, percentiles and max through the one pass over valid tokens in place (``scan.py``) give
    the same per-batch candidates, bit for bit, as the route that copies each activation without
    its padding first, on real architectures: GPT-2's Conv1D (addmm), LLaMA's gated MLP and rotary
    attention, BERT's padded batches. The models are made wide enough that most activations hold
    over 4K values (the route needs more than octav()'s sort threshold)."""
    transformers = pytest.importorskip("transformers")
    from octavcal import candidates

    transformers.logging.set_verbosity_error()
    wide = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    config = {
        "BERT": ("bert", "BertModel", dict(vocab_size=100, **wide)),
        "GPT-2": ("gpt2", "GPT2LMHeadModel", dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4)),
        "LLaMA": ("llama", "LlamaForCausalLM", dict(vocab_size=100, num_key_value_heads=2, **wide)),
    }[family]
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(config[0], **config[2])
    cfg._attn_implementation = "eager"
    model = getattr(transformers, config[1])(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        lengths = torch.randint(40, 97, (6,), generator=g)
        mask = (torch.arange(96)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": torch.randint(3, 100, (6, 96), generator=g), "attention_mask": mask})
    methods = ("octav", "p99.9", "p99.99", "max")
    monkeypatch.setattr(candidates, "SCAN_MIN", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scanned = octavcal.calibrate(model, batches, CalibrationConfig(bits=8, methods=methods))
        assert sum(scan_routes) >= 8, scan_routes
        monkeypatch.setattr(candidates, "SCAN_MIN", 1 << 62)
        copied = octavcal.calibrate(model, batches, CalibrationConfig(bits=8, methods=methods))
    assert scanned.targets.keys() == copied.targets.keys()
    masked = 0
    for tid, entry in copied.targets.items():
        other = scanned.targets[tid]
        assert (other.signed, other.masked) == (entry.signed, entry.masked), tid
        masked += entry.masked
        for name, scales in entry.methods.items():
            assert torch.equal(other.methods[name].amax, scales.amax), (tid, name)
            if scales.per_batch is not None:
                assert torch.equal(other.methods[name].per_batch, scales.per_batch), (tid, name)
    assert masked > 0
