"""QAT: each gradient estimator against its formula, Proposition 4.1's premise, and prepare_qat's contract."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from octavcal import SpecError, fake_quantize, octav
from octavcal.qat import fake_quantize_with_grad, prepare_qat, strip
from octavcal.simulate import apply_scales

S = 1.5
# inside, at +-s, beyond (signed); the formulas of Section 4 and eq. (10)
POINTS = torch.tensor([-4.0, -S, -0.7, 0.0, 0.3, S, 2.0, 6.0], dtype=torch.float64)
EXPECTED = {
    "ste": [1, 1, 1, 1, 1, 1, 1, 1],
    "pwl": [0, 1, 1, 1, 1, 1, 0, 0],
    "mad": [S / 4, 1, 1, 1, 1, 1, S / 2, S / 6],
}
# unsigned (Appendix A): MAD is 1 for x <= s and s/x above; PWL is 1 on [0, s]
UNSIGNED_POINTS = torch.tensor([-1.0, 0.0, 0.3, S, 3.0], dtype=torch.float64)
UNSIGNED_EXPECTED = {"ste": [1, 1, 1, 1, 1], "pwl": [0, 1, 1, 1, 0], "mad": [1, 1, 1, 1, S / 3]}


def grad_of(points, estimator, signed):
    x = points.clone().requires_grad_(True)
    y = fake_quantize_with_grad(
        x, torch.tensor(S, dtype=torch.float64), 4, signed=signed, estimator=estimator
    )
    y.sum().backward()
    return x.grad, y


@pytest.mark.parametrize("estimator", ["ste", "pwl", "mad"])
def test_estimator_gradients_follow_the_formulas(estimator):
    g, y = grad_of(POINTS, estimator, signed=True)
    torch.testing.assert_close(g, torch.tensor(EXPECTED[estimator], dtype=torch.float64))
    torch.testing.assert_close(y, fake_quantize(POINTS, S, 4))  # the forward pass is the grid's Q(x)
    gu, _ = grad_of(UNSIGNED_POINTS, estimator, signed=False)
    torch.testing.assert_close(gu, torch.tensor(UNSIGNED_EXPECTED[estimator], dtype=torch.float64))


def test_mad_is_continuous_at_s_and_clipping_scalar_gets_no_gradient():
    eps = 1e-9
    g, _ = grad_of(torch.tensor([S - eps, S + eps, -S - eps], dtype=torch.float64), "mad", signed=True)
    torch.testing.assert_close(g, torch.ones(3, dtype=torch.float64), atol=1e-8, rtol=0)
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    amax = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    fake_quantize_with_grad(x, amax, 4, signed=True, estimator="mad").sum().backward()
    assert amax.grad is None


def test_ste_gradient_variance_exceeds_the_true_gradients_when_clipping():
    """Proposition 4.1's premise: E[(dQ/dx)^2] is 1 under STE but Pr(|X| <= s) < 1 for the true (PWL,
    in the discretization region) derivative, so STE's back-propagated gradients have more variance."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=gen, dtype=torch.float64)
    s = octav(x, 4).item()
    upstream = torch.randn(100_000, generator=gen, dtype=torch.float64)
    grads = {}
    for est in ("ste", "pwl"):
        xx = x.clone().requires_grad_(True)
        (
            fake_quantize_with_grad(xx, torch.tensor(s, dtype=torch.float64), 4, signed=True, estimator=est)
            * upstream
        ).sum().backward()
        grads[est] = xx.grad
    clipped = (x.abs() > s).double().mean().item()
    assert clipped > 0
    ratio = grads["ste"].var().item() / grads["pwl"].var().item()
    assert ratio == pytest.approx(1 / (1 - clipped), rel=0.05) and ratio > 1


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(8, 16), nn.Linear(16, 3), nn.LayerNorm(16)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = self.norm(h @ torch.eye(16))  # a matmul operand to quantize
        return self.fc2(h)


def data(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def test_prepare_qat_keeps_parameters_and_trains():
    torch.manual_seed(0)
    model = Tiny()
    params = list(model.parameters())
    norm_before = {k: v.clone() for k, v in model.norm.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    qat = prepare_qat(model, bits=4, grad="mph")
    assert {id(p) for p in qat.parameters()} == {id(p) for p in params}  # the optimizer's view is unchanged
    assert all(torch.equal(v, model.norm.state_dict()[k]) for k, v in norm_before.items())
    x, y = data()
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert {"fc1:input", "fc2:input", "<root>:matmul0.lhs", "<root>:matmul0.rhs"} <= set(
        qat.activation_quantizers
    )
    # The forward pass quantized fc1's weight per output feature with dynamic OCTAV of the current weight.
    with torch.no_grad():
        qat(x)
    q = qat.weight_quantizers["fc1:weight"]
    w = model.fc1.parametrizations.weight.original
    torch.testing.assert_close(q.amax, octav(w.detach(), 4, signed=True, axis=0), rtol=1e-5, atol=0)


def test_strip_returns_a_plain_model_and_its_scales():
    torch.manual_seed(1)
    model = Tiny()
    qat = prepare_qat(model, bits=4, activations="max")
    x, _ = data(64)
    with torch.no_grad():
        out_qat = qat(x)
    plain, table = strip(qat)
    assert sorted(plain.state_dict()) == sorted(Tiny().state_dict())  # original names, loadable as before
    # the file names the scalers that were used: dynamic OCTAV for weights, max for activations
    assert table.methods == ["octav+max"] and table.meta["source"] == "qat"
    assert table.targets["fc1:weight"].methods["octav+max"].amax.shape == (16,)
    assert table.targets["fc1:input"].methods["octav+max"].amax.item() == pytest.approx(x.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(apply_scales(plain, table, "octav+max")(x), out_qat, rtol=1e-5, atol=1e-5)


def test_static_and_first_last_options():
    from octavcal import CalibrationConfig, calibrate
    from octavcal.core import Batch

    torch.manual_seed(2)
    model = Tiny()
    x, _ = data(32)
    table = calibrate(model, [Batch((x,))], CalibrationConfig(bits=4, methods=("octav",)))
    qat = prepare_qat(
        model,
        bits=4,
        weights="static",
        activations="static",
        scales=table,
        first_last_bits=8,
        example=Batch((x,)),
    )
    with torch.no_grad():
        qat(x)
    assert qat.weight_quantizers["fc1:weight"].bits == 8 and qat.weight_quantizers["fc2:weight"].bits == 8
    assert torch.equal(
        qat.activation_quantizers["<root>:matmul0.lhs"].amax, table.amax("<root>:matmul0.lhs", "octav")
    )
    with pytest.raises(SpecError, match="Unknown grad option 'sgd'"):
        prepare_qat(Tiny(), grad="sgd")


@pytest.mark.gpu
def test_qat_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    torch.manual_seed(0)
    cpu = Tiny()
    gpu = copy.deepcopy(cpu).cuda()
    x, y = data()
    grads = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        qat = prepare_qat(model, bits=4)
        F.cross_entropy(qat(x.to(device)), y.to(device)).backward()
        grads.append(model.fc1.parametrizations.weight.original.grad.cpu())
        amax = qat.weight_quantizers["fc1:weight"].amax.cpu()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(amax, octav(cpu.fc1.parametrizations.weight.original.detach(), 4, axis=0))
