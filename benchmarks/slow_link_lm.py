"""The slow-link benchmark's language model and data (``bench_slow_link``).

A small decoder-only transformer over bytes (vocabulary 256) trained on the
Python standard library's own source files: text every machine with Python
has, offline. The files (``*.py`` under ``sysconfig.get_paths()["stdlib"]``,
``site-packages`` left out, sorted) are split into train and validation by a
hash of their path relative to the standard library, so the split is the
same on every machine with the same Python.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ByteLM",
    "ModelShape",
    "Split",
    "evaluate",
    "loss_of",
    "lr_factor",
    "sample_batch",
    "split_stdlib",
    "validation_set",
]

VOCAB = 256
VALIDATION_BUCKETS = 20  # one path hash bucket in 20 (~5% of the files) is validation


@dataclass(frozen=True)
class ModelShape:
    """The transformer's size and the sequences it trains on."""

    width: int  # model dimension
    layers: int
    heads: int
    context: int  # bytes per sequence

    def num_params(self) -> int:
        """Parameters of ``ByteLM(self)`` (the output layer is the embedding's)."""
        return sum(p.numel() for p in ByteLM(self).parameters())


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class ByteLM(nn.Module):
    """Decoder-only transformer over bytes: learned positions, tied output layer."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        if shape.width % shape.heads:
            raise ValueError(f"width {shape.width} is not a multiple of heads {shape.heads}")
        self.embed = nn.Embedding(VOCAB, shape.width)
        self.position = nn.Parameter(torch.zeros(shape.context, shape.width))
        self.blocks = nn.ModuleList(Block(shape.width, shape.heads) for _ in range(shape.layers))
        self.norm = nn.LayerNorm(shape.width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the next byte, shape ``(*tokens.shape, 256)``."""
        x = self.embed(tokens) + self.position[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def loss_of(model: nn.Module, sequences: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over ``sequences`` (``(batch, context + 1)``),
    with ``params`` (by name) standing in for the model's own when given."""
    inputs, targets = sequences[:, :-1].long(), sequences[:, 1:].long()
    if params is None:
        logits = model(inputs)
    else:
        logits = torch.func.functional_call(model, params, (inputs,))
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module, sequences: torch.Tensor, params: dict | None = None, chunk: int = 64
) -> float:
    """Mean validation loss (nats per byte) over all of ``sequences``, in chunks."""
    total = 0.0
    for start in range(0, sequences.shape[0], chunk):
        part = sequences[start : start + chunk]
        total += loss_of(model, part, params).item() * part.shape[0]
    return total / sequences.shape[0]


@dataclass(frozen=True)
class Split:
    """The standard library's source bytes, split by file into train and validation."""

    train: bytes
    validation: bytes
    train_files: int
    validation_files: int
    root: str


def split_stdlib(root: Path | None = None) -> Split:
    """Reads the standard library's ``*.py`` files (sorted, ``site-packages`` left
    out) and splits them by a SHA-256 of their relative path: bucket 0 of
    ``VALIDATION_BUCKETS`` is validation. Files joined by a NUL byte."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    train: list[bytes] = []
    validation: list[bytes] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative.split("/") or not path.is_file():
            continue
        digest = hashlib.sha256(relative.encode()).digest()
        (validation if digest[0] % VALIDATION_BUCKETS == 0 else train).append(path.read_bytes())
    return Split(b"\0".join(train), b"\0".join(validation), len(train), len(validation), str(root))


def sample_batch(
    data: torch.Tensor, batch: int, context: int, generator: torch.Generator
) -> torch.Tensor:
    """``batch`` windows of ``context + 1`` bytes at random offsets of ``data`` (uint8)."""
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + context + 1] for s in starts.tolist()])


def validation_set(data: torch.Tensor, sequences: int, context: int, seed: int) -> torch.Tensor:
    """A fixed validation set: ``sequences`` windows drawn with ``seed``."""
    return sample_batch(data, sequences, context, torch.Generator().manual_seed(seed))


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
