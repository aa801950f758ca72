"""A two-layer transformer encoder reading an 8x8 digit as 8 tokens (its rows).

Attention is written with explicit matmuls (softmax(Q K^T / sqrt(d)) V), so every batched matrix
multiplication is visible to calibration; ``sdpa=True`` uses scaled_dot_product_attention instead.
An ``attention_mask`` (B, 8) marks real rows (1) and padding (0).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))  # (B, H, T, Dh)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4  # padded keys get no attention
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads) + bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.output(ctx.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, sdpa: bool) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads, sdpa)
        self.norm1 = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, mask))
        return self.norm2(x + self.output(F.gelu(self.intermediate(x))))


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, layers: int = 2, sdpa: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.zeros(8, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden, sdpa) for _ in range(layers))
        self.classifier = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, 8, 8) rows as tokens -> logits (B, 10)
        mask = torch.ones(x.shape[:2], device=x.device) if attention_mask is None else attention_mask
        h = self.embed(x) + self.position
        for layer in self.layers:
            h = layer(h, mask)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.classifier(pooled)


def build() -> DigitsTransformer:
    """The architecture for ``--arch sample_models.digits_transformer:build``."""
    return DigitsTransformer()


def build_sdpa() -> DigitsTransformer:
    """The same weights' architecture with scaled_dot_product_attention (hides probabilities @ V)."""
    return DigitsTransformer(sdpa=True)
