"""Train the sample models on scikit-learn's bundled digits and write checkpoints and data.

    python -m sample_models.build      # needs scikit-learn; deterministic on CPU

Writes beside this file: <model>.safetensors (state dict), and for each model calib.safetensors
(calibration inputs from the training split) and heldout.safetensors (test split, with labels).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .digits_cnn import DigitsCNN
from .digits_transformer import DigitsTransformer

HERE = Path(__file__).parent


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


def random_padding(n: int, gen: torch.Generator) -> torch.Tensor:
    """Masks keeping the first 5..8 rows of each digit: padded rows carry no data."""
    keep = torch.randint(5, 9, (n,), generator=gen)
    return (torch.arange(8)[None, :] < keep[:, None]).float()


def train(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(64):
            loss = F.cross_entropy(model(**{k: v[idx] for k, v in inputs.items()}), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(**inputs).argmax(1) == labels).float().mean())


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_test, y_test = load_digits_split()
    gen = torch.Generator().manual_seed(2)

    cnn = DigitsCNN()
    train(cnn, {"x": x_train[:, None]}, y_train, epochs=30, lr=3e-3)
    cnn.eval()
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, HERE / "digits_cnn.safetensors")
    save_file({"x": x_train[:, None].contiguous()}, HERE / "digits_cnn.calib.safetensors")
    save_file({"x": x_test[:, None].contiguous(), "labels": y_test}, HERE / "digits_cnn.heldout.safetensors")
    print(f"digits_cnn: test accuracy {accuracy(cnn, {'x': x_test[:, None]}, y_test):.4f}")

    tfm = DigitsTransformer()
    mask_train, mask_test = random_padding(len(y_train), gen), random_padding(len(y_test), gen)
    train(tfm, {"x": x_train, "attention_mask": mask_train}, y_train, epochs=60, lr=2e-3)
    tfm.eval()
    save_file(
        {k: v.contiguous() for k, v in tfm.state_dict().items()}, HERE / "digits_transformer.safetensors"
    )
    save_file({"x": x_train, "attention_mask": mask_train}, HERE / "digits_transformer.calib.safetensors")
    save_file(
        {"x": x_test, "attention_mask": mask_test, "labels": y_test},
        HERE / "digits_transformer.heldout.safetensors",
    )
    acc = accuracy(tfm, {"x": x_test, "attention_mask": mask_test}, y_test)
    print(f"digits_transformer: test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
