"""QAT on the sample digits CNN: full precision, max-scaling and OCTAV with STE, PWL, MAD and MPH.

The shape of the paper's Table 1 and Figure 4, on a model that trains in seconds: from scratch and
retraining from the shipped checkpoint, at --bits (default 4 and 2), over --seeds seeds. Reports mean
and spread of test accuracy, a convergence plot, and the fraction of the weights clipped at the first
iteration that never moved (Proposition 4.2: PWL stops them; MAD does not).

    pip install scikit-learn            # the digits split comes from sample_models.build
    python examples/qat_demo.py --out docs/qat
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from octavcal import octav  # noqa: E402
from octavcal.qat import prepare_qat  # noqa: E402
from sample_models.build import load_digits_split  # noqa: E402
from sample_models.digits_cnn import DigitsCNN  # noqa: E402

CONFIGS = {  # name: (weights/activations scaler, estimator); None = full precision
    "full precision": None,
    "max-scaling": ("max", "ste"),
    "OCTAV+STE": ("octav", "ste"),
    "OCTAV+PWL": ("octav", "pwl"),
    "OCTAV+MAD": ("octav", "mad"),
    "OCTAV+MPH": ("octav", "mph"),
}


def run(config, bits, seed, pretrained, epochs, lr, data):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = DigitsCNN()
    if pretrained:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ROOT / "sample_models" / "digits_cnn.safetensors")))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    # Weights beyond the first iteration's OCTAV scalar are clipped: PWL gives them no gradient.
    clipped = {
        n: w.abs() > octav(w, bits, signed=True, axis=0).reshape(-1, *[1] * (w.dim() - 1))
        for n, w in start.items()
    }
    net = (
        model
        if config is None
        else prepare_qat(
            model, bits=bits, weights=config[0], activations=config[0], grad=config[1], first_last_bits=None
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(64):
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            curve.append(float((net(x_test).argmax(1) == y_test).float().mean()))
    weights = {
        n.replace(".parametrizations.weight.original", ".weight"): p.detach()
        for n, p in model.named_parameters()
        if "weight" in n
    }
    never_moved = sum(int(((weights[n] == w0) & clipped[n]).sum()) for n, w0 in start.items())
    return curve, never_moved / max(sum(int(m.sum()) for m in clipped.values()), 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--retrain-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/qat"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # small batches: threads cost more than they give, and runs are reproducible
    x_train, y_train, x_test, y_test = load_digits_split()
    data = (x_train[:, None], y_train, x_test[:, None], y_test)
    results, curves = [], {}
    for mode, epochs, lr, pretrained in (
        ("scratch", args.epochs, 3e-3, False),
        ("retrain", args.retrain_epochs, 3e-4, True),
    ):
        for bits in [int(b) for b in args.bits.split(",")]:
            for name, config in CONFIGS.items():
                if config is None and bits != int(args.bits.split(",")[0]):
                    continue  # full precision does not depend on bits
                accs, stucks, t0 = [], [], time.time()
                for seed in range(args.seeds):
                    curve, stuck = run(config, bits, seed, pretrained, epochs, lr, data)
                    accs.append(curve[-1])
                    stucks.append(stuck)
                    curves.setdefault(f"{mode} {bits}-bit {name}", []).append(curve)
                row = {
                    "mode": mode,
                    "bits": None if config is None else bits,
                    "config": name,
                    "accuracy_mean": statistics.mean(accs),
                    "accuracy_std": statistics.pstdev(accs),
                    "stuck_weights": statistics.mean(stucks),
                    "seeds": args.seeds,
                    "seconds": time.time() - t0,
                }
                results.append(row)
                print(
                    f"{mode:8} {row['bits'] or 'fp':>3} {name:15} {100 * row['accuracy_mean']:6.2f} "
                    f"± {100 * row['accuracy_std']:.2f}  "
                    f"clipped & never moved {100 * row['stuck_weights']:.1f}%  "
                    f"({row['seconds']:.0f}s)",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"results": results, "curves": curves}, indent=1))
    _plot(curves, args.out / "convergence.png")


def _plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in curves if k.startswith("scratch")]
    bits = sorted({k.split()[1] for k in keys})
    fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 3.6), squeeze=False)
    for ax, b in zip(axes[0], bits, strict=True):
        for key in keys:
            if key.split()[1] == b or "full precision" in key:
                mean = torch.tensor(curves[key]).mean(0)
                ax.plot(range(1, len(mean) + 1), mean, label=key.split(" ", 2)[2])
        ax.set(
            title=f"From scratch, {b} (mean over seeds)",
            xlabel="epoch",
            ylabel="test accuracy",
            ylim=(0.5, 1),
        )
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
