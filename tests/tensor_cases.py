"""Inputs and tolerances shared by the tests."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import TypeVar

import pytest
import torch

from distlearn_cuda import _C

# For tests of the CUDA path: they run where the extension has its CUDA
# flavor and a GPU is present, and are reported as skipped elsewhere.
needs_gpu = pytest.mark.skipif(
    not (_C.has_cuda and torch.cuda.is_available()),
    reason="needs the CUDA flavor of _C and a GPU",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Odd sizes: a single element, sizes that leave every vector width a tail,
# a tensor past the CPU engine's per-thread threshold (2^18 elements), an
# empty one, and multi-dimensional shapes.
ODD_SHAPES = [(1,), (3,), (1023,), (65537,), (0,), (5, 7), (3, 1, 11), (300_007,), (17, 13)]

_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance(*dtypes: torch.dtype) -> dict[str, float]:
    """rtol/atol for values of order 1 that went through all of ``dtypes``."""
    tol = max(_TOLERANCE[d] for d in dtypes)
    return {"rtol": tol, "atol": tol}


def random_tensors(
    shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], generator: torch.Generator
) -> list[torch.Tensor]:
    """Fresh N(0, 1) tensors, one per (shape, dtype)."""
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        for shape, dtype in zip(shapes, dtypes, strict=True)
    ]


def poisoned_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Same shapes and strides, every element NaN: an element a kernel forgets shows."""
    return [torch.full_like(t, float("nan")) for t in tensors]


T = TypeVar("T")

# Choices made while tests are collected (parameters drawn into test ids):
# under pytest-xdist every worker collects, and all must draw alike, so the
# run's id (the same on every worker, new each run) seeds them.
_COLLECTION = random.Random(os.environ.get("PYTEST_XDIST_TESTRUNUID"))


def collection_choice(options: Sequence[T]) -> T:
    """One of ``options``, drawn anew each run but alike on every worker."""
    return _COLLECTION.choice(options)


def fresh_seed() -> int:
    """A new seed each run, printed so a failure can be replayed:
    ``DISTLEARN_SEED=S`` gives every test that draws one the seed ``S``."""
    seed = int(os.environ.get("DISTLEARN_SEED") or random.randrange(2**31))
    print(f"seed {seed}")
    return seed
